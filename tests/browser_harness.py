"""Real-browser helpers for the dashboard tests: a `streamlit run` server and headless Chromium.

    with dashboard_server({"FLICKR8K_DIR": ...}) as server, chromium() as browser:
        page = new_page(browser, server.url)

The server is a real `streamlit run dashboard.py` subprocess on a free localhost port (caches in tmp),
stopped with its whole process group even when the test fails. The browser is Debian's chromium driven by
Playwright (Playwright's own browser download is not used), so the tests are skipped, with the reason,
where chromium is not installed: `apt-get install -y chromium` (.ci/run does this).

`count_model_loads=True` starts the server through a small wrapper that prints MODEL_LOAD_MARKER to the
server log each time `Captioner.from_checkpoint` runs, so a test can check the model is loaded once per
server process; the app itself is unchanged.
"""
from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").is_file() else None)
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1280, "height": 800}
MODEL_LOAD_MARKER = "CAPTIONSCOPE_TEST_MODEL_LOAD"
MAX_SCREENSHOT_BYTES = 400_000


def _skip_reason() -> str | None:
    if CHROMIUM is None:
        return "chromium is not installed (apt-get install -y chromium); the real-browser tests need it"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright Python package is not installed"
    return None


SKIP_REASON = _skip_reason()
requires_chromium = pytest.mark.skipif(SKIP_REASON is not None, reason=SKIP_REASON or "")


# -- the server ------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.is_file() else ""

    def model_loads(self) -> int:
        return self.log().count(MODEL_LOAD_MARKER)

    def peak_rss_mb(self) -> float:
        """VmHWM of the server process (Linux): the most resident memory it ever had."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmHWM in /proc/<pid>/status")


# Runs streamlit's own CLI in this process after wrapping Captioner.from_checkpoint with a log line.
_COUNTING_WRAPPER = f"""
import sys
sys.path.insert(0, {str(REPO)!r})
import core.captioner as _c
_load = _c.Captioner.from_checkpoint.__func__
def _counted(cls, path, *args, **kwargs):
    print("{MODEL_LOAD_MARKER}", path, file=sys.stderr, flush=True)
    return _load(cls, path, *args, **kwargs)
_c.Captioner.from_checkpoint = classmethod(_counted)
from streamlit.web import cli
sys.argv = ["streamlit", *sys.argv[1:]]
sys.exit(cli.main())
"""


@contextlib.contextmanager
def dashboard_server(env: dict[str, str], *, count_model_loads: bool = False,
                     startup_timeout: float = 90.0) -> Iterator[Server]:
    """`streamlit run dashboard.py` on a free localhost port; yields once /_stcore/health answers."""
    port = free_port()
    workdir = Path(tempfile.mkdtemp(prefix="captionscope-server-"))
    full_env = {**os.environ, "CAPTIONSCOPE_CACHE_DIR": str(workdir / "cache"),
                "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false", "PYTHONUNBUFFERED": "1", **env}
    args = ["run", str(REPO / "dashboard.py"), "--server.headless", "true", "--server.port", str(port),
            "--server.address", "127.0.0.1", "--server.fileWatcherType", "none",
            "--browser.gatherUsageStats", "false"]
    command = ([sys.executable, "-c", _COUNTING_WRAPPER, *args] if count_model_loads
               else [sys.executable, "-m", "streamlit", *args])
    log_path = workdir / "server.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=REPO, env=full_env, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    server = Server(f"http://127.0.0.1:{port}", process, log_path)
    try:
        _wait_healthy(server, startup_timeout)
        yield server
    finally:
        _stop(process)
        shutil.rmtree(workdir, ignore_errors=True)


def _wait_healthy(server: Server, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"streamlit exited with {server.process.returncode}:\n{server.log()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{server.url}/_stcore/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"streamlit did not answer /_stcore/health within {timeout:.0f} s:\n{server.log()[-3000:]}")


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM the server's process group (it was started in its own session), SIGKILL if it lingers."""
    if process.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        try:
            process.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


# -- the browser -----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def chromium():
    """A headless Chromium (Debian's binary) through Playwright's sync API; closed on exit."""
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()


def new_page(browser, url: str, *, timeout_ms: float = 60_000):
    """A fresh browser context (= a fresh Streamlit session) at 1280x800, opened at `url`.

    Returns once the first script run has drawn the page title (every page starts with st.title), so a
    click cannot land in the middle of the first run.
    """
    context = browser.new_context(viewport=VIEWPORT)
    context.set_default_timeout(timeout_ms)
    page = context.new_page()
    page.goto(url)
    page.locator('[data-testid="stMain"] h1').first.wait_for()
    return page


