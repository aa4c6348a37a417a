"""Score any caption: teacher-forced per-word probabilities, attention and β for a caption a person typed.

Typed text is cleaned before it is scored (HTML tags and entities, emoji and punctuation go; what went is
reported), then split with the training tokenizer (`core.text.tokenize`). Words outside the vocabulary are
named, never silently mapped: they are scored as <unk> (the probability the model gives its unknown-word
token, the only honest number it has for them) and listed in `oov`. The decoder itself never emits <unk>,
so every other position uses the decoder's distribution (without <pad>, <start>, <unk>), and scoring the
decoder's own caption gives back its token log-probs exactly; the total counts <end>, as the decoder's
`logprob` does.
"""
from __future__ import annotations

import html
import re
from dataclasses import dataclass, field

import numpy as np
import torch

from core.analysis import score_tokens
from core.decoding import DecodingConfig
from core.errors import ConfigError
from core.logits_rules import LogitsRules
from core.text import tokenize

MAX_CHARACTERS = 1000
MAX_WORDS = 50
UNLIKELY = 0.05          # a word under this probability is highlighted
_TAG = re.compile(r"<[^<>]{0,200}>")


@dataclass
class PreparedCaption:
    words: list[str]                                      # tokens as scored
    token_ids: list[int]                                  # <unk> for out-of-vocabulary words
    oov: list[tuple[int, str]] = field(default_factory=list)   # (position, word) of each unknown word
    notes: list[str] = field(default_factory=list)       # what cleaning removed, for the user


@dataclass
class CaptionScore:
    words: list[str]                # the scored tokens: the words, then "<end>"
    token_ids: list[int]
    logprobs: np.ndarray            # (T,) log p(token_t | image, tokens before t)
    attention: np.ndarray           # (T, L) α when predicting each token
    betas: np.ndarray               # (T,)
    oov: list[tuple[int, str]]
    notes: list[str]

    @property
    def probs(self) -> np.ndarray:
        return np.exp(self.logprobs)

    @property
    def logprob(self) -> float:
        """Total log-prob including <end> (the decoder's `Hypothesis.logprob` convention)."""
        return float(np.sum(self.logprobs, dtype=np.float64))

    @property
    def per_token(self) -> float:
        return self.logprob / max(len(self.logprobs), 1)

    def unlikely(self, threshold: float = UNLIKELY) -> list[int]:
        return [i for i, p in enumerate(self.probs) if p < threshold]

    def to_json(self) -> dict:
        return {"words": self.words, "token_logprobs": [round(float(x), 6) for x in self.logprobs],
                "logprob": self.logprob, "per_token": self.per_token,
                "attention": np.round(self.attention, 5).tolist(), "betas": np.round(self.betas, 5).tolist(),
                "oov": [w for _, w in self.oov], "notes": self.notes}


def prepare_caption(text: str, vocab, *, allow_oov: bool = True, what: str = "caption") -> PreparedCaption:
    """Clean, tokenize and look up typed text; a ConfigError with one clear line when it cannot be scored."""
    if not isinstance(text, str):
        raise ConfigError(f"the {what} must be text, got {type(text).__name__}")
    if len(text) > MAX_CHARACTERS:
        raise ConfigError(f"the {what} is {len(text):,} characters long; the limit is {MAX_CHARACTERS:,}")
    notes = []
    cleaned = html.unescape(_TAG.sub(" ", text))
    if cleaned != text and _TAG.search(text):
        notes.append("HTML tags removed")
    words = tokenize(cleaned)
    leftover = re.sub(r"\s+", "", re.sub(r"[^\W_]+", "", cleaned))
    if leftover:
        notes.append(f"ignored punctuation and symbols: {leftover[:40]}")
    if not words:
        raise ConfigError(f"the {what} has no words to score" + (" (only punctuation, symbols or emoji)"
                                                                 if text.strip() else " (it is empty)"))
    if len(words) > MAX_WORDS:
        raise ConfigError(f"the {what} has {len(words)} words; the limit is {MAX_WORDS}")
    stoi = vocab.stoi
    oov = [(i, w) for i, w in enumerate(words) if w not in stoi or stoi[w] < 4]
    if len(oov) == len(words):
        raise ConfigError(f"none of the words of the {what} are in the model's vocabulary: "
                          + ", ".join(sorted({w for _, w in oov}))[:200])
    if oov and not allow_oov:
        raise ConfigError(f"not in the model's vocabulary: {', '.join(dict.fromkeys(w for _, w in oov))} "
                          f"(the model cannot produce these words)")
    ids = [stoi[w] if (i, w) not in oov else vocab.unk_id for i, w in enumerate(words)]
    return PreparedCaption(words, ids, oov, notes)


def score_caption(captioner, features: torch.Tensor, text: str, decoding: DecodingConfig | None = None) -> CaptionScore:
    """Teacher-forced score of typed text on one image's (L, C) features, under the distribution `decoding`
    gives its captions' log-probs (its repetition penalty reshapes it; its other knobs only constrain)."""
    prepared = prepare_caption(text, captioner.vocab)
    rules = LogitsRules.of(decoding, captioner.vocab) if decoding is not None else LogitsRules()
    scored = score_tokens(captioner.model, features, prepared.token_ids, score_unk=True, rules=rules)
    return CaptionScore(prepared.words + ["<end>"], scored.token_ids, scored.logprobs, scored.attention,
                        scored.betas, prepared.oov, prepared.notes)
