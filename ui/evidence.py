"""The Attention page's faithfulness tools: three maps and deletion curves, score a caption, force a
prefix, the beam search step by step. Cached calls into core/ plus their rendering; the page calls one
`render_*` function per section. Cache keys as in ui/cache.py: checkpoint id, image content key, decoding
dict and what else determines the result; live objects go in `_`-prefixed arguments.
"""
from __future__ import annotations

import dataclasses

import altair as alt
import numpy as np
import pandas as pd
import streamlit as st
from PIL import Image

from core import analysis, beam_trace, evidence, scoring
from core.decoding import DecodingConfig, Hypothesis
from core.errors import CaptionScopeError

SPACES = {"Feature space": "feature", "Pixel space": "pixel"}
# pixel space re-encodes one image per curve point: coarser curves and fewer seeds keep it to seconds
SPACE_SETTINGS = {"feature": {"step": 1, "seeds": 5}, "pixel": {"step": 4, "seeds": 3}}
MAP_TITLES = {"attention": "Attention α", "saliency": "Gradient × input", "occlusion": "Occlusion sensitivity"}
METHOD_COLOURS = {"attention": "#2563eb", "saliency": "#16a34a", "occlusion": "#ea580c", "random": "#6b7280"}


# -- cached computations -----------------------------------------------------------------------------------------
@st.cache_data(max_entries=64, show_spinner="Computing the three maps and the deletion curves…")
def word_evidence(checkpoint_id: str, content_key: str, decoding: dict, index: int, word_index: int, space: str,
                  block: int, _captioner, _image: Image.Image, _features, _hypothesis: Hypothesis) -> evidence.WordEvidence:
    settings = SPACE_SETTINGS[space]
    return evidence.word_evidence(_captioner, _image, _features, _hypothesis, word_index, space=space, block=block,
                                  **settings)


@st.cache_data(max_entries=64, show_spinner="Occluding random regions of the same size…")
def random_baseline(checkpoint_id: str, content_key: str, decoding: dict, index: int, word_index: int,
                    region: tuple[int, int, int, int], _captioner, _image: Image.Image,
                    _hypothesis: Hypothesis) -> analysis.BaselineResult:
    size = (region[2] - region[0], region[3] - region[1])
    return analysis.random_region_baseline(_captioner, _image, _hypothesis, word_index, size=size, samples=8,
                                           exclude=region)


@st.cache_data(max_entries=128, show_spinner="Scoring the caption…")
def score(checkpoint_id: str, content_key: str, text: str, repetition_penalty: float, _captioner,
          _features) -> scoring.CaptionScore:
    return scoring.score_caption(_captioner, _features, text, DecodingConfig(repetition_penalty=repetition_penalty))


@st.cache_data(max_entries=64, show_spinner="Continuing the caption…")
def continuation(checkpoint_id: str, content_key: str, decoding: dict, prefix: tuple[int, ...], _captioner,
                 _features) -> list[Hypothesis]:
    return beam_trace.continue_caption(_captioner.model, _features, DecodingConfig.from_dict(decoding), list(prefix),
                                      vocab=_captioner.vocab)


@st.cache_data(max_entries=32, show_spinner="Tracing the beam search…")
def trace(checkpoint_id: str, content_key: str, decoding: dict, _captioner, _features) -> beam_trace.BeamTrace:
    return beam_trace.trace_beam_search(_captioner.model, _features, DecodingConfig.from_dict(decoding),
                                       vocab=_captioner.vocab)


# -- rendering ---------------------------------------------------------------------------------------------------------
def heat_image(image: Image.Image, weights: np.ndarray, grid: int, *, opacity: float, cmap: str,
               smooth: bool) -> Image.Image:
    """Bounded for display (core.images.DISPLAY_LIMITS), as the page's own overlay."""
    return analysis.attention_overlay(image, weights, grid, opacity=opacity, cmap=cmap, smooth=smooth)


