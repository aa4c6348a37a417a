"""The sidebar every page shares (checkpoint, decoding settings, Flickr8K folder) and `page_setup`, the first
call of every page.

The decoding controls are generated from one table, `DECODING_CONTROLS` (field -> label, range, step,
help): the widgets and the clamping of a checkpoint's defaults into the widgets' ranges both read it. The
Hugging Face knobs (top-p, repetition penalty, min length, diverse beam search, bad words) are in it too;
a contradictory combination or a word the checkpoint does not know gets a sidebar message naming it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import streamlit as st

from core.captioner import Captioner
from core.checkpoint import DEFAULT_CHECKPOINT_NAME, save_uploaded_checkpoint, upload_file_name
from core.data import find_data_dir_from_env
from core.decoding import DecodingConfig
from core.errors import CheckpointError, ConfigError
from core.io_utils import printable_name
from ui import links, state
from ui.settings import BUNDLED, UPLOADED, CheckpointChoice, available_checkpoints, checkpoint_dir, upload_dir

# Streamlit enforces the server-wide .streamlit/config.toml maxUploadSize on every upload, whatever a widget
# asks for, so that file sets the same 200: ~10x the bundled 21 MB checkpoint. Image uploaders ask for 20.
MAX_CHECKPOINT_UPLOAD_MB = 200
PAGE_CONFIG = dict(page_title="CaptionScope", page_icon=":material/image_search:", layout="wide")


@dataclass(frozen=True)
class Control:
    """One decoding setting's widget: session key, label, range, step and help text."""
    key: str
    label: str
    low: int | float
    high: int | float
    step: int | float
    help: str | None = None
    slider: bool = True          # False: a number input

    def clamp(self, value: float) -> int | float:
        kind = type(self.low)
        return kind(min(max(kind(value), self.low), self.high))

    def draw(self, container) -> None:
        widget = container.slider if self.slider else container.number_input
        widget(self.label, self.low, self.high, step=self.step, key=self.key, help=self.help)


@dataclass(frozen=True)
class WordsControl:
    """A list-of-words setting (bad_words) as one text field, words separated by commas or spaces."""
    key: str
    label: str
    help: str | None = None

    def clamp(self, words) -> str:
        return ", ".join(words)

    def draw(self, container) -> None:
        container.text_input(self.label, key=self.key, help=self.help, placeholder="e.g. dog, ball")

    @staticmethod
    def parse(text: str) -> tuple[str, ...]:
        return tuple(w for w in str(text).replace(",", " ").split() if w)


# field of DecodingConfig -> its control; "samples" is num_return_sequences while sampling (the n-best list
# of a beam search is the whole beam)
DECODING_CONTROLS: dict[str, Control | WordsControl] = {
    "beam_size": Control("dec_beam", "Beam width", 1, 10, 1, "1 = greedy search. The n-best list shows every beam."),
    "samples": Control("dec_samples", "Samples per image", 1, 10, 1),
    "temperature": Control("dec_temperature", "Temperature", 0.1, 2.0, 0.05),
    "top_k": Control("dec_top_k", "Top-k (0 = all)", 0, 100, 1, slider=False),
    "seed": Control("dec_seed", "Seed", 0, 2**31 - 1, 1,
                    "Same seed, same samples (so results can be cached and compared).", slider=False),
    "length_penalty": Control("dec_length_penalty", "Length penalty α", 0.0, 2.0, 0.1,
                              "GNMT: score = log-prob / ((5 + length) / 6)^α. 0 ranks by the raw log-prob; "
                              "larger values favour longer captions."),
    "max_length": Control("dec_max_length", "Max length", 5, 50, 1, "Generated tokens including <end>.",
                          slider=False),
    "no_repeat_ngram_size": Control("dec_no_repeat", "No-repeat n-gram", 0, 4, 1,
                                    "0 = off; n = never produce the same n-gram twice.", slider=False),
    # Hugging Face generate's knobs, under its names (rules: core/logits_rules.py)
    "top_p": Control("dec_top_p", "Top-p (1 = all)", 0.05, 1.0, 0.05,
                     "Nucleus sampling: sample from the smallest set of top words whose probability reaches p "
                     "(after top-k)."),
    "repetition_penalty": Control("dec_repetition_penalty", "Repetition penalty", 1.0, 3.0, 0.01,
                                  "Hugging Face's rule: each word already in the caption has its logit divided "
                                  "by this (multiplied when negative). 1 = off; larger = fewer repeated words."),
    "min_length": Control("dec_min_length", "Min length", 0, 50, 1,
                          "No <end> before this many tokens (incl. <end>, like Max length). 0 = off.",
                          slider=False),
    "num_beam_groups": Control("dec_beam_groups", "Beam groups", 1, 10, 1,
                               "Diverse beam search: the beams split into this many groups (it must divide the "
                               "beam width); each group is penalised for words earlier groups just picked.",
                               slider=False),
    "diversity_penalty": Control("dec_diversity_penalty", "Diversity penalty", 0.1, 3.0, 0.1,
                                 "Subtracted from a word's log-prob once per earlier group that picked it at "
                                 "the same step (Hamming diversity)."),
    "bad_words": WordsControl("dec_bad_words", "Bad words",
                              "Words no caption may contain (separated by commas or spaces). Words the "
                              "checkpoint's vocabulary lacks are named and ignored."),
}
SAMPLE_KEY = "dec_sample"
SIDEBAR_KEYS = (*(c.key for c in DECODING_CONTROLS.values()), SAMPLE_KEY, "flickr_dir", "checkpoint_label")


