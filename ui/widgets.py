"""Small rendering helpers shared by the pages (tables, image pickers, thumbnails, metric tables)."""
from __future__ import annotations

import base64
import io
import math
import re
from typing import Mapping

import pandas as pd
import streamlit as st
from PIL import Image, ImageOps

from core import showcase
from core.errors import CaptionScopeError
from core.images import SUPPORTED_EXTENSIONS, ImageLimits
from core.io_utils import mtime_ns  # noqa: F401  (the pages key thumbnails on it)
from core.io_utils import printable_name
from core.metrics import METRIC_NAMES
from ui import cache, links, settings, state
from core.captioner import CaptionResult
from ui.cache import ImageInput

# Asked of every image uploader: the server's maxUploadSize is the larger checkpoint limit (ui.state).
MAX_UPLOAD_MB = ImageLimits().max_bytes // 2**20
MAX_PICKER_OPTIONS = 5000     # a selectbox sends every option to the browser: the first n of a huge split


def upload_help() -> str:
    return f"{', '.join(SUPPORTED_EXTENSIONS)} · up to {MAX_UPLOAD_MB} MB per image"


def example_input(name: str) -> ImageInput:
    return ImageInput.from_path(settings.example_images()[name], "example")


def flickr_input(dataset, image_name: str) -> ImageInput:
    return ImageInput.from_path(dataset.images_dir / image_name, "flickr8k")


def init_state(key: str, value, options=None) -> None:
    """Give a persistent widget its first value (widgets take no default= so that state can carry over)."""
    if key not in st.session_state or (options is not None and st.session_state[key] not in options):
        st.session_state[key] = value


def resolve_image_name(name: str) -> tuple[str, str] | None:
    """A linked image name -> ("example", example name) or ("flickr8k", dev image name), else None.
    Only looked up in the examples and the split's image list: never turned into a path."""
    for label, path in settings.example_images().items():
        if name in (label, path.stem, path.name):
            return "example", label
    if state.flickr_dir() is not None:
        dataset, _ = state.get_dataset()
        if dataset is not None:
            split = dataset.browse_split
            if split and name in {it.image for it in dataset.splits[split]}:
                return "flickr8k", name
    return None


def linked_image() -> tuple[str, str] | None:
    """The image of the link this session was opened with, once (a message if it names nothing known)."""
    name = links.take_initial("image")
    if name is None:
        return None
    found = resolve_image_name(name)
    if found is None:
        st.warning(f"Link: image {links.shown(name)} is neither an example photo nor a Flickr8K dev image"
                   + ("" if state.flickr_dir() else " (no Flickr8K folder is set)") + ".", icon=":material/link_off:")
    return found


@st.cache_data(max_entries=4, show_spinner=False)
def _stored_showcase(checkpoint_sha256: str) -> showcase.Showcase | None:
    return showcase.load(checkpoint_sha256=checkpoint_sha256)


def current_showcase() -> showcase.Showcase | None:
    """The showcase dev images of the loaded checkpoint (assets/showcase.json), when a Flickr8K folder is set."""
    if state.flickr_dir() is None:
        return None
    captioner, _ = state.get_captioner()
    dataset, _ = state.get_dataset()
    stored = _stored_showcase(captioner.checkpoint_id) if captioner is not None and dataset is not None else None
    if stored is None or "dev" not in dataset.splits:
        return None
    present = {it.image for it in dataset.splits["dev"]}   # another copy of Flickr8K may lack some files
    best = tuple(n for n in stored.best if n in present)
    fails = tuple(n for n in stored.fails if n in present)
    return showcase.Showcase(best, fails, stored.scores) if best or fails else None


def showcase_first(names: list[str]) -> list[str]:
    """The split's names with the showcase images (best captioned, then where it fails) first."""
    shown = current_showcase()
    if shown is None:
        return names
    present = set(names)
    first = [n for n in (*shown.best, *shown.fails) if n in present]
    return first + [n for n in names if n not in set(first)]


def showcase_label(name: str) -> str:
    shown = current_showcase()
    tag = shown.label(name) if shown is not None else None
    if tag is None:
        return printable_name(name)
    return (f"{'★' if tag.startswith('best') else '✗'} {tag} · {printable_name(name)} "
            f"(CIDEr-D {shown.scores[name] * 100:.0f})")


