"""The Streamlit dashboard, driven headless through streamlit.testing.v1.AppTest.

Uses the bundled checkpoint when it is there (else the tiny trained one from conftest), copied into a
temporary checkpoint folder together with its training log, a made-up `.eval.json` and a README, so the
model card has everything to show. FLICKR8K_DIR points at the 8-image `tiny_flickr` fixture and every
cache goes to tmp. Page switching: `pages/` makes AppTest run each page file on its own, which is why
every page draws the shared sidebar itself (ui.sidebar.page_setup).
"""
from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest
from browser_harness import checkpoint_folder
from PIL import Image

from streamlit.testing.v1 import AppTest

REPO = Path(__file__).resolve().parents[1]
APP = str(REPO / "dashboard.py")
TIMEOUT = 120
EXAMPLE = REPO / "assets" / "examples" / "astronaut.jpg"
EVAL = {"split": "dev", "images": 8, "beams": {"1": {"BLEU-1": 0.61, "BLEU-4": 0.1234, "METEOR": 0.2, "CIDEr-D": 0.5},
                                             "3": {"BLEU-1": 0.62, "BLEU-4": 0.1357, "CIDEr-D": 0.52}}}


@pytest.fixture(scope="module")
def checkpoint_dir(request, tmp_path_factory) -> Path:
    folder = checkpoint_folder(request, tmp_path_factory)     # bundled checkpoint + log (or the tiny one)
    (folder / "captionscope-lite2.eval.json").write_text(json.dumps(EVAL))
    (folder / "README.md").write_text("# Checkpoints\n\nTest notes about the bundled model.\n")
    return folder


