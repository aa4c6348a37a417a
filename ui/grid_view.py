"""The Beam comparison page's decoding grid: pick the axes, run, read the table and charts, and compare two
settings image by image. The computing is core.grid; results are kept per server process (re-scoring a grid
with METEOR takes a while), captions also on disk through the corpus cache."""
from __future__ import annotations

import dataclasses
from collections import OrderedDict
from typing import Sequence

import altair as alt
import streamlit as st

from core.data import ImageCaptions
from core.decoding import DecodingConfig
from core.errors import CaptionScopeError
from core.grid import GridResult, build_grid, changed_images, evaluate_grid
from core.metrics import METRIC_NAMES, java_available
from ui import cache, compare_view, state, widgets
from ui import settings as ui_settings

WIDTH_OPTIONS = list(range(1, 11))
ALPHA_OPTIONS = [0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0]
NGRAM_OPTIONS = [0, 2, 3, 4]
AXES = ("beam_size", "length_penalty", "no_repeat_ngram_size")
P = state.PERSIST
KEPT_RESULTS = 4


@st.cache_resource
def _results() -> "OrderedDict[tuple, GridResult]":
    """The last few grids run in this server process, by request."""
    return OrderedDict()


def _run(captioner, items: Sequence[ImageCaptions], settings: list[DecodingConfig], split: str) -> GridResult:
    bar = st.progress(0.0, text="Decoding the grid…")

    def update(done: int, total: int) -> None:
        bar.progress(min(done / max(total, 1), 1.0), text=f"Decoding the grid… {done:,}/{total:,} image decodes")
    try:
        result = evaluate_grid(captioner, items, settings, AXES, features_dir=ui_settings.features_dir(), split=split,
                               cache=cache.caption_cache(), progress=update, with_meteor=java_available())
    finally:
        bar.empty()
    return result


def _controls(base: DecodingConfig, total: int) -> tuple[list[DecodingConfig] | None, int, str | None]:
    for key, value in (("grid_widths", [1, 3, 5]), ("grid_alphas", [0.0, 0.5, 1.0]), ("grid_ngrams", [0, 3])):
        widgets.init_state(f"{P}{key}", value)
    widgets.init_state(f"{P}grid_subset", min(100, total))
    st.session_state[f"{P}grid_subset"] = min(max(int(st.session_state[f"{P}grid_subset"]), 1), total)
    c1, c2, c3, c4 = st.columns([3, 3, 2, 2])
    widths = c1.multiselect("Grid beam widths", WIDTH_OPTIONS, key=f"{P}grid_widths")
    alphas = c2.multiselect("Grid length penalties α", ALPHA_OPTIONS, key=f"{P}grid_alphas")
    ngrams = c3.multiselect("Grid no-repeat n-gram", NGRAM_OPTIONS, key=f"{P}grid_ngrams",
                            help="0 = off")
    n = int(c4.number_input("Grid images (first n)", 1, total, step=50, key=f"{P}grid_subset"))
    axes = {"beam_size": sorted(widths), "length_penalty": sorted(alphas), "no_repeat_ngram_size": sorted(ngrams)}
    try:
        return build_grid(base, axes), n, None
    except CaptionScopeError as e:
        return None, n, str(e)


def render(captioner, items: Sequence[ImageCaptions], split: str, base: DecodingConfig) -> None:
    base = dataclasses.replace(base, do_sample=False, num_return_sequences=1)
    settings, n, error = _controls(base, len(items))
    if error:
        st.error(error)
        return
    request = (captioner.checkpoint_id, split, n, tuple(tuple(sorted(c.to_dict().items())) for c in settings))
    store = _results()
    if st.button(f"Run the grid over {len(settings)} setting{'s' if len(settings) != 1 else ''}",
                 icon=":material/grid_on:", type="primary", key="grid_run"):
        if request not in store:
            try:
                store[request] = _run(captioner, items[:n], settings, split)
            except CaptionScopeError as e:
                st.error(str(e))
                return
            while len(store) > KEPT_RESULTS:
                store.popitem(last=False)
        st.session_state["grid_request"] = request
    result = store.get(st.session_state.get("grid_request")) if st.session_state.get("grid_request") == request \
        else None
    if result is None:
        st.caption(f"Decodes the first {n:,} {split} images once per setting (greedy once for every α) and "
                   "scores every setting together: BLEU-1..4, METEOR, ROUGE-L, CIDEr-D.")
        return
    _table(result)
    _charts(result)
    _two_settings(result, items[:n])


