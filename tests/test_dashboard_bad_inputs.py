"""Bad uploads on every dashboard page that takes an image, driven headless through AppTest.

A bad file shows one st.error naming it, in place; good uploads next to it are still captioned and the
session keeps working. Oversize uploads get the size-cap message. A crafted checkpoint choice pointing
outside the checkpoint folder is refused.
"""
from __future__ import annotations

import shutil

import pytest
import torch
from streamlit.testing.v1 import AppTest

from core.images import SUPPORTED_EXTENSIONS
from bad_images import image_cases, jpeg_bytes, split_image
from conftest import REPO

APP = str(REPO / "dashboard.py")
TIMEOUT = 300
GOOD = ("good.jpg", jpeg_bytes(split_image()), "image/jpeg")
SINGLE_IMAGE_BAD = ("html_as_jpg", "truncated_png", "bomb_png", "empty_file")


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def env(tiny_checkpoint, tmp_path_factory):
    folder = tmp_path_factory.mktemp("checkpoints")
    shutil.copyfile(tiny_checkpoint, folder / "captionscope-lite2.safetensors")
    outside = tmp_path_factory.mktemp("outside")
    shutil.copyfile(tiny_checkpoint, outside / "elsewhere.safetensors")     # a valid file the picker must not reach
    mp = pytest.MonkeyPatch()
    mp.setenv("CAPTIONSCOPE_CHECKPOINT_DIR", str(folder))
    mp.setenv("CAPTIONSCOPE_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    mp.setenv("CAPTIONSCOPE_FEATURES_DIR", str(tmp_path_factory.mktemp("no_features")))
    mp.delenv("FLICKR8K_DIR", raising=False)
    yield folder, outside
    mp.undo()


def start(page: str) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=TIMEOUT).run()
    at.switch_page(f"pages/{page}.py").run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def uploader(at: AppTest, label: str):
    found = [u for u in at.get("file_uploader") if u.label == label]
    assert found, [u.label for u in at.get("file_uploader")]
    return found[0]


def main_errors(at: AppTest) -> list[str]:
    return [e.value for e in at.main.error]


def test_caption_page_whole_corpus_upload(env):
    at = start("caption")
    # the uploader itself only accepts SUPPORTED_EXTENSIONS (drawing.svg, favicon.ico never reach the page)
    cases = {k: v for k, v in image_cases().items() if v[0].lower().rsplit(".", 1)[-1] in SUPPORTED_EXTENSIONS}
    assert "svg_named_png" in cases and "svg" not in cases
    files = [(name, data, "application/octet-stream") for name, data, _ in cases.values()]
    oversized = ("big.jpg", jpeg_bytes(split_image()) + b"\0" * (21 * 2**20), "image/jpeg")
    uploader(at, "Upload photos").set_value([*files, oversized, GOOD]).run()
    assert not at.exception, [e.value for e in at.exception]
    errors = main_errors(at)
    bad = [name for name, _, outcome in cases.values() if outcome == "error"] + ["big.jpg"]
    assert len(errors) == len(bad), errors
    for name, message in zip(bad, errors):                  # in upload order, each in its own place
        assert message.startswith(f"{name}: ") and "\n" not in message, message
    assert errors[-1].startswith("big.jpg: file is 21 MB, over the 20 MB limit")
    ok = [name for name, _, outcome in cases.values() if outcome == "ok"]
    captions = [s.value for s in at.main.subheader]
    assert len(captions) == len(ok) + 1 + 1                 # every good upload, good.jpg, the example
    assert all(c.strip() for c in captions)

    # the session keeps working: drop the bad files, caption again
    uploader(at, "Upload photos").set_value([GOOD]).run()
    assert not at.exception and not main_errors(at)
    assert len(at.main.subheader) == 2


@pytest.mark.parametrize("page,prefix", [("attention", "att"), ("beams", "beam")])
def test_single_image_pages_show_the_error_in_place(env, page, prefix):
    at = start(page)
    at.session_state[f"p_{prefix}_source"] = "Upload"
    at.run()
    cases = image_cases()
    for case in SINGLE_IMAGE_BAD:
        name, data, outcome = cases[case]
        assert outcome == "error"
        uploader(at, "Upload an image").set_value((name, data, "image/jpeg")).run()
        assert not at.exception, (case, [e.value for e in at.exception])
        errors = main_errors(at)
        assert len(errors) == 1 and errors[0].startswith(f"{name}: ") and "\n" not in errors[0], errors
    big = ("big.png", b"\x89PNG\r\n\x1a\n" + b"\0" * (21 * 2**20), "image/png")
    uploader(at, "Upload an image").set_value(big).run()
    assert main_errors(at) == ["big.png: file is 21 MB, over the 20 MB limit for images"]
    # then a good upload works in the same session
    uploader(at, "Upload an image").set_value(GOOD).run()
    assert not at.exception and not main_errors(at)
    if page == "attention":
        assert len(at.get("pills")[0].options) >= 1          # the words of the caption
    else:
        assert len(at.table[0].value) == len(at.session_state["p_beam_widths"])


