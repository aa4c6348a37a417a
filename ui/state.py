"""The sidebar every page shares, and the small session state behind it.

Session state holds only light things: the chosen checkpoint's file name, ONE `DecodingConfig` (key
"decoding") and the Flickr8K folder text. Heavy objects (the loaded model, the dataset) live in
`st.cache_resource`, once per server process, keyed by what identifies them (checkpoint path + mtime,
dataset folder), so switching pages never reloads anything.

Folders (no machine path is baked in):
  checkpoints   $CAPTIONSCOPE_CHECKPOINT_DIR or the repo's checkpoints/
  cache         $CAPTIONSCOPE_CACHE_DIR or the repo's .cache/captionscope/ (uploaded checkpoints, captions)
  Flickr8K      $FLICKR8K_DIR or the sidebar's text field
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import streamlit as st

from core.captioner import Captioner
from core.checkpoint import (DEFAULT_CHECKPOINT_DIR, DEFAULT_CHECKPOINT_NAME, SUFFIX, list_checkpoints,
                             load_checkpoint, read_metadata, resolve_checkpoint, upload_file_name)
from core.data import CaptionDataset, find_data_dir_from_env, load_dataset
from core.decoding import DecodingConfig
from core.errors import CaptionScopeError, CheckpointError
from core.io_utils import atomic_write_bytes, printable_name, sha256_bytes

REPO = Path(__file__).resolve().parents[1]
EXAMPLES_DIR = REPO / "assets" / "examples"
CHECKPOINT_DIR_ENV = "CAPTIONSCOPE_CHECKPOINT_DIR"
CACHE_DIR_ENV = "CAPTIONSCOPE_CACHE_DIR"
FEATURES_DIR_ENV = "CAPTIONSCOPE_FEATURES_DIR"
# Streamlit enforces the server-wide .streamlit/config.toml maxUploadSize on every upload, whatever a widget
# asks for, so that file sets the same 200: ~10x the bundled 21 MB checkpoint. Image uploaders ask for 20.
MAX_CHECKPOINT_UPLOAD_MB = 200
BUNDLED, UPLOADED = "bundled", "uploaded"
# Widget keys starting with this survive page switches (Streamlit drops the state of widgets that a run
# does not draw; `keep_page_state` re-assigns them on every run, before any page draws).
PERSIST = "p_"

# widget keys of the decoding settings (their values are folded into st.session_state["decoding"])
_DECODING_KEYS = {"beam_size": "dec_beam", "length_penalty": "dec_length_penalty", "max_length": "dec_max_length",
                  "no_repeat_ngram_size": "dec_no_repeat", "do_sample": "dec_sample",
                  "temperature": "dec_temperature", "top_k": "dec_top_k", "seed": "dec_seed"}
_SAMPLES_KEY = "dec_samples"


# -- folders -------------------------------------------------------------------------------------------------
def checkpoint_dir() -> Path:
    value = os.environ.get(CHECKPOINT_DIR_ENV, "").strip()
    return Path(value).expanduser() if value else DEFAULT_CHECKPOINT_DIR


def cache_dir() -> Path:
    value = os.environ.get(CACHE_DIR_ENV, "").strip()
    return Path(value).expanduser() if value else REPO / ".cache" / "captionscope"


def upload_dir() -> Path:
    return cache_dir() / "uploaded_checkpoints"


def features_dir() -> Path:
    """Where `python -m core.features` wrote the Flickr8K feature caches (lets corpus runs skip the CNN)."""
    value = os.environ.get(FEATURES_DIR_ENV, "").strip()
    return Path(value).expanduser() if value else REPO / "features"


def example_images() -> dict[str, Path]:
    """Bundled example photos, {display name: path} (see assets/examples/README.md for their licences)."""
    if not EXAMPLES_DIR.is_dir():
        return {}
    return {p.stem.replace("_", " "): p for p in sorted(EXAMPLES_DIR.glob("*.jpg"))}


# -- checkpoints -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CheckpointChoice:
    origin: str        # BUNDLED | UPLOADED
    name: str          # file name inside its folder

    @property
    def label(self) -> str:
        return self.name if self.origin == BUNDLED else f"{self.name} (uploaded)"

    def folder(self) -> Path:
        return checkpoint_dir() if self.origin == BUNDLED else upload_dir()

    def path(self) -> Path:
        """Resolved through core.checkpoint, so a choice can never point outside its folder."""
        return resolve_checkpoint(self.name, self.folder())


def available_checkpoints() -> list[CheckpointChoice]:
    return ([CheckpointChoice(BUNDLED, p.name) for p in list_checkpoints(checkpoint_dir())]
            + [CheckpointChoice(UPLOADED, p.name) for p in list_checkpoints(upload_dir())])


@st.cache_resource(max_entries=3, show_spinner="Loading the model…")
def _load_captioner(path: str, mtime_ns: int) -> tuple[Captioner | None, str | None]:
    """(captioner, None) or (None, one-line error). Failures are cached too: no retry loop on every rerun."""
    del mtime_ns  # part of the cache key only: a replaced file is loaded again
    try:
        return Captioner.from_checkpoint(path), None
    except CaptionScopeError as e:
        return None, str(e).splitlines()[0]
    except (OSError, RuntimeError) as e:     # e.g. encoder weights unreadable
        return None, f"{Path(path).name}: cannot load ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"


@st.cache_data(max_entries=16, show_spinner=False)
def checkpoint_metadata(path: str, mtime_ns: int) -> dict:
    """Header-only metadata (cheap); raises CheckpointError."""
    del mtime_ns
    return read_metadata(path)


def _mtime_ns(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return 0


def selected_checkpoint() -> CheckpointChoice | None:
    return st.session_state.get("checkpoint_choice")


def selected_checkpoint_path() -> Path | None:
    choice = selected_checkpoint()
    if choice is None:
        return None
    try:
        return choice.path()
    except CheckpointError:
        return None


def get_captioner() -> tuple[Captioner | None, str | None]:
    """The model of the sidebar's checkpoint (loaded once per server process) or the reason there is none."""
    choice = selected_checkpoint()
    if choice is None:
        return None, (f"No checkpoint found in {checkpoint_dir()}. Train one with `python -m core.train` and "
                      f"copy its best.safetensors to checkpoints/{DEFAULT_CHECKPOINT_NAME}, or upload one in "
                      f"the sidebar.")
    try:
        path = choice.path()
    except CheckpointError as e:
        return None, str(e)
    return _load_captioner(str(path), _mtime_ns(path))