def _table(result: GridResult) -> None:
    shown = result.table.copy()
    for m in METRIC_NAMES:
        shown[m] *= 100
    st.dataframe(shown.drop(columns=["images"]), hide_index=True, width="stretch", key="grid_table",
                 column_config={
                     "setting": st.column_config.TextColumn("Setting"),
                     "beam_size": st.column_config.NumberColumn("Beam"),
                     "length_penalty": st.column_config.NumberColumn("α", format="%.2f"),
                     "no_repeat_ngram_size": st.column_config.NumberColumn("No-repeat"),
                     **{m: st.column_config.NumberColumn(f"{m} ×100", format="%.2f") for m in METRIC_NAMES},
                     "mean_length": st.column_config.NumberColumn("Mean words", format="%.2f"),
                     "distinct_1": st.column_config.NumberColumn("Distinct-1", format="%.3f"),
                     "distinct_2": st.column_config.NumberColumn("Distinct-2", format="%.3f"),
                     "ended_with_end": st.column_config.NumberColumn("Ended with <end>", format="percent"),
                     "decode_s": st.column_config.NumberColumn("Decode", format="%.1f s"),
                 })
    for note in result.notes:
        st.caption(note)


def _charts(result: GridResult) -> None:
    available = [m for m in METRIC_NAMES if result.table[m].notna().any()]
    widgets.init_state(f"{P}grid_metric", "CIDEr-D" if "CIDEr-D" in available else available[0], available)
    c1, c2 = st.columns([1, 1])
    metric = c1.selectbox("Grid metric", available, key=f"{P}grid_metric")
    ngrams = sorted(result.table["no_repeat_ngram_size"].unique().tolist())
    widgets.init_state("grid_heat_ngram", ngrams[0], ngrams)
    ngram = c2.selectbox("No-repeat n-gram of the heatmap", ngrams, key="grid_heat_ngram",
                         disabled=len(ngrams) == 1)
    frame = result.table.assign(value=result.table[metric] * 100)
    left, right = st.columns(2)
    scatter = alt.Chart(frame).mark_circle(size=90).encode(
        x=alt.X("mean_length:Q", title="mean caption length (words)", scale=alt.Scale(zero=False)),
        y=alt.Y("value:Q", title=f"{metric} ×100", scale=alt.Scale(zero=False)),
        color=alt.Color("beam_size:N", title="beam width"),
        tooltip=["setting", alt.Tooltip("value:Q", title=metric, format=".2f"),
                 alt.Tooltip("mean_length:Q", format=".2f")])
    left.altair_chart(scatter, width="stretch")
    heat = frame[frame["no_repeat_ngram_size"] == ngram]
    heatmap = alt.Chart(heat).mark_rect().encode(
        x=alt.X("length_penalty:O", title="length penalty α"), y=alt.Y("beam_size:O", title="beam width"),
        color=alt.Color("value:Q", title=f"{metric} ×100"),
        tooltip=["setting", alt.Tooltip("value:Q", title=metric, format=".2f")])
    text = heatmap.mark_text(baseline="middle").encode(text=alt.Text("value:Q", format=".1f"), color=alt.value("black"))
    right.altair_chart(heatmap + text, width="stretch")


def _two_settings(result: GridResult, items: Sequence[ImageCaptions]) -> None:
    st.markdown("**Two settings, image by image**")
    labels = result.labels
    widgets.init_state("grid_a", labels[0], labels)
    widgets.init_state("grid_b", labels[-1], labels)
    c1, c2, c3 = st.columns([2, 2, 1])
    a = c1.selectbox("Setting A", labels, key="grid_a")
    b = c2.selectbox("Setting B", labels, key="grid_b")
    metric = st.session_state.get(f"{P}grid_metric", "CIDEr-D")
    frame = changed_images(result, items, a, b, metric)
    show = int(c3.number_input("Images shown", 1, max(len(frame), 1), min(10, max(len(frame), 1)),
                               key="grid_changed_n"))
    st.caption(f"{len(frame):,} of {len(items):,} captions differ; biggest {metric} change first "
               "(red: only in A, green: only in B).")
    compare_view.changed_rows(({**row, "before": row["metric_a"], "after": row["metric_b"]}
                               for row in frame.head(show).to_dict("records")), metric)
