"""Bench 5 — the dashboard: cold start (server start -> first caption of an example on the Caption page),
the server's peak resident memory with the model loaded, and a page interaction on a cached image
(deselect + reselect an example: st.cache_data hit) beside one on a new image (encoder + decoder run).

Drives `streamlit run dashboard.py` headless with Playwright + Debian's chromium; skips with a clear line
when either is missing.
"""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from bench.common import REPO, Row

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]


def skip(reason: str) -> list[Row]:
    return [Row("dashboard", "skipped", "-", "-", None, "interaction <= 0.3 s", None, [f"skipped: {reason}"])]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def attention_word_steps(page, url: str, clicks: int) -> list[float]:
    """On the Attention page (first example, already captioned): click the caption's words in turn and time
    each click until the overlay's caption names the new word."""
    page.goto(f"{url}/attention")
    first = page.get_by_text("(step 1 of", exact=False).first
    first.wait_for(timeout=300_000)
    steps = int(first.inner_text().rsplit("of", 1)[1].strip(" )"))
    words = page.locator('[data-testid="stMain"] [data-testid="stButtonGroup"]').nth(2).locator("button")
    if steps < 2 or words.count() != steps:
        return []
    times = []
    for i in range(clicks):
        k = 1 + i % (steps - 1)
        t = time.perf_counter()
        words.nth(k).click()
        page.get_by_text(f"(step {k + 1} of {steps})", exact=False).first.wait_for(timeout=120_000)
        times.append(time.perf_counter() - t)
    return times


PAGE_READY_JS = """([title, needle]) => {
    const main = document.querySelector('[data-testid="stMain"]');
    const h1 = main && main.querySelector('h1');
    return !!h1 && h1.innerText.trim() === title && main.innerText.includes(needle);
}"""


def page_switches(page, rounds: int) -> list[float]:
    """Caption <-> Attention through the sidebar, on the example both pages have already captioned: time
    from the click until the new page shows its caption (Caption) or its word overlay (Attention)."""
    times = []
    for _ in range(rounds):
        for title, needle in (("Caption", "hypothes"), ("Attention", "(step 1 of")):
            t = time.perf_counter()
            page.locator('[data-testid="stSidebarNav"] a', has_text=title).first.click()
            page.wait_for_function(PAGE_READY_JS, arg=[title, needle], timeout=120_000)
            times.append(time.perf_counter() - t)
    return times


def run(args: argparse.Namespace) -> list[Row]:
    if args.quick:
        return skip("--quick (a server + browser start takes too long for a smoke run)")
    chromium = shutil.which("chromium") or (CHROMIUM if Path(CHROMIUM).exists() else None)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        return skip("playwright is not installed")
    if not chromium:
        return skip("no chromium (apt-get install -y chromium)")
    if args.synthetic or not args.checkpoint.is_file():
        return skip("needs the bundled checkpoint")
    port = free_port()
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "CAPTIONSCOPE_CACHE_DIR": cache, "PYTHONPATH": str(REPO)}
        t0 = time.perf_counter()
        server = subprocess.Popen([sys.executable, "-m", "streamlit", "run", "dashboard.py", "--server.headless",
                                   "true", "--server.port", str(port), "--browser.gatherUsageStats", "false"],
                                  cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            url = f"http://127.0.0.1:{port}"
            while True:
                try:
                    if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).status == 200:
                        break
                except OSError:
                    pass
                if server.poll() is not None or time.perf_counter() - t0 > 120:
                    return skip("streamlit did not start")
                time.sleep(0.1)
            t_health = time.perf_counter() - t0
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=chromium, args=ARGS)
                page = browser.new_page()
                page.goto(f"{url}/caption")
                captions = page.locator('[data-testid="stMain"] h3')   # the sidebar has h3s too
                captions.first.wait_for(timeout=300_000)
                t_first = time.perf_counter() - t0
                first_caption = captions.first.inner_text()
                rss = peak_rss_mb(server.pid)
                pills = page.locator('[data-testid="stButtonGroup"] button')
                pills.first.wait_for(timeout=60_000)
                names = [pills.nth(i).inner_text().strip() for i in range(pills.count())]
                if not names:
                    return skip(f"no example pills found on {page.url}")
                shown = names[0]

                def toggle(name: str, change: int) -> float:
                    """Click a pill; time until the number of captions (h3) on the page changed by `change`."""
                    expect = captions.count() + change
                    t = time.perf_counter()
                    pills.filter(has_text=name).first.click()
                    page.wait_for_function("document.querySelectorAll('[data-testid=stMain] h3').length == " + str(expect), timeout=120_000)
                    return time.perf_counter() - t

                new_image = toggle(names[1], +1) if len(names) > 1 else float("nan")   # encoder + decoder
                cached = []
                for _ in range(max(args.repeats, 3)):
                    toggle(shown, -1)                       # deselect
                    cached.append(toggle(shown, +1))        # reselect: a cache hit
                word_steps = attention_word_steps(page, url, max(args.repeats, 3) * 2)
                switches = page_switches(page, max(args.repeats, 3))
                browser.close()
        finally:
            server.terminate()
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.kill()
    inter = statistics.median(cached)
    word = statistics.median(word_steps) if word_steps else float("nan")
    switch = statistics.median(switches)
    return [
        Row("dashboard", "cold start -> first caption", f"{t_first:.1f} s", f"{t_health:.1f} s to /_stcore/health",
            t_first / t_health, "-", None,
            [f"server peak RSS (VmHWM) {rss:.0f} MB with the model loaded; first caption: {first_caption!r}"]),
        Row("dashboard", "interaction, cached image", f"{inter:.2f} s", f"{new_image:.2f} s new image",
            new_image / inter, "<= 0.3 s", inter <= 0.3,
            [f"reselect example {shown!r} (median of {len(cached)}) vs adding {names[1] if len(names) > 1 else '-'!r}"]),
        Row("dashboard", "attention: next word, cached image", f"{word:.2f} s", f"{inter:.2f} s caption reselect",
            None, "<= 0.3 s", word <= 0.3,
            [f"click word k+1 until its overlay caption shows (median of {len(word_steps)}; overlay, entropy and "
             f"β charts redrawn each time)"]),
        Row("dashboard", "page switch, cached image", f"{switch:.2f} s", f"{inter:.2f} s caption reselect",
            None, "<= 0.3 s", switch <= 0.3,
            [f"sidebar Caption <-> Attention until the caption / the word overlay shows (median of {len(switches)})"]),
    ]
