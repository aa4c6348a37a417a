"""The Compare checkpoints page's parts: pick two checkpoints, one image (both captions, attention of the
words both say, side by side), and the dev split (corpus metrics, per-image deltas, word-level diffs).
The computing is core.compare; split results are kept per server process."""
from __future__ import annotations

from collections import OrderedDict
from typing import Iterable, Sequence

import streamlit as st

from core import analysis
from core.compare import Comparison, compare_checkpoints, shared_words
from core.data import ImageCaptions
from core.decoding import DecodingConfig
from core.errors import CaptionScopeError
from core.metrics import METRIC_NAMES, java_available
from core.io_utils import mtime_ns
from ui import cache, marks, state, widgets
from ui import settings as ui_settings
from ui.cache import ImageInput

ORDERS = {"Biggest changes first": "abs", "Biggest wins of B first": "wins", "Biggest losses of B first": "losses"}
KEPT_RESULTS = 4


def load(choice: ui_settings.CheckpointChoice):
    """(captioner, None) or (None, the one-line reason), through the sidebar's per-process model cache."""
    try:
        path = choice.path()
    except CaptionScopeError as e:
        return None, str(e)
    return state._load_captioner(str(path), mtime_ns(path))


def changed_rows(rows: Iterable[dict], metric: str) -> None:
    """Each row (image, path, caption_a, caption_b, references list, before, after, delta) as a thumbnail,
    both captions with the differing words marked, the metric change, and the references on demand."""
    for row in rows:
        pic, text = st.columns([1, 6])
        pic.image(widgets.square_thumbnail(row["path"], mtime_ns(row["path"]), 96), width=96)
        left, right = marks.diff_pair(row["caption_a"], row["caption_b"])
        text.markdown(f"**{marks.escape(row['image'])}** · {metric} ×100: {100 * row['before']:.1f} → "
                      f"{100 * row['after']:.1f} (**{100 * row['delta']:+.1f}**)  \n"
                      f"**A:** {left}  \n**B:** {right}")
        with text.expander("References"):
            st.markdown("  \n".join(f"{i + 1}. {marks.escape(r)}" for i, r in enumerate(row["references"])))


def one_image(a, b, item: ImageInput, decoding: DecodingConfig, alignment: tuple[bool, str]) -> None:
    try:
        decoded_a, decoded_b = cache.caption(a, item, decoding), cache.caption(b, item, decoding)
        image, image_b = decoded_a.image, decoded_b.image
    except CaptionScopeError as e:
        st.error(str(e))
        return
    pic, text = st.columns([1, 2])
    pic.image(image, caption=item.name, width="stretch")
    left, right = marks.diff_pair(decoded_a.caption, decoded_b.caption)
    text.markdown(f"**A:** {left}  \n**B:** {right}")
    text.caption("Red: only in A's caption, green: only in B's.")
    shared = shared_words(decoded_a.words[0] if decoded_a.words else [], decoded_b.words[0] if decoded_b.words else [])
    comparable, note = alignment
    if not comparable:
        text.info(f"Attention cannot be lined up: {note}.")
        return
    if note:
        text.caption(note)
    if not shared:
        text.info("The two captions share no word, so there is no attention map to put side by side.")
        return
    words = [w for w, _, _ in shared]
    key = f"cmp_word_{item.key[:16]}"
    widgets.init_state(key, words[0], words)
    word = text.selectbox("A word both captions contain", words, key=key)
    _, i, j = shared[words.index(word)]
    maps = st.columns(2)
    for col, label, decoded, index, grid, base in ((maps[0], "A", decoded_a, i, a.grid, image),
                                                   (maps[1], "B", decoded_b, j, b.grid, image_b)):
        heat = analysis.upsample_attention(decoded.hypotheses[0].attention[index], grid, base.size)
        col.image(analysis.overlay_heatmap(base, heat), caption=f"{label}: “{word}” (word {index + 1})",
                  width="stretch")


@st.cache_resource
def _results() -> "OrderedDict[tuple, Comparison]":
    return OrderedDict()


