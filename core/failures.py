"""Failure finding over a captioned split: words no reference supports, what BLEU matched, and how the
model's language differs from the references'.

* Unsupported words: a caption's content words that appear in none of the image's references, after
  lowercasing (PTB-style tokens, as the metrics use) and Porter stemming ("dogs"/"dog", "running"/"runs";
  NLTK's PorterStemmer is pure code, no data download). Function words (articles, prepositions, pronouns,
  auxiliaries...) never count: "a" vs "the" is not a hallucination.
* Reference matches: for one reference, which caption words are part of an n-gram (n <= 4) that BLEU
  counts as matched (clipped: a reference n-gram matches at most as often as it occurs there).
* Model vs people: caption lengths against reference lengths, words over- and under-produced relative to
  the references, the vocabulary each uses.
"""
from __future__ import annotations

import functools
import math
from collections import Counter
from typing import Iterable, Mapping, Sequence

import pandas as pd

from core.data import ImageCaptions
from core.metrics import simple_tokenize

FUNCTION_WORDS = frozenset("""
a an the this that these those some any each every either neither no another other such
and or but nor so yet if then than as because while when where whereas though although
of in on at by for with without from to into onto upon over under above below between among through
across along around behind beside besides beyond near past toward towards up down out off about against
within during before after like via per
i me my mine we us our ours you your yours he him his she her hers it its they them their theirs
myself yourself himself herself itself ourselves themselves who whom whose which what
is are was were be been being am 's do does did doing done have has had having will would shall should
can could may might must n't not
there here very too also just only all both most more much many few several own same
""".split())


@functools.lru_cache(maxsize=1)
def _stemmer():
    from nltk.stem.porter import PorterStemmer
    return PorterStemmer()


@functools.lru_cache(maxsize=65536)
def stem(word: str) -> str:
    """Lowercased Porter stem: plural, -ing, -ed forms meet ("dogs" -> "dog", "running" -> "run")."""
    return _stemmer().stem(word.lower())


def tokens(text: str) -> list[str]:
    """Lowercased words as the metrics see them (punctuation dropped, "dog's" -> "dog 's")."""
    return simple_tokenize(text).split()


def is_content(word: str) -> bool:
    return word not in FUNCTION_WORDS and any(ch.isalnum() for ch in word)


def unsupported_words(caption: str, references: Sequence[str]) -> list[str]:
    """The caption's content words (each once, in caption order) whose stem is in no reference."""
    supported = {stem(w) for ref in references for w in tokens(ref)}
    out: list[str] = []
    for word in tokens(caption):
        if is_content(word) and stem(word) not in supported and word not in out:
            out.append(word)
    return out


def unsupported_by_image(items: Sequence[ImageCaptions], captions: Mapping[str, str]) -> dict[str, list[str]]:
    return {it.image: unsupported_words(captions[it.image], it.captions) for it in items if it.image in captions}


def unsupported_share(per_image: Mapping[str, Sequence[str]]) -> float:
    """Share of captions with at least one unsupported word (0 for no captions)."""
    return sum(bool(w) for w in per_image.values()) / len(per_image) if per_image else 0.0


def top_unsupported(per_image: Mapping[str, Sequence[str]], n: int = 20) -> pd.DataFrame:
    """The most frequent unsupported words: word, captions (how many have it), images (their names)."""
    images: dict[str, list[str]] = {}
    for image, words in per_image.items():
        for word in words:
            images.setdefault(word, []).append(image)
    rows = sorted(images.items(), key=lambda kv: (-len(kv[1]), kv[0]))[:n]
    return pd.DataFrame([{"word": w, "captions": len(ims), "images": ims} for w, ims in rows],
                        columns=["word", "captions", "images"])


