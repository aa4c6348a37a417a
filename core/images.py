"""Robust image decoding: anything a user can upload becomes an upright RGB picture or one clear ImageError.

Images come from the dataset, the CLI and dashboard uploads, so they can be anything: CMYK JPEGs, 16-bit
PNGs, animated GIFs, phone photos rotated by EXIF, web pages saved as ".jpg", truncated downloads, or
decompression bombs. `load_image` normalises all of them (RGB, upright, first frame, long side capped)
and turns every failure into `ImageError("<name>: <what is wrong>")`, never a raw PIL traceback.
Memory stays bounded: file size is capped while reading, declared pixel counts are checked before any
decoding, and JPEGs are decoded at reduced scale by libjpeg (`Image.draft`).
"""
from __future__ import annotations

import hashlib
import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from PIL import Image, ImageOps

from core.errors import ImageError

SUPPORTED_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
# Pillow format names we decode (the JPEG opener also returns camera "MPO" multi-picture JPEGs).
_PIL_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")
_MAGIC = {b"\xff\xd8\xff": "JPEG", b"\x89PNG\r\n\x1a\n": "PNG", b"GIF8": "GIF", b"BM": "BMP",
          b"II*\x00": "TIFF", b"MM\x00*": "TIFF"}


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 20 * 2**20       # larger uploads are refused before being read in full
    max_pixels: int = 120_000_000     # declared width*height; checked before decoding (bomb guard)
    target_side: int = 224            # what the encoder uses
    max_side: int = 1024              # long side of the returned image (enough for the dashboard)


def content_hash(data: bytes) -> str:
    """sha256 hex of the raw file bytes, so features can be cached by content, not by file name."""
    return hashlib.sha256(data).hexdigest()


def _size_text(n: int) -> str:
    """'20 MB', '21.3 MB', '0.1 KB': the cap is usually round, the file size usually not."""
    value, unit = (n / 2**20, "MB") if n >= 2**20 else (n / 2**10, "KB")
    return f"{round(value, 1):g} {unit}"


def _too_big(name: str, size: int, limits: ImageLimits) -> ImageError:
    return ImageError(f"{name}: file is {_size_text(size)}, over the {_size_text(limits.max_bytes)} "
                      f"limit for images")


def read_source_bytes(source: str | Path | bytes | BinaryIO,
                      limits: ImageLimits = ImageLimits(), name: str | None = None) -> tuple[bytes, str]:
    """Return (bytes, display name) of a path, bytes or file-like, never reading more than max_bytes + 1."""
    cap = limits.max_bytes
    if isinstance(source, (bytes, bytearray, memoryview)):
        data, name = bytes(source), name or "image"
    elif isinstance(source, (str, Path, os.PathLike)):
        path = Path(source)
        name = name or str(source)
        try:
            if path.is_dir():
                raise ImageError(f"{name}: is a folder, not an image file")
            size = path.stat().st_size          # cheap refusal before reading anything
            if size > cap:
                raise _too_big(name, size, limits)
            with path.open("rb") as f:
                data = f.read(cap + 1)          # the file may have grown since stat()
        except FileNotFoundError:
            raise ImageError(f"{name}: file not found") from None
        except PermissionError:
            raise ImageError(f"{name}: permission denied") from None
        except OSError as e:
            raise ImageError(f"{name}: cannot read file ({e.strerror or e})") from None
    elif hasattr(source, "read") or hasattr(source, "getvalue"):
        name = name or Path(str(getattr(source, "name", "") or "upload")).name
        size = getattr(source, "size", None)    # Streamlit UploadedFile knows its size up front
        if isinstance(size, int) and size > cap:
            raise _too_big(name, size, limits)
        # getvalue() returns the whole buffer regardless of the read position (UploadedFile, BytesIO).
        data = source.getvalue() if hasattr(source, "getvalue") else source.read(cap + 1)
        if isinstance(data, str):
            raise ImageError(f"{name}: file was opened in text mode; open it with 'rb'")
        data = bytes(data)
    else:
        raise ImageError(f"{name or 'image'}: cannot read an image from a {type(source).__name__}")
    if len(data) > cap:
        raise _too_big(name, len(data), limits)
    return data, name