# -- decoding settings <-> widgets -------------------------------------------------------------------------
def _apply_decoding_defaults(base: DecodingConfig, *, overwrite: bool) -> None:
    """Set the widgets from a checkpoint's default decoding settings (clamped into the widgets' ranges)."""
    values = {name: getattr(base, name) for name in DECODING_CONTROLS if name != "samples"}
    values.update(seed=base.seed or 0, samples=3 if base.do_sample else max(base.num_return_sequences, 3),
                  diversity_penalty=base.diversity_penalty or 0.5)    # the value the slider offers once groups > 1
    for name, control in DECODING_CONTROLS.items():
        if overwrite or control.key not in st.session_state:
            st.session_state[control.key] = control.clamp(values[name])
    if overwrite or SAMPLE_KEY not in st.session_state:
        st.session_state[SAMPLE_KEY] = bool(base.do_sample)


def _decoding_from_widgets(sidebar, captioner: Captioner | None) -> DecodingConfig:
    """The widgets' setting. Contradictory knobs: an error naming the setting, and the setting without the
    Hugging Face knobs. Bad words the checkpoint does not know: a warning naming them, and they are dropped."""
    value = {name: st.session_state[control.key] for name, control in DECODING_CONTROLS.items()}
    sampling = bool(st.session_state[SAMPLE_KEY])
    base = DecodingConfig(
        beam_size=int(value["beam_size"]), max_length=int(value["max_length"]),
        length_penalty=float(value["length_penalty"]), no_repeat_ngram_size=int(value["no_repeat_ngram_size"]),
        do_sample=sampling, temperature=float(value["temperature"]), top_k=int(value["top_k"]),
        num_return_sequences=int(value["samples"]) if sampling else int(value["beam_size"]),
        seed=int(value["seed"]))
    groups = 1 if sampling else int(value["num_beam_groups"])
    words = WordsControl.parse(value["bad_words"])
    try:
        knobs = dataclasses.replace(
            base, top_p=float(value["top_p"]), repetition_penalty=float(value["repetition_penalty"]),
            min_length=int(value["min_length"]), num_beam_groups=groups,
            diversity_penalty=float(value["diversity_penalty"]) if groups > 1 else 0.0, bad_words=words)
        if captioner is not None and knobs.bad_words:
            unknown = [w for w in knobs.bad_words if w not in captioner.vocab.stoi]
            if unknown:
                sidebar.warning(f"Not in this checkpoint's vocabulary, so never said anyway (ignored): "
                                f"{', '.join(unknown)}")
                knobs = dataclasses.replace(knobs, bad_words=tuple(w for w in knobs.bad_words if w not in unknown))
            captioner.check_decoding(knobs)
    except ConfigError as e:
        sidebar.error(f"{e}. Captioning without these knobs.")
        return base
    return knobs


def _on_reset_decoding() -> None:
    meta = state.selected_metadata()
    _apply_decoding_defaults(meta.decoding_config() if meta is not None else DecodingConfig(), overwrite=True)


