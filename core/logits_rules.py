"""The per-step rules behind Hugging Face `generate`'s knobs, on (rows, vocabulary) score tensors.

Each follows the Hugging Face logits processor of the same name (tests/test_logits_rules.py checks them
against `transformers` on the same logits), and every search applies them the same way, so beam width 1
stays greedy search:

* `repetition_penalty` reshapes the distribution: the logits of already generated words are divided by
  it when positive and multiplied when negative, before temperature and softmax (as Hugging Face's greedy
  search and sampling do; its beam search applies it to log-probs instead). Reported log-probs are those
  of the penalised distribution, as they are of the tempered one when sampling.
* `min_length`, `bad_words` (and `no_repeat_ngram_size`) are constraints: the banned tokens' scores
  become -inf after the softmax, so the reported log-probs stay the model's own. `min_length` yields
  where nothing but <end> is left allowed (a caption must be able to stop).
* `diversity_penalty` (diverse beam search): a group's candidate scores lose `diversity_penalty` per
  earlier group beam that picked the same word at this step (Hamming diversity).
* `top_p` (sampling): keep the smallest set of top tokens whose probability reaches top_p.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from core.decoding_rules import NEG_INF, DecodingConfig, block_repeated_ngrams
from core.errors import ConfigError
from core.text import END_ID, NEVER_GENERATED_IDS, Vocabulary


def penalise_repetitions(logits: Tensor, history: Tensor, penalty: float) -> Tensor:
    """RepetitionPenaltyLogitsProcessor: each word already in the row's history (R, t) gets its logit
    divided by `penalty` if positive, multiplied if negative (once, however often it was generated)."""
    if penalty == 1.0 or history.shape[1] == 0:
        return logits
    seen = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, history, True)
    return torch.where(seen, torch.where(logits < 0, logits * penalty, logits / penalty), logits)


def ban_tokens(scores: Tensor, token_ids: tuple[int, ...]) -> Tensor:
    """NoBadWordsLogitsProcessor for one-token words: -inf for `token_ids` in every row."""
    if not token_ids:
        return scores
    scores = scores.clone()
    scores[:, list(token_ids)] = NEG_INF
    return scores


def hold_end(scores: Tensor, step: int, min_length: int) -> Tensor:
    """MinLengthLogitsProcessor: no <end> as generated token number step + 1 < min_length, except in rows
    where every other token is already banned."""
    if step + 1 >= min_length:
        return scores
    others = torch.cat([scores[:, :END_ID], scores[:, END_ID + 1:]], dim=1)
    hold = torch.isfinite(others).any(dim=1)
    scores = scores.clone()
    scores[:, END_ID] = torch.where(hold, torch.full_like(scores[:, END_ID], NEG_INF), scores[:, END_ID])
    return scores


def diversity_counts(tokens: Tensor, live: Tensor, vocab_size: int) -> Tensor:
    """(A, V) how many of each image's earlier-group beams (A, n) picked each word (only `live` beams)."""
    counts = torch.zeros((tokens.shape[0], vocab_size), dtype=torch.float32, device=tokens.device)
    return counts.scatter_add_(1, tokens, live.to(counts.dtype))


def nucleus(scores: Tensor, top_p: float) -> Tensor:
    """TopPLogitsWarper: -inf outside the smallest set of top tokens whose probability reaches top_p (the
    top token always stays). `scores` are logits or log-probs; the probabilities are their softmax."""
    if top_p >= 1.0:
        return scores
    ascending, order = scores.sort(dim=1)
    remove = ascending.softmax(dim=1).cumsum(dim=1) <= 1 - top_p
    remove[:, -1] = False
    return scores.masked_fill(remove.scatter(1, order, remove), NEG_INF)


def bad_word_ids(words: tuple[str, ...], vocab: Vocabulary) -> tuple[int, ...]:
    """The vocabulary ids of `bad_words`; ConfigError naming the words this vocabulary does not have."""
    if not words:
        return ()
    stoi = vocab.stoi
    unknown = [w for w in words if w not in stoi]
    if unknown:
        raise ConfigError("decoding: bad_words not in the checkpoint's vocabulary (it can never say them "
                          f"anyway): {', '.join(repr(w) for w in unknown)}")
    ids = tuple(stoi[w] for w in words)
    special = [w for w, i in zip(words, ids) if i in (END_ID, *NEVER_GENERATED_IDS)]
    if special:
        raise ConfigError(f"decoding: bad_words cannot ban special tokens: {', '.join(map(repr, special))}")
    if len(ids) >= len(vocab) - 1 - len(NEVER_GENERATED_IDS):
        raise ConfigError("decoding: bad_words ban every word of the vocabulary")
    return ids


@dataclass(frozen=True)
class LogitsRules:
    """A DecodingConfig's per-step rules with its bad words resolved to ids; all off by default."""
    repetition_penalty: float = 1.0
    min_length: int = 0
    no_repeat_ngram_size: int = 0
    banned_ids: tuple[int, ...] = ()

    @classmethod
    def of(cls, config: DecodingConfig, vocab: Vocabulary | None = None) -> "LogitsRules":
        """The rules of `config`; `vocab` (a core.text.Vocabulary) is needed only for bad_words."""
        if config.bad_words and vocab is None:
            raise ConfigError("decoding: bad_words need the checkpoint's vocabulary (pass vocab=)")
        return cls(config.repetition_penalty, config.min_length, config.no_repeat_ngram_size,
                   bad_word_ids(config.bad_words, vocab))

    def reshape(self, logits: Tensor, history: Tensor) -> Tensor:
        """The raw logits (R, V) after the rules that change the distribution (before the softmax)."""
        return penalise_repetitions(logits, history, self.repetition_penalty)

    def constrain(self, scores: Tensor, history: Tensor, step: int) -> Tensor:
        """Log-probs (R, V) with the banned tokens of step `step` (0-based) at -inf."""
        scores = block_repeated_ngrams(scores, history, self.no_repeat_ngram_size)
        scores = ban_tokens(scores, self.banned_ids)
        return hold_end(scores, step, self.min_length)
