"""The new comparison controls, driven headless with AppTest: the Beam comparison page's decoding grid
(and its bad-grid messages), the Compare checkpoints page (two checkpoints with different vocabularies,
and one against itself), and the Flickr8K browser's failure finder. The tiny model, its dataset and its
feature cache stand in for the bundled ones."""
from __future__ import annotations

import shutil

import pytest
from streamlit.testing.v1 import AppTest

from test_compare import grow_vocabulary
from test_dashboard import APP, TIMEOUT, widget


@pytest.fixture(scope="module")
def env(tiny_checkpoint, tiny_flickr, tiny_features, tmp_path_factory):
    folder = tmp_path_factory.mktemp("checkpoints")
    shutil.copyfile(tiny_checkpoint, folder / "captionscope-lite2.safetensors")
    grow_vocabulary(tiny_checkpoint, folder / "other-vocab.safetensors")
    mp = pytest.MonkeyPatch()
    mp.setenv("CAPTIONSCOPE_CHECKPOINT_DIR", str(folder))
    mp.setenv("CAPTIONSCOPE_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    mp.setenv("CAPTIONSCOPE_FEATURES_DIR", str(tiny_features))
    mp.setenv("FLICKR8K_DIR", str(tiny_flickr))
    yield folder
    mp.undo()


def start(page: str) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=TIMEOUT).run()
    at.switch_page(f"pages/{page}.py").run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def frame_with(at: AppTest, column: str):
    found = [d.value for d in at.dataframe if column in d.value.columns]
    assert found, f"no table with a {column!r} column"
    return found[0]


def test_grid_runs_and_compares_two_settings(env):
    at = start("beams")
    widget(at.multiselect, "Grid beam widths").set_value([1, 2]).run()
    widget(at.multiselect, "Grid length penalties α").set_value([0.0, 1.0]).run()
    widget(at.multiselect, "Grid no-repeat n-gram").set_value([0]).run()
    [b for b in at.button if b.label == "Run the grid over 4 settings"][0].click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    table = frame_with(at, "setting")
    assert len(table) == 4 and set(table["beam_size"]) == {1, 2}
    assert table["CIDEr-D"].between(0, 1000).all() and table["ended_with_end"].between(0, 1).all()
    assert {"distinct_1", "distinct_2", "mean_length", "decode_s"} <= set(table.columns)
    assert len(at.get("vega_lite_chart")) >= 2          # metric vs length, and the heatmap
    widget(at.selectbox, "Setting B").set_value(widget(at.selectbox, "Setting A").value).run()
    assert any("0 of 8 captions differ" in c.value for c in at.caption)   # a setting against itself
    widget(at.selectbox, "Grid metric").set_value("BLEU-4").run()
    assert not at.exception


@pytest.mark.parametrize("values, needle", [
    ({"Grid beam widths": []}, "no values for beam_size"),
    ({"Grid beam widths": list(range(1, 11)), "Grid length penalties α": [0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0],
      "Grid no-repeat n-gram": [0, 2, 3, 4]}, "280 settings, over the limit of 200"),
])
def test_a_bad_grid_is_one_message_naming_the_setting(env, values, needle):
    at = start("beams")
    for label, value in values.items():
        widget(at.multiselect, label).set_value(value).run()
    assert not at.exception
    errors = [e.value for e in at.error]
    assert len(errors) == 1 and needle in errors[0] and errors[0].startswith("decoding grid")
    assert not [b for b in at.button if b.label.startswith("Run the grid")]


def test_compare_two_checkpoints_on_one_image_and_the_split(env):
    at = start("compare")
    assert widget(at.selectbox, "Checkpoint A").value == "captionscope-lite2.safetensors"
    assert widget(at.selectbox, "Checkpoint B").value == "other-vocab.safetensors"
    assert any(m.value.startswith("**A:**") for m in at.markdown)
    [b for b in at.button if b.label.startswith("Compare on")][0].click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    table = frame_with(at, "caption_b")
    assert len(table) == 8 and "CIDEr-D_delta" in table.columns
    assert (table["CIDEr-D_delta"].abs().diff().dropna() <= 1e-9).all()     # biggest change first
    widget(at.selectbox, "Order").set_value("Biggest wins of B first").run()
    table = frame_with(at, "caption_b")
    assert (table["CIDEr-D_delta"].diff().dropna() <= 1e-9).all()
    assert any("background[" in m.value for m in at.markdown)               # a word-level diff is marked


def test_a_checkpoint_against_itself_shows_zero_deltas(env):
    at = start("compare")
    widget(at.selectbox, "Checkpoint B").set_value("captionscope-lite2.safetensors").run()
    assert any("same checkpoint" in c.value for c in at.caption)
    # the same model says the same words: a shared word's two attention maps are shown side by side
    assert widget(at.selectbox, "A word both captions contain").options
    [b for b in at.button if b.label.startswith("Compare on")][0].click().run()
    table = frame_with(at, "caption_b")
    assert (table["CIDEr-D_delta"] == 0).all() and (table["caption_a"] == table["caption_b"]).all()
    delta_row = at.table[0].value.loc["B − A"]
    assert set(delta_row) == {"0.0"}


def test_browser_failure_finder(env):
    at = start("browser")
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert widget(at.metric, "Captions with an unsupported word").value.endswith("%")
    table = frame_with(at, "unsupported")
    assert len(table) == 8
    widget(at.toggle, "Only captions with an unsupported word").set_value(True).run()
    assert not at.exception
    widget(at.selectbox, "Sort").set_value("Unsupported words, most first").run()
    assert not at.exception
    at.toggle[0].set_value(False).run()
    assert any("BLEU counts as matched" in c.value for c in at.caption)
    assert any("background[" in m.value for m in at.markdown)            # matched words are marked
    assert widget(at.metric, "Words the model uses").value.isdigit()