def _draw_decoding(sidebar, defaults: DecodingConfig, captioner: Captioner | None = None) -> None:
    _apply_decoding_defaults(defaults, overwrite=False)
    sidebar.subheader("Decoding")
    c = DECODING_CONTROLS
    sampling = sidebar.toggle("Sample instead of beam search", key=SAMPLE_KEY)
    if sampling:
        c["samples"].draw(sidebar)
        left, right = sidebar.columns(2)
        c["temperature"].draw(left)
        c["top_k"].draw(right)
        c["top_p"].draw(sidebar)
        c["seed"].draw(sidebar)
    else:
        c["beam_size"].draw(sidebar)
    c["length_penalty"].draw(sidebar)
    left, right = sidebar.columns(2)
    c["max_length"].draw(left)
    c["no_repeat_ngram_size"].draw(right)
    more = sidebar.expander("More knobs: repetition, min length, diverse beams, bad words")
    c["repetition_penalty"].draw(more)
    c["min_length"].draw(more)
    if not sampling:
        c["num_beam_groups"].draw(more)
        if st.session_state[c["num_beam_groups"].key] > 1:
            c["diversity_penalty"].draw(more)
    c["bad_words"].draw(more)
    sidebar.button("Reset to checkpoint defaults", on_click=_on_reset_decoding, width="stretch")
    st.session_state["decoding"] = _decoding_from_widgets(sidebar, captioner)


# -- checkpoint ----------------------------------------------------------------------------------------------
def _checkpoint_upload_key() -> str:
    return f"checkpoint_upload_{st.session_state.get('checkpoint_upload_round', 0)}"


def _on_checkpoint_upload() -> None:
    """Save the upload, then replace the uploader with a fresh, empty one: its chip would keep showing the
    browser's raw file name (a U+202E in it reverses the text). The outcome names the cleaned file; the
    next upload replaces it, so no message outlives the upload it is about."""
    upload = st.session_state.get(_checkpoint_upload_key())
    st.session_state.pop("checkpoint_upload_result", None)
    if upload is None:
        return
    try:
        saved = save_uploaded_checkpoint(upload_dir(), upload.name, upload.getvalue())
    except CheckpointError as e:
        st.session_state["checkpoint_upload_result"] = ("error", str(e))
    except OSError as e:                        # e.g. the upload folder is full or read-only
        st.session_state["checkpoint_upload_result"] = ("error", f"{upload_file_name(upload.name)}: cannot "
                                                                 f"save the upload ({e.strerror or e})")
    else:
        label = CheckpointChoice(UPLOADED, saved.name).label
        st.session_state["checkpoint_upload_result"] = ("success", f"Added {label}; it is selected")
        st.session_state["checkpoint_label"] = label
    st.session_state["checkpoint_upload_round"] = st.session_state.get("checkpoint_upload_round", 0) + 1


def _draw_checkpoint(sidebar):
    """The checkpoint picker and uploader; returns the loaded Captioner or None."""
    sidebar.subheader("Model")
    choices = available_checkpoints()
    by_label = {c.label: c for c in choices}
    if st.session_state.get("checkpoint_label") not in by_label:
        bundled = [c for c in choices if c.origin == BUNDLED and c.name == DEFAULT_CHECKPOINT_NAME]
        first = (bundled or choices or [None])[0]
        st.session_state["checkpoint_label"] = first.label if first else None
    if choices:
        sidebar.selectbox("Checkpoint", list(by_label), key="checkpoint_label",
                          help=f"`*.safetensors` files in {checkpoint_dir().name}/ and your uploads")
    else:
        sidebar.warning(f"No checkpoint in {checkpoint_dir()}.")
    st.session_state["checkpoint_choice"] = by_label.get(st.session_state.get("checkpoint_label"))
    with sidebar.expander("Add a checkpoint"):
        st.file_uploader("CaptionScope .safetensors checkpoint", type=["safetensors"], key=_checkpoint_upload_key(),
                         on_change=_on_checkpoint_upload, max_upload_size=MAX_CHECKPOINT_UPLOAD_MB,
                         help=f"Up to {MAX_CHECKPOINT_UPLOAD_MB} MB. Validated by core.checkpoint (never "
                              "unpickled) and kept in the upload folder.")
        kind, message = st.session_state.get("checkpoint_upload_result") or (None, "")
        if kind == "error":
            st.error(message)
        elif kind == "success":                 # once: the picker above now shows the cleaned name
            st.toast(message, icon=":material/check:")
            st.session_state.pop("checkpoint_upload_result")

    captioner, error = state.get_captioner() if choices else (None, None)
    if error and choices:
        sidebar.error(error)
    elif captioner is not None:
        where = "GPU" if captioner.device.startswith("cuda") else "CPU"
        sidebar.caption(f"{captioner.encoder_name} · vocab {len(captioner.vocab):,} · {where}")
        if not captioner.encoder_weights_match:
            sidebar.warning("The encoder weights differ from the ones this checkpoint was trained with; "
                            "captions may be worse than reported.")
    return captioner


