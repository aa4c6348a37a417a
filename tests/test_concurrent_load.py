"""Under load: one browser session runs the Flickr8K browser's first visit (a corpus job), another captions a
photo meanwhile. The corpus job must run in the low-priority worker process, not in the server, and the
other session's caption must arrive while the job is still running (no timing is asserted: the order is)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.browser_harness import (
    CHROMIUM,
    CHROMIUM_ARGS,
    VIEWPORT,
    checkpoint_folder,
    dashboard_server,
    requires_chromium,
)

COPIES = 40        # 8 tiny images x 40 = 320 dev images: well over the worker threshold

pytestmark = [requires_chromium, pytest.mark.timeout(600)]


def _big_flickr(tiny: Path, root: Path) -> Path:
    (root / "images").mkdir(parents=True)
    tokens, names = [], []
    lines = (tiny / "Flickr8k.token.txt").read_text().splitlines()
    for k in range(COPIES):
        for src in sorted((tiny / "images").iterdir()):
            name = f"{k:03d}{src.name}"
            shutil.copy(src, root / "images" / name)
            names.append(name)
            tokens += [f"{name}#{line.split('#', 1)[1]}" for line in lines if line.startswith(src.name + "#")]
    (root / "Flickr8k.token.txt").write_text("\n".join(tokens) + "\n")
    (root / "Flickr_8k.trainImages.txt").write_text("\n".join(names[:8]) + "\n")
    (root / "Flickr_8k.devImages.txt").write_text("\n".join(names) + "\n")
    return root


def _children_nice(pid: int) -> list[tuple[str, int]]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append((cmdline, int(fields[16])))
    return out


def test_caption_answers_while_another_session_runs_the_first_visit(request, tmp_path_factory, tiny_flickr):
    from playwright.sync_api import sync_playwright

    data = _big_flickr(tiny_flickr, tmp_path_factory.mktemp("big"))
    env = {"CAPTIONSCOPE_CHECKPOINT_DIR": str(checkpoint_folder(request, tmp_path_factory)),
           "FLICKR8K_DIR": str(data), "CAPTIONSCOPE_FEATURES_DIR": str(tmp_path_factory.mktemp("nofeat"))}
    with dashboard_server(env) as server, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            heavy = browser.new_context(viewport=VIEWPORT).new_page()
            heavy.set_default_timeout(400_000)
            heavy.goto(f"{server.url}/browser")
            heavy.locator('[data-testid="stProgress"]').first.wait_for()        # the first visit is running
            light = browser.new_context(viewport=VIEWPORT).new_page()
            light.set_default_timeout(400_000)
            light.goto(f"{server.url}/caption")
            light.locator('[data-testid="stMain"] h3').first.wait_for()       # the example's caption
            still_running = heavy.locator('[data-testid="stProgress"]').count() > 0
            workers = [(c, n) for c, n in _children_nice(server.pid) if "core.worker" in c]
            heavy.locator('[data-testid="stMain"] h3:has-text("Details")').first.wait_for()
            assert light.locator('[data-testid="stMain"] h3').first.inner_text().strip()
        finally:
            browser.close()
    assert still_running, "the corpus job finished before the other session's caption: nothing was measured"
    assert workers and all(nice >= 10 for _, nice in workers), workers
