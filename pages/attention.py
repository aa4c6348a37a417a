"""Attention: where the model looked for each word, how focused it was, and whether the word depends on it."""
import hashlib

import numpy as np
import pandas as pd
import streamlit as st

from core import analysis
from core.images import fit_for_display
from ui import cache, charts, evidence, links, sidebar, state, widgets

COLORMAPS = ["jet", "viridis", "magma", "inferno", "plasma", "turbo", "gray"]

sidebar.page_setup()
st.title("Attention")
captioner = state.require_captioner()
decoding = state.decoding()
grid = captioner.grid

pick, choose = st.columns(2)
with pick:
    item = widgets.single_image_picker("att")
if item is None:
    st.stop()
decoded = widgets.caption_or_stop(captioner, item, decoding)

# -- which hypothesis, which word -------------------------------------------------------------------------------
options = list(range(len(decoded.hypotheses)))
hyp_key = f"att_hyp_{item.key[:16]}"
widgets.init_state(hyp_key, 0, options)
links.apply_index("hyp", hyp_key, len(options))
h = choose.selectbox("Hypothesis", options, key=hyp_key, disabled=len(options) == 1,
                 format_func=lambda i: f"#{i + 1}  {' '.join(decoded.words[i]) or '(empty)'}  "
                                       f"(log-prob {decoded.hypotheses[i].logprob:.2f})")
hyp = decoded.hypotheses[h]
tokens = decoded.tokens(h)
attention = hyp.attention
steps = len(tokens)
key = cache.CaptionKey.of(captioner, item, decoding)
image = decoded.image
sig = hashlib.sha1(f"{item.key}|{h}|{' '.join(tokens)}".encode()).hexdigest()[:12]
pill_key, slider_key = f"att_word_pill_{sig}", f"att_word_slider_{sig}"
requested = st.session_state.pop("att_requested_word", None)     # from the Faithfulness page's word links
if isinstance(requested, int) and 0 <= requested < steps:
    st.session_state[pill_key] = st.session_state[slider_key] = requested
widgets.init_state(pill_key, 0, range(steps))
links.apply_index("word", pill_key, steps)
widgets.init_state(slider_key, st.session_state[pill_key], range(steps))


def _from_pill() -> None:
    if st.session_state.get(pill_key) is None:
        st.session_state[pill_key] = st.session_state.get(slider_key, 0)
    st.session_state[slider_key] = st.session_state[pill_key]


def _from_slider() -> None:
    st.session_state[pill_key] = st.session_state[slider_key]


def _label(i: int) -> str:
    """The word, made unique with zero-width spaces: the pills widget tells options apart by their label."""
    return tokens[i] + "\u200b" * tokens[:i].count(tokens[i])


# -- the chosen word: image on the left, words and controls on the right --------------------------------------------
view, side = st.columns([3, 2])
with side:
    st.pills("Word", list(range(steps)), key=pill_key, format_func=_label, required=True, on_change=_from_pill,
             wrap=True)
    if steps > 1:
        st.slider("Step", 0, steps - 1, key=slider_key, on_change=_from_slider, format="%d",
                  help="Same as clicking the words: step through the caption.")
    t = int(st.session_state[pill_key])
    links.share({"hyp": h + 1, "word": t + 1}, where=choose)
    widgets.init_state(f"{state.PERSIST}att_opacity", 0.5)
    widgets.init_state(f"{state.PERSIST}att_cmap", COLORMAPS[0], COLORMAPS)
    widgets.init_state(f"{state.PERSIST}att_smooth", True)
    opacity = st.slider("Heatmap opacity", 0.0, 1.0, step=0.05, key=f"{state.PERSIST}att_opacity")
    c1, c2 = st.columns(2, vertical_alignment="bottom")
    cmap = c1.selectbox("Colormap", COLORMAPS, key=f"{state.PERSIST}att_cmap")
    smooth = c2.toggle("Smooth", key=f"{state.PERSIST}att_smooth",
                       help="Off: one block per attention cell, which is all the model can resolve.")
    entropy = analysis.attention_entropy(attention)
    peak = analysis.peak_region(attention[t], grid)
    prob = float(np.exp(hyp.token_logprobs[t]))
    m1, m2, m3 = st.columns(3)
    m1.metric("p(word)", f"{prob:.2f}", help="Probability the model gave this word at this step")
    m2.metric("β gate", f"{float(hyp.betas[t]):.2f}",
              help="How much of the attended context reaches the LSTM (near 0: the word comes from the "
                   "language model, not the image)")
    m3.metric("Entropy", f"{float(entropy[t]):.1f}",
              help=f"In bits: 0 = one region, {analysis.max_entropy(attention.shape[1]):.2f} = spread evenly")
    st.caption(f"Peak cell: row {peak[0] + 1}, column {peak[1] + 1} of {grid}×{grid} · "
               f"max weight {float(attention[t].max()):.2f}")
with view:
    # JPEG: redrawn on every word change, and a photo encodes ~10x faster (and smaller) than as PNG
    st.image(analysis.attention_overlay(image, attention[t], grid, opacity=opacity, cmap=cmap, smooth=smooth),
             output_format="JPEG",
             caption=f"“{tokens[t]}” (step {t + 1} of {steps})", width="stretch")

