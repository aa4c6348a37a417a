"""The small session state the pages share, and the heavy objects behind it.

Session state holds only light things: the chosen checkpoint (`CheckpointChoice`), ONE `DecodingConfig`
(key "decoding", set by the sidebar on every run) and the Flickr8K folder text. Heavy objects (the loaded
model, the dataset) live in `st.cache_resource`, once per server process, keyed by what identifies them
(checkpoint path + mtime, dataset folder), so switching pages never reloads anything. Folders come from
ui.settings; the sidebar that sets all this is ui.sidebar.
"""
from __future__ import annotations

from pathlib import Path

import streamlit as st

from core.captioner import Captioner
from core.checkpoint import DEFAULT_CHECKPOINT_NAME, read_metadata
from core.checkpoint_metadata import CheckpointMetadata
from core.data import CaptionDataset, ImageCaptions, load_dataset
from core.decoding import DecodingConfig
from core.errors import CaptionScopeError, CheckpointError
from core.io_utils import mtime_ns
from ui.settings import CheckpointChoice, checkpoint_dir

# Widget keys starting with this survive page switches (Streamlit drops the state of widgets that a run
# does not draw; `ui.sidebar.keep_page_state` re-assigns them on every run, before any page draws).
PERSIST = "p_"


# -- the checkpoint ------------------------------------------------------------------------------------------
@st.cache_resource(max_entries=3, show_spinner="Loading the model…")
def _load_captioner(path: str, mtime: int) -> tuple[Captioner | None, str | None]:
    """(captioner, None) or (None, one-line error). Failures are cached too: no retry loop on every rerun."""
    del mtime  # part of the cache key only: a replaced file is loaded again
    try:
        return Captioner.from_checkpoint(path), None
    except CaptionScopeError as e:
        return None, str(e).splitlines()[0]
    except (OSError, RuntimeError) as e:     # e.g. encoder weights unreadable
        return None, f"{Path(path).name}: cannot load ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"


@st.cache_data(max_entries=16, show_spinner=False)
def checkpoint_metadata(path: str, mtime: int) -> CheckpointMetadata:
    """Header-only metadata (cheap); raises CheckpointError."""
    del mtime
    return read_metadata(path)


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


def selected_metadata() -> CheckpointMetadata | None:
    """The header of the sidebar's checkpoint, or None when there is none or it cannot be read."""
    path = selected_checkpoint_path()
    if path is None:
        return None
    try:
        return checkpoint_metadata(str(path), mtime_ns(path))
    except CaptionScopeError:
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
    return _load_captioner(str(path), mtime_ns(path))


def require_captioner() -> Captioner:
    """For pages that cannot work without a model: show why there is none and stop the page there."""
    captioner, error = get_captioner()
    if captioner is None:
        st.error(error or "No model loaded.")
        st.stop()
    return captioner


# -- decoding ------------------------------------------------------------------------------------------------
def decoding() -> DecodingConfig:
    """The one DecodingConfig every page uses (set by the sidebar on each run)."""
    config = st.session_state.get("decoding")
    return config if isinstance(config, DecodingConfig) else DecodingConfig()


# -- Flickr8K ------------------------------------------------------------------------------------------------
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


def require_dev_split() -> tuple[CaptionDataset, str, list[ImageCaptions]]:
    """(dataset, split name, its items) for the split the pages browse (dev, else the first one), or stop
    the page with how to set the folder."""
    dataset, error = get_dataset()
    if dataset is None:
        st.info(error)
        st.stop()
    split = dataset.browse_split
    if split is None:
        st.error(f"{dataset.root}: no images with captions found")
        st.stop()
    return dataset, split, dataset.splits[split]