def require_captioner() -> Captioner:
    """For pages that cannot work without a model: show why there is none and stop the page there."""
    captioner, error = get_captioner()
    if captioner is None:
        st.error(error or "No model loaded.")
        st.stop()
    return captioner


def save_uploaded_checkpoint(name: str, data: bytes) -> CheckpointChoice:
    """Validate an uploaded checkpoint with core.checkpoint and keep it under the upload folder.

    The bytes are written to a temporary name first and fully loaded (header, shapes, hashes); only a
    checkpoint that loads is renamed into the folder, so a bad upload never reaches the picker.
    Raises CheckpointError with the loader's one-line message.
    """
    file_name = upload_file_name(name)          # ASCII only: what the disk, the picker and messages show
    folder = upload_dir()
    folder.mkdir(parents=True, exist_ok=True)
    digest = sha256_bytes(data)
    temp = folder / f".upload-{digest[:16]}{SUFFIX}"
    atomic_write_bytes(temp, data)
    try:
        load_checkpoint(temp)
    except CaptionScopeError as e:
        temp.unlink(missing_ok=True)
        raise CheckpointError(str(e).replace(str(temp), file_name).splitlines()[0]) from None
    target = folder / file_name
    if target.exists() and sha256_bytes(target.read_bytes()) != digest:
        target = folder / f"{target.stem}-{digest[:8]}{SUFFIX}"
    os.replace(temp, target)
    return CheckpointChoice(UPLOADED, target.name)


# -- decoding --------------------------------------------------------------------------------------------------
def decoding() -> DecodingConfig:
    """The one DecodingConfig every page uses (set by the sidebar on each run)."""
    config = st.session_state.get("decoding")
    return config if isinstance(config, DecodingConfig) else DecodingConfig()


def _apply_decoding_defaults(defaults: dict, *, overwrite: bool) -> None:
    base = DecodingConfig()
    try:
        base = DecodingConfig.from_dict(dict(defaults or {}))
    except CaptionScopeError:
        pass
    values = {"beam_size": min(max(base.beam_size, 1), 10), "length_penalty": float(base.length_penalty),
              "max_length": min(max(base.max_length, 5), 50), "no_repeat_ngram_size": min(base.no_repeat_ngram_size, 4),
              "do_sample": bool(base.do_sample), "temperature": float(min(max(base.temperature, 0.1), 2.0)),
              "top_k": min(base.top_k, 100), "seed": int(base.seed or 0)}
    for field_name, key in _DECODING_KEYS.items():
        if overwrite or key not in st.session_state:
            st.session_state[key] = values[field_name]
    if overwrite or _SAMPLES_KEY not in st.session_state:
        st.session_state[_SAMPLES_KEY] = 3 if base.do_sample else max(base.num_return_sequences, 3)


