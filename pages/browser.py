"""Flickr8K browser: the dev split captioned and scored; search, sort (worst first), page, inspect one image;
the failure finder (unsupported words, reference matches, the model's language against the references')."""
import dataclasses
import math

import streamlit as st

from core import corpus, failures
from core.errors import CaptionScopeError
from core.images import fit_for_display
from core.io_utils import printable_name
from core.metrics import METRIC_NAMES
from ui import cache, failures_view, links, sidebar, state, widgets
from ui.cache import ImageInput

SORTS = {
    "CIDEr-D, worst first": ("CIDEr-D", True), "CIDEr-D, best first": ("CIDEr-D", False),
    "BLEU-4, worst first": ("BLEU-4", True), "BLEU-4, best first": ("BLEU-4", False),
    "METEOR, worst first": ("METEOR", True), "METEOR, best first": ("METEOR", False),
    "Unsupported words, most first": ("unsupported_count", False),
    "Caption length, shortest first": ("length", True), "Caption length, longest first": ("length", False),
    "Image name": ("image", True),
}
WHERE = {"references and caption": "both", "references": "references", "caption": "caption"}
P = state.PERSIST
REFERENCES_PER_PAGE = 20

sidebar.page_setup()
st.title("Flickr8K browser")
captioner = state.require_captioner()
dataset, split, items = state.require_dev_split()
decoding = state.decoding()
if decoding.mode != "sample":
    decoding = dataclasses.replace(decoding, num_return_sequences=1)   # same cache entries as the sweep

try:
    predictions = cache.caption_split(captioner, items, decoding, split)
    scores = cache.score_split(predictions, items)
except CaptionScopeError as e:
    st.error(str(e))
    st.stop()

# -- corpus metrics --------------------------------------------------------------------------------------------
st.caption(f"{len(items):,} {split} images of {dataset.root.name} · captions with the sidebar's decoding "
           "settings · metrics ×100")
cols = st.columns(len(METRIC_NAMES))
for col, name in zip(cols, METRIC_NAMES):
    value = scores.corpus.get(name)
    col.metric(name, f"{value * 100:.1f}" if value is not None else "—")
for note in scores.notes:
    st.caption(note)

# -- table controls ----------------------------------------------------------------------------------------------
table = failures.with_unsupported(corpus.browse_table(items, predictions, scores))
st.subheader("Failure finder")
unsupported_word, only_unsupported = failures_view.corpus_panel(table)
with st.expander("What the model says against what people say"):
    failures_view.language_panel(items, predictions)
widgets.init_state(f"{P}browse_sort", next(iter(SORTS)), SORTS)
widgets.init_state(f"{P}browse_where", next(iter(WHERE)), WHERE)
widgets.init_state(f"{P}browse_query", "")
widgets.init_state(f"{P}browse_page_size", 25, (10, 25, 50, 100))
c1, c2, c3, c4 = st.columns([3, 2, 2, 1])
query = c1.text_input("Search", key=f"{P}browse_query", placeholder="e.g. dog beach",
                      help="Every word must appear (case-insensitive).")
where = c2.selectbox("in", list(WHERE), key=f"{P}browse_where")
sort = c3.selectbox("Sort", list(SORTS), key=f"{P}browse_sort")
page_size = c4.selectbox("Rows", (10, 25, 50, 100), key=f"{P}browse_page_size")
sort_by, ascending = SORTS[sort]
shown = failures_view.apply_filter(corpus.filter_table(table, query, WHERE[where], sort_by, ascending),
                                   unsupported_word, only_unsupported)
pages = max(1, math.ceil(len(shown) / page_size))
widgets.init_state(f"{P}browse_page", 1)
st.session_state[f"{P}browse_page"] = min(max(int(st.session_state[f"{P}browse_page"]), 1), pages)
c1, c2 = st.columns([1, 4], vertical_alignment="bottom")
page = int(c1.number_input(f"Page (of {pages})", 1, pages, step=1, key=f"{P}browse_page"))
c2.caption(f"{len(shown):,} of {len(table):,} images match")
if shown.empty:
    st.info("No image matches the search.")
    st.stop()

# -- the current page (thumbnails are made for these rows only) ----------------------------------------------------
rows = shown.iloc[(page - 1) * page_size: page * page_size].copy()
rows.insert(0, "thumbnail", [widgets.thumbnail_uri(p, widgets.mtime_ns(p)) for p in rows["path"]])
for metric in corpus.TABLE_METRICS:
    rows[metric] = rows[metric] * 100
