"""Faithfulness over the dev split: does attention rank the regions each word depends on better than chance?"""
import dataclasses

import altair as alt
import pandas as pd
import streamlit as st

from core import faithfulness
from core.errors import CaptionScopeError
from ui import cache, settings, sidebar, state, widgets

SPACES = {"Feature space": "feature", "Pixel space": "pixel"}

sidebar.page_setup()
st.title("Faithfulness")
captioner = state.require_captioner()
dataset, split, items = state.require_dev_split()
decoding = dataclasses.replace(state.decoding(), do_sample=False, num_return_sequences=1)
if state.decoding().do_sample:
    st.caption("The sidebar is set to sampling; this page explains the beam-search caption.")
st.markdown("For every generated word of the first *n* images, regions are removed in the order attention, "
            "gradient saliency and random orders rank them, and p(word) is re-scored each time. A lower area "
            "under that curve means the ranking found what the word depends on.")

size_key = f"{state.PERSIST}faith_images"
widgets.init_state(size_key, min(20, len(items)))
st.session_state[size_key] = min(max(int(st.session_state[size_key]), 1), len(items))
c1, c2, c3 = st.columns([1, 2, 2], vertical_alignment="bottom")
n = int(c1.number_input(f"{split} images (first n)", 1, len(items), step=10, key=size_key))
space_label = c2.radio("Deletion space", list(SPACES), key=f"{state.PERSIST}faith_space", horizontal=True)
config = faithfulness.FaithfulnessConfig(space=SPACES[space_label], step=1 if space_label == "Feature space" else 4)
request = (captioner.checkpoint_id, str(dataset.root), split, n, config, tuple(sorted(decoding.to_dict().items())))
if c3.button("Run over the split", icon=":material/play_arrow:", type="primary"):
    st.session_state["faith_request"] = request
if st.session_state.get("faith_request") != request:
    st.caption("Results are cached on disk per checkpoint, decoding setting, image list and deletion setting.")
    st.stop()

bar = st.progress(0.0, text="Deletion curves…")
try:
    rows = faithfulness.run_split(captioner, items[:n], decoding, config, features_dir=settings.features_dir(),
                                  split=split, cache=cache.caption_cache(),
                                  progress=lambda d, t: bar.progress(d / max(t, 1), text=f"Deletion curves… {d}/{t} images"))
except CaptionScopeError as e:
    st.error(str(e))
    st.stop()
finally:
    bar.empty()
summary = faithfulness.summarise(rows)

st.subheader("Summary")
table = pd.DataFrame([{"Ranking": m, "Mean AUC": f"{summary[m]['mean_auc']:.3f}",
                       "95% interval": "{:.3f} to {:.3f}".format(*summary[m]["ci95"]),
                       "Beats random on": f"{summary[m]['beats_random']:.0%} of words" if m != "random" else "—"}
                      for m in faithfulness.METHODS])
st.table(table, hide_index=True)
st.caption(f"{summary['images']} images, {summary['words']} words ({config.space} space). Bootstrap 95% "
           "intervals over words.")

frame = pd.DataFrame(rows)
frame["attention - random"] = frame["auc_attention"] - frame["auc_random"]
left, right = st.columns(2)
with left:
    st.altair_chart(alt.Chart(frame).mark_bar().encode(
        x=alt.X("attention - random:Q", bin=alt.Bin(maxbins=30), title="attention AUC − random AUC"),
        y=alt.Y("count():Q", title="words")), width="stretch")
    st.caption("Left of 0: attention found the evidence sooner than chance.")
with right:
    bands = pd.DataFrame([{"Frequency": band, "Words": v["count"], "Attention": f"{v['attention']:.3f}",
                           "Saliency": f"{v['saliency']:.3f}", "Random": f"{v['random']:.3f}",
                           "Attention beats random": f"{v['attention_beats_random']:.0%}"}
                          for band, v in summary["by_frequency"].items()])
    st.table(bands, hide_index=True)
    st.caption("Frequency = the word's rank in the vocabulary (by training count): content words such as "
               "“dog” sit below the top 10.")

st.subheader("Where attention is least faithful")
worst = faithfulness.least_faithful(rows, 10)
for i, row in enumerate(worst):
    c1, c2 = st.columns([4, 1], vertical_alignment="center")
    c1.markdown(f"**“{row['word']}”** (word {row['position'] + 1}) in {row['image']}: attention "
                f"{row['auc_attention']:.3f} vs random {row['auc_random']:.3f}")
    if c2.button("Open", key=f"faith_open_{i}", icon=":material/visibility:"):
        st.session_state[f"{state.PERSIST}att_source"] = "Flickr8K dev"
        st.session_state[f"{state.PERSIST}att_flickr"] = row["image"]
        st.session_state["att_requested_word"] = int(row["position"])
        st.switch_page("pages/attention.py")

with st.expander("By word"):
    st.dataframe(pd.DataFrame([{"word": w, **v} for w, v in summary["by_word"].items()]), hide_index=True,
                 width="stretch")
