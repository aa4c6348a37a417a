"""core.images: every odd-but-valid image loads as upright RGB; every bad one gives one clear ImageError."""
from __future__ import annotations

import hashlib
import json
import io
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from PIL import Image, ImageFile

from core.errors import CaptionScopeError, ImageError
from core.images import SUPPORTED_EXTENSIONS, ImageLimits, content_hash, load_image, read_source_bytes
from tests.bad_images import (BLUE, GREEN, RED, image_cases, jpeg_bytes, make_image_corpus, png_declaring,
                              split_image)

CASES = image_cases()
REPO = Path(__file__).resolve().parents[1]

# What each error message must say (after "<file name>: ").
EXPECTED_ERRORS = {
    "empty_file": r"empty \(0 bytes\)",
    "text_as_jpg": r"text file, not an image",
    "html_as_jpg": r"HTML web page, not an image",
    "svg": r"SVG is not supported .* PNG",
    "svg_named_png": r"SVG is not supported",
    "truncated_jpeg": r"JPEG file is truncated",
    "truncated_png": r"PNG file is truncated",
    "jpeg_header_only": r"JPEG file is truncated or corrupt",
    "png_corrupt_data": r"PNG file is corrupt",
    "heic_as_jpg": r"HEIC/AVIF images are not supported",
    "bomb_png": r"too large to decode safely \(decompression bomb\?\)",
    "bomb_jpeg_over_limit": r"declares 11000x11000 = 121 megapixels, over the 120-megapixel limit",
    "random_bytes": r"not a recognised image file \(supported: jpg, jpeg, png",
    "unsupported_ico": r"ICO images are not supported",
    "oversized_file": r"file is 21 MB, over the 20 MB limit",
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, tuple[Path, str]]:
    return make_image_corpus(tmp_path_factory.mktemp("corpus"))


def raw_info(path: Path) -> tuple[str, tuple[int, int], int]:
    """(mode, size, frames) as stored, straight from Pillow: proves the case really is odd."""
    with Image.open(path) as im:
        return im.mode, im.size, getattr(im, "n_frames", 1)


def near(pixel, colour, tol=12) -> bool:
    return all(abs(a - b) <= tol for a, b in zip(pixel, colour))


def test_every_error_case_has_an_expected_message():
    errors = {case for case, (_, _, outcome) in CASES.items() if outcome == "error"}
    assert errors | {"oversized_file"} == set(EXPECTED_ERRORS)
    assert {outcome for _, _, outcome in CASES.values()} == {"ok", "error"}


@pytest.mark.parametrize("case", sorted(CASES))
def test_corpus_case(corpus, case):
    path, outcome = corpus[case]
    if outcome == "ok":
        img = load_image(path)
        assert img.mode == "RGB" and min(img.size) >= 1
        assert max(img.size) <= ImageLimits().max_side
        img.getpixel((0, 0))                       # pixel data really decoded
    else:
        with pytest.raises(ImageError) as err:
            load_image(path)
        message = str(err.value)
        assert "\n" not in message
        assert message.startswith(f"{path}: ")
        assert re.search(EXPECTED_ERRORS[case], message), message


def test_same_outcome_from_bytes_and_uploads(corpus):
    """Dashboard uploads arrive as bytes / file-likes: same outcomes, and the upload's name in errors."""
    for case, (filename, data, outcome) in CASES.items():
        upload = FakeUpload(data, filename)
        if outcome == "ok":
            assert load_image(data).tobytes() == load_image(corpus[case][0]).tobytes()
            assert load_image(upload).mode == "RGB"
        else:
            with pytest.raises(ImageError, match=rf"^{re.escape(filename)}: .*{EXPECTED_ERRORS[case]}"):
                load_image(upload)
            with pytest.raises(ImageError, match=r"^my upload: "):
                load_image(data, name="my upload")


class FakeUpload:
    """Mimics streamlit's UploadedFile: .name, .size, .read() (moves the position), .getvalue()."""

    def __init__(self, data: bytes, name: str):
        self._buf, self.name, self.size = io.BytesIO(data), name, len(data)

    def read(self, n: int = -1) -> bytes:
        return self._buf.read(n)

    def getvalue(self) -> bytes:
        return self._buf.getvalue()


def test_upload_already_read_still_loads():
    upload = FakeUpload(jpeg_bytes(split_image()), "photo.jpg")
    upload.read()                                  # e.g. hashed before captioning
    assert load_image(upload).size == (200, 100)


@pytest.mark.parametrize("orientation, size, red_at, blue_at", [
    (3, (200, 100), (190, 50), (10, 50)),          # 180 degrees: red moves to the right
    (6, (100, 200), (50, 10), (50, 190)),          # raw left half ends on top
    (8, (100, 200), (50, 190), (50, 10)),          # raw left half ends at the bottom
])
def test_exif_orientation_is_applied(corpus, orientation, size, red_at, blue_at):
    with Image.open(corpus[f"exif_orientation_{orientation}"][0]) as raw:           # stored landscape
        assert raw.size == (200, 100) and near(raw.convert("RGB").getpixel((10, 50)), RED)
    img = load_image(corpus[f"exif_orientation_{orientation}"][0])
    assert img.size == size
    assert near(img.getpixel(red_at), RED) and near(img.getpixel(blue_at), BLUE)