def deletion_chart(result: evidence.WordEvidence) -> alt.LayerChart:
    curves = result.deletion
    frame = curves.frame()
    band = pd.DataFrame({"removed": curves.fractions, "low": curves.random_curves.min(0),
                         "high": curves.random_curves.max(0)})
    x = alt.X("removed:Q", title="share of the image removed", axis=alt.Axis(format="%"))
    area = alt.Chart(band).mark_area(opacity=0.2, color=METHOD_COLOURS["random"]).encode(
        x=x, y=alt.Y("low:Q", title=f"p(“{result.word}”)"), y2="high:Q")
    colour = alt.Color("method:N", scale=alt.Scale(domain=list(METHOD_COLOURS), range=list(METHOD_COLOURS.values())))
    lines = alt.Chart(frame).mark_line().encode(x=x, y="p:Q", color=colour, tooltip=["method", "removed", "p"])
    return area + lines


def render_faithfulness(captioner, image: Image.Image, features, hyp: Hypothesis, key: dict, t: int, *,
                        opacity: float, cmap: str, smooth: bool) -> None:
    """Three maps side by side, their rank correlations, deletion curves with the random band, a verdict."""
    c1, c2, c3 = st.columns([2, 2, 1], vertical_alignment="bottom")
    space_label = c1.radio("Deletion space", list(SPACES), key="att_faith_space", horizontal=True,
                           help="Feature space: a removed region's features become the image's mean feature "
                                "(what the decoder sees; fast). Pixel space: the cells are greyed out and the "
                                "image re-encoded (the whole pipeline; receptive fields overlap).")
    block = c2.radio("Occlusion cells", [2, 1], key="att_faith_block", horizontal=True,
                     format_func=lambda b: f"{b}×{b}", help="Cells greyed out per re-encode for the occlusion map.")
    space = SPACES[space_label]
    request = (key["sig"], t, space, int(block))
    if c3.button("Run faithfulness check", icon=":material/science:", type="primary"):
        st.session_state["att_faith_request"] = request
    if st.session_state.get("att_faith_request") != request:
        st.caption("Compares attention with gradient saliency and occlusion for this word, and removes regions in "
                   "each map's order to see which finds the evidence first.")
        return
    try:
        result = word_evidence(captioner.checkpoint_id, key["item"], key["decoding"], key["h"], t, space, int(block),
                               captioner, image, features, hyp)
    except CaptionScopeError as e:
        st.error(str(e))
        return
    grid = captioner.grid
    for column, (name, weights) in zip(st.columns(3), result.maps.items()):
        column.image(heat_image(image, weights, grid, opacity=opacity, cmap=cmap, smooth=smooth), width="stretch",
                     caption=MAP_TITLES[name], output_format="JPEG")
    for column, (pair, rho) in zip(st.columns(3), result.correlations.items()):
        column.metric(f"Spearman ρ, {pair}", "—" if np.isnan(rho) else f"{rho:+.2f}")
    chart, table = st.columns([3, 2])
    chart.altair_chart(deletion_chart(result), width="stretch")
    auc = result.deletion.auc
    low, high = result.deletion.random_band
    table.table(pd.DataFrame({"Ranking": list(auc), "Area under the curve": [f"{v:.3f}" for v in auc.values()]}),
                hide_index=True)
    table.caption(f"Random orders ({len(result.deletion.random_curves)} seeds): {low:.3f} to {high:.3f}. "
                  "Lower = p(word) falls sooner = the ranking found what the word depends on.")
    st.info(result.deletion.verdict())


def render_random_baseline(captioner, image: Image.Image, hyp: Hypothesis, key: dict, t: int, region, drop: float) -> None:
    base = random_baseline(captioner.checkpoint_id, key["item"], key["decoding"], key["h"], t, tuple(region),
                           captioner, image, hyp)
    st.caption(f"Random regions of the same size lower p by {base.mean_drop:+.3f} ± {base.std_drop:.3f} "
               f"({len(base.drops)} regions): this region's drop of {drop:+.3f} is "
               + ("well above chance." if drop > base.mean_drop + 2 * base.std_drop else "within chance."))