@pytest.fixture(scope="module")
def env(checkpoint_dir, tiny_flickr, tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("CAPTIONSCOPE_CHECKPOINT_DIR", str(checkpoint_dir))
    mp.setenv("CAPTIONSCOPE_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    mp.setenv("CAPTIONSCOPE_FEATURES_DIR", str(tmp_path_factory.mktemp("no_features")))
    mp.setenv("FLICKR8K_DIR", str(tiny_flickr))
    yield checkpoint_dir
    mp.undo()


def start(page: str | None = None) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=TIMEOUT).run()
    assert not at.exception, [e.value for e in at.exception]
    if page:
        at.switch_page(f"pages/{page}.py").run()
        assert not at.exception, [e.value for e in at.exception]
    return at


def jpeg_bytes(path: Path) -> bytes:
    buffer = io.BytesIO()
    Image.open(path).convert("RGB").save(buffer, format="JPEG")
    return buffer.getvalue()


def image_table(at: AppTest):
    """The browser's image table (the failure finder's word tables come before it on the page)."""
    return next(d.value for d in at.dataframe if "thumbnail" in d.value.columns)


def shown_references(at: AppTest) -> tuple[str, list[str]]:
    """The detail view's references block (each reference, then the caption with BLEU's matches marked) and
    its numbered reference lines."""
    block = next(m.value for m in at.markdown if "&emsp;↳" in m.value)
    return block, [line for line in block.split("\n") if line[:1].isdigit() and ". " in line]


def widget(elements, label: str):
    found = [e for e in elements if e.label == label]
    assert found, f"no widget labelled {label!r} (have {[e.label for e in elements]})"
    return found[0]


def test_every_page_renders(env):
    at = start()
    assert at.title[0].value == "CaptionScope"
    assert not at.error, [e.value for e in at.error]
    assert widget(at.selectbox, "Checkpoint").value == "captionscope-lite2.safetensors"
    flickr = os.environ["FLICKR8K_DIR"]
    assert widget(at.text_input, "Flickr8K folder").value == flickr      # from $FLICKR8K_DIR
    titles = {"caption": "Caption", "attention": "Attention", "faithfulness": "Faithfulness", "beams": "Beam comparison",
              "browser": "Flickr8K browser", "model_card": "Model card", "presentation": "Presentation",
              "home": "CaptionScope"}
    for page, title in titles.items():
        at.switch_page(f"pages/{page}.py").run()
        assert not at.exception, (page, [e.value for e in at.exception])
        assert not at.error, (page, [e.value for e in at.error])
        assert at.title[0].value == title
        # the shared sidebar is on every page, with the state it had
        assert widget(at.selectbox, "Checkpoint").value == "captionscope-lite2.safetensors"
        assert widget(at.text_input, "Flickr8K folder").value == flickr


def test_caption_example_and_nbest(env):
    at = start("caption")
    captions = [s.value for s in at.main.subheader]
    assert captions and all(c.strip() and c != "(empty caption)" for c in captions)
    widget(at.slider, "Beam width").set_value(3).run()
    assert not at.exception
    nbest = at.table[0].value               # a static table: long captions wrap instead of being cut off
    assert len(nbest) == 3 and list(nbest["Rank"]) == ["1", "2", "3"]
    assert nbest["Caption"].str.len().gt(0).all()
    logprobs = nbest["Log-prob"].astype(float)
    assert (logprobs.diff().dropna() <= 1e-6).all() or at.session_state["decoding"].length_penalty
    assert {b.label for b in at.get("download_button")} == {"Download CSV", "Download JSON", "Report (HTML)"}


def test_sidebar_decoding_knobs(env):
    """The Hugging Face knobs from the sidebar: bad words leave the caption (unknown ones are named), diverse
    beam search runs once the groups divide the width, and a contradiction is one error naming the setting."""
    at = start("caption")
    first = at.main.subheader[0].value.split()
    word = next(w for w in first if len(w) > 2)
    widget(at.text_input, "Bad words").set_value(f"{word}, zzqqx").run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert any("zzqqx" in w.value for w in at.sidebar.warning)
    assert at.session_state["decoding"].bad_words == (word,)
    assert all(word not in s.value.split() for s in at.main.subheader)

    widget(at.slider, "Beam width").set_value(3).run()
    widget(at.number_input, "Beam groups").set_value(2).run()
    assert not at.exception
    errors = [e.value for e in at.sidebar.error]
    assert len(errors) == 1 and "num_beam_groups (2) must divide beam_size (3)" in errors[0]
    assert at.session_state["decoding"].num_beam_groups == 1           # captions go on without the knobs
    widget(at.slider, "Beam width").set_value(4).run()
    assert not at.exception and not at.sidebar.error
    widget(at.slider, "Diversity penalty").set_value(1.0).run()
    decoding = at.session_state["decoding"]
    assert (decoding.num_beam_groups, decoding.diversity_penalty, decoding.bad_words) == (2, 1.0, (word,))
    assert len(at.table[0].value) == 4 and decoding.describe().startswith("diverse beam search")
    widget(at.number_input, "Min length").set_value(12).run()
    assert at.session_state["decoding"].min_length == 12 and not at.exception
    assert len(at.main.subheader[0].value.split()) >= 11                  # 12 tokens incl. <end>
    assert "min length 12" in at.main.caption[0].value                     # the page names the knobs in use


def test_caption_bad_upload_keeps_the_others(env):
    at = start("caption")
    uploader = [u for u in at.get("file_uploader") if u.label == "Upload photos"][0]
    uploader.set_value([("notes.jpg", b"<html>not an image</html>", "image/jpeg"),
                        ("good.jpg", jpeg_bytes(EXAMPLE), "image/jpeg")]).run()
    assert not at.exception
    errors = [e.value for e in at.error]
    assert len(errors) == 1 and errors[0].startswith("notes.jpg:") and "\n" not in errors[0]
    # the good upload and the example picked by default are both captioned
    assert len([s for s in at.main.subheader if s.value.strip()]) == 2
    assert len(at.table) == 2


def test_attention_words_grid_and_occlusion(env):
    from core.text import END
    from core.captioner import Captioner
    at = start("attention")
    decoding = at.session_state["decoding"]
    expected = Captioner.from_checkpoint(env / "captionscope-lite2.safetensors").caption(EXAMPLE, decoding)
    hyp = expected.hypotheses[0]
    tokens = expected.words[0] + ([END] if hyp.finished else [])
    words = widget(at.pills, "Word")
    assert len(words.options) == len(tokens) == hyp.attention.shape[0]
    assert [o.replace("\u200b", "") for o in words.options] == tokens
    images = at.get("image")
    assert len(images) >= 2     # the chosen word's overlay and the grid of all words
    if len(tokens) > 2:
        words.set_value(2).run()
        assert not at.exception
        assert widget(at.slider, "Step").value == 2
        widget(at.slider, "Step").set_value(1).run()
        assert widget(at.pills, "Word").value == 1
    [b for b in at.button if b.label == "Run occlusion check"][0].click().run()
    assert not at.exception
    labels = [m.label for m in at.metric]
    assert any(label.endswith("before") for label in labels) and "after" in labels
    assert any("Caption after" in m.value for m in at.markdown)
    assert {b.label for b in at.get("download_button")} >= {"Grid (PNG)", "Animation (GIF)"}


def test_attention_faithfulness_scoring_prefix_and_beam_view(env):
    from core.captioner import Captioner
    at = start("attention")
    decoding = at.session_state["decoding"]
    expected = Captioner.from_checkpoint(env / "captionscope-lite2.safetensors").caption(EXAMPLE, decoding)
    hyp = expected.hypotheses[0]
    # three maps, their correlations, deletion curves and one verdict line
    [b for b in at.button if b.label == "Run faithfulness check"][0].click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert len([m for m in at.metric if m.label.startswith("Spearman ρ")]) == 3
    assert any(i.value.startswith("Attention ranks the regions that matter") for i in at.info)
    widget(at.radio, "Deletion space").set_value("Pixel space").run()
    assert not at.exception and not any(i.value.startswith("Attention ranks") for i in at.info)   # asks again
    # score a caption: the model's own one first, then bad and unknown text
    box = widget(at.text_input, "Caption to score")
    assert box.value == expected.caption
    assert widget(at.metric, "Log-prob (this caption)").value == f"{hyp.logprob:.2f}"
    box.set_value("<b>a</b> zzqx dog 🐶 runs").run()
    assert not at.exception
    assert any("zzqx" in w.value for w in at.warning) and any("HTML tags removed" in c.value for c in at.caption)
    widget(at.text_input, "Caption to score").set_value("   ").run()
    assert any("has no words" in e.value for e in at.error)
    # force a prefix
    widget(at.text_input, "First words").set_value("a man").run()
    assert not at.exception and any(m.value.startswith("**a man**") for m in at.markdown)
    widget(at.text_input, "First words").set_value("a zzqx").run()
    assert any("not in the model's vocabulary: zzqx" in e.value for e in at.error)
    # the beam search, step by step: picking a node shows its attention
    node = widget(at.selectbox, "Node")
    assert len(node.options) > 1 and node.options[0].startswith("step 1 · kept")
    node.set_value(len(node.options) - 1).run()
    assert not at.exception, [e.value for e in at.exception]


def test_attention_prefix_and_beam_view_apply_the_sidebar_knobs(env):
    """The sidebar's Hugging Face knobs reach the forced prefix (min length counts the typed words) and the
    beam view (diverse groups: the width moves in steps of the groups, each node names its group)."""
    at = start("attention")
    widget(at.number_input, "Min length").set_value(12).run()
    widget(at.text_input, "First words").set_value("a man").run()
    assert not at.exception, [e.value for e in at.exception]
    shown = next(m.value for m in at.markdown if m.value.startswith("**a man**"))
    assert len(shown.replace("*", "").split()) >= 11                          # 12 tokens incl. <end>
    widget(at.slider, "Beam width").set_value(4).run()
    widget(at.number_input, "Beam groups").set_value(2).run()
    widget(at.slider, "Diversity penalty").set_value(1.0).run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    width = widget(at.slider, "Beam width k")
    assert width.value == 4 and width.step == 2 and width.min == 2
    assert "group" in at.dataframe[-1].value.columns and set(at.dataframe[-1].value["group"]) == {1, 2}
    assert any("diversity penalty 1 between 2 groups" in c.value for c in at.caption)
    widget(at.selectbox, "Node").set_value(1).run()
    assert not at.exception, [e.value for e in at.exception]


def test_faithfulness_page_summary_and_link_to_the_attention_page(env):
    at = start("faithfulness")
    widget(at.number_input, "dev images (first n)").set_value(2).run()
    [b for b in at.button if b.label == "Run over the split"][0].click().run()
    assert not at.exception, [e.value for e in at.exception]
    summary = at.table[0].value
    assert list(summary["Ranking"]) == ["attention", "saliency", "random"]
    assert any(s.value == "Where attention is least faithful" for s in at.subheader)
    opens = [b for b in at.button if b.label == "Open"]
    assert opens
    opens[0].click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.title[0].value == "Attention"
    assert widget(at.selectbox, "dev image").value.endswith(".jpg")


def test_beam_comparison_rows_and_sweep(env):
    at = start("beams")
    widget(at.multiselect, "Beam widths").set_value([1, 2, 4]).run()
    assert not at.exception
    table = at.table[0].value
    assert list(table["Beam"]) == ["1", "2", "4"]
    assert table["Caption"].str.len().gt(0).all()
    widget(at.number_input, "dev images (first n)").set_value(4).run()
    [b for b in at.button if b.label.startswith("Run the sweep")][0].click().run()
    assert not at.exception, [e.value for e in at.exception]
    sweep = at.dataframe[0].value
    assert list(sweep["width"]) == [1, 2, 4]
    assert sweep["BLEU-4"].between(0, 100).all() and sweep["mean_length"].gt(0).all()


def test_flickr_browser_filters_and_details(env):
    at = start("browser")
    assert [m.label for m in at.metric][:4] == ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4"]
    table = image_table(at)
    assert len(table) == 8
    assert table["thumbnail"].str.startswith("data:image/jpeg;base64,").all()
    cider = table["CIDEr-D"].tolist()
    assert cider == sorted(cider)                                   # default sort: worst first
    widget(at.text_input, "Search").set_value("red").run()
    assert not at.exception
    table = image_table(at)
    assert len(table) == 2
    assert (table["caption"] + " " + table["references_text"]).str.contains("red").all()
    detail = widget(at.selectbox, "Image (or select a row above)")
    assert len(detail.options) == 2 and all("red" in name for name in detail.options)
    assert "image" not in table.columns       # the name is in the details: the table fits 1280 px
    _, references = shown_references(at)
    assert [r.split(". ")[0] for r in references] == ["1", "2", "3", "4", "5"]     # 5 numbered references
    widget(at.selectbox, "Rows").set_value(10).run()
    assert not at.exception


def test_model_card_metric_table(env):
    at = start("model_card")
    metrics = at.table[0].value
    assert "Xu et al. 2015, soft attention" in metrics.index
    assert metrics.loc["Xu et al. 2015, soft attention", "BLEU-4"] == "19.5"
    assert metrics.loc["Xu et al. 2015, hard attention", "METEOR"] == "20.3"
    assert metrics.loc["this model, dev, beam 1", "BLEU-4"] == "12.3"     # from the .eval.json, x100
    assert metrics.loc["this model, dev, beam 3", "METEOR"] == "—"
    assert any(i.startswith("This checkpoint, dev") for i in metrics.index)
    assert len(at.get("vega_lite_chart")) >= 1                    # training curves from the log
    assert any(e.label.endswith("README.md") for e in at.expander)


def test_bad_checkpoint_is_one_line_error(env, tmp_path, monkeypatch):
    (tmp_path / "broken.safetensors").write_bytes(b"\x80\x04 definitely a pickle")
    monkeypatch.setenv("CAPTIONSCOPE_CHECKPOINT_DIR", str(tmp_path))
    at = start()
    errors = [e.value for e in at.sidebar.error]
    assert len(errors) == 1 and "broken.safetensors" in errors[0] and "\n" not in errors[0]
    at.switch_page("pages/caption.py").run()
    assert not at.exception
    assert any("broken.safetensors" in e.value for e in at.main.error)


def checkpoint_uploader(at: AppTest):
    return [u for u in at.get("file_uploader") if u.label.startswith("CaptionScope")][0]


def sidebar_texts(at: AppTest) -> list[str]:
    """Every text the sidebar shows the user: messages, the picker's options, toasts."""
    return ([e.value for e in at.sidebar.error] + list(widget(at.selectbox, "Checkpoint").options)
            + [t.value for t in at.toast])


def test_checkpoint_upload(env, tmp_path, monkeypatch):
    monkeypatch.setenv("CAPTIONSCOPE_CACHE_DIR", str(tmp_path))
    at = start()
    checkpoint_uploader(at).set_value(("evil.safetensors", b"PK\x03\x04 zip from torch.save",
                                       "application/octet-stream")).run()
    assert not at.exception
    assert any("evil.safetensors" in e.value and "pickle" in e.value for e in at.sidebar.error)
    assert not list((tmp_path / "uploaded_checkpoints").glob("*.safetensors"))
    data = (env / "captionscope-lite2.safetensors").read_bytes()
    checkpoint_uploader(at).set_value(("my model.safetensors", data, "application/octet-stream")).run()
    assert not at.exception
    assert widget(at.selectbox, "Checkpoint").value == "my_model.safetensors (uploaded)"
    assert (tmp_path / "uploaded_checkpoints" / "my_model.safetensors").read_bytes() == data
    assert not at.sidebar.error                                    # the first upload's error is gone
    assert [t.value for t in at.toast] == ["Added my_model.safetensors (uploaded); it is selected"]
    assert checkpoint_uploader(at).value is None                   # a fresh uploader: no chip with the raw name


def test_checkpoint_upload_shows_names_cleaned_of_bidi_characters(env, tmp_path, monkeypatch):
    """U+202E (right-to-left override) made "report\u202egnp.safetensors" show reversed; every name the
    sidebar shows is now the cleaned one used on disk."""
    monkeypatch.setenv("CAPTIONSCOPE_CACHE_DIR", str(tmp_path))
    at = start()
    checkpoint_uploader(at).set_value(("bad\u202eevil\u200b.safetensors", b"\x80\x04 pickle",
                                       "application/octet-stream")).run()
    errors = [e.value for e in at.sidebar.error]
    assert len(errors) == 1 and errors[0].startswith("bad_evil.safetensors"), errors
    data = (env / "captionscope-lite2.safetensors").read_bytes()
    checkpoint_uploader(at).set_value(("model\u202e" + "x" * 500 + ".safetensors", data,
                                       "application/octet-stream")).run()
    assert not at.exception and not at.sidebar.error
    label = widget(at.selectbox, "Checkpoint").value
    assert label == "model_" + "x" * 94 + ".safetensors (uploaded)"
    assert (tmp_path / "uploaded_checkpoints" / label.removesuffix(" (uploaded)")).is_file()
    assert all(text.isascii() for text in sidebar_texts(at)), sidebar_texts(at)


def test_upload_limits_checkpoints_200_mb_images_20_mb(env):
    """Streamlit enforces the server's maxUploadSize on every upload (HTTP 413 past it), so the server allows
    the checkpoint limit and each image uploader asks the browser for the 20 MB image limit."""
    import tomllib

    from ui.sidebar import MAX_CHECKPOINT_UPLOAD_MB
    config = tomllib.loads((REPO / ".streamlit" / "config.toml").read_text())
    assert config["server"]["maxUploadSize"] == MAX_CHECKPOINT_UPLOAD_MB == 200
    bundled = REPO / "checkpoints" / "captionscope-lite2.safetensors"
    if bundled.is_file():
        assert bundled.stat().st_size * 5 < MAX_CHECKPOINT_UPLOAD_MB * 2**20           # room to grow
    at = start("caption")
    assert checkpoint_uploader(at).proto.max_upload_size_mb == MAX_CHECKPOINT_UPLOAD_MB
    photos = [u for u in at.get("file_uploader") if u.label == "Upload photos"][0]
    assert photos.proto.max_upload_size_mb == 20
    at.switch_page("pages/attention.py").run()
    at.session_state["p_att_source"] = "Upload"
    at.run()
    single = [u for u in at.get("file_uploader") if u.label == "Upload an image"][0]
    assert single.proto.max_upload_size_mb == 20


def test_flickr_browser_payload_is_bounded_for_a_crowded_captions_file(env, tiny_flickr, tmp_path, monkeypatch):
    """A token file with 166k captions per image hung the browser tab (every reference in every cell)."""
    import shutil

    from core.corpus import MAX_REFERENCE_CHARS, TABLE_REFERENCES
    shutil.copytree(tiny_flickr / "images", tmp_path / "images")
    names = sorted(p.name for p in (tmp_path / "images").iterdir())
    lines = [f"{n}#{k}\ta {n.split('_')[1]} shape [link](http://x) number {k}" for n in names for k in range(1500)]
    (tmp_path / "Flickr8k.token.txt").write_text("\n".join(lines) + "\n")
    monkeypatch.setenv("FLICKR8K_DIR", str(tmp_path))
    at = start("browser")
    assert not at.exception, [e.value for e in at.exception]
    assert any("more than 20 references" in w.value for w in at.sidebar.warning)
    cells = image_table(at)["references_text"]
    assert cells.str.len().max() <= TABLE_REFERENCES * (MAX_REFERENCE_CHARS + 3) + 40
    assert cells.str.endswith("… and 1,495 more").all()
    block, references = shown_references(at)
    assert len(references) == 20 and "\\[link\\]\\(http\\://x\\)" in block   # shown literally
    widget(at.number_input, "References page (of 75; 1,500 references)").set_value(75).run()
    assert not at.exception
    _, last = shown_references(at)
    assert last[0].startswith("1481. ") and len(last) == 20