def test_16bit_png_is_scaled_not_clipped(corpus):
    assert raw_info(corpus["png_16bit_midgrey"][0])[0].startswith("I")
    assert near(load_image(corpus["png_16bit_midgrey"][0]).getpixel((5, 5)), (128, 128, 128), tol=1)
    row = [load_image(corpus["png_16bit_gradient"][0]).getpixel((x, 0))[0] for x in range(256)]
    assert row == sorted(row) and row[0] == 0 and row[-1] == 255 and abs(row[128] - 128) <= 1


def test_transparency_is_composited_onto_white(corpus):
    rgba = load_image(corpus["rgba_png"][0])
    assert rgba.getpixel((2, 2)) == (255, 255, 255) and rgba.getpixel((30, 2)) == GREEN
    for case in ("palette_transparent_png", "palette_transparent_gif"):
        img = load_image(corpus[case][0])
        assert img.getpixel((2, 2)) == (255, 255, 255) and img.getpixel((30, 2)) == RED, case
    assert load_image(corpus["la_png"][0]).getpixel((3, 3)) == (255, 255, 255)


def test_colour_modes_and_frames(corpus):
    assert raw_info(corpus["cmyk_jpeg"][0])[0] == "CMYK"
    assert near(load_image(corpus["cmyk_jpeg"][0]).getpixel((5, 5)), RED, tol=30)
    assert near(load_image(corpus["grayscale_jpeg"][0]).getpixel((5, 5)), (128, 128, 128), tol=3)
    for case in ("animated_gif", "animated_webp"):
        assert raw_info(corpus[case][0])[2] == 2
        assert near(load_image(corpus[case][0]).getpixel((5, 5)), RED, tol=2), case   # first frame
    assert load_image(corpus["one_pixel_png"][0]).getpixel((0, 0)) == GREEN
    assert load_image(corpus["wide_strip_png"][0]).size == (1024, 1)
    assert load_image(corpus["multipage_tiff"][0]).size == (200, 100)


def test_limits_are_configurable():
    data = jpeg_bytes(split_image((400, 300)))
    assert load_image(data, limits=ImageLimits(max_side=100)).size == (100, 75)
    with pytest.raises(ImageError, match=r"^x\.jpg: file is \d+(\.\d)? KB, over the 0\.1 KB limit for images"):
        load_image(data, name="x.jpg", limits=ImageLimits(max_bytes=100))
    with pytest.raises(ImageError, match=r"400x300 = 0 megapixels, over the 0\.1-megapixel limit"):
        load_image(data, limits=ImageLimits(max_pixels=100_000))
    # Between Pillow's warning threshold (~89 MP) and our cap, our limit decides, silently.
    with pytest.raises(ImageError, match="declares 10000x10000"):
        load_image(png_declaring(10_000, 10_000), limits=ImageLimits(max_pixels=99_000_000))


def test_size_cap_never_reads_a_huge_source_whole(tmp_path, monkeypatch):
    class Stream:                                  # an endless file-like without getvalue()
        requested: list[int] = []

        def read(self, n=-1):
            self.requested.append(n)
            return b"\xff" * (n if n >= 0 else 10**9)
    limits = ImageLimits(max_bytes=1000)
    with pytest.raises(ImageError, match="over the"):
        read_source_bytes(Stream(), limits)
    assert Stream.requested == [1001]
    big = tmp_path / "big.png"
    big.write_bytes(b"\0" * 5000)
    monkeypatch.setattr(Path, "open", lambda *a, **k: pytest.fail("read a file over the cap"))
    with pytest.raises(ImageError, match=rf"^{re.escape(str(big))}: file is 4.9 KB, over the 1 KB limit"):
        read_source_bytes(big, limits)


def test_read_source_bytes_and_bad_sources(tmp_path):
    data = jpeg_bytes(split_image())
    (tmp_path / "a.jpg").write_bytes(data)
    assert read_source_bytes(tmp_path / "a.jpg") == (data, str(tmp_path / "a.jpg"))
    assert read_source_bytes(str(tmp_path / "a.jpg"))[0] == data
    assert read_source_bytes(FakeUpload(data, "up.jpg")) == (data, "up.jpg")
    assert read_source_bytes(io.BytesIO(data)) == (data, "upload")
    with pytest.raises(ImageError, match="missing.jpg: file not found"):
        load_image(tmp_path / "missing.jpg")
    with pytest.raises(ImageError, match="is a folder"):
        load_image(tmp_path)
    with pytest.raises(ImageError, match="int"):
        load_image(42)
    with open(tmp_path / "a.jpg", encoding="latin-1") as text_mode:
        with pytest.raises(ImageError, match="text mode"):
            load_image(text_mode)
    assert issubclass(ImageError, CaptionScopeError) and issubclass(ImageError, ValueError)