def render_score(captioner, image: Image.Image, features, hyp: Hypothesis, words: list[str], key: dict, *,
                 opacity: float, cmap: str, smooth: bool) -> None:
    penalty = float(key["decoding"].get("repetition_penalty", 1.0))
    text_key = f"att_score_text_{key['sig']}"
    if text_key not in st.session_state:
        st.session_state[text_key] = " ".join(words)
    text = st.text_input("Caption to score", key=text_key, max_chars=scoring.MAX_CHARACTERS,
                         help="Type a caption or edit the model's. Unknown words are named and scored as <unk>.")
    try:
        scored = score(captioner.checkpoint_id, key["item"], text, penalty, captioner, features)
    except CaptionScopeError as e:
        st.error(str(e))
        return
    if scored.oov:
        st.warning("Not in the model's vocabulary (scored as <unk>): " + ", ".join(dict.fromkeys(w for _, w in scored.oov)))
    for note in scored.notes:
        st.caption(note)
    m1, m2, m3, m4 = st.columns(4)
    m1.metric("Log-prob (this caption)", f"{scored.logprob:.2f}")
    m2.metric("Per token", f"{scored.per_token:.3f}")
    m3.metric("Log-prob (model's best)", f"{hyp.logprob:.2f}")
    m4.metric("Per token (best)", f"{hyp.logprob / max(hyp.length, 1):.3f}")
    unlikely = set(scored.unlikely())
    frame = pd.DataFrame({"word": scored.words, "p(word)": scored.probs, "β": scored.betas,
                          "unlikely": [i in unlikely for i in range(len(scored.words))]})
    st.dataframe(frame.style.apply(lambda row: ["background-color: #fee2e2" if row["unlikely"] else ""] * len(row),
                                   axis=1).format({"p(word)": "{:.3f}", "β": "{:.2f}"}),
                 hide_index=True, width="stretch", column_config={"unlikely": None})
    st.caption(f"Highlighted: p(word) < {scoring.UNLIKELY:.0%}. The total counts <end>, as the decoder's log-prob does."
               + (f" Scored with the decoding's repetition penalty ({penalty:g}), which reshapes the model's "
                  "distribution as it does for the decoder's own captions." if penalty != 1.0 else ""))
    pick_key = f"att_score_word_{key['sig']}"
    if st.session_state.get(pick_key) not in range(len(scored.words)):
        st.session_state[pick_key] = 0
    chosen = st.selectbox("Attention of the scored word", range(len(scored.words)), key=pick_key,
                          format_func=lambda i: f"{i + 1}. {scored.words[i]}")
    c1, _ = st.columns([1, 1])
    c1.image(heat_image(image, scored.attention[chosen], captioner.grid, opacity=opacity, cmap=cmap, smooth=smooth),
             caption=f"“{scored.words[chosen]}”: p = {scored.probs[chosen]:.3f}, β = {scored.betas[chosen]:.2f}",
             width="stretch", output_format="JPEG")


def render_prefix(captioner, image: Image.Image, features, decoding: DecodingConfig, key: dict, *,
                  opacity: float, cmap: str, smooth: bool) -> None:
    text = st.text_input("First words", key="att_prefix_text", placeholder="a woman in",
                         help="The decoder continues from these words with the sidebar's decoding settings.")
    if not text.strip():
        st.caption("Type the first words of a caption; the model finishes it.")
        return
    try:
        prepared = scoring.prepare_caption(text, captioner.vocab, allow_oov=False, what="prefix")
        hyps = continuation(captioner.checkpoint_id, key["item"], key["decoding"], tuple(prepared.token_ids),
                            captioner, features)
    except CaptionScopeError as e:
        st.error(str(e))
        return
    words = captioner.words(hyps[0])
    st.markdown(f"**{' '.join(words[:len(prepared.words)])}** {' '.join(words[len(prepared.words):])}")
    st.caption(f"log-prob {hyps[0].logprob:.2f} (prefix included) · score {hyps[0].score:.2f} · "
               f"{'ended with <end>' if hyps[0].finished else 'stopped at max length'}")
    tokens = words + (["<end>"] if hyps[0].finished else [])
    st.image(analysis.attention_grid(image, tokens, hyps[0].attention, captioner.grid, opacity=opacity, cmap=cmap,
                                     smooth=smooth), width="stretch")


