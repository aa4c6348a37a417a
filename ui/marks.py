"""Marked-up caption text for st.markdown: differing words, unsupported words, reference matches.

Streamlit Markdown colours text with `:color-background[...]`; every word is escaped first, so a caption
or reference can never inject Markdown, HTML or directives of its own.
"""
from __future__ import annotations

import re
from typing import Sequence

from core.compare import word_diff

_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+\-.!|<>~:$])")
# reference matches by the longest matched n-gram covering the word
MATCH_COLOURS = {1: "blue", 2: "green", 3: "green", 4: "green"}


def escape(text: str) -> str:
    return _MD_SPECIAL.sub(r"\\\1", text)


def _mark(word: str, colour: str) -> str:
    return f":{colour}-background[{escape(word)}]"


def diff_pair(a: str, b: str) -> tuple[str, str]:
    """Caption a with the words b lacks struck through in red, caption b with its new words in green."""
    left, right = [], []
    for tag, word in word_diff(a, b):
        if tag == "same":
            left.append(escape(word))
            right.append(escape(word))
        elif tag == "removed":
            left.append(f":red-background[~~{escape(word)}~~]")
        else:
            right.append(_mark(word, "green"))
    return " ".join(left) or "*(empty)*", " ".join(right) or "*(empty)*"


def unsupported(caption: str, words: Sequence[str]) -> str:
    """The caption with its unsupported words on orange (matched on the lower-cased word)."""
    flagged = {w.lower() for w in words}
    return " ".join(_mark(w, "orange") if w.lower() in flagged else escape(w) for w in caption.split()) \
        or "*(empty)*"


def matches(pairs: Sequence[tuple[str, int]]) -> str:
    """(token, longest matched n) pairs: unigram matches on blue, words inside a longer n-gram on green."""
    return " ".join(_mark(w, MATCH_COLOURS[n]) if n else escape(w) for w, n in pairs) or "*(empty)*"