def test_truncated_images_do_not_flip_the_global_switch(corpus):
    with pytest.raises(ImageError):
        load_image(corpus["truncated_jpeg"][0])
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_content_hash():
    assert content_hash(b"abc") == hashlib.sha256(b"abc").hexdigest()
    assert content_hash(b"abc") != content_hash(b"abd")
    assert SUPPORTED_EXTENSIONS == ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")


MEASURE = """
import json, sys
from core.images import load_image
import PIL.Image, PIL.JpegImagePlugin, PIL.ImageOps                  # imports are not the image's cost

def status_kib(field):   # VmHWM is this process's own peak; ru_maxrss would inherit the forking parent's
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))

before = status_kib("VmRSS")
img = load_image(sys.argv[1])
print(json.dumps({"size": img.size, "top": img.getpixel((10, 10)), "bottom": img.getpixel((10, img.height - 10)),
                  "peak_growth_mb": (status_kib("VmHWM") - before) / 1024}))
"""


def test_huge_jpeg_is_downscaled_while_decoding_and_big_files_are_refused(tmp_path):
    """A 10000x10000 JPEG is 300 MB decoded; load_image must stay far below (measured in a fresh process)."""
    corpus = make_image_corpus(tmp_path, include_huge=True)
    path, outcome = corpus["huge_jpeg_10000"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)   # 100 MP: Pillow warns, we don't
        assert outcome == "ok" and raw_info(path)[1] == (10_000, 10_000)
    result = subprocess.run([sys.executable, "-c", MEASURE, str(path)], cwd=REPO, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    measured = json.loads(result.stdout)
    assert measured["size"] == [1024, 1024]
    assert near(measured["top"], RED) and near(measured["bottom"], BLUE)
    assert measured["peak_growth_mb"] < 60, measured

    path, outcome = corpus["oversized_file"]
    assert outcome == "error" and path.stat().st_size > ImageLimits().max_bytes
    with pytest.raises(ImageError, match=rf"^{re.escape(str(path))}: {EXPECTED_ERRORS['oversized_file']}"):
        load_image(path)


# -- display: bounded pictures of any image shape ----------------------------------------------------------------

DISPLAY_SHAPES = [(1, 1024), (1024, 1), (1, 1), (3, 1024), (640, 480), (480, 640), (1024, 1024), (1024, 200)]


@pytest.mark.parametrize("size", DISPLAY_SHAPES)
@pytest.mark.parametrize("width", [None, 224, 320, 5000])
def test_display_box_is_bounded_and_keeps_the_image_shape(size, width):
    from core.images import DISPLAY_LIMITS, display_box
    box = display_box(size, width)
    cw, ch = box.canvas
    x0, y0, x1, y1 = box.content
    assert 1 <= cw <= DISPLAY_LIMITS.max_side and 1 <= ch <= DISPLAY_LIMITS.max_side
    assert max(cw, ch) / min(cw, ch) <= DISPLAY_LIMITS.max_aspect + 0.02
    assert 0 <= x0 < x1 <= cw and 0 <= y0 < y1 <= ch
    W, H = size
    iw, ih = box.content_size
    # the image keeps its aspect ratio (to the pixel) and touches the canvas on at least one axis
    assert abs(iw * H - ih * W) <= max(W, H) and (iw == cw or ih == ch)
    if width is not None:
        assert cw == min(width, DISPLAY_LIMITS.max_side) or ch == DISPLAY_LIMITS.max_side


def test_display_box_of_ordinary_photos_is_the_photo_itself():
    from core.images import display_box
    assert display_box((640, 480)).canvas == (640, 480)
    assert display_box((640, 480), 224).canvas == (224, 168)
    assert display_box((640, 480), 224).content == (0, 0, 224, 168)


def test_display_box_shares_the_pixel_budget_between_panels():
    from core.images import DISPLAY_LIMITS, display_box
    one = display_box((1, 1024), 1024)
    many = display_box((1, 1024), 1024, panels=500)
    assert many.canvas[0] * many.canvas[1] * 500 <= DISPLAY_LIMITS.max_total_pixels
    assert many.canvas[0] < one.canvas[0]


def test_fit_for_display_letterboxes_a_strip():
    import numpy as np
    from core.images import DISPLAY_FILL, fit_for_display
    strip = Image.new("RGB", (1, 1024), (200, 0, 0))
    shown = fit_for_display(strip)
    assert shown.size == (256, 1024)
    pixels = np.asarray(shown)
    assert (pixels[:, 128] == (200, 0, 0)).all() or (pixels[:, 127] == (200, 0, 0)).all()
    assert tuple(pixels[0, 0]) == DISPLAY_FILL
    photo = Image.new("RGB", (300, 200), (1, 2, 3))
    assert fit_for_display(photo).size == (300, 200)