def _decoding_from_widgets() -> DecodingConfig:
    s = st.session_state
    sampling = bool(s[_DECODING_KEYS["do_sample"]])
    beam = int(s[_DECODING_KEYS["beam_size"]])
    config = DecodingConfig(
        beam_size=beam, max_length=int(s[_DECODING_KEYS["max_length"]]),
        length_penalty=float(s[_DECODING_KEYS["length_penalty"]]),
        no_repeat_ngram_size=int(s[_DECODING_KEYS["no_repeat_ngram_size"]]), do_sample=sampling,
        temperature=float(s[_DECODING_KEYS["temperature"]]), top_k=int(s[_DECODING_KEYS["top_k"]]),
        # the n-best list is the whole beam; sampling draws `samples` captions
        num_return_sequences=int(s[_SAMPLES_KEY]) if sampling else beam,
        seed=int(s[_DECODING_KEYS["seed"]]))
    config.validate()
    return config


# -- Flickr8K --------------------------------------------------------------------------------------------------
@st.cache_resource(max_entries=2, show_spinner="Reading the Flickr8K captions…")
def _load_dataset(folder: str) -> tuple[CaptionDataset | None, str | None]:
    try:
        return load_dataset(folder), None
    except CaptionScopeError as e:
        return None, str(e).splitlines()[0]
    except OSError as e:
        return None, f"{folder}: {e.strerror or e}"


def flickr_dir() -> Path | None:
    text = str(st.session_state.get("flickr_dir") or "").strip()
    return Path(text).expanduser() if text else None


def get_dataset() -> tuple[CaptionDataset | None, str | None]:
    folder = flickr_dir()
    if folder is None:
        return None, ("No Flickr8K folder set. Start the dashboard with `FLICKR8K_DIR=/path/to/flickr8k "
                      "streamlit run dashboard.py`, or type the folder into the sidebar's **Flickr8K folder** "
                      "field (it holds Flickr8k.token.txt / captions.txt and the images).")
    return _load_dataset(str(folder))


def require_dev_split():
    """(dataset, dev items) or stop the page with how to set the folder."""
    dataset, error = get_dataset()
    if dataset is None:
        st.info(error)
        st.stop()
    split = "dev" if "dev" in dataset.splits else next(iter(dataset.splits), None)
    if split is None:
        st.error(f"{dataset.root}: no images with captions found")
        st.stop()
    return dataset, split, dataset.splits[split]


PAGE_CONFIG = dict(page_title="CaptionScope", page_icon=":material/image_search:", layout="wide")


def page_setup() -> None:
    """First call of every page: page config, carried-over widget state, the shared sidebar.

    Pages draw the sidebar themselves (not dashboard.py) because Streamlit runs a page file on its own,
    without the entry point, when it treats the app as a legacy `pages/` folder app: the first request of
    a server process and `AppTest.switch_page`. Drawn here, the sidebar exists exactly once either way.
    """
    leave_folder_mode()
    st.set_page_config(**PAGE_CONFIG)
    keep_page_state()
    render_sidebar()


