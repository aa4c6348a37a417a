"""Shareable links: the page state <-> the URL's query parameters (`st.query_params`), in one place.

The contract (README, "Shareable links"):
    ?image=NAME        an example photo (file name or stem, e.g. `cat`) or a Flickr8K image of the split
    &word=K            Attention / Presentation: the K-th word of the caption, counted from 1
    &hyp=K             Attention: the K-th hypothesis of the n-best list, from 1
    &checkpoint=FILE   a checkpoint file of the checkpoint folder
    &beam= &lp= &maxlen= &norepeat= &sample=0|1 &temperature= &topk= &seed= &samples=   decoding settings

A fresh session (a link opened in a new browser) applies the URL once, before the sidebar draws, and every
run writes the page's current state back, so the address bar is always the link to what is shown. Every
value is checked: an unknown image, a `../` path, a word out of range, a non-numeric or huge number or an
unknown checkpoint is refused with one line naming it, and the page goes on with its default. Image names
are only ever looked up in the examples and the dataset's split lists, never joined to a path.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping
from urllib.parse import urlencode

import streamlit as st

_APPLIED = "_links_applied"
_MESSAGES = "_links_messages"
IMAGE_KEY = "links_image"            # what the page's image picker shows now: (origin, name) or None
MAX_SHOWN = 60                       # characters of a hostile value repeated in a message


@dataclass(frozen=True)
class NumberParam:
    """A decoding setting: URL name, sidebar widget key, type and the range its widget allows."""
    name: str
    key: str
    kind: type
    low: float
    high: float
    sampling_only: bool = False


DECODING_PARAMS = (
    NumberParam("beam", "dec_beam", int, 1, 10),
    NumberParam("lp", "dec_length_penalty", float, 0.0, 2.0),
    NumberParam("maxlen", "dec_max_length", int, 5, 50),
    NumberParam("norepeat", "dec_no_repeat", int, 0, 4),
    NumberParam("temperature", "dec_temperature", float, 0.1, 2.0, sampling_only=True),
    NumberParam("topk", "dec_top_k", int, 0, 100, sampling_only=True),
    NumberParam("seed", "dec_seed", int, 0, 2**31 - 1, sampling_only=True),
    NumberParam("samples", "dec_samples", int, 1, 10, sampling_only=True),
)
SAMPLE_PARAM, SAMPLE_KEY = "sample", "dec_sample"


def shown(value: str) -> str:
    """A user-supplied value for a message: one line, bounded, inside a code span (no Markdown, no HTML)."""
    text = " ".join(str(value).replace("`", "'").split())
    return f"`{text[:MAX_SHOWN]}{'…' if len(text) > MAX_SHOWN else ''}`"


def parse_number(param: NumberParam, raw: str) -> tuple[float | int | None, str | None]:
    """(value, None) or (None, one-line reason)."""
    text = str(raw).strip()
    try:
        value = float(text) if param.kind is float else int(text, 10)
    except ValueError:
        return None, f"`{param.name}={shown(raw)[1:-1]}` is not a{'n integer' if param.kind is int else ' number'}"
    if isinstance(value, float) and not math.isfinite(value):
        return None, f"`{param.name}` must be a finite number"
    if not param.low <= value <= param.high:
        low, high = (int(param.low), int(param.high)) if param.kind is int else (param.low, param.high)
        return None, f"`{param.name}={shown(raw)[1:-1]}` is outside {low}–{high}"
    return value, None


def parse_index(name: str, raw: str | None, count: int) -> tuple[int, str | None]:
    """A 1-based index from the URL -> (0-based index, message or None); out of range falls back to 0."""
    if raw is None:
        return 0, None
    try:
        k = int(str(raw).strip(), 10)
    except ValueError:
        return 0, f"`{name}={shown(raw)[1:-1]}` is not a whole number; showing {name} 1"
    if not 1 <= k <= count:
        return 0, f"`{name}={shown(raw)[1:-1]}` is out of range: there {'is' if count == 1 else 'are'} {count} " \
                  f"({'1' if count == 1 else f'1–{count}'}); showing {name} 1"
    return k - 1, None


# -- applying a link (once per session) ----------------------------------------------------------------------
def _first(value) -> str:
    return value[0] if isinstance(value, (list, tuple)) and value else str(value)


def query() -> dict[str, str]:
    try:
        return {k: _first(v) for k, v in st.query_params.to_dict().items()}
    except Exception:   # noqa: BLE001 - no query string support (bare mode)
        return {}


def note(message: str) -> None:
    st.session_state.setdefault(_MESSAGES, []).append(message)


def begin_page(checkpoint_labels: Callable[[], list[str]]) -> None:
    """First thing of every page run: apply a fresh session's link; forget the previous page's image."""
    apply_once(checkpoint_labels)
    st.session_state[IMAGE_KEY] = None
    st.session_state["links_upload"] = False


def apply_once(checkpoint_labels: Callable[[], list[str]]) -> None:
    """On a session's first run: the checkpoint and decoding settings of the URL into the sidebar's widget
    state (the image, word and hypothesis are read by the pickers). Messages for refused values are kept
    for `show_messages`."""
    if st.session_state.get(_APPLIED):
        return
    st.session_state[_APPLIED] = True
    params = query()
    st.session_state["links_initial"] = params
    if "checkpoint" in params:
        labels = checkpoint_labels()
        wanted = params["checkpoint"]
        if wanted in labels:
            st.session_state["checkpoint_label"] = wanted
        else:
            note(f"Checkpoint {shown(wanted)} is not in the checkpoint folder; using the default one.")
    sampling = params.get(SAMPLE_PARAM)
    if sampling is not None:
        if sampling in ("0", "1"):
            st.session_state[SAMPLE_KEY] = sampling == "1"
        else:
            note(f"`sample={shown(sampling)[1:-1]}` must be 0 or 1; ignored.")
    for param in DECODING_PARAMS:
        if param.name in params:
            value, error = parse_number(param, params[param.name])
            if error:
                note(f"{error}; ignored.")
            else:
                st.session_state[param.key] = value


def initial(name: str) -> str | None:
    """The value of `name` in the URL this session was opened with (None if absent)."""
    return (st.session_state.get("links_initial") or {}).get(name)


def take_initial(name: str) -> str | None:
    """Like `initial`, but only once: a picker applies the link's image on its first run, then the user's
    clicks win."""
    params = st.session_state.get("links_initial") or {}
    return params.pop(name, None)


def apply_index(name: str, key: str, count: int) -> None:
    """A link's 1-based `name` (word, hyp) into the widget state `key`, once; a bad value -> a message."""
    raw = take_initial(name)
    if raw is None:
        return
    index, error = parse_index(name, raw, count)
    st.session_state[key] = index
    if error:
        st.warning(f"Link: {error}.", icon=":material/link_off:")


