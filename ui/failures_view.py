"""The Flickr8K browser's failure finder: unsupported words (share, most frequent words that filter the table,
the column), reference matches in the detail view, and the model's language against the references'.
The computing is core.failures."""
from __future__ import annotations

from typing import Mapping, Sequence

import altair as alt
import pandas as pd
import streamlit as st

from core import failures
from core.data import ImageCaptions
from ui import marks, widgets

TOP_WORDS = 15


def corpus_panel(table: pd.DataFrame) -> tuple[str | None, bool]:
    """Share of captions with an unsupported word, the most frequent ones as pills (a pick filters the table
    to its images) and an "only those captions" switch; returns (picked word or None, only flagged)."""
    per_image = dict(zip(table["image"], (w.split(", ") if w else [] for w in table["unsupported"])))
    share = failures.unsupported_share(per_image)
    top = failures.top_unsupported(per_image, TOP_WORDS)
    c1, c2 = st.columns([1, 4])
    c1.metric("Captions with an unsupported word", f"{100 * share:.1f}%",
              help="A content word that none of the image's five references uses (after lower-casing and "
                   "Porter stemming, so 'dogs' matches 'dog'; function words never count).")
    options = list(top["word"])
    counts = dict(zip(top["word"], top["captions"]))
    widgets.init_state("browse_unsupported_word", None, options + [None])
    word = c2.pills("Most frequent unsupported words (pick one to see its images)", options, key="browse_unsupported_word",
                    format_func=lambda w: f"{w} ({counts[w]})") if options else None
    if not options:
        c2.caption("No caption has an unsupported word.")
    only = c2.toggle("Only captions with an unsupported word", key="browse_only_unsupported")
    return word, bool(only)


def apply_filter(table: pd.DataFrame, word: str | None, only_unsupported: bool) -> pd.DataFrame:
    if word:
        table = table[table["unsupported"].map(lambda text: word in text.split(", "))]
    if only_unsupported:
        table = table[table["unsupported_count"] > 0]
    return table


def caption_with_unsupported(caption: str, words: Sequence[str]) -> str:
    return marks.unsupported(caption, words)


def reference_matches(caption: str, references: Sequence[str], start: int = 0) -> None:
    """Per reference (numbered from start + 1), the caption with the words BLEU matched in it marked."""
    lines = []
    for i, ref in enumerate(references, start):
        lines.append(f"{i + 1}. {marks.escape(ref)}  \n&emsp;↳ {marks.matches(failures.reference_matches(caption, ref))}")
    st.markdown("\n".join(lines))
    st.caption("Under each reference, the caption's words that BLEU counts as matched there: blue = a single "
               "word, green = part of a matched 2- to 4-gram.")


def language_panel(items: Sequence[ImageCaptions], predictions: Mapping[str, Mapping]) -> None:
    """Caption lengths against reference lengths, words over- and under-produced, vocabulary sizes."""
    captions = [predictions[it.image]["caption"] for it in items if it.image in predictions]
    references = [r for it in items for r in it.captions]
    vocab = failures.vocabulary_comparison(captions, references)
    cols = st.columns(4)
    cols[0].metric("Words the model uses", f"{vocab['caption_vocabulary']:,}")
    cols[1].metric("Words the references use", f"{vocab['reference_vocabulary']:,}")
    cols[2].metric("Used by both", f"{vocab['shared']:,}")
    cols[3].metric("Reference words (≥ 5 uses) never said", f"{vocab['frequent_reference_words_never_used']:,}")
    hist = failures.length_histogram(captions, references).melt("length", var_name="source", value_name="share")
    chart = alt.Chart(hist).mark_bar(opacity=0.7).encode(
        x=alt.X("length:O", title="words"), y=alt.Y("share:Q", title="share", stack=None, axis=alt.Axis(format="%")),
        color=alt.Color("source:N", title=None), xOffset="source:N",
        tooltip=["length", "source", alt.Tooltip("share:Q", format=".1%")])
    st.altair_chart(chart, width="stretch")
    over, under = failures.over_under_produced(failures.word_usage(captions, references))
    left, right = st.columns(2)
    config = {"word": st.column_config.TextColumn("Word"),
              "caption_rate": st.column_config.NumberColumn("Per 100 captions", format="%.1f"),
              "reference_rate": st.column_config.NumberColumn("Per 100 references", format="%.1f")}
    columns = ["word", "caption_rate", "reference_rate"]
    left.markdown("**Over-produced** (the model says them more often than people do)")
    left.dataframe(over[columns], hide_index=True, width="stretch", column_config=config, key="browse_over")
    right.markdown("**Under-produced** (people say them more often than the model does)")
    right.dataframe(under[columns], hide_index=True, width="stretch", column_config=config, key="browse_under")