def _not_an_image(name: str, data: bytes) -> ImageError:
    """Explain why Pillow could not identify `data`: wrong kind of file, truncated header, or odd format."""
    head = data[:2048].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    supported = ", ".join(SUPPORTED_EXTENSIONS)
    if b"<svg" in head or (head.startswith(b"<?xml") and b"svg" in head) or name.lower().endswith(".svg"):
        return ImageError(f"{name}: SVG is not supported — convert it to PNG or JPEG first")
    if head.startswith((b"<!doctype html", b"<html")) or b"<html" in head[:512]:
        return ImageError(f"{name}: this is an HTML web page, not an image (save the image itself)")
    magic = next((fmt for m, fmt in _MAGIC.items() if data.startswith(m)), None)
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        magic = "WEBP"
    if data[4:8] == b"ftyp" and data[8:12] in (b"heic", b"heix", b"mif1", b"msf1", b"avif", b"hevc"):
        return ImageError(f"{name}: HEIC/AVIF images are not supported — convert it to JPEG or PNG first")
    if magic:
        return ImageError(f"{name}: {magic} file is truncated or corrupt (header cannot be read)")
    try:
        text = data[:4096].decode("utf-8")
        if all(c.isprintable() or c in "\r\n\t" for c in text):
            return ImageError(f"{name}: this is a text file, not an image (supported: {supported})")
    except UnicodeDecodeError:
        pass
    try:  # a real image in a format we do not accept: name the format
        with Image.open(io.BytesIO(data)) as other:
            fmt = other.format
        return ImageError(f"{name}: {fmt} images are not supported (supported: {supported})")
    except Exception:
        return ImageError(f"{name}: not a recognised image file (supported: {supported})")