def show_messages() -> None:
    for message in st.session_state.pop(_MESSAGES, []):
        st.warning(f"Link: {message}", icon=":material/link_off:")


# -- writing the link ------------------------------------------------------------------------------------------
def decoding_params(session: Mapping) -> dict[str, str]:
    sampling = bool(session.get(SAMPLE_KEY))
    out = {SAMPLE_PARAM: "1"} if sampling else {}
    for param in DECODING_PARAMS:
        if param.key in session and (sampling or not param.sampling_only) and not (sampling and param.name == "beam"):
            value = session[param.key]
            out[param.name] = f"{value:g}" if isinstance(value, float) else str(value)
    return out


def current_params(extra: Mapping[str, object] | None = None) -> dict[str, str]:
    s = st.session_state
    params: dict[str, str] = {}
    picked = s.get(IMAGE_KEY)
    if picked:
        params["image"] = picked[1]
    params.update({k: str(v) for k, v in (extra or {}).items() if v is not None})
    if s.get("checkpoint_label"):
        params["checkpoint"] = str(s["checkpoint_label"])
    params.update(decoding_params(s))
    return params


def share(extra: Mapping[str, object] | None = None, *, where=None) -> str:
    """Write the page's state into the URL and draw the "copy link" control; returns the link."""
    params = current_params(extra)
    try:
        st.query_params.from_dict(params)
    except Exception:   # noqa: BLE001 - bare mode
        pass
    base = getattr(st.context, "url", None) or ""
    link = f"{base}?{urlencode(params)}"
    target = where or st
    with target.popover("Copy link", icon=":material/link:"):
        st.caption("Opens this view in a fresh browser (select and copy, or use the copy icon).")
        st.code(link, language=None, wrap_lines=True)
        if st.session_state.get(IMAGE_KEY) is None and st.session_state.get("links_upload"):
            st.caption("Uploaded images cannot be linked: the link opens without it.")
    return link


def set_image(origin: str | None, name: str | None) -> None:
    """Record what the picker shows: ("example"|"flickr8k", name), or an upload (not linkable)."""
    st.session_state[IMAGE_KEY] = (origin, name) if origin in ("example", "flickr8k") and name else None
    st.session_state["links_upload"] = origin == "upload"