def request_flickr_image(prefix: str, name: str) -> None:
    """Make the picker `prefix` (on its next run, on any page) show Flickr8K image `name`."""
    st.session_state[f"{state.PERSIST}{prefix}_source"] = "Flickr8K dev"
    st.session_state[f"{state.PERSIST}{prefix}_flickr"] = name


def example_link_name(label: str) -> str:
    path = settings.example_images().get(label)
    return path.stem if path else label


def single_image_picker(prefix: str, *, allow_flickr: bool = True) -> ImageInput | None:
    """One image from an example, an upload or (when the folder is set) a Flickr8K dev image.

    Shows the ImageError of a bad upload in place and returns None then. Records the choice for the page's
    shareable link (uploads cannot be linked), and applies the link's `image` on a session's first run.
    """
    examples = settings.example_images()
    sources = ["Example", "Upload"] + (["Flickr8K dev"] if allow_flickr and state.flickr_dir() else [])
    key = f"{state.PERSIST}{prefix}_source"
    if st.session_state.get("requested_example") in examples:
        st.session_state[key] = "Example"
    linked = linked_image()
    if linked and linked[0] == "example":
        st.session_state[key] = "Example"
        st.session_state["requested_example"] = linked[1]
    elif linked and linked[0] == "flickr8k" and "Flickr8K dev" in sources:
        st.session_state[key] = "Flickr8K dev"
        st.session_state[f"{state.PERSIST}{prefix}_flickr"] = linked[1]
    init_state(key, sources[0], sources)
    source = st.segmented_control("Image", sources, key=key, required=True)
    try:
        if source == "Upload":
            links.set_image("upload", None)
            upload = st.file_uploader("Upload an image", type=list(SUPPORTED_EXTENSIONS), key=f"{prefix}_upload",
                                      help=upload_help() + " · uploads cannot be put in a link",
                                      max_upload_size=MAX_UPLOAD_MB)
            return ImageInput.from_upload(upload) if upload is not None else None
        if source == "Flickr8K dev":
            dataset, error = state.get_dataset()
            if dataset is None:
                st.info(error)
                return None
            split = dataset.browse_split
            names = showcase_first([it.image for it in dataset.splits[split]])[:MAX_PICKER_OPTIONS] if split else []
            if not names:
                st.info(f"The {split} split is empty.")
                return None
            key = f"{state.PERSIST}{prefix}_flickr"
            init_state(key, names[0], set(names))
            name = st.selectbox(f"{split} image", names, key=key, format_func=showcase_label,
                                help="Showcase images first (best captioned, then where it fails); "
                                     "type to search the file names.")
            links.set_image("flickr8k", name)
            return flickr_input(dataset, name)
        if not examples:
            st.info("No example photos found in assets/examples/.")
            return None
        key = f"{state.PERSIST}{prefix}_example"
        requested = st.session_state.pop("requested_example", None)
        if requested in examples:
            st.session_state[key] = requested
        init_state(key, next(iter(examples)), examples)
        name = st.pills("Example photo", list(examples), key=key, required=True, wrap=True,
                        help="Public-domain photos from outside Flickr8K's world: expect captions that miss.")
        links.set_image("example", example_link_name(name))
        return example_input(name)
    except CaptionScopeError as e:
        st.error(str(e))
        return None


_MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]()<>#+\-.!|~:$])")


def escape_markdown(text: str) -> str:
    """Text from a file or a model, shown literally inside st.markdown: no links, images, HTML, LaTeX or
    Streamlit directives (":red[...]", ":material/...:") made from it."""
    return _MARKDOWN_SPECIAL.sub(r"\\\1", " ".join(str(text).split()))


def nbest_frame(decoded: CaptionResult) -> pd.DataFrame:
    rows = [{"rank": i + 1, "caption": " ".join(words), "log-prob": hyp.logprob,
             "normalised": hyp.logprob / max(hyp.length, 1), "score": hyp.score, "length": len(words),
             "finished": hyp.finished}
            for i, (hyp, words) in enumerate(zip(decoded.hypotheses, decoded.words))]
    return pd.DataFrame(rows)


