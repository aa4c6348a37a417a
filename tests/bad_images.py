"""A corpus of bad and odd image files, generated on the fly (nothing binary is committed).

Used by tests of core.images and, later, of the CLIs and the dashboard upload path:

    corpus = make_image_corpus(tmp_path)          # {case: (path, "ok" | "error")}

Each "ok" case must load as an RGB picture; each "error" case must raise one clear ImageError. The
outcomes assume the default `ImageLimits()`. Cases whose content is checked more closely (colours,
orientation) are documented next to the function that makes them.
"""
from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

from PIL import Image, ImageDraw

RED, BLUE, GREEN = (255, 0, 0), (0, 0, 255), (0, 255, 0)


def split_image(size: tuple[int, int] = (200, 100), left=RED, right=BLUE) -> Image.Image:
    """Landscape RGB picture: left half `left`, right half `right` (so orientation can be checked)."""
    img = Image.new("RGB", size, right)
    img.paste(left, (0, 0, size[0] // 2, size[1]))
    return img


def jpeg_bytes(img: Image.Image, **save_kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90, **save_kwargs)
    return buf.getvalue()


def png_bytes(img: Image.Image, **save_kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG", **save_kwargs)
    return buf.getvalue()


def exif_rotated_jpeg(orientation: int) -> bytes:
    """Raw pixels are the 200x100 red-left/blue-right picture; EXIF says how to turn it upright.

    Upright result: 6 -> 100x200 red on top; 8 -> 100x200 red at the bottom; 3 -> 200x100 red on the right.
    """
    img = split_image()
    exif = Image.Exif()
    exif[0x0112] = orientation
    return jpeg_bytes(img, exif=exif.tobytes())


def set_jpeg_size(data: bytes, width: int, height: int) -> bytes:
    """Rewrite the SOF0 header of a baseline JPEG to declare another size (the pixel data stays tiny)."""
    at = data.index(b"\xff\xc0")
    return data[:at + 5] + struct.pack(">HH", height, width) + data[at + 9:]


def png_declaring(width: int, height: int) -> bytes:
    """A hand-made PNG whose IHDR declares width x height but whose IDAT holds a few bytes: a bomb."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


def animated(fmt: str) -> bytes:
    """Two frames: red then blue. The first frame (red) is the one to caption."""
    frames = [Image.new("RGB", (40, 30), RED), Image.new("RGB", (40, 30), BLUE)]
    buf = io.BytesIO()
    extra = {"lossless": True} if fmt == "WEBP" else {}
    frames[0].save(buf, fmt, save_all=True, append_images=frames[1:], duration=100, loop=0, **extra)
    return buf.getvalue()


def make_huge_jpeg(path: Path, side: int = 10_000) -> Path:
    """A real side x side JPEG (300 MB decoded at full size): red top half, blue bottom half.

    Building it briefly needs ~300 MB in this process; loading it must not.
    """
    img = Image.new("RGB", (side, side), BLUE)
    ImageDraw.Draw(img).rectangle((0, 0, side - 1, side // 2 - 1), fill=RED)
    img.save(path, "JPEG", quality=75)
    del img
    return path


def image_cases() -> dict[str, tuple[str, bytes, str]]:
    """case -> (file name, bytes, expected outcome)."""
    rgb = split_image()
    cases: dict[str, tuple[str, bytes, str]] = {}

    def add(case: str, filename: str, data: bytes, outcome: str) -> None:
        cases[case] = (filename, data, outcome)

    # --- loadable, if odd ---
    add("rgb_jpeg", "rgb.jpg", jpeg_bytes(rgb), "ok")
    add("progressive_jpeg", "progressive.jpg", jpeg_bytes(rgb, progressive=True), "ok")
    add("cmyk_jpeg", "cmyk.jpg", jpeg_bytes(Image.new("CMYK", (64, 48), (0, 255, 255, 0))), "ok")  # red
    add("grayscale_jpeg", "gray.jpg", jpeg_bytes(Image.new("L", (64, 48), 128)), "ok")
    add("grayscale_png", "gray.png", png_bytes(Image.new("L", (64, 48), 200)), "ok")
    add("bilevel_png", "bilevel.png", png_bytes(Image.new("1", (64, 48), 1)), "ok")
    add("png_16bit_midgrey", "grey16.png", png_bytes(Image.new("I;16", (64, 48), 32768)), "ok")
    gradient = Image.new("I;16", (256, 4))
    gradient.putdata([x * 257 for x in range(256)] * 4)        # 0 .. 65535 left to right
    add("png_16bit_gradient", "gradient16.png", png_bytes(gradient), "ok")
    palette = Image.new("P", (32, 32), 1)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * (256 * 3 - 6))
    palette.paste(0, (0, 0, 16, 32))                            # left half = index 0 = transparent black
    add("palette_transparent_png", "palette.png", png_bytes(palette, transparency=0), "ok")
    add("palette_transparent_gif", "palette.gif", _gif(palette), "ok")
    rgba = Image.new("RGBA", (32, 32), (0, 0, 0, 0))            # fully transparent black -> white
    rgba.paste((0, 255, 0, 255), (16, 0, 32, 32))               # right half opaque green
    add("rgba_png", "rgba.png", png_bytes(rgba), "ok")
    add("la_png", "la.png", png_bytes(Image.new("LA", (32, 32), (0, 0))), "ok")
    add("animated_gif", "animated.gif", animated("GIF"), "ok")
    add("animated_webp", "animated.webp", animated("WEBP"), "ok")
    for orientation in (3, 6, 8):
        add(f"exif_orientation_{orientation}", f"exif{orientation}.jpg", exif_rotated_jpeg(orientation), "ok")
    add("one_pixel_png", "one.png", png_bytes(Image.new("RGB", (1, 1), GREEN)), "ok")
    add("wide_strip_png", "strip.png", png_bytes(Image.new("RGB", (3000, 2), GREEN)), "ok")
    add("png_named_jpg", "actually_png.jpg", png_bytes(rgb), "ok")
    add("jpeg_uppercase_ext", "PHOTO.JPEG", jpeg_bytes(rgb), "ok")
    buf = io.BytesIO(); rgb.save(buf, "BMP"); add("bmp", "image.bmp", buf.getvalue(), "ok")
    buf = io.BytesIO(); rgb.save(buf, "TIFF", save_all=True, append_images=[Image.new("RGB", (9, 9))])
    add("multipage_tiff", "pages.tiff", buf.getvalue(), "ok")
    add("jpeg_trailing_garbage", "trailing.jpg", jpeg_bytes(rgb) + b"\0garbage" * 100, "ok")

    # --- not decodable ---
    full_jpeg, full_png = jpeg_bytes(Image.effect_noise((256, 256), 60).convert("RGB")), png_bytes(
        Image.effect_noise((256, 256), 60).convert("RGB"))
    add("empty_file", "empty.jpg", b"", "error")
    add("text_as_jpg", "notes.jpg", b"Dear diary,\nthis is not a picture.\n" * 20, "error")
    add("html_as_jpg", "download.jpg",
        b"<!DOCTYPE html>\n<html><head><title>403 Forbidden</title></head><body>no</body></html>\n", "error")
    add("svg", "drawing.svg", b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="10" '
        b'height="10"><rect width="10" height="10" fill="red"/></svg>\n', "error")
    add("svg_named_png", "drawing.png", b'<svg xmlns="http://www.w3.org/2000/svg"><circle r="4"/></svg>', "error")
    add("truncated_jpeg", "truncated.jpg", full_jpeg[: len(full_jpeg) // 2], "error")
    add("truncated_png", "truncated.png", full_png[: len(full_png) // 2], "error")
    add("jpeg_header_only", "header.jpg", full_jpeg[:40], "error")
    mid = len(full_png) // 2                                     # inside the compressed pixel data
    add("png_corrupt_data", "corrupt.png", full_png[:mid] + bytes(64) + full_png[mid + 64:], "error")
    add("heic_as_jpg", "iphone.jpg", b"\0\0\0\x18ftypheic\0\0\0\0mif1heic" + bytes(512), "error")
    add("bomb_png", "bomb.png", png_declaring(100_000, 100_000), "error")            # Pillow refuses too
    add("bomb_jpeg_over_limit", "bomb.jpg", set_jpeg_size(jpeg_bytes(rgb), 11_000, 11_000), "error")
    add("random_bytes", "noise.jpg", bytes((i * 7919 + 13) % 251 for i in range(4096)), "error")
    buf = io.BytesIO(); Image.new("RGB", (32, 32), RED).save(buf, "ICO")
    add("unsupported_ico", "favicon.ico", buf.getvalue(), "error")
    return cases


def _gif(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "GIF", transparency=0)
    return buf.getvalue()


def make_image_corpus(dir: Path, *, include_huge: bool = False) -> dict[str, tuple[Path, str]]:
    """Write every case into `dir`; return case -> (path, "ok" | "error") for the default ImageLimits.

    include_huge adds "huge_jpeg_10000" (a real 10000x10000 JPEG, ~1 s and ~300 MB to build) and
    "oversized_file" (a valid JPEG padded past the 20 MB file-size cap).
    """
    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    corpus: dict[str, tuple[Path, str]] = {}
    for case, (filename, data, outcome) in image_cases().items():
        path = dir / filename
        path.write_bytes(data)
        corpus[case] = (path, outcome)
    if include_huge:
        corpus["huge_jpeg_10000"] = (make_huge_jpeg(dir / "huge.jpg"), "ok")
        oversized = dir / "oversized.jpg"
        oversized.write_bytes(jpeg_bytes(split_image()) + b"\0" * (21 * 2**20))
        corpus["oversized_file"] = (oversized, "error")
    return corpus
