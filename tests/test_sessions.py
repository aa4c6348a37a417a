"""Many sessions at once: 8 browser sessions upload 8 different images to one dashboard server.

Every session must show its own image's caption (computed in-process with core.captioner.Captioner on the
same checkpoint and decoding settings) and nothing from another session; the server must load the model
once (the server is started through tests.browser_harness's counting wrapper, which logs each
Captioner.from_checkpoint call) and stay under MEMORY_BOUND_MB of peak resident memory. Each session has a
hard timeout and so has the whole run; the server and browser are stopped at the end.
"""
from __future__ import annotations

import asyncio
import io
import time

import pytest
from conftest import COLOURS, SHAPES, draw_shape
from PIL import Image, ImageOps

from tests.browser_harness import (
    CAPTION_ROWS_JS,
    CHECKPOINT_NAME,
    CHROMIUM,
    CHROMIUM_ARGS,
    REPO,
    VIEWPORT,
    app_decoding,
    checkpoint_folder,
    dashboard_server,
    decoding_line,
    requires_chromium,
)

SESSIONS = 8
SESSION_TIMEOUT_S = 100         # one session: open the page, upload, get the caption
TOTAL_TIMEOUT_S = 110           # all of them, run concurrently
MEMORY_BOUND_MB = 2500          # server VmHWM; the model (+ encoder) is ~100 MB in float32, torch ~500 MB
EXAMPLE = "astronaut.jpg"       # the Caption page's default example, shown in every session too

pytestmark = [requires_chromium, pytest.mark.timeout(240)]


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def candidate_images() -> list[tuple[str, bytes]]:
    """Shapes (which the tiny model names exactly) first, then the example photos, mirrored and turned."""
    shapes = [(f"{colour}-{shape}.png", png(draw_shape(colour, shape, 224))) for colour in COLOURS
              for shape in SHAPES]
    photos = []
    for path in sorted((REPO / "assets" / "examples").glob("*.jpg")):
        image = Image.open(path).convert("RGB")
        photos += [(f"{path.stem}-mirrored.png", png(ImageOps.mirror(image))),
                   (f"{path.stem}-turned.png", png(image.rotate(90, expand=True)))]
    return shapes + photos


@pytest.fixture(scope="module")
def plan(request, tmp_path_factory):
    """(checkpoint folder, decoding, [(file name, bytes, expected caption)] with 8 different captions)."""
    from core.captioner import Captioner
    folder = checkpoint_folder(request, tmp_path_factory)
    captioner = Captioner.from_checkpoint(folder / CHECKPOINT_NAME)
    config = app_decoding(captioner)
    example_caption = captioner.caption(REPO / "assets" / "examples" / EXAMPLE, config).caption
    chosen, seen = [], {example_caption}
    for name, data in candidate_images():
        caption = captioner.caption(data, config, name=name).caption
        if caption not in seen:
            seen.add(caption)
            chosen.append((name, data, caption))
        if len(chosen) == SESSIONS:
            break
    assert len(chosen) == SESSIONS, f"only {len(chosen)} images with different captions: {chosen}"
    # file names that say which session uploaded them
    return folder, config, [(f"session{i}-{name}", data, caption) for i, (name, data, caption) in enumerate(chosen)]


BUSY = '[data-testid="stStatusWidget"], [data-testid="stSpinner"], [data-testid="stSkeleton"]'


async def one_session(context, url: str, name: str, data: bytes, progress: dict) -> dict:
    """Open the Caption page in a new tab (= a new Streamlit session), upload `data`, wait until its caption
    shows; return what the tab saw. `progress[name]` says how far it got (for the message on a timeout).
    """
    progress[name] = "opening the page"
    started = time.monotonic()
    page = await context.new_page()
    try:
        await page.goto(f"{url}/caption")
        await page.locator('[data-testid="stMain"] h1').filter(has_text="Caption").first.wait_for()
        progress[name] = "uploading"
        await page.locator('[data-testid="stMain"] [data-testid="stFileUploaderDropzoneInput"]').set_input_files(
            [{"name": name, "mimeType": "image/png", "buffer": data}])
        rows: dict[str, str] = {}
        quiet = 0
        while quiet < 4:            # own row shown and nothing running for 4 polls in a row
            await page.wait_for_timeout(200)
            rows = dict(await page.evaluate(CAPTION_ROWS_JS))
            busy = await page.locator(BUSY).count()
            quiet = quiet + 1 if name in rows and not busy else 0
            progress[name] = f"waiting: busy={busy}, rows={rows}"
        errors = await page.locator('[data-testid="stAlertContentError"], [data-testid="stException"]').all_inner_texts()
        decoding = await page.get_by_text("Decoding:", exact=False).first.inner_text()
        return {"rows": rows, "errors": errors, "decoding": decoding, "seconds": time.monotonic() - started}
    finally:
        await page.close()


async def run_sessions(url: str, uploads: list[tuple[str, bytes, str]], progress: dict) -> list[dict]:
    from playwright.async_api import async_playwright
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        # one browser context, so the tabs share the HTTP and compiled-JS caches (the CPU goes to the server)
        context = await browser.new_context(viewport=VIEWPORT)
        context.set_default_timeout(SESSION_TIMEOUT_S * 1000)
        try:
            tasks = [asyncio.wait_for(one_session(context, url, name, data, progress), SESSION_TIMEOUT_S)
                     for name, data, _ in uploads]
            return await asyncio.wait_for(asyncio.gather(*tasks), TOTAL_TIMEOUT_S)
        finally:
            await browser.close()


def test_eight_sessions_each_get_their_own_caption(plan, tiny_flickr, tmp_path_factory):
    folder, config, uploads = plan
    env = {"CAPTIONSCOPE_CHECKPOINT_DIR": str(folder), "FLICKR8K_DIR": str(tiny_flickr),
           "CAPTIONSCOPE_FEATURES_DIR": str(tmp_path_factory.mktemp("no_features"))}
    with dashboard_server(env, count_model_loads=True) as server:
        assert server.model_loads() == 0            # cold server: the sessions race to load the model
        started = time.monotonic()
        progress: dict[str, str] = {}
        try:
            results = asyncio.run(run_sessions(server.url, uploads, progress))
        except TimeoutError:
            pytest.fail(f"sessions timed out; where each got to: {progress}\nserver log:\n{server.log()[-2000:]}")
        elapsed = time.monotonic() - started
        loads, peak_mb = server.model_loads(), server.peak_rss_mb()
        log = server.log()
    assert server.process.poll() is not None        # the server was stopped

    expected = {name: caption for name, _, caption in uploads}
    for (name, _, caption), seen in zip(uploads, results):
        assert not seen["errors"], (name, seen["errors"])
        assert seen["decoding"].startswith(decoding_line(config)), seen["decoding"]
        assert seen["rows"].get(name) == caption, (name, caption, seen["rows"])
        # only its own upload and the default example: no other session's image or caption leaked in
        assert name in seen["rows"] and set(seen["rows"]) <= {name, EXAMPLE}, (name, seen["rows"])  # no other tab's image
        others = {c for n, c in expected.items() if n != name}
        assert not others & set(seen["rows"].values()), (name, seen["rows"])
    assert loads == 1, f"model loaded {loads} times:\n{log[-2000:]}"
    assert peak_mb < MEMORY_BOUND_MB, f"server peak RSS {peak_mb:.0f} MB"
    assert elapsed < TOTAL_TIMEOUT_S
    print(f"{SESSIONS} sessions in {elapsed:.1f} s (slowest {max(r['seconds'] for r in results):.1f} s); "
          f"server peak RSS {peak_mb:.0f} MB; model loads {loads}")