# n-best columns: (label, format). "score" is the length-penalised log-prob the list is ranked by.
NBEST_COLUMNS = {"rank": ("Rank", "{}"), "caption": ("Caption", "{}"), "log-prob": ("Log-prob", "{:.2f}"),
                 "score": ("Score", "{:.2f}"), "normalised": ("Per token", "{:.3f}"), "length": ("Words", "{}")}


def text_table(frame: pd.DataFrame, columns: Mapping[str, tuple[str, str]]) -> pd.DataFrame:
    """A display copy for st.table(..., hide_index=True): `columns` maps source column -> (label, format
    string), in order. A static table wraps long captions where st.dataframe cuts them off, and costs the
    browser far less to draw. Cells and labels are Markdown there: no "#" or "*" labels."""
    return pd.DataFrame({label: [fmt.format(v) for v in frame[col]] for col, (label, fmt) in columns.items()})


def metric_row(values: Mapping[str, float], *, scale: float = 100.0) -> dict[str, float]:
    """Metrics for display: x100 (the convention of captioning papers), NaN for a missing one."""
    return {m: round(float(values[m]) * scale, 2) if m in values and values[m] is not None
            and math.isfinite(float(values[m])) else math.nan for m in METRIC_NAMES}


def metric_table(rows: list[dict], label: str = "model") -> pd.DataFrame:
    """Rows of x100 metrics as display strings ("—" where a metric is missing) for a static st.table."""
    frame = pd.DataFrame(rows).set_index(label)
    return frame.map(lambda v: "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.1f}")


def key_value_table(values: Mapping) -> pd.DataFrame:
    return pd.DataFrame({"value": {str(k): "—" if v is None else str(v) for k, v in values.items()}})


def facts_row(facts: Mapping[str, str]) -> None:
    """Label/value boxes in one row (st.metric truncates long text values such as encoder names)."""
    for col, (label, value) in zip(st.columns(len(facts), border=True), facts.items()):
        col.caption(label)
        col.markdown(f"**{value}**")


@st.cache_data(max_entries=4096, show_spinner=False)
def thumbnail_uri(path: str, mtime_ns: int, side: int = 96) -> str:
    """A small JPEG as a data: URI, for st.column_config.ImageColumn (only made for rows on screen)."""
    del mtime_ns
    try:
        with Image.open(path) as im:
            im.draft("RGB", (side * 2, side * 2))
            im = im.convert("RGB")
            im.thumbnail((side, side))
            buffer = io.BytesIO()
            im.save(buffer, format="JPEG", quality=80)
    except (OSError, ValueError, Image.DecompressionBombError):
        return ""
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


@st.cache_data(max_entries=64, show_spinner=False)
def square_thumbnail(path: str, mtime_ns: int, side: int = 320) -> Image.Image:
    """Centre-cropped square, so a row of example photos lines up."""
    del mtime_ns
    with Image.open(path) as im:
        return ImageOps.fit(im.convert("RGB"), (side, side), Image.LANCZOS)


def report_entry(item: ImageInput, result: CaptionResult, *, references=(), scores=None):
    """One image of an HTML report (core.report) from what a page has already captioned."""
    from core.report import ReportEntry

    return ReportEntry(item.name, result, item.origin, list(references), dict(scores or {}))


def report_button(captioner, decoding, entries: list, *, where=None, label: str = "Report (HTML)") -> None:
    """Download one self-contained HTML file of `entries` (made when clicked: heatmaps cost a little)."""
    from core.report import report_for_captioner

    (where or st).download_button(
        label, lambda: report_for_captioner(captioner, entries, decoding), file_name="captionscope-report.html",
        mime="text/html", icon=":material/description:", on_click="ignore", width="stretch",
        disabled=not entries, help="One file with the images embedded: opens offline, makes no requests.")


def caption_or_stop(captioner, item: ImageInput, decoding) -> CaptionResult:
    """The (cached) caption of `item`; on bad input the page shows one message and stops there."""
    try:
        decoded = cache.caption(captioner, item, decoding)
    except CaptionScopeError as e:
        st.error(str(e))
        st.stop()
    if not decoded.hypotheses:
        st.warning("The decoder returned no caption for this image.")
        st.stop()
    return decoded