table_key = f"browse_table_{page}_{page_size}_{sort}_{where}_{query}_{unsupported_word}_{only_unsupported}"
# pixel widths that fit the 1280 px layout beside the sidebar without sideways scrolling; the file name
# and the full references are in the details below (double-clicking a cell also shows all of it)
selection = st.dataframe(
    rows[["thumbnail", "caption", "unsupported", *corpus.TABLE_METRICS, "length", "references_text"]],
    hide_index=True, width="stretch", on_select="rerun", selection_mode="multi-row", key=table_key,
    row_height=64, column_config={
        "thumbnail": st.column_config.ImageColumn("", width=64),
        "caption": st.column_config.TextColumn("Caption", width=220),
        "unsupported": st.column_config.TextColumn("Unsupported", width=100,
                                                   help="Content words no reference of the image uses"),
        **{m: st.column_config.NumberColumn(m, format="%.1f", width=66) for m in corpus.TABLE_METRICS},
        "length": st.column_config.NumberColumn("Words", width=56),
        "references_text": st.column_config.TextColumn("References", width=160),
    })
selected_rows = selection.selection.rows if selection is not None and hasattr(selection, "selection") else []
names = rows["image"].tolist()
detail_key = f"browse_detail_{table_key}"
picked_names = [names[i] for i in selected_rows if i < len(names)]
if selected_rows:
    st.session_state[detail_key] = names[selected_rows[-1]]
linked = widgets.linked_image()                        # ?image=NAME of a dev image: its details
if linked and linked[0] == "flickr8k" and linked[1] in set(table["image"]):
    names = names if linked[1] in names else [linked[1], *names]
    st.session_state[detail_key] = linked[1]
widgets.init_state(detail_key, names[0], names)
c1, c2, _ = st.columns([2, 1, 3], vertical_alignment="center")
c1.caption(f"{len(picked_names)} row(s) selected for the report" if picked_names else
           "Select rows (tick boxes on the left) to put them in an HTML report.")

# -- one image -----------------------------------------------------------------------------------------------------
st.subheader("Details")
name = st.selectbox("Image (or select a row above)", names, key=detail_key, format_func=printable_name)
entry = table[table["image"] == name].iloc[0]
links.set_image("flickr8k", name)
try:
    item = ImageInput.from_path(entry["path"], "flickr8k")
    decoded = cache.caption(captioner, item, decoding)
    image = decoded.image
except CaptionScopeError as e:
    st.error(str(e))
    st.stop()
pic, text = st.columns([2, 3])
pic.image(fit_for_display(image), caption=printable_name(name), width="stretch")
with text:
    caption = predictions[name]["caption"]
    flagged = entry["unsupported"].split(", ") if entry["unsupported"] else []
    st.markdown(f"**Caption:** {failures_view.caption_with_unsupported(caption, flagged)}")
    if flagged:
        st.caption("On orange: words none of the references supports.")
    references = entry["references"]
    first = 0
    if len(references) > REFERENCES_PER_PAGE:      # the whole list would grow the page with the file
        ref_pages = math.ceil(len(references) / REFERENCES_PER_PAGE)
        ref_page = st.number_input(f"References page (of {ref_pages:,}; {len(references):,} references)", 1,
                                   ref_pages, step=1, key=f"browse_ref_page_{detail_key}_{name}")
        first = (int(ref_page) - 1) * REFERENCES_PER_PAGE
    st.markdown("**References** (and what BLEU matched in each):")
    failures_view.reference_matches(caption, [corpus.clip_text(r) for r in
                                              references[first:first + REFERENCES_PER_PAGE]], start=first)
    per = widgets.metric_row(scores.per_image.get(name, {}))
    st.table(widgets.metric_table([{"image": "×100", **per}], label="image").T)
st.markdown("**Attention of each word**")
if decoded.caption != predictions[name]["caption"]:
    st.caption(f"Decoded from the image file: “{decoded.caption}” (the split run used the cached float16 "
               "features, which can tip a close decision).")
grid_png = cache.attention_grid_png(cache.CaptionKey.of(captioner, item, decoding), 0, cache.HeatmapStyle(),
                                    decoded, captioner.grid)
st.image(grid_png, width="stretch", output_format="PNG")   # as is: "auto" re-encoded it every rerun


def _report_entries() -> list:
    entries = []
    for picked in picked_names:
        row = table[table["image"] == picked].iloc[0]
        try:
            picked_item = ImageInput.from_path(row["path"], "flickr8k")
            picked_result = cache.caption(captioner, picked_item, decoding)
        except CaptionScopeError:
            continue
        entries.append(widgets.report_entry(picked_item, picked_result,
                                            references=row["references"], scores=scores.per_image.get(picked)))
    return entries


with c2:
    widgets.report_button(captioner, decoding, _report_entries() if picked_names else [],
                          label=f"Report of {len(picked_names)} (HTML)")
links.share()