def wait_idle(page, timeout_s: float = 60.0, *, settle_s: float = 0.75) -> None:
    """Wait until the script run is over: no 'running' status, spinner or skeleton for `settle_s`."""
    busy = ('[data-testid="stStatusWidget"], [data-testid="stSpinner"], [data-testid="stSkeleton"], '
            '[data-testid="stAppSkeleton"], [data-testid="stProgress"]')
    deadline = time.monotonic() + timeout_s
    quiet_since = None
    while time.monotonic() < deadline:
        if page.locator(busy).count() == 0:
            quiet_since = quiet_since or time.monotonic()
            if time.monotonic() - quiet_since >= settle_s:
                return
        else:
            quiet_since = None
        page.wait_for_timeout(150)
    raise TimeoutError(f"the app was still running after {timeout_s:.0f} s")


def nav_titles(page) -> list[str]:
    """Labels of the sidebar's page links (the icon's ligature text is a separate element)."""
    links = page.locator('[data-testid="stSidebarNav"] a')
    return [links.nth(i).inner_text().split("\n")[-1].strip() for i in range(links.count())]


def goto_page(page, title: str, timeout_s: float = 60.0, ready: str | None = None) -> None:
    """Click the sidebar link labelled exactly `title` (same session, unlike opening a new URL).

    `ready`: a selector that only the finished page has (the running indicator alone can be missed).
    """
    link = page.locator('[data-testid="stSidebarNav"] a').filter(has=page.get_by_text(title, exact=True))
    link.first.click()
    heading = "CaptionScope" if title == "Home" else title
    page.locator('[data-testid="stMain"] h1').filter(has_text=heading).first.wait_for(timeout=timeout_s * 1000)
    if ready:
        page.locator(ready).first.wait_for(timeout=timeout_s * 1000)
    wait_idle(page, timeout_s)


def error_boxes(page) -> list[str]:
    """Texts of st.error boxes and of st.exception / uncaught-exception boxes on the page."""
    boxes = page.locator('[data-testid="stAlertContentError"], [data-testid="stException"]')
    return [boxes.nth(i).inner_text() for i in range(boxes.count())]


def horizontal_overflow(page) -> dict[str, int]:
    """scrollWidth beyond the visible width of the document and of Streamlit's main scroll container."""
    return page.evaluate("""() => {
        const out = {};
        const doc = document.documentElement;
        out.document = doc.scrollWidth - window.innerWidth;
        const main = document.querySelector('[data-testid="stMain"]');
        if (main) out.main = main.scrollWidth - main.clientWidth;
        return out;
    }""")


def screenshot(page, folder: str | Path, name: str) -> Path:
    """Viewport PNG, optimised; quantised to a 256-colour palette when it would exceed ~400 KB."""
    from PIL import Image
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    image = Image.open(io.BytesIO(page.screenshot(full_page=False))).convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, "PNG", optimize=True)
    if buffer.tell() > MAX_SCREENSHOT_BYTES:
        buffer = io.BytesIO()
        image.quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.FLOYDSTEINBERG).save(
            buffer, "PNG", optimize=True)
    path = folder / f"{name}.png"
    path.write_bytes(buffer.getvalue())
    return path


# -- what the tests share about the app ------------------------------------------------------------------------
BUNDLED = REPO / "checkpoints" / "captionscope-lite2.safetensors"
CHECKPOINT_NAME = "captionscope-lite2.safetensors"


def checkpoint_folder(request, tmp_path_factory) -> Path:
    """A checkpoint folder with the bundled checkpoint and its log (else the tiny trained one from conftest)."""
    folder = tmp_path_factory.mktemp("checkpoints")
    if BUNDLED.is_file():
        source, log = BUNDLED, BUNDLED.with_name(f"{BUNDLED.stem}.log.jsonl")
    else:
        run = request.getfixturevalue("tiny_run")
        source, log = run / "best.safetensors", run / "log.jsonl"
    shutil.copyfile(source, folder / CHECKPOINT_NAME)
    if log.is_file():
        shutil.copyfile(log, folder / f"{Path(CHECKPOINT_NAME).stem}.log.jsonl")
    return folder


def app_decoding(captioner):
    """The DecodingConfig the dashboard starts with: the checkpoint's defaults, n-best = the whole beam."""
    import dataclasses
    config = captioner.default_decoding()
    return dataclasses.replace(config, num_return_sequences=config.beam_size)


def decoding_line(config) -> str:
    """The start of the Caption page's "Decoding: ..." line for a beam-search config (to check the app agrees)."""
    return (f"Decoding: {config.describe()} · length penalty {config.length_penalty:g} · "
            f"max length {config.max_length}")


# (image caption under the picture, subheader = best caption) of each result row of the Caption page
CAPTION_ROWS_JS = """() => Array.from(document.querySelectorAll('[data-testid="stMain"] [data-testid="stHorizontalBlock"]'))
    .filter(b => b.querySelector('[data-testid="stImageCaption"]') && b.querySelector('h3'))
    .map(b => [b.querySelector('[data-testid="stImageCaption"]').innerText.trim(),
               b.querySelector('h3').innerText.trim()])"""


def caption_rows(page) -> list[tuple[str, str]]:
    """[(image name, best caption)] of the Caption page's results, in page order."""
    return [tuple(row) for row in page.evaluate(CAPTION_ROWS_JS)]
