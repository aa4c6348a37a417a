"""The dashboard in a real browser: `streamlit run` on localhost, driven by headless Chromium at 1280x800.

Uploads a photo through the Caption page's real file input, checks its caption against the model run
in-process, looks at its attention heatmap, visits every page (no error box, no horizontal scroll) and
saves a screenshot of each into $CAPTIONSCOPE_SCREENSHOTS (default: a tmp folder). A second test uploads
a text file named .jpg next to a good photo: the error shows in place and the photo is still captioned.

Data: the 8-image `tiny_flickr` fixture. For the README screenshots run

    CAPTIONSCOPE_SCREENSHOTS=docs/screenshots FLICKR8K_DIR=/path/to/flickr8k pytest tests/test_browser.py

(screenshot mode: the real Flickr8K folder and feature cache are used, and the first visit of the browser
page captions the whole dev split, which takes minutes on a CPU).
"""
from __future__ import annotations

import io
from urllib.parse import urlsplit
import os
import re
import time
from pathlib import Path

import pytest
from PIL import Image, ImageOps

from tests.browser_harness import (
    BUNDLED as BUNDLED_CHECKPOINT,
    CHECKPOINT_NAME,
    REPO,
    app_decoding,
    caption_rows,
    checkpoint_folder,
    chromium,
    dashboard_server,
    decoding_line,
    error_boxes,
    goto_page,
    horizontal_overflow,
    nav_titles,
    new_page,
    requires_chromium,
    screenshot,
    wait_idle,
)

SCREENSHOTS = os.environ.get("CAPTIONSCOPE_SCREENSHOTS", "").strip()
SCREENSHOT_MODE = bool(SCREENSHOTS and os.environ.get("FLICKR8K_DIR"))
PAGE_TIMEOUT_S = 900 if SCREENSHOT_MODE else 120     # the real dev split is captioned on the first visit
PHOTO = REPO / "assets" / "examples" / "coffee.jpg"
PAGES = ["Home", "Caption", "Attention", "Faithfulness", "Presentation", "Beam comparison", "Flickr8K browser",
         "Compare checkpoints",
         "Model card"]
# what only the finished page shows (the Flickr8K browser captions the whole split before drawing its table)
READY = {"Beam comparison": '[data-testid="stMain"] [data-testid="stTable"]',
         "Flickr8K browser": '[data-testid="stMain"] h3:has-text("Details")',
         "Compare checkpoints": '[data-testid="stMain"] h3:has-text("The dev split")',
         "Model card": '[data-testid="stMain"] [data-testid="stTable"]',
         "Home": '[data-testid="stMain"] [data-testid="stImage"] img'}

pytestmark = [requires_chromium, pytest.mark.timeout(1800 if SCREENSHOT_MODE else 300)]


def upload_bytes() -> bytes:
    """A photo that is not one of the bundled examples (mirrored), written by PIL as a JPEG."""
    buffer = io.BytesIO()
    ImageOps.mirror(Image.open(PHOTO).convert("RGB")).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def photo() -> tuple[str, bytes]:
    return "my-photo.jpg", upload_bytes()


@pytest.fixture(scope="module")
def expected(request, tmp_path_factory, photo):
    """(checkpoint folder, decoding config, best caption of the photo) from the model run in-process."""
    from core.captioner import Captioner
    folder = checkpoint_folder(request, tmp_path_factory)
    captioner = Captioner.from_checkpoint(folder / "captionscope-lite2.safetensors")
    config = app_decoding(captioner)
    caption = captioner.caption(photo[1], config, name=photo[0]).caption
    assert caption.strip()
    return folder, config, caption


@pytest.fixture(scope="module")
def server(expected, tiny_flickr, tmp_path_factory):
    folder = expected[0]
    env = {"CAPTIONSCOPE_CHECKPOINT_DIR": str(folder)}
    if SCREENSHOT_MODE:
        env["FLICKR8K_DIR"] = os.environ["FLICKR8K_DIR"]
    else:
        env["FLICKR8K_DIR"] = str(tiny_flickr)
        env["CAPTIONSCOPE_FEATURES_DIR"] = str(tmp_path_factory.mktemp("no_features"))
    with dashboard_server(env) as running:
        yield running