def leave_folder_mode() -> None:
    """Route a fresh server's first deep link (`/caption`) through dashboard.py's st.navigation.

    A server process starts in Streamlit's legacy folder mode when a `pages/` folder sits beside the entry
    point, and only leaves it once st.navigation runs. A deep link as the very first request would run the
    page file directly, with a sidebar listing file names. Leaving the mode by hand and rerunning sends
    that request through dashboard.py, which opens the same page (same URL path) under the real menu.
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
    sidebar_keys = (*_DECODING_KEYS.values(), _SAMPLES_KEY, "flickr_dir", "checkpoint_label")
    for key in [k for k in st.session_state if isinstance(k, str) and (k.startswith(PERSIST) or k in sidebar_keys)]:
        st.session_state[key] = st.session_state[key]


# -- the sidebar -----------------------------------------------------------------------------------------------
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
        choice = save_uploaded_checkpoint(upload.name, upload.getvalue())
    except CheckpointError as e:
        st.session_state["checkpoint_upload_result"] = ("error", str(e))
    except OSError as e:                        # e.g. the upload folder is full or read-only
        st.session_state["checkpoint_upload_result"] = ("error", f"{upload_file_name(upload.name)}: cannot "
                                                                 f"save the upload ({e.strerror or e})")
    else:
        st.session_state["checkpoint_upload_result"] = ("success", f"Added {choice.label}; it is selected")
        st.session_state["checkpoint_label"] = choice.label
    st.session_state["checkpoint_upload_round"] = st.session_state.get("checkpoint_upload_round", 0) + 1


def _on_reset_decoding() -> None:
    path = selected_checkpoint_path()
    defaults = {}
    if path is not None:
        try:
            defaults = checkpoint_metadata(str(path), _mtime_ns(path)).get("decoding", {})
        except CaptionScopeError:
            pass
    _apply_decoding_defaults(defaults, overwrite=True)


def render_sidebar() -> None:
    """Checkpoint picker, decoding settings and the Flickr8K folder; run by dashboard.py before every page."""
    sidebar = st.sidebar
    # --- checkpoint
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

    captioner, error = get_captioner() if choices else (None, None)
    if error and choices:
        sidebar.error(error)
    elif captioner is not None:
        where = "GPU" if captioner.device.startswith("cuda") else "CPU"
        sidebar.caption(f"{captioner.encoder_name} · vocab {len(captioner.vocab):,} · {where}")
        if not captioner.metadata.get("encoder_weights_match", True):
            sidebar.warning("The encoder weights differ from the ones this checkpoint was trained with; "
                            "captions may be worse than reported.")

    # --- decoding
    defaults = captioner.metadata.get("decoding", {}) if captioner is not None else {}
    _apply_decoding_defaults(defaults, overwrite=False)
    sidebar.subheader("Decoding")
    sampling = sidebar.toggle("Sample instead of beam search", key=_DECODING_KEYS["do_sample"])
    if sampling:
        sidebar.slider("Samples per image", 1, 10, key=_SAMPLES_KEY)
        c1, c2 = sidebar.columns(2)
        c1.slider("Temperature", 0.1, 2.0, step=0.05, key=_DECODING_KEYS["temperature"])
        c2.number_input("Top-k (0 = all)", 0, 100, step=1, key=_DECODING_KEYS["top_k"])
        sidebar.number_input("Seed", 0, 2**31 - 1, step=1, key=_DECODING_KEYS["seed"],
                             help="Same seed, same samples (so results can be cached and compared).")
    else:
        sidebar.slider("Beam width", 1, 10, key=_DECODING_KEYS["beam_size"],
                       help="1 = greedy search. The n-best list shows every beam.")
    sidebar.slider("Length penalty α", 0.0, 2.0, step=0.1, key=_DECODING_KEYS["length_penalty"],
                   help="GNMT: score = log-prob / ((5 + length) / 6)^α. 0 ranks by the raw log-prob; "
                        "larger values favour longer captions.")
    c1, c2 = sidebar.columns(2)
    c1.number_input("Max length", 5, 50, step=1, key=_DECODING_KEYS["max_length"],
                    help="Generated tokens including <end>.")
    c2.number_input("No-repeat n-gram", 0, 4, step=1, key=_DECODING_KEYS["no_repeat_ngram_size"],
                    help="0 = off; n = never produce the same n-gram twice.")
    sidebar.button("Reset to checkpoint defaults", on_click=_on_reset_decoding, width="stretch")
    st.session_state["decoding"] = _decoding_from_widgets()

    # --- data
    sidebar.subheader("Flickr8K")
    if "flickr_dir" not in st.session_state:
        env = find_data_dir_from_env()
        st.session_state["flickr_dir"] = str(env) if env else ""
    sidebar.text_input("Flickr8K folder", key="flickr_dir", placeholder="/path/to/flickr8k",
                       help="Folder with Flickr8k.token.txt (or captions.txt) and the images. "
                            "Defaults to $FLICKR8K_DIR.")
    if flickr_dir() is not None:
        dataset, data_error = get_dataset()
        if dataset is None:
            sidebar.error(data_error)
        else:
            sizes = ", ".join(f"{name} {len(items):,}" for name, items in dataset.splits.items())
            sidebar.caption(f"{dataset.source_format} format · {sizes}")
            for warning in dataset.warnings:     # e.g. 166k references per image: far from a sane dataset
                sidebar.warning(printable_name(warning, 400))