def beam_frame(result: beam_trace.BeamTrace, vocab) -> pd.DataFrame:
    rows = []
    for step in result.steps:
        for status, nodes in (("kept", step.kept), ("finished", step.finished), ("pruned", step.pruned)):
            for node in nodes:
                rows.append({"step": step.t + 1, "status": status, "group": node.group + 1, "hypothesis": " ".join(
                    vocab.decode_tokens(node.tokens)) + (" <end>" if node.finished else ""),
                    "log-prob": node.logprob, "score": node.score, "node": node})
    frame = pd.DataFrame(rows)
    if not frame.empty and frame["group"].max() == 1:      # one group: plain beam search, no column for it
        frame = frame.drop(columns="group")
    return frame


def render_beam(captioner, image: Image.Image, features, decoding: DecodingConfig, key: dict, *,
                opacity: float, cmap: str, smooth: bool) -> None:
    groups = decoding.num_beam_groups          # diverse beam search: the width stays a multiple of the groups
    widest = groups * max(2, 10 // groups)
    default = 3 if decoding.do_sample else decoding.beam_size if groups > 1 else max(2, decoding.beam_size)
    width = st.slider("Beam width k", groups, widest, min(widest, default), step=groups,
                      key=f"att_beam_width_{decoding.beam_size}_{groups}",
                      help="Diverse beam search: a multiple of the sidebar's beam groups." if groups > 1 else None)
    config = dataclasses.replace(decoding, beam_size=int(width), do_sample=False,
                                 num_return_sequences=min(decoding.num_return_sequences, int(width)))
    try:
        result = trace(captioner.checkpoint_id, key["item"], config.to_dict(), captioner, features)
    except CaptionScopeError as e:
        st.error(str(e))
        return
    frame = beam_frame(result, captioner.vocab)
    table, pic = st.columns([3, 2])
    table.dataframe(frame.drop(columns="node"), hide_index=True, width="stretch", height=360, column_config={
        "log-prob": st.column_config.NumberColumn("Log-prob", format="%.3f"),
        "score": st.column_config.NumberColumn("Length-penalised", format="%.3f")})
    best = " ".join(captioner.words(result.hypotheses[0])) if result.hypotheses else "(none)"
    knobs = config.describe_knobs() + ([f"diversity penalty {config.diversity_penalty:g} between "
                                        f"{config.num_beam_groups} groups"] if config.num_beam_groups > 1 else [])
    table.caption(f"Per step: the kept beams, the ones that finished with <end>, and the strongest pruned "
                  f"candidates, ranked by the score the search uses"
                  + (f" (with {', '.join(knobs)})" if knobs else "") + f". Final: **{best}**.")
    labels = [f"step {r['step']} · {r['status']} · {r['hypothesis']}" for r in frame.to_dict("records")]
    node_key = f"att_beam_node_{key['sig']}_{width}"
    if st.session_state.get(node_key) not in range(len(labels)):
        st.session_state[node_key] = 0
    chosen = pic.selectbox("Node", range(len(labels)), key=node_key, format_func=lambda i: labels[i])
    node = frame["node"][chosen]
    pic.image(heat_image(image, node.attention, captioner.grid, opacity=opacity, cmap=cmap, smooth=smooth),
              caption=f"Attention for “{(node.tokens and captioner.vocab.itos[node.tokens[-1]]) or ''}” "
                      f"(log-prob {node.logprob:.2f})", width="stretch", output_format="JPEG")