@pytest.fixture(scope="module")
def browser():
    with chromium() as running:
        yield running


@pytest.fixture(scope="module")
def screenshot_dir(tmp_path_factory) -> Path:
    return Path(SCREENSHOTS) if SCREENSHOTS else tmp_path_factory.mktemp("screenshots")


def file_payload(name: str, data: bytes, mime: str = "image/jpeg") -> dict:
    return {"name": name, "mimeType": mime, "buffer": data}


def upload(page, *files: dict) -> None:
    page.locator('[data-testid="stMain"] [data-testid="stFileUploaderDropzoneInput"]').set_input_files(list(files))


def wait_for_caption_of(page, name: str, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = dict(caption_rows(page))
        if name in found:
            wait_idle(page, timeout_s)
            return dict(caption_rows(page))[name]
        page.wait_for_timeout(200)
    raise AssertionError(f"no caption for {name} after {timeout_s:.0f} s; rows: {caption_rows(page)}")


def check_page(page, title: str, folder: Path) -> list[str]:
    """Screenshot the page, then return what is wrong with it (error boxes, horizontal scroll)."""
    path = screenshot(page, folder, title.lower().replace(" ", "_"))
    problems = [f"{title}: error box: {text[:300]!r}" for text in error_boxes(page)]
    overflow = horizontal_overflow(page)
    problems += [f"{title}: scrolls sideways in {where} by {px} px" for where, px in overflow.items() if px > 0]
    assert path.stat().st_size > 10_000, path          # a real picture of the page, not a blank
    return problems


def test_every_page_in_a_real_browser(server, browser, expected, photo, screenshot_dir):
    _, config, expected_caption = expected
    name, data = photo
    page = new_page(browser, server.url, timeout_ms=PAGE_TIMEOUT_S * 1000)
    problems: list[str] = []
    try:
        page.locator(READY["Home"]).first.wait_for(timeout=PAGE_TIMEOUT_S * 1000)
        wait_idle(page, PAGE_TIMEOUT_S)
        assert nav_titles(page) == PAGES            # st.navigation's pages, not the pages/ folder's files
        problems += check_page(page, "Home", screenshot_dir)

        # Caption: the upload goes through the page's real <input type=file>
        goto_page(page, "Caption", PAGE_TIMEOUT_S)
        upload(page, file_payload(name, data))
        assert wait_for_caption_of(page, name, PAGE_TIMEOUT_S) == expected_caption
        assert page.get_by_text(decoding_line(config)).count() == 1       # the app decodes as we did
        problems += check_page(page, "Caption", screenshot_dir)

        # Attention: the same photo, uploaded there; the overlay of the first word is the heatmap
        goto_page(page, "Attention", PAGE_TIMEOUT_S)
        page.locator('[data-testid="stMain"] button', has_text="Upload").first.click()
        wait_idle(page, PAGE_TIMEOUT_S)
        upload(page, file_payload(name, data))
        first_word = expected_caption.split()[0]
        overlay = page.locator('[data-testid="stImage"]').filter(
            has=page.get_by_text(f"“{first_word}” (step 1 of", exact=False))
        overlay.first.wait_for(timeout=PAGE_TIMEOUT_S * 1000)
        wait_idle(page, PAGE_TIMEOUT_S)
        assert overlay.first.locator("img").evaluate("img => img.complete && img.naturalWidth > 100")
        problems += check_page(page, "Attention", screenshot_dir)

        for title in [t for t in PAGES[3:] if t != "Presentation"]:   # its projector mode hides the sidebar;
            goto_page(page, title, PAGE_TIMEOUT_S, ready=READY.get(title))
            problems += check_page(page, title, screenshot_dir)
        goto_page(page, "Home", PAGE_TIMEOUT_S, ready=READY["Home"])        # back home: the sidebar still works after every page
        assert not error_boxes(page)
    finally:
        page.context.close()
    assert not problems, problems


def test_bad_upload_shows_error_in_place(server, browser, expected, photo):
    _, _, expected_caption = expected
    name, data = photo
    page = new_page(browser, f"{server.url}/caption", timeout_ms=PAGE_TIMEOUT_S * 1000)
    try:
        wait_idle(page, PAGE_TIMEOUT_S)
        upload(page, file_payload("notes.jpg", b"These are my notes, not a photo.\n" * 20),
               file_payload(name, data))
        caption = wait_for_caption_of(page, name, PAGE_TIMEOUT_S)
        errors = error_boxes(page)
        assert len(errors) == 1 and errors[0].startswith("notes.jpg:"), errors
        assert "Traceback" not in errors[0] and "\n" not in errors[0].strip()
        assert caption == expected_caption
        # the error sits in the results, before the good photo's row (files are shown in upload order)
        error_y = page.locator('[data-testid="stAlertContentError"]').first.bounding_box()["y"]
        photo_y = page.locator('[data-testid="stImageCaption"]', has_text=name).first.bounding_box()["y"]
        assert error_y < photo_y
        assert horizontal_overflow(page)["document"] <= 0
    finally:
        page.context.close()


def test_deep_link_as_first_request_of_a_fresh_server(expected, tiny_flickr, tmp_path_factory, browser):
    """A `pages/` folder starts a server in Streamlit's legacy folder mode: without ui.sidebar's fix the first
    request, if a deep link, got a sidebar of file names ('attention', 'beams', 'dashboard' ...)."""
    env = {"CAPTIONSCOPE_CHECKPOINT_DIR": str(expected[0]), "FLICKR8K_DIR": str(tiny_flickr),
           "CAPTIONSCOPE_FEATURES_DIR": str(tmp_path_factory.mktemp("no_features_deep"))}
    with dashboard_server(env) as fresh:
        page = new_page(browser, f"{fresh.url}/beams", timeout_ms=PAGE_TIMEOUT_S * 1000)
        try:
            page.locator('[data-testid="stMain"] h1', has_text="Beam comparison").first.wait_for(
                timeout=PAGE_TIMEOUT_S * 1000)
            wait_idle(page, PAGE_TIMEOUT_S)
            assert nav_titles(page) == PAGES
            # the path stays /beams; the query holds the shareable state (ui.links)
            assert urlsplit(page.url).path.rstrip("/").endswith("/beams") and not error_boxes(page)
        finally:
            page.context.close()


def test_faithfulness_controls_in_a_real_browser(server, browser):
    """The Attention page's new controls (faithfulness check, score a caption, force a prefix, beam nodes)
    and the Faithfulness page's run, clicked and typed into as a user would."""
    page = new_page(browser, f"{server.url}/attention", timeout_ms=PAGE_TIMEOUT_S * 1000)
    main = page.locator('[data-testid="stMain"]')
    try:
        main.locator('[data-testid="stImage"] img').first.wait_for(timeout=PAGE_TIMEOUT_S * 1000)
        wait_idle(page, PAGE_TIMEOUT_S)
        main.get_by_role("button", name="Run faithfulness check").click()
        main.get_by_text("Attention ranks the regions that matter", exact=False).first.wait_for(
            timeout=PAGE_TIMEOUT_S * 1000)
        wait_idle(page, PAGE_TIMEOUT_S)
        assert main.get_by_text("Spearman ρ", exact=False).count() == 3
        box = main.get_by_role("textbox", name="Caption to score", exact=True)
        box.fill("<b>a</b> zzqx dog 🐶 runs")
        box.press("Enter")
        main.get_by_text("Not in the model's vocabulary (scored as <unk>): zzqx").first.wait_for(
            timeout=PAGE_TIMEOUT_S * 1000)
        prefix = main.get_by_role("textbox", name="First words", exact=True)
        prefix.fill("a man")
        prefix.press("Enter")
        main.locator("strong", has_text="a man").first.wait_for(timeout=PAGE_TIMEOUT_S * 1000)
        wait_idle(page, PAGE_TIMEOUT_S)
        assert main.get_by_text("Attention for “", exact=False).count() == 1       # the beam view's first node
        assert not error_boxes(page) and horizontal_overflow(page)["document"] <= 0

        goto_page(page, "Faithfulness", PAGE_TIMEOUT_S)
        images = main.get_by_role("spinbutton", name="dev images (first n)", exact=True)
        images.fill("1")
        images.press("Enter")
        wait_idle(page, PAGE_TIMEOUT_S)
        main.get_by_role("button", name="Run over the split").click()
        main.get_by_text("Where attention is least faithful").first.wait_for(timeout=PAGE_TIMEOUT_S * 1000)
        wait_idle(page, PAGE_TIMEOUT_S)
        assert not error_boxes(page)
        main.get_by_role("button", name="Open").first.click()
        main.locator("h1", has_text="Attention").first.wait_for(timeout=PAGE_TIMEOUT_S * 1000)
        wait_idle(page, PAGE_TIMEOUT_S)
        assert not error_boxes(page)
    finally:
        page.context.close()


def sidebar_selectbox(page, label: str):
    return page.locator('[data-testid="stSidebar"] [data-testid="stSelectbox"]').filter(
        has=page.locator(f'input[aria-label="{label}"]')).first


def wait_for_selected(page, label: str, option: str, timeout_s: float) -> None:
    """Until the sidebar selectbox `label` shows `option` (its value sits in a combobox <input>)."""
    box = sidebar_selectbox(page, label)
    deadline = time.monotonic() + timeout_s
    while box.locator("input").input_value() != option:
        if time.monotonic() > deadline:
            raise AssertionError(f"{label}: {box.locator('input').input_value()!r}, expected {option!r}")
        page.wait_for_timeout(250)
    wait_idle(page, timeout_s)


def sidebar_select(page, label: str, option: str, timeout_s: float) -> None:
    """Pick `option` in the sidebar selectbox labelled `label`, the way a user does (open, click)."""
    sidebar_selectbox(page, label).locator('button[aria-label="Open"]').click()
    page.get_by_role("option", name=option, exact=True).click()
    wait_for_selected(page, label, option, timeout_s)


def test_upload_the_bundled_checkpoint_in_the_sidebar(server, browser, expected, photo, tmp_path):
    """The bundled checkpoint is 21 MB: Streamlit's server-wide maxUploadSize (20) answered HTTP 413.
    Upload it through the sidebar's real file input, pick it in the picker, caption with it."""
    if not BUNDLED_CHECKPOINT.is_file():
        pytest.skip("the bundled checkpoint is not in checkpoints/")
    _, _, expected_caption = expected
    copy = tmp_path / "my-lite2.safetensors"
    copy.write_bytes(BUNDLED_CHECKPOINT.read_bytes())
    assert copy.stat().st_size > 20 * 2**20
    page = new_page(browser, f"{server.url}/caption", timeout_ms=PAGE_TIMEOUT_S * 1000)
    try:
        wait_idle(page, PAGE_TIMEOUT_S)
        sidebar = page.locator('[data-testid="stSidebar"]')
        sidebar.locator('[data-testid="stExpander"] summary', has_text="Add a checkpoint").first.click()
        sidebar.locator('[data-testid="stFileUploaderDropzoneInput"]').set_input_files(str(copy))
        uploaded = "my-lite2.safetensors (uploaded)"
        wait_for_selected(page, "Checkpoint", uploaded, PAGE_TIMEOUT_S)       # selected once it is validated
        assert not error_boxes(page), error_boxes(page)
        kept = Path(server.log_path).parent / "cache" / "uploaded_checkpoints" / copy.name
        assert kept.read_bytes() == copy.read_bytes()
        # pick the bundled one, then the upload again, through the picker itself
        sidebar_select(page, "Checkpoint", CHECKPOINT_NAME, PAGE_TIMEOUT_S)
        sidebar_select(page, "Checkpoint", uploaded, PAGE_TIMEOUT_S)
        name, data = photo
        upload(page, file_payload(name, data))
        assert wait_for_caption_of(page, name, PAGE_TIMEOUT_S) == expected_caption     # same weights
        assert not error_boxes(page), error_boxes(page)
    finally:
        page.context.close()


def test_a_1x50000_png_on_the_attention_page(server, browser, expected):
    """Used to take the server from 1.2 to 8.5 GB and end in a DecompressionBombError traceback."""
    buffer = io.BytesIO()
    Image.new("RGB", (1, 50000), (30, 120, 200)).save(buffer, "PNG")
    page = new_page(browser, f"{server.url}/attention", timeout_ms=PAGE_TIMEOUT_S * 1000)
    try:
        wait_idle(page, PAGE_TIMEOUT_S)
        page.locator('[data-testid="stMain"] button', has_text="Upload").first.click()
        wait_idle(page, PAGE_TIMEOUT_S)
        upload(page, file_payload("strip.png", buffer.getvalue(), "image/png"))
        page.locator('[data-testid="stMain"] h3', has_text="Occlusion check").first.wait_for(
            timeout=PAGE_TIMEOUT_S * 1000)
        wait_idle(page, PAGE_TIMEOUT_S)
        assert not error_boxes(page), error_boxes(page)
        sizes = page.evaluate("""() => Array.from(document.querySelectorAll('[data-testid="stMain"] img'))
            .map(img => [img.naturalWidth, img.naturalHeight])""")
        assert len(sizes) >= 3 and all(w * h <= 16_000_000 and h <= 4096 for w, h in sizes), sizes
        print(f"server peak RSS after the strip: {server.peak_rss_mb():.0f} MB; images {sizes}")
    finally:
        page.context.close()


def click_button(page, label: str, timeout_s: float) -> None:
    page.locator('[data-testid="stMain"] button', has_text=label).first.click()
    page.wait_for_timeout(300)
    wait_idle(page, timeout_s)


def test_grid_checkpoint_comparison_and_failure_finder_in_a_real_browser(server, browser):
    """The new controls through real clicks: run the default 3×3×2 grid (table, both charts, two settings
    side by side), compare the checkpoint with itself on the split, filter the browser to unsupported words."""
    page = new_page(browser, f"{server.url}/beams", timeout_ms=PAGE_TIMEOUT_S * 1000)
    main = '[data-testid="stMain"]'
    try:
        wait_idle(page, PAGE_TIMEOUT_S)
        click_button(page, "Run the grid over 18 settings", PAGE_TIMEOUT_S)
        page.locator(f"{main} [data-testid='stVegaLiteChart']").nth(1).wait_for(timeout=PAGE_TIMEOUT_S * 1000)
        assert page.get_by_text("Two settings, image by image").count() == 1
        assert page.get_by_text("captions differ; biggest", exact=False).count() == 1
        assert not error_boxes(page) and horizontal_overflow(page)["document"] <= 0

        goto_page(page, "Compare checkpoints", PAGE_TIMEOUT_S, ready=READY["Compare checkpoints"])
        assert page.get_by_text("same checkpoint: every delta is zero", exact=False).count() == 1
        click_button(page, "Compare on", PAGE_TIMEOUT_S)
        page.get_by_text("captions differ · by CIDEr-D", exact=False).first.wait_for(timeout=PAGE_TIMEOUT_S * 1000)
        # 8 tiny images, or the real split's first n in screenshot mode: a checkpoint against itself changes none
        assert page.get_by_text(re.compile(r"\b0 of \d+ captions differ")).count() == 1
        assert not error_boxes(page) and horizontal_overflow(page)["document"] <= 0

        goto_page(page, "Flickr8K browser", PAGE_TIMEOUT_S, ready=READY["Flickr8K browser"])
        assert page.get_by_text("Captions with an unsupported word").count() >= 1
        page.locator(f"{main} [data-testid='stCheckbox']", has_text="Only captions with an unsupported word").first.click()
        wait_idle(page, PAGE_TIMEOUT_S)
        assert not error_boxes(page) and horizontal_overflow(page)["document"] <= 0
    finally:
        page.context.close()