def test_attention_page_uses_the_upright_exif_image(env):
    at = start("attention")
    at.session_state["p_att_source"] = "Upload"
    at.run()
    name, data, _ = image_cases()["exif_orientation_6"]
    uploader(at, "Upload an image").set_value((name, data, "image/jpeg")).run()
    assert not at.exception and not main_errors(at)
    from ui.cache import ImageInput
    from core.captioner import Captioner
    captioner = Captioner.from_checkpoint(env[0] / "captionscope-lite2.safetensors")
    shown = captioner.features(ImageInput.from_bytes(name, data).data, name=name)[1]
    assert shown.size == (100, 200)                          # what the page overlays the heatmap on


@pytest.mark.parametrize("crafted", ["../outside/elsewhere.safetensors", "/etc/passwd",
                                     "..%2Felsewhere.safetensors", "sub/../../elsewhere.safetensors"])
def test_checkpoint_picker_rejects_crafted_paths(env, crafted):
    from ui.settings import BUNDLED, CheckpointChoice
    folder, outside = env
    at = AppTest.from_file(APP, default_timeout=TIMEOUT).run()
    # a forged choice object in the session is replaced on the next run: pages only load from the folder
    # (a label that is not offered cannot even be set: the selectbox refuses values outside its options)
    at.session_state["checkpoint_choice"] = CheckpointChoice(BUNDLED, crafted)
    at.switch_page("pages/caption.py").run()
    assert not at.exception
    choice = at.session_state["checkpoint_choice"]
    assert choice.path().parent.resolve() == folder.resolve()
    from core.checkpoint import resolve_checkpoint
    from core.errors import CheckpointError
    with pytest.raises(CheckpointError):
        resolve_checkpoint(crafted, folder)
    with pytest.raises(CheckpointError):                       # the choice object itself refuses, too
        CheckpointChoice(BUNDLED, f"../{outside.name}/elsewhere.safetensors").path()


def _sent_images(monkeypatch) -> list[tuple[str, tuple[int, int]]]:
    """(mimetype, size) of every picture the app hands Streamlit's media storage (what the browser loads)."""
    import io

    from PIL import Image
    from streamlit.runtime.memory_media_file_storage import MemoryMediaFileStorage
    sent: list[tuple[str, tuple[int, int]]] = []
    original = MemoryMediaFileStorage.load_and_get_id

    def record(self, path_or_data, mimetype, kind, filename=None):
        if mimetype.startswith("image/") and isinstance(path_or_data, bytes):
            sent.append((mimetype, Image.open(io.BytesIO(path_or_data)).size))
        return original(self, path_or_data, mimetype, kind, filename)
    monkeypatch.setattr(MemoryMediaFileStorage, "load_and_get_id", record)
    return sent


@pytest.mark.parametrize("size", [(1, 50000), (50000, 1)])
def test_attention_page_bounds_what_it_draws_for_a_strip(env, monkeypatch, size):
    """A 1x50000 PNG (174 KB) used to make 224 x 229,000 px grid panels (8.5 GB, then a DecompressionBomb
    traceback). Every picture the page sends is now within core.images.DISPLAY_LIMITS."""
    import io

    from PIL import Image

    from core.analysis import GAP, TITLE_HEIGHT
    from core.images import DISPLAY_LIMITS
    at = start("attention")
    at.session_state["p_att_source"] = "Upload"
    at.run()
    buffer = io.BytesIO()
    Image.new("RGB", size, (20, 160, 60)).save(buffer, "PNG")
    sent = _sent_images(monkeypatch)
    uploader(at, "Upload an image").set_value(("strip.png", buffer.getvalue(), "image/png")).run()
    assert not at.exception and not main_errors(at), [e.value for e in at.exception]
    assert len(sent) >= 3, sent                               # overlay, all-words grid, occlusion preview
    grid_width = 5 * 224 + 4 * GAP
    assert any(w == grid_width for _, (w, _h) in sent), sent
    for mime, (w, h) in sent:
        if w <= DISPLAY_LIMITS.max_side:                      # one picture: bounded per side and in shape
            assert h <= DISPLAY_LIMITS.max_side and max(w, h) / min(w, h) <= DISPLAY_LIMITS.max_aspect + 0.02
        else:                                                 # the grid: 5 panels a row, each bounded
            assert w == grid_width and h * w <= DISPLAY_LIMITS.max_total_pixels + (TITLE_HEIGHT + GAP) * w * 10


def test_upload_names_are_shown_without_bidi_or_control_characters(env):
    at = start("caption")
    spoofed = "holiday\u202egpj.exe\u200b.jpg"                  # shows as "holidayexe.jpg" in a browser
    uploader(at, "Upload photos").set_value([(spoofed, b"<html>not an image</html>", "image/jpeg"),
                                             ("ok\u202e\n.jpg", GOOD[1], "image/jpeg")]).run()
    assert not at.exception
    errors = main_errors(at)
    assert len(errors) == 1 and errors[0].startswith("holidaygpj.exe.jpg: "), errors
    from streamlit.testing.v1.element_tree import Image as ImageElement

    def images(node):
        if isinstance(node, ImageElement):
            yield node
        for child in getattr(node, "children", {}).values():
            yield from images(child)
    captions = [c for image in images(at.main) for c in image.captions]
    assert "ok .jpg" in captions and all("\u202e" not in c for c in captions), captions