# -- every word ----------------------------------------------------------------------------------------------
st.subheader("All words")
style = cache.HeatmapStyle(opacity=opacity, cmap=cmap, smooth=smooth)
grid_png = cache.attention_grid_png(key, h, style, decoded, grid)
st.image(grid_png, width="stretch", output_format="PNG")   # as is: "auto" re-encoded it every rerun
stem = item.name.rsplit(".", 1)[0]
d1, d2, _ = st.columns([1, 1, 3])
d1.download_button("Grid (PNG)", grid_png, file_name=f"{stem}-attention.png", mime="image/png",
                   icon=":material/download:", on_click="ignore", width="stretch")
d2.download_button("Animation (GIF)", lambda: cache.attention_gif(key, h, style, decoded, grid),
                   file_name=f"{stem}-attention.gif", mime="image/gif", icon=":material/download:",
                   on_click="ignore", width="stretch")

st.subheader("Focus and gate per word")
chart_data = pd.DataFrame({"step": range(1, steps + 1), "word": [f"{i + 1}. {w}" for i, w in enumerate(tokens)],
                           "entropy (bits)": entropy, "β": hyp.betas.astype(float),
                           "p(word)": np.exp(np.asarray(hyp.token_logprobs, dtype=float))})
c1, c2 = st.columns(2)
with c1:
    st.vega_lite_chart(charts.word_line_spec(chart_data, "entropy (bits)", selected_word=chart_data["word"][t],
                                             tooltip=["word", "entropy (bits)"], zero=True,
                                             reference_y=analysis.max_entropy(attention.shape[1])),
                       width="stretch")
    st.caption("Attention entropy; dashed: uniform attention (no focus at all).")
with c2:
    st.vega_lite_chart(charts.word_line_spec(chart_data, "β", selected_word=chart_data["word"][t],
                                             tooltip=["word", "β", "p(word)"], color="#16a34a", y_domain=(0, 1)),
                       width="stretch")
    st.caption("β gate: the share of the attended context passed to the decoder at each word.")

faith = {"sig": sig, "item": item.key, "decoding": decoding.to_dict(), "h": h}
features = cache.features(captioner, item)
look = {"opacity": opacity, "cmap": cmap, "smooth": smooth}

# -- occlusion ---------------------------------------------------------------------------------------------------
st.subheader("Occlusion check")
st.markdown(f"Attention shows where the model looked, not what it used. Grey out a region, re-encode the "
            f"image and see whether **p(“{tokens[t]}”)** (same preceding words) drops and the caption changes.")
modes = ["Most-attended region", "Pick cells"]
widgets.init_state(f"{state.PERSIST}att_occl_mode", modes[0], modes)
mode = st.radio("Region", modes, key=f"{state.PERSIST}att_occl_mode", horizontal=True)
if mode == modes[1]:
    c1, c2 = st.columns(2)
    rows = c1.slider("Rows", 1, grid, (peak[0] + 1, peak[0] + 1), key=f"att_occl_rows_{sig}")
    cols = c2.slider("Columns", 1, grid, (peak[1] + 1, peak[1] + 1), key=f"att_occl_cols_{sig}")
    region = (rows[0] - 1, cols[0] - 1, rows[1], cols[1])
else:
    region = analysis.best_block(attention[t], grid)
request = (sig, t, tuple(int(v) for v in region))
if st.button("Run occlusion check", icon=":material/play_arrow:", type="primary"):
    st.session_state["att_occlusion_request"] = request
if st.session_state.get("att_occlusion_request") != request:
    c1, _ = st.columns([1, 2])
    c1.image(fit_for_display(analysis.occlude(image, region, grid)), width="stretch", output_format="JPEG",
             caption=f"Region to grey out: rows {region[0] + 1}–{region[2]}, columns {region[1] + 1}–{region[3]} "
                     f"({analysis.region_mass(attention[t], grid, region):.0%} of this word's attention)")
else:
    result = cache.occlusion(key, h, t, region, captioner, decoded)
    c1, c2 = st.columns([1, 2])
    c1.image(fit_for_display(result.image), caption=f"Occluded: {result.attention_mass:.0%} of the word's attention",
             width="stretch")
    with c2:
        m1, m2, m3 = st.columns(3)
        m1.metric(f"p(“{result.word}”) before", f"{result.prob_before:.3f}")
        m2.metric("after", f"{result.prob_after:.3f}", delta=f"{result.prob_after - result.prob_before:+.3f}")
        m3.metric("Relative change", f"{(result.prob_after / max(result.prob_before, 1e-12) - 1):+.0%}")
        st.markdown(f"**Caption before:** {result.caption_before}  \n**Caption after:** {result.caption_after}")
        if result.caption_before == result.caption_after:
            st.caption("Same caption after occlusion.")
        evidence.render_random_baseline(captioner, image, hyp, faith, t, result.region, result.drop)

# -- faithfulness, scoring, prefix forcing, the beam search ------------------------------------------------------
st.subheader("Is this attention faithful?")
evidence.render_faithfulness(captioner, image, features, hyp, faith, t, **look)
st.subheader("Score a caption")
evidence.render_score(captioner, image, features, hyp, decoded.words[h], faith, **look)
st.subheader("Force a prefix")
evidence.render_prefix(captioner, image, features, decoding, faith, **look)
st.subheader("Beam search, step by step")
evidence.render_beam(captioner, image, features, decoding, faith, **look)
