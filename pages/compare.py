"""Compare checkpoints: two models on one image (both captions, attention of the words both say) and on the
dev split (corpus metrics of both, per-image deltas, word-level diffs). Views over core.compare."""
import dataclasses

import streamlit as st

from core.compare import attention_alignment
from ui import compare_view, settings, sidebar, state, widgets

P = state.PERSIST

sidebar.page_setup()
st.title("Compare checkpoints")
choices = settings.available_checkpoints()
if not choices:
    st.info(f"No checkpoint in {settings.checkpoint_dir()}: add one (or upload one in the sidebar) to compare.")
    st.stop()
labels = [c.label for c in choices]
by_label = dict(zip(labels, choices))
chosen = state.selected_checkpoint()
widgets.init_state(f"{P}cmp_a", chosen.label if chosen is not None and chosen.label in by_label else labels[0],
                   labels)
widgets.init_state(f"{P}cmp_b", next((l for l in labels if l != st.session_state[f"{P}cmp_a"]), labels[0]), labels)
c1, c2 = st.columns(2)
label_a = c1.selectbox("Checkpoint A", labels, key=f"{P}cmp_a")
label_b = c2.selectbox("Checkpoint B", labels, key=f"{P}cmp_b", help="Deltas are B − A.")
(a, error_a), (b, error_b) = compare_view.load(by_label[label_a]), compare_view.load(by_label[label_b])
if a is None or b is None:
    st.error(error_a or error_b)
    st.stop()
if label_a == label_b or a.checkpoint_id == b.checkpoint_id:      # an uploaded copy is the same checkpoint
    st.caption("A and B are the same checkpoint: every delta is zero.")
# deterministic settings for both: the sidebar's beam search (sampling would compare two random draws)
decoding = dataclasses.replace(state.decoding(), do_sample=False, num_return_sequences=1)
alignment = attention_alignment(a, b)

st.subheader("One image")
item = widgets.single_image_picker("cmp")
if item is not None:
    compare_view.one_image(a, b, item, decoding, alignment)

st.subheader("The dev split")
dataset, split, items = state.require_dev_split()
if not items:
    st.info(f"The {split} split is empty.")
    st.stop()
compare_view.split_section(a, b, items, split, decoding)
