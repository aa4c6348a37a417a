"""Beam comparison: one image at several beam widths, a decoding grid (widths × length penalty × no-repeat
n-gram: table, charts, two settings image by image) and a corpus sweep of BLEU-4 / CIDEr-D vs width."""
import dataclasses

import pandas as pd
import streamlit as st

from core.errors import CaptionScopeError
from core.images import fit_for_display
from ui import cache, grid_view, links, sidebar, state, widgets

WIDTHS = list(range(1, 11))

sidebar.page_setup()
st.title("Beam comparison")
captioner = state.require_captioner()
sidebar_decoding = state.decoding()

widths_key = f"{state.PERSIST}beam_widths"
widgets.init_state(widths_key, [1, 2, 3, 5, 10])
c1, c2, c3 = st.columns([3, 2, 1])
widths = sorted(c1.multiselect("Beam widths", WIDTHS, key=widths_key))
# keyed by the sidebar's values: these start from the sidebar and follow it when it changes
lp = c2.slider("Length penalty α", 0.0, 2.0, float(sidebar_decoding.length_penalty), 0.1,
               key=f"beam_lp_{sidebar_decoding.length_penalty}")
ngram = c3.number_input("No-repeat n-gram", 0, 4, int(sidebar_decoding.no_repeat_ngram_size), 1,
                        key=f"beam_ngram_{sidebar_decoding.no_repeat_ngram_size}")
# plain beam search at every width (beam groups must divide the width, so diverse search is not swept)
base = dataclasses.replace(sidebar_decoding, length_penalty=float(lp), no_repeat_ngram_size=int(ngram),
                           do_sample=False, num_return_sequences=1, num_beam_groups=1, diversity_penalty=0.0)
if sidebar_decoding.mode == "sample":
    st.caption("The sidebar is set to sampling; this page always uses beam search.")
elif sidebar_decoding.num_beam_groups > 1:
    st.caption("The sidebar is set to diverse beam search; this page compares plain beam search widths.")

st.subheader("One image")
item = widgets.single_image_picker("beam")
links.share()
if item is not None and widths:
    try:
        image = cache.display_image(captioner, item)
        feats = cache.features(captioner, item)
    except CaptionScopeError as e:
        st.error(str(e))
    else:
        rows = cache.beam_rows(cache.CaptionKey.of(captioner, item, base), tuple(widths), captioner, feats)
        pic, table = st.columns([1, 3])
        pic.image(fit_for_display(image), caption=item.name, width="stretch")
        frame = pd.DataFrame(rows, columns=["width", "caption", "logprob", "normalised", "length", "finished",
                                            "time_ms"])
        frame["finished"] = frame["finished"].map({True: "yes", False: "no"})
        table.table(widgets.text_table(frame, {
            "width": ("Beam", "{}"), "caption": ("Caption", "{}"), "logprob": ("Log-prob", "{:.2f}"),
            "normalised": ("Per token", "{:.3f}"), "length": ("Words", "{}"), "finished": ("<end>", "{}"),
            "time_ms": ("Time (ms)", "{:.0f}")}), hide_index=True)
        table.caption("Wider beams find captions with a higher total log-prob; the per-token column shows "
                      "whether they win only by being shorter (raise α to counter that).")
elif not widths:
    st.info("Pick at least one beam width.")

dataset, error = state.get_dataset()
if dataset is None:
    st.info(error)
    st.stop()
split = dataset.browse_split
items = dataset.splits[split] if split else []
if items:
    st.subheader(f"Flickr8K {split}: a decoding grid")
    grid_view.render(captioner, items, split, base)

st.subheader("Flickr8K dev: scores vs beam width")
if not items or not widths:
    st.info(f"The {split} split is empty." if not items else "Pick at least one beam width.")
    st.stop()
size_key = f"{state.PERSIST}beam_subset"
widgets.init_state(size_key, min(100, len(items)))
st.session_state[size_key] = min(max(int(st.session_state[size_key]), 1), len(items))
c1, c2 = st.columns([1, 3], vertical_alignment="bottom")
n = int(c1.number_input(f"{split} images (first n)", 1, len(items), step=50, key=size_key))
run = c2.button(f"Run the sweep over {len(widths)} width{'s' if len(widths) > 1 else ''}",
                icon=":material/play_arrow:", type="primary")
request = (captioner.checkpoint_id, str(dataset.root), split, n, tuple(widths), base)
if run:
    st.session_state["beam_sweep_request"] = request
if st.session_state.get("beam_sweep_request") == request:
    try:
        sweep = cache.beam_sweep(captioner, items[:n], widths, base, split)
    except CaptionScopeError as e:
        st.error(str(e))
        st.stop()
    shown = sweep.copy()
    shown["BLEU-4"] *= 100
    shown["CIDEr-D"] *= 100
    st.dataframe(shown, hide_index=True, width="stretch", column_config={
        "width": st.column_config.NumberColumn("Beam"),
        "BLEU-4": st.column_config.NumberColumn("BLEU-4 ×100", format="%.2f"),
        "CIDEr-D": st.column_config.NumberColumn("CIDEr-D ×100", format="%.2f"),
        "mean_length": st.column_config.NumberColumn("Mean words", format="%.2f"),
        "finished": st.column_config.NumberColumn("Ended with <end>", format="percent"),
        "decode_s": st.column_config.NumberColumn("Decode", format="%.1f s"),
    })
    c1, c2 = st.columns(2)
    with c1:
        st.line_chart(shown.set_index("width")[["BLEU-4", "CIDEr-D"]], x_label="beam width", y_label="×100")
    with c2:
        st.line_chart(shown.set_index("width")[["mean_length"]], x_label="beam width", y_label="mean words")
    st.caption(f"First {n:,} images of the {split} split; captions are cached on disk per width and "
               "decoding setting, so a rerun is instant.")
else:
    st.caption("Decodes the subset once per width (from the feature cache when present, else the images).")