# -- Flickr8K ------------------------------------------------------------------------------------------------
def _draw_data(sidebar) -> None:
    sidebar.subheader("Flickr8K")
    if "flickr_dir" not in st.session_state:
        env = find_data_dir_from_env()
        st.session_state["flickr_dir"] = str(env) if env else ""
    sidebar.text_input("Flickr8K folder", key="flickr_dir", placeholder="/path/to/flickr8k",
                       help="Folder with Flickr8k.token.txt (or captions.txt) and the images. "
                            "Defaults to $FLICKR8K_DIR.")
    if state.flickr_dir() is not None:
        dataset, data_error = state.get_dataset()
        if dataset is None:
            sidebar.error(data_error)
        else:
            sizes = ", ".join(f"{name} {len(items):,}" for name, items in dataset.splits.items())
            sidebar.caption(f"{dataset.source_format} format · {sizes}")
            for warning in dataset.warnings:     # e.g. 166k references per image: far from a sane dataset
                sidebar.warning(printable_name(warning, 400))


def render_sidebar() -> None:
    """Checkpoint picker, decoding settings and the Flickr8K folder; drawn by `page_setup` on every run of
    every page. Sets the session's "checkpoint_choice" and "decoding"."""
    captioner = _draw_checkpoint(st.sidebar)
    _draw_decoding(st.sidebar, captioner.default_decoding() if captioner is not None else DecodingConfig(), captioner)
    _draw_data(st.sidebar)


# -- every page ----------------------------------------------------------------------------------------------
def page_setup() -> None:
    """First call of every page: page config, carried-over widget state, the shared sidebar.

    Pages draw the sidebar themselves (not dashboard.py) because Streamlit runs a page file on its own,
    without the entry point, when it treats the app as a legacy `pages/` folder app: the first request of
    a server process and `AppTest.switch_page`. Drawn here, the sidebar exists exactly once either way.
    """
    leave_folder_mode()
    st.set_page_config(**PAGE_CONFIG)
    links.begin_page(lambda: [c.label for c in available_checkpoints()])   # a link's settings, before widgets
    keep_page_state()
    render_sidebar()
    links.show_messages()


def leave_folder_mode() -> None:
    """Route a fresh server's first deep link (`/caption`) through dashboard.py's st.navigation.

    A server process starts in Streamlit's legacy folder mode when a `pages/` folder sits beside the entry
    point, and only leaves it once st.navigation runs. A deep link as the very first request would run the
    page file directly, with a sidebar listing file names. Leaving the mode by hand and rerunning sends
    that request through dashboard.py, which opens the same page (same URL path) under the real menu.
    Pinned by tests/test_browser.py (a fresh server's first request is a deep link).
    """
    try:
        from streamlit.runtime.pages_manager import PagesManager
    except ImportError:    # a Streamlit without this internal: nothing to fix, at worst file-name links
        return
    if PagesManager.uses_pages_directory and real_server():
        PagesManager.uses_pages_directory = False
        st.rerun()


def real_server() -> bool:
    """A real `streamlit run` server. AppTest installs a mock Runtime and runs page files on their own by
    design (`switch_page`); a rerun there would drop the widget events a test sends."""
    from streamlit import runtime
    return runtime.exists() and type(runtime.get_instance()) is runtime.Runtime


def keep_page_state() -> None:
    """Re-assign the values of the sidebar's widgets and of PERSIST-prefixed page widgets.

    Streamlit ties a widget's value to the page that drew it and forgets it when a run does not draw it
    (another page, a hidden option such as the temperature). A value assigned through the Session State
    API is kept, and the next widget with that key starts from it.
    """
    for key in [k for k in st.session_state
                if isinstance(k, str) and (k.startswith(state.PERSIST) or k in SIDEBAR_KEYS)]:
        st.session_state[key] = st.session_state[key]