def _scale_16bit(img: Image.Image) -> Image.Image:
    """Map 16/32-bit integer or float grey to 8-bit by its range; convert('L') would clip to white."""
    if img.mode.startswith("I;16"):
        lo, hi = 0, 65535
    else:
        lo, hi = img.getextrema()
        if img.mode == "F" and 0.0 <= lo and hi <= 1.0:
            lo, hi = 0.0, 1.0
        elif 0 <= lo and hi <= 255:
            lo, hi = 0, 255
        elif 0 <= lo and hi <= 65535:
            lo, hi = 0, 65535
    scale = 255.0 / (hi - lo) if hi > lo else 1.0
    # point() on I/F images accepts a linear function, evaluated in C.
    return img.convert("F" if img.mode == "F" else "I").point(lambda v: (v - lo) * scale + 0.5).convert("L")


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB with any transparency composited onto white (a black background would change the caption)."""
    if img.mode.startswith("I") or img.mode == "F":
        img = _scale_16bit(img)
    if img.mode in ("RGBA", "LA", "La", "RGBa", "PA") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")  # CMYK, YCbCr, L, 1, P


def load_image(source: str | Path | bytes | BinaryIO, *, name: str | None = None,
               limits: ImageLimits = ImageLimits()) -> Image.Image:
    """Decode `source` to an RGB, EXIF-upright, first-frame image with long side <= limits.max_side."""
    data, name = read_source_bytes(source, limits, name)
    if not data:
        raise ImageError(f"{name}: file is empty (0 bytes)")
    try:
        # Pillow warns from ~89 MP on; our own max_pixels check below replaces that warning.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=_PIL_FORMATS)
    except Image.DecompressionBombError as e:
        raise ImageError(f"{name}: image is too large to decode safely (decompression bomb?): "
                         f"{_one_line(e)}") from None
    except Exception:
        raise _not_an_image(name, data) from None

    try:
        width, height = img.size
        if width <= 0 or height <= 0:
            raise ImageError(f"{name}: image declares an empty size {width}x{height}")
        if width * height > limits.max_pixels:
            raise ImageError(
                f"{name}: image declares {width}x{height} = {width * height / 1e6:.0f} megapixels, over "
                f"the {limits.max_pixels / 1e6:g}-megapixel limit (decompression bomb?)")
        if img.format in ("JPEG", "MPO"):
            # libjpeg decodes at 1/2, 1/4 or 1/8 scale directly: a 10000^2 photo never exists at full size.
            img.draft("RGB", (limits.max_side, limits.max_side))
        img.load()  # first frame only; raises on truncated data (LOAD_TRUNCATED_IMAGES stays False)
        img = ImageOps.exif_transpose(img) or img
        img = _to_rgb(img)
        if max(img.size) > limits.max_side:
            img.thumbnail((limits.max_side, limits.max_side), Image.Resampling.LANCZOS, reducing_gap=2.0)
        return img
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageError(f"{name}: image is too large to decode safely: {_one_line(e)}") from None
    except MemoryError:
        raise ImageError(f"{name}: not enough memory to decode this image") from None
    except Exception as e:  # truncated / corrupt data surfaces as OSError, SyntaxError, EOFError, zlib...
        fmt = img.format or "image"
        msg = _one_line(e)
        if "truncated" in msg or isinstance(e, EOFError) or "end of file" in msg.lower():
            raise ImageError(f"{name}: {fmt} file is truncated (incomplete download?): {msg}") from None
        raise ImageError(f"{name}: {fmt} file is corrupt and cannot be decoded: {msg}") from None


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


# -- display: every picture rendered from an image (overlays, grid panels, GIF frames, previews) -----------------

@dataclass(frozen=True)
class DisplayLimits:
    """Bounds on what a rendering of an image may cost, whatever the image's shape.

    Panels are sized from the image's aspect ratio, so a 1x1024 strip scaled to a 224 px wide panel would
    be 229,000 px tall; beyond `max_aspect` the image is letterboxed instead (kept whole, padded).
    """
    max_side: int = 1024                  # longest side of one rendered picture (one panel, one frame)
    max_aspect: float = 4.0               # longer / shorter side of a picture; beyond it: letterboxed
    max_total_pixels: int = 16_000_000    # all panels of one grid (or frames of one GIF) together


DISPLAY_LIMITS = DisplayLimits()
DISPLAY_FILL = (241, 245, 249)            # letterbox padding: the dashboard's secondary background


@dataclass(frozen=True)
class DisplayBox:
    """Where an image goes when shown: a `canvas` (w, h) and the `content` box (x0, y0, x1, y1) inside it."""
    canvas: tuple[int, int]
    content: tuple[int, int, int, int]

    @property
    def content_size(self) -> tuple[int, int]:
        x0, y0, x1, y1 = self.content
        return x1 - x0, y1 - y0


def display_box(size: tuple[int, int], width: int | None = None, *, panels: int = 1,
                limits: DisplayLimits = DISPLAY_LIMITS) -> DisplayBox:
    """The bounded picture for an image of `size` = (W, H): the one helper every rendering path uses.

    width=None keeps the image's own scale (long side capped at max_side); a width fixes the canvas width
    (a grid panel, a GIF frame). The canvas never exceeds max_side per side nor max_aspect in shape, and
    `panels` canvases together stay within max_total_pixels. The image keeps its aspect ratio inside it.
    """
    W, H = int(size[0]), int(size[1])
    if W < 1 or H < 1:
        raise ValueError(f"image size must be positive, got {size}")
    aspect = limits.max_aspect
    if width is None:
        long_side = min(max(W, H), limits.max_side)
        w, h = W * long_side / max(W, H), H * long_side / max(W, H)
        w, h = max(w, long_side / aspect), max(h, long_side / aspect)
    else:
        w = float(min(max(int(width), 1), limits.max_side))
        h = min(max(H * w / W, w / aspect), w * aspect)
        if h > limits.max_side:
            w, h = w * limits.max_side / h, float(limits.max_side)
    budget = limits.max_total_pixels / max(int(panels), 1)
    if w * h > budget:
        shrink = (budget / (w * h)) ** 0.5
        w, h = w * shrink, h * shrink
    cw, ch = max(1, round(w)), max(1, round(h))
    scale = min(cw / W, ch / H)
    iw, ih = min(cw, max(1, round(W * scale))), min(ch, max(1, round(H * scale)))
    x0, y0 = (cw - iw) // 2, (ch - ih) // 2
    return DisplayBox((cw, ch), (x0, y0, x0 + iw, y0 + ih))


def letterbox(content: Image.Image, box: DisplayBox, fill: tuple[int, int, int] = DISPLAY_FILL) -> Image.Image:
    """`content` (resized to box.content_size if needed) pasted into its place on a `fill` canvas."""
    content = content.convert("RGB")
    if content.size != box.content_size:
        content = content.resize(box.content_size, Image.BILINEAR)
    if box.canvas == content.size:
        return content
    canvas = Image.new("RGB", box.canvas, fill)
    canvas.paste(content, box.content[:2])
    return canvas


def fit_for_display(image: Image.Image, width: int | None = None, *,
                    fill: tuple[int, int, int] = DISPLAY_FILL) -> Image.Image:
    """The image as the dashboard shows it: within DISPLAY_LIMITS, extreme shapes letterboxed."""
    return letterbox(image, display_box(image.size, width), fill)