def split_section(a, b, items: Sequence[ImageCaptions], split: str, decoding: DecodingConfig) -> None:
    total = len(items)
    widgets.init_state(f"{state.PERSIST}cmp_subset", min(100, total))
    st.session_state[f"{state.PERSIST}cmp_subset"] = min(max(int(st.session_state[f"{state.PERSIST}cmp_subset"]), 1), total)
    c1, c2 = st.columns([1, 3], vertical_alignment="bottom")
    n = int(c1.number_input(f"{split} images (first n)", 1, total, step=50, key=f"{state.PERSIST}cmp_subset"))
    request = (a.checkpoint_id, b.checkpoint_id, split, n, tuple(sorted(decoding.to_dict().items())))
    store = _results()
    if c2.button(f"Compare on {n:,} {split} images", icon=":material/compare:", type="primary", key="cmp_run"):
        if request not in store:
            bar = st.progress(0.0, text="Captioning with both checkpoints…")
            try:
                store[request] = compare_checkpoints(
                    a, b, items[:n], decoding, features_dir=ui_settings.features_dir(), split=split,
                    cache=cache.caption_cache(), with_meteor=java_available(),
                    progress=lambda d, t: bar.progress(min(d / max(t, 1), 1.0), text=f"Captioning… {d:,}/{t:,}"))
            except CaptionScopeError as e:
                st.error(str(e))
                return
            finally:
                bar.empty()
            while len(store) > KEPT_RESULTS:
                store.popitem(last=False)
        st.session_state["cmp_request"] = request
    result = store.get(request) if st.session_state.get("cmp_request") == request else None
    if result is None:
        st.caption("Captions both checkpoints with the sidebar's decoding settings and scores them together.")
        return
    _split_results(result, items[:n])


def _split_results(result: Comparison, items: Sequence[ImageCaptions]) -> None:
    s = result.summary
    rows = [{"model": "A", **widgets.metric_row(s["a"]["metrics"])}, {"model": "B", **widgets.metric_row(s["b"]["metrics"])},
            {"model": "B − A", **widgets.metric_row(s["delta"])}]
    st.table(widgets.metric_table(rows))
    for note in s["notes"]:
        st.caption(note)
    metrics = [m for m in METRIC_NAMES if f"{m}_delta" in result.per_image.columns]
    c1, c2 = st.columns(2)
    widgets.init_state("cmp_metric", "CIDEr-D" if "CIDEr-D" in metrics else metrics[0], metrics)
    metric = c1.selectbox("Rank images by", metrics, key="cmp_metric")
    widgets.init_state("cmp_order", next(iter(ORDERS)), ORDERS)
    order = c2.selectbox("Order", list(ORDERS), key="cmp_order")
    frame = result.per_image
    delta = frame[f"{metric}_delta"]
    wins, losses = int((delta > 0).sum()), int((delta < 0).sum())
    st.caption(f"{s['changed_captions']:,} of {s['images']:,} captions differ · by {metric}, B wins on {wins:,} "
               f"images, loses on {losses:,}, ties on {s['images'] - wins - losses:,}.")
    how = ORDERS[order]
    ranked = (frame.loc[delta.abs().sort_values(ascending=False, kind="stable").index] if how == "abs" else
              frame.sort_values(f"{metric}_delta", ascending=how == "losses", kind="stable"))
    table = ranked[["image", "caption_a", "caption_b", f"{metric}_a", f"{metric}_b", f"{metric}_delta"]].copy()
    for col in table.columns[3:]:
        table[col] *= 100
    st.dataframe(table, hide_index=True, width="stretch", key="cmp_table", column_config={
        "image": st.column_config.TextColumn("Image"), "caption_a": st.column_config.TextColumn("Caption A"),
        "caption_b": st.column_config.TextColumn("Caption B"),
        f"{metric}_a": st.column_config.NumberColumn("A", format="%.1f"),
        f"{metric}_b": st.column_config.NumberColumn("B", format="%.1f"),
        f"{metric}_delta": st.column_config.NumberColumn("B − A", format="%+.1f")})
    refs = {it.image: list(it.captions) for it in items}
    top = ranked[ranked["changed"]].head(10)
    st.markdown("**Word-level diff of the first changed captions in this order**")
    changed_rows(({"image": r["image"], "path": r["path"], "caption_a": r["caption_a"], "caption_b": r["caption_b"],
                   "references": refs[r["image"]], "before": r[f"{metric}_a"], "after": r[f"{metric}_b"],
                   "delta": r[f"{metric}_delta"]} for _, r in top.iterrows()), metric)
    if top.empty:
        st.caption("No caption differs: both checkpoints say the same thing on every image.")
