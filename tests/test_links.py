"""ui.links: pages keep their state in the URL; hostile query values get one clear line, never a traceback."""
from __future__ import annotations

from streamlit.testing.v1 import AppTest

from tests.test_dashboard import APP, TIMEOUT, checkpoint_dir, env, widget  # noqa: F401  (fixtures)
from ui.links import DECODING_PARAMS, parse_index, parse_number

BEAM = next(p for p in DECODING_PARAMS if p.name == "beam")
LP = next(p for p in DECODING_PARAMS if p.name == "lp")


def test_parse_number_and_index():
    assert parse_number(BEAM, "4") == (4, None)
    assert parse_number(LP, "0.5") == (0.5, None)
    for raw in ("abc", "1e9", "99999999999999999999", "-1", "3.5", ""):
        value, error = parse_number(BEAM, raw)
        assert value is None and error.startswith("`beam=")
    for raw in ("nan", "inf", "1e308"):
        assert parse_number(LP, raw)[0] is None
    assert parse_index("word", "3", 5) == (2, None)
    for raw in ("0", "6", "-1", "x", "1e3"):
        index, error = parse_index("word", raw, 5)
        assert index == 0 and "word" in error and "showing word 1" in error


def link_warnings(at: AppTest) -> list[str]:
    return [w.value for w in at.warning if w.value.startswith("Link:")]


def open_link(page: str, params: dict) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.query_params.update(params)
    at.switch_page(f"pages/{page}.py").run()          # the link's page is the session's first run
    assert not at.exception, [e.value for e in at.exception]
    return at


def test_attention_link_reproduces_the_view(env):
    at = open_link("attention", {"image": "cat", "word": "2", "beam": "2", "lp": "0.5"})
    assert not link_warnings(at), link_warnings(at)
    assert widget(at.slider, "Beam width").value == 2 and widget(at.slider, "Length penalty α").value == 0.5
    assert widget(at.slider, "Step").value == 1                 # word 2, counted from 1
    params = {k: v for k, v in at.query_params.items()}
    got = {k: (v[0] if isinstance(v, list) else v) for k, v in params.items()}
    assert got["image"] == "cat" and got["word"] == "2" and got["beam"] == "2" and got["lp"] == "0.5"
    assert got["checkpoint"] == "captionscope-lite2.safetensors"


def test_flickr_image_link(env, tiny_flickr):
    from core.data import load_dataset

    name = load_dataset(tiny_flickr).split("dev")[3].image
    at = open_link("attention", {"image": name})
    assert not link_warnings(at), link_warnings(at)
    assert widget(at.selectbox, "dev image").value == name


def test_hostile_query_values_each_get_one_line(env):
    at = open_link("attention", {"image": "../Flickr8k.token.txt", "word": "999", "beam": "1e9",
                                 "maxlen": "abc", "lp": "nan", "checkpoint": "../../etc/passwd",
                                 "sample": "yes"})
    warnings = link_warnings(at)
    joined = "\n".join(warnings)
    assert "`../Flickr8k.token.txt` is neither an example photo nor a Flickr8K dev image" in joined
    assert "`beam=1e9`" in joined and "`maxlen=abc` is not an integer" in joined and "`lp`" in joined
    assert "Checkpoint `../../etc/passwd` is not in the checkpoint folder" in joined
    assert "`sample=yes` must be 0 or 1" in joined
    assert "`word=999` is out of range" in joined
    assert all("\n" not in w and "Traceback" not in w for w in warnings)
    assert widget(at.slider, "Beam width").value != 10**9
    assert widget(at.selectbox, "Checkpoint").value == "captionscope-lite2.safetensors"


def test_presentation_link_and_controls(env):
    at = open_link("presentation", {"image": "cat", "word": "2"})
    assert not link_warnings(at), link_warnings(at)
    assert at.title[0].value == "Presentation"

    def word() -> str:
        value = at.query_params["word"]
        return value[0] if isinstance(value, list) else value

    assert word() == "2"
    captions = [m.value for m in at.markdown if "cs-caption" in m.value]
    assert captions and captions[0].count("cs-now") == 1
    [b for b in at.button if b.label == "Next"][0].click().run()
    assert word() == "3"
    [b for b in at.button if b.label == "Previous"][0].click().run()
    [b for b in at.button if b.label == "Previous"][0].click().run()
    [b for b in at.button if b.label == "Previous"][0].click().run()      # stops at the first word
    assert word() == "1"
    assert [b.label for b in at.button if b.label in ("Play", "Pause")] == ["Play"]