def reference_matches(caption: str, reference: str, max_n: int = 4) -> list[tuple[str, int]]:
    """Each caption token with the longest matched n-gram (BLEU's clipped counts) covering it, 0 = none."""
    cap, ref = tokens(caption), tokens(reference)
    best = [0] * len(cap)
    for n in range(1, max_n + 1):
        remaining = Counter(tuple(ref[i:i + n]) for i in range(len(ref) - n + 1))
        for i in range(len(cap) - n + 1):
            gram = tuple(cap[i:i + n])
            if remaining[gram] > 0:
                remaining[gram] -= 1
                for k in range(i, i + n):
                    best[k] = max(best[k], n)
    return list(zip(cap, best))


# -- what the model says against what people say ------------------------------------------------------------

def length_histogram(captions: Iterable[str], references: Iterable[str]) -> pd.DataFrame:
    """length (words), captions and references: the share of each with that many words."""
    cap = Counter(len(tokens(c)) for c in captions)
    ref = Counter(len(tokens(r)) for r in references)
    total_c, total_r = max(sum(cap.values()), 1), max(sum(ref.values()), 1)
    lengths = range(min(cap | ref, default=0), max(cap | ref, default=-1) + 1)
    return pd.DataFrame([{"length": k, "captions": cap[k] / total_c, "references": ref[k] / total_r}
                         for k in lengths], columns=["length", "captions", "references"])


def word_usage(captions: Sequence[str], references: Sequence[str]) -> pd.DataFrame:
    """Per word: caption_count, reference_count, the rate per 100 captions / references, and log_ratio =
    ln((caption rate + s) / (reference rate + s)) with s = one use per corpus (so a word one side never
    uses gets a finite ratio). Sorted from most over-produced to most under-produced."""
    cap = Counter(w for c in captions for w in tokens(c))
    ref = Counter(w for r in references for w in tokens(r))
    n_cap, n_ref = max(len(captions), 1), max(len(references), 1)
    smooth = 100.0 / min(n_cap, n_ref)
    rows = []
    for word in cap | ref:
        rc, rr = 100.0 * cap[word] / n_cap, 100.0 * ref[word] / n_ref
        rows.append({"word": word, "caption_count": cap[word], "reference_count": ref[word],
                     "caption_rate": rc, "reference_rate": rr,
                     "log_ratio": math.log((rc + smooth) / (rr + smooth))})
    frame = pd.DataFrame(rows, columns=["word", "caption_count", "reference_count", "caption_rate",
                                        "reference_rate", "log_ratio"])
    return frame.sort_values(["log_ratio", "word"], ascending=[False, True], kind="stable").reset_index(drop=True)


def over_under_produced(usage: pd.DataFrame, n: int = 15, min_count: int = 5) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The n words the model uses most above the references' rate (used >= min_count times by the model),
    and the n it uses most below it (used >= min_count times in the references)."""
    over = usage[(usage["caption_count"] >= min_count) & (usage["log_ratio"] > 0)].head(n)
    under = usage[(usage["reference_count"] >= min_count) & (usage["log_ratio"] < 0)]
    return over.reset_index(drop=True), under.iloc[::-1].head(n).reset_index(drop=True)


def vocabulary_comparison(captions: Sequence[str], references: Sequence[str]) -> dict[str, int]:
    """Distinct words: used in the captions, in the references, in both, and reference words used at least
    5 times that the model never says."""
    cap = Counter(w for c in captions for w in tokens(c))
    ref = Counter(w for r in references for w in tokens(r))
    return {"caption_vocabulary": len(cap), "reference_vocabulary": len(ref), "shared": len(set(cap) & set(ref)),
            "frequent_reference_words_never_used": sum(1 for w, k in ref.items() if k >= 5 and w not in cap)}


def with_unsupported(table: pd.DataFrame) -> pd.DataFrame:
    """The browser table (`core.corpus.browse_table`) plus `unsupported` (the words, ", "-joined) and
    `unsupported_count`, to sort and filter on."""
    words = [unsupported_words(c, refs) for c, refs in zip(table["caption"], table["references"])]
    out = table.copy()
    out["unsupported"] = [", ".join(w) for w in words]
    out["unsupported_count"] = [len(w) for w in words]
    return out
