"""core.report: one self-contained, escaped HTML file; its CLI; and the report in a real Chromium."""
from __future__ import annotations

import re
import shutil
from html.parser import HTMLParser

import pytest

from core.captioner import Captioner
from core.data import load_dataset
from core.decoding import DecodingConfig
from core.report import CSP, ReportEntry, flickr_entries, report_for_captioner
from tests.browser_harness import chromium, requires_chromium
from tests.conftest import run_cli

HOSTILE = "<img src=x onerror=alert(1)>.jpg"


class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def _tags(text: str) -> list[tuple[str, dict]]:
    parser = _Tags()
    parser.feed(text)
    return parser.tags


@pytest.fixture(scope="module")
def report_files(tiny_checkpoint, tiny_flickr, tmp_path_factory):
    folder = tmp_path_factory.mktemp("report")
    first = next(iter(load_dataset(tiny_flickr).split("dev")))
    hostile = folder / HOSTILE
    shutil.copy(first.path, hostile)
    return folder, hostile


def test_report_is_self_contained_and_escaped(tiny_checkpoint, tiny_flickr, report_files):
    folder, hostile = report_files
    captioner = Captioner.from_checkpoint(tiny_checkpoint)
    decoding = DecodingConfig(beam_size=2, num_return_sequences=2)
    items = load_dataset(tiny_flickr).split("dev")[:3]
    entries, notes = flickr_entries(captioner, items, decoding, with_meteor=False)
    entries += [ReportEntry(r.name, r, "upload") for r in captioner.caption_many(
        [hostile, b"not an image"], decoding, names=[HOSTILE, "<b>bad</b>.png"])]
    text = report_for_captioner(captioner, entries, decoding, notes=notes)
    tags = _tags(text)
    # nothing hostile became markup: one <img> per picture and heatmap, all data: URIs, no script, no link
    assert not [t for t, _ in tags if t in ("script", "link", "iframe", "object", "embed", "b")]
    assert all(a.get("src", "").startswith("data:image/jpeg;base64,") for t, a in tags if t == "img")
    assert not [a for t, a in tags if t == "img" and "onerror" in a]
    assert not re.search(r"(?:src|href)\s*=\s*[\"']?(?:https?:|//)", text)
    assert ("meta", {"http-equiv": "Content-Security-Policy", "content": CSP}) in tags
    assert "&lt;img src=x onerror=alert(1)&gt;.jpg" in text and "&lt;b&gt;bad&lt;/b&gt;.png" in text
    assert captioner.checkpoint_id in text and "beam_size=2" in text
    # per image: the main picture plus one heatmap per word (with <end>) of the best caption
    good = [e for e in entries if hasattr(e.result, "hypotheses")]
    heatmaps = sum(min(len(e.result.hypotheses[0].attention), 30) for e in good)
    assert sum(t == "img" for t, _ in tags) == len(good) + heatmaps
    for item in items:                         # references and scores of the Flickr8K images
        assert all(f"<li>{ref}</li>" in text for ref in item.captions)
    assert text.count("<h3>Scores (×100)</h3>") == 3 and "CIDEr-D" in text


def test_cli_files_and_dataset_names(tiny_checkpoint, tiny_flickr, report_files, tmp_path):
    _, hostile = report_files
    names = [it.image for it in load_dataset(tiny_flickr).split("dev")[:2]]
    out = tmp_path / "report.html"
    done = run_cli("core.report", str(hostile), "--data", str(tiny_flickr), "--split", "dev", "--images", *names,
                   "--out", str(out), "--checkpoint", str(tiny_checkpoint), "--beam", "2", "--no-meteor")
    assert done.returncode == 0, done.stderr
    text = out.read_text()
    assert all(n in text for n in names) and "&lt;img src=x" in text and "<img src=x" not in text


@pytest.mark.parametrize("name", ["nope.jpg", "../Flickr8k.token.txt", "/etc/passwd"])
def test_cli_unknown_or_outside_name_is_one_line(tiny_checkpoint, tiny_flickr, tmp_path, name):
    done = run_cli("core.report", "--data", str(tiny_flickr), "--images", name, "--out", str(tmp_path / "r.html"),
                   "--checkpoint", str(tiny_checkpoint))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.startswith("error: not in the dev split") and name in done.stderr
    assert not (tmp_path / "r.html").exists()


@requires_chromium
def test_report_opens_offline_with_every_image_loaded(tiny_checkpoint, tiny_flickr, report_files, tmp_path):
    _, hostile = report_files
    out = tmp_path / "report.html"
    names = [it.image for it in load_dataset(tiny_flickr).split("dev")[:2]]
    done = run_cli("core.report", str(hostile), "--data", str(tiny_flickr), "--images", *names,
                   "--out", str(out), "--checkpoint", str(tiny_checkpoint), "--no-meteor")
    assert done.returncode == 0, done.stderr
    with chromium() as browser:
        context = browser.new_context(offline=True)
        page = context.new_page()
        requests, dialogs = [], []
        page.on("request", lambda r: requests.append(r.url))
        page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        page.goto(out.as_uri())
        page.wait_for_load_state("load")
        images = page.evaluate("[...document.images].map(i => [i.complete, i.naturalWidth, i.naturalHeight])")
        assert len(images) > 3 and all(c and w > 0 and h > 0 for c, w, h in images), images
        assert HOSTILE in page.locator("h2").all_inner_texts()
        assert not dialogs
        assert [u for u in requests if not u.startswith(("file:", "data:"))] == []
        context.close()
