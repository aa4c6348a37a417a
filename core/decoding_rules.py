"""The rules every decoding strategy shares: the config, the hypothesis it returns, the distribution it
picks from (never-generated tokens removed), the n-gram block and the GNMT length penalty.

`core.decoding` (greedy, sampling, `generate`) and `core.beam_search` (the batched beam search and its
plain reference) are built on these; import the public names from `core.decoding`.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from typing import Iterator

import numpy as np
import torch
from torch import Tensor, nn

from core.errors import ConfigError
from core.text import NEVER_GENERATED_IDS, tokenize

NEG_INF = float("-inf")
NEVER_GENERATED = list(NEVER_GENERATED_IDS)     # index form, built once


@dataclass(frozen=True)
class DecodingConfig:
    """Every decoding knob in one place (like Hugging Face's GenerationConfig), valid once built.

    do_sample=True samples (temperature / top_k, `num_return_sequences` samples per image, beam_size is
    ignored); otherwise beam_size == 1 is greedy search and beam_size > 1 beam search, returning the
    `num_return_sequences` best hypotheses (at most beam_size). Frozen and hashable by value, so caches
    key on the object itself; `dataclasses.replace` gives a changed (and again validated) copy.
    num_beam_groups > 1 is Hugging Face's diverse (group) beam search with Hamming diversity.
    """
    beam_size: int = 3
    max_length: int = 20               # generated tokens incl. <end>
    length_penalty: float = 0.0        # GNMT alpha; > 0 favours longer captions, 0 = raw sum of log-probs
    no_repeat_ngram_size: int = 0      # 0 = off; n: never produce the same n-gram twice in a caption
    do_sample: bool = False
    temperature: float = 1.0           # sampling only
    top_k: int = 0                     # sampling only; 0 = the whole vocabulary
    num_return_sequences: int = 1
    seed: int | None = None            # sampling only; None = a fresh random seed
    # Hugging Face `generate`'s knobs (rules in core.logits_rules); at these defaults they change nothing
    top_p: float = 1.0                 # sampling only: the smallest top set with probability >= top_p
    repetition_penalty: float = 1.0    # > 1: logits of already generated words shrink (positive / p, negative * p)
    min_length: int = 0                # no <end> before this many generated tokens (incl. <end>, like max_length)
    num_beam_groups: int = 1           # diverse beam search: beam_size / num_beam_groups beams per group
    diversity_penalty: float = 0.0     # per earlier group that picked a word at this step, its log-prob - this
    bad_words: tuple[str, ...] = ()    # words no caption may contain (lower-cased, sorted, one token each)

    def __post_init__(self) -> None:
        def need_int(name: str, minimum: int) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"decoding: {name} must be an integer, got {value!r}")
            if value < minimum:
                raise ConfigError(f"decoding: {name} must be >= {minimum}, got {value}")

        need_int("beam_size", 1)
        need_int("max_length", 1)
        need_int("no_repeat_ngram_size", 0)
        need_int("top_k", 0)
        need_int("num_return_sequences", 1)
        need_int("min_length", 0)
        need_int("num_beam_groups", 1)
        for name in ("length_penalty", "temperature", "top_p", "repetition_penalty", "diversity_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"decoding: {name} must be a finite number, got {value!r}")
        if self.temperature <= 0:
            raise ConfigError(f"decoding: temperature must be > 0, got {self.temperature} "
                              "(use do_sample=False for deterministic decoding)")
        if not isinstance(self.do_sample, bool):
            raise ConfigError(f"decoding: do_sample must be true or false, got {self.do_sample!r}")
        if self.seed is not None:
            need_int("seed", 0)
        if not self.do_sample and self.num_return_sequences > self.beam_size:
            raise ConfigError(f"decoding: num_return_sequences ({self.num_return_sequences}) cannot exceed "
                              f"beam_size ({self.beam_size}) without sampling; raise beam_size or set do_sample")
        self._check_knobs()

    def _check_knobs(self) -> None:
        """The Hugging Face knobs: ranges, and the combinations that contradict each other."""
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"decoding: top_p must be in (0, 1], got {self.top_p} (1 = off)")
        if self.repetition_penalty <= 0:
            raise ConfigError(f"decoding: repetition_penalty must be > 0, got {self.repetition_penalty} (1 = off)")
        if self.min_length > self.max_length:
            raise ConfigError(f"decoding: min_length ({self.min_length}) cannot exceed max_length "
                              f"({self.max_length})")
        if self.diversity_penalty < 0:
            raise ConfigError(f"decoding: diversity_penalty must be >= 0, got {self.diversity_penalty}")
        groups = self.num_beam_groups
        if groups > 1 and self.do_sample:
            raise ConfigError(f"decoding: num_beam_groups ({groups}) is diverse beam search and cannot be used "
                              "with do_sample; set num_beam_groups=1 or do_sample=False")
        if self.beam_size % groups:
            raise ConfigError(f"decoding: num_beam_groups ({groups}) must divide beam_size ({self.beam_size}) "
                              "into groups of equal size")
        if self.diversity_penalty > 0 and groups == 1:
            raise ConfigError(f"decoding: diversity_penalty ({self.diversity_penalty:g}) needs num_beam_groups "
                              "> 1 (it only separates beam groups)")
        if groups > 1 and self.diversity_penalty == 0:
            raise ConfigError(f"decoding: num_beam_groups ({groups}) needs a diversity_penalty > 0, otherwise "
                              "every group finds the same beams")
        object.__setattr__(self, "bad_words", _normalise_bad_words(self.bad_words))

    @property
    def mode(self) -> str:
        """"sample", "greedy" (beam width 1) or "beam": which search `generate` runs."""
        return "sample" if self.do_sample else "greedy" if self.beam_size == 1 else "beam"

    def describe(self) -> str:
        """The search in a few words, for the pages: "beam search, width 3", "greedy search", "sampling 3 (...)"."""
        if self.mode == "sample":
            return (f"sampling {self.num_return_sequences} (T={self.temperature:g}, top-k={self.top_k}, "
                    f"seed {self.seed})")
        if self.mode == "greedy":
            return "greedy search"
        if self.num_beam_groups > 1:
            return (f"diverse beam search, width {self.beam_size} in {self.num_beam_groups} groups "
                    f"(diversity penalty {self.diversity_penalty:g})")
        return f"beam search, width {self.beam_size}"

    def describe_knobs(self) -> list[str]:
        """The Hugging Face knobs that are on, in words ("repetition penalty 1.2", "bad words: dog, ball")."""
        knobs = [f"top-p {self.top_p:g}" if self.do_sample and self.top_p < 1 else "",
                 f"repetition penalty {self.repetition_penalty:g}" if self.repetition_penalty != 1 else "",
                 f"min length {self.min_length}" if self.min_length > 1 else "",
                 f"bad words: {', '.join(self.bad_words)}" if self.bad_words else ""]
        return [k for k in knobs if k]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "DecodingConfig":
        if not isinstance(data, dict):
            raise ConfigError(f"decoding config must be a mapping, got {type(data).__name__}")
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ConfigError(f"unknown decoding config keys: {sorted(unknown)}")
        return cls(**data)


def _normalise_bad_words(words) -> tuple[str, ...]:
    """bad_words as one lower-cased vocabulary token each, sorted and without repeats (so equal sets of words
    make equal, equally hashed configs); a str is one word."""
    if isinstance(words, str):
        words = (words,)
    if not isinstance(words, (tuple, list, set, frozenset)) or not all(isinstance(w, str) for w in words):
        raise ConfigError(f"decoding: bad_words must be a list of words, got {words!r}")
    normalised = set()
    for word in words:
        tokens = tokenize(word)
        if len(tokens) != 1:
            raise ConfigError(f"decoding: bad_words must be single words, got {word!r}")
        normalised.add(tokens[0])
    return tuple(sorted(normalised))


def length_penalty_factor(length: int, length_penalty: float) -> float:
    """GNMT's ((5 + |Y|) / 6) ** alpha: dividing a (negative) log-prob by it makes long captions less unlikely."""
    return ((5.0 + length) / 6.0) ** length_penalty


@dataclass
class Hypothesis:
    token_ids: list[int]          # words only (no <start>, no <end>)
    token_logprobs: list[float]   # one per emitted token, incl. the final <end> when finished
    attention: np.ndarray         # (steps, L) float32, α row used to emit each token; rows sum to 1
    betas: np.ndarray             # (steps,) float32, the gate β for each token
    finished: bool                # <end> was produced
    score: float = field(default=NEG_INF)   # length-penalised log-prob, what the n-best list is sorted by

    @property
    def logprob(self) -> float:
        return float(sum(self.token_logprobs))

    @property
    def length(self) -> int:
        """Emitted tokens incl. <end> (the length the penalty uses); len(token_ids) is the word count."""
        return len(self.token_logprobs)


# -- what every search shares --------------------------------------------------------------------------------------

@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Dropout off while decoding; give the caller back the mode it had (a training loop may be mid-epoch)."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def check_features(model: nn.Module, features: Tensor) -> Tensor:
    """The (B, L, C) features as float32 on the model's device; ConfigError for a wrong shape."""
    if not isinstance(features, Tensor) or features.dim() != 3:
        shape = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
        raise ConfigError(f"decoding: features must be a (batch, regions, channels) tensor, got {shape}")
    expected = model.config.encoder_dim
    if features.shape[2] != expected:
        raise ConfigError(f"decoding: features have {features.shape[2]} channels but the model expects "
                          f"{expected} (checkpoint trained with another encoder?)")
    device = next(model.parameters()).device
    return features.to(device=device, dtype=torch.float32)


def log_probs(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """log_softmax(logits / T) over the tokens a caption may contain (`NEVER_GENERATED_IDS` removed)."""
    logits = logits / temperature if temperature != 1.0 else logits.clone()
    logits[:, NEVER_GENERATED] = NEG_INF
    return torch.log_softmax(logits, dim=-1)


def block_repeated_ngrams(scores: Tensor, history: Tensor, n: int) -> Tensor:
    """-inf for every token that would complete an n-gram already present in the row's history (R, t).

    Vectorised over rows: slide an n-window over the history, find the windows whose first n-1 tokens equal
    the row's last n-1 tokens, and ban their last token.
    """
    t = history.shape[1]
    if n <= 0 or t < n:  # off, or not a single complete n-gram yet
        return scores
    windows = history.unfold(1, n, 1)                                   # (R, t-n+1, n)
    prefix = history[:, t - (n - 1):]                                   # (R, n-1)
    match = (windows[:, :, : n - 1] == prefix.unsqueeze(1)).all(dim=2)  # (R, t-n+1)
    hits = torch.zeros_like(scores).scatter_add_(1, windows[:, :, n - 1], match.to(scores.dtype))
    return scores.masked_fill(hits > 0, NEG_INF)


