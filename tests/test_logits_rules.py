"""core.logits_rules against the Hugging Face logits processors of the same names, on the same logits.

`transformers` is a test-only dependency (requirements-dev.txt). Its v5 no longer ships the Hamming diversity
processor (group beam search moved out of the library), so that rule is checked against a plain
reimplementation of transformers 4.x's `HammingDiversityLogitsProcessor.__call__`.
"""
from __future__ import annotations

import pytest
import torch

from core.decoding import DecodingConfig, sampling_probs
from core.decoding_rules import NEG_INF, NEVER_GENERATED, log_probs
from core.errors import ConfigError
from core.logits_rules import (LogitsRules, bad_word_ids, ban_tokens, diversity_counts, hold_end, nucleus,
                               penalise_repetitions)
from core.text import END_ID, START_ID, Vocabulary

hf = pytest.importorskip("transformers.generation.logits_process")

R, V = 6, 30


@pytest.fixture
def logits() -> torch.Tensor:
    """Raw logits of both signs (the repetition rule treats them differently), a few rows."""
    return torch.randn(R, V, generator=torch.Generator().manual_seed(0)) * 3


@pytest.fixture
def history() -> torch.Tensor:
    """Generated tokens so far (R, t), with repeats; the words a caption may contain (ids >= 4)."""
    return torch.randint(4, V, (R, 5), generator=torch.Generator().manual_seed(1))


def with_start(history: torch.Tensor) -> torch.Tensor:
    """Hugging Face's input_ids for an encoder-decoder: the decoder start token, then the generated ones."""
    return torch.cat([torch.full((history.shape[0], 1), START_ID), history], dim=1)


@pytest.mark.parametrize("penalty", [0.7, 1.0, 1.3, 2.5])
def test_repetition_penalty_matches_transformers(logits, history, penalty):
    expected = hf.RepetitionPenaltyLogitsProcessor(penalty)(history, logits.clone())
    ours = penalise_repetitions(logits, history, penalty)
    torch.testing.assert_close(ours, expected)
    if penalty != 1.0:
        seen = torch.zeros(R, V, dtype=torch.bool).scatter_(1, history, True)
        assert torch.equal(ours == logits, ~seen | (logits == 0))     # only generated words change
    assert torch.equal(penalise_repetitions(logits, history[:, :0], penalty), logits)  # t = 0: nothing yet


@pytest.mark.parametrize("min_length", [0, 1, 3, 6])
def test_min_length_matches_transformers(logits, history, min_length):
    scores = log_probs(logits)
    processor = hf.MinLengthLogitsProcessor(min_length, eos_token_id=END_ID)
    for t in range(history.shape[1]):
        expected = processor(with_start(history[:, :t]), scores.clone())
        torch.testing.assert_close(hold_end(scores, t, min_length), expected)


def test_min_length_yields_when_only_end_is_left(logits):
    scores = log_probs(logits)
    scores[0, :] = NEG_INF
    scores[0, END_ID] = -0.5                 # row 0: nothing but <end> allowed
    held = hold_end(scores, 0, 5)
    assert held[0, END_ID] == -0.5 and torch.isneginf(held[1:, END_ID]).all()


def test_bad_words_match_transformers(logits):
    scores = log_probs(logits)
    ids = (5, 9, 17)
    expected = hf.NoBadWordsLogitsProcessor([[i] for i in ids], eos_token_id=END_ID)(with_start(
        torch.zeros((R, 0), dtype=torch.long)), scores.clone())
    torch.testing.assert_close(ban_tokens(scores, ids), expected)
    assert torch.isneginf(ban_tokens(scores, ids)[:, list(ids)]).all()


@pytest.mark.parametrize("top_p", [0.05, 0.3, 0.7, 0.95, 1.0])
def test_top_p_matches_transformers(logits, top_p):
    scores = log_probs(logits)                # -inf for the never-generated tokens, as in the searches
    expected = hf.TopPLogitsWarper(top_p)(with_start(torch.zeros((R, 0), dtype=torch.long)), scores.clone())
    ours = nucleus(scores, top_p)
    torch.testing.assert_close(ours, expected)
    assert (torch.isfinite(ours).sum(dim=1) >= 1).all()        # the top token always stays
    kept = scores.exp().masked_fill(torch.isneginf(ours), 0).sum(dim=1)
    assert (kept >= top_p - 1e-6).all()


@pytest.mark.parametrize("top_k, top_p, temperature", [(0, 0.8, 1.0), (5, 0.9, 0.7), (10, 0.5, 1.6)])
def test_sampling_distribution_matches_transformers_pipeline(logits, history, top_k, top_p, temperature):
    """Hugging Face's sampling order: repetition penalty, temperature, top-k, top-p, softmax."""
    config = DecodingConfig(do_sample=True, top_k=top_k, top_p=top_p, temperature=temperature,
                            repetition_penalty=1.4)
    rules = LogitsRules.of(config)
    ours = sampling_probs(rules.constrain(log_probs(rules.reshape(logits, history), temperature), history, 5),
                          config)
    scores = hf.RepetitionPenaltyLogitsProcessor(1.4)(history, logits.clone())
    scores[:, NEVER_GENERATED] = NEG_INF
    steps = [hf.TemperatureLogitsWarper(temperature), *([hf.TopKLogitsWarper(top_k)] if top_k else []),
             hf.TopPLogitsWarper(top_p)]
    for step in steps:
        scores = step(history, scores)
    torch.testing.assert_close(ours, scores.softmax(dim=1))


def hamming_diversity_v4(current_tokens: torch.Tensor, scores: torch.Tensor, beam_group_idx: int,
                         num_beams: int, num_beam_groups: int, diversity_penalty: float) -> torch.Tensor:
    """transformers 4.x HammingDiversityLogitsProcessor.__call__, as it was written there."""
    num_sub_beams = num_beams // num_beam_groups
    batch_size = current_tokens.shape[0] // num_beams
    group_start_idx = beam_group_idx * num_sub_beams
    group_end_idx = min(group_start_idx + num_sub_beams, num_beams)
    group_size = group_end_idx - group_start_idx
    vocab_size = scores.shape[-1]
    if group_start_idx == 0:
        return scores
    scores_processed = scores.clone()
    for batch_idx in range(batch_size):
        previous_group_tokens = current_tokens[batch_idx * num_beams: batch_idx * num_beams + group_start_idx]
        token_frequency = torch.bincount(previous_group_tokens, minlength=vocab_size).to(scores.device)
        scores_processed[batch_idx * group_size: (batch_idx + 1) * group_size] -= diversity_penalty * token_frequency
    return scores_processed


@pytest.mark.parametrize("num_beams, groups", [(4, 2), (6, 3), (4, 4)])
def test_diversity_penalty_matches_hamming_diversity(num_beams, groups):
    batch, penalty = 3, 0.75
    gen = torch.Generator().manual_seed(2)
    current = torch.randint(4, 12, (batch * num_beams,), generator=gen)     # few words: many collisions
    sub = num_beams // groups
    for g in range(groups):
        scores = torch.randn(batch * sub, V, generator=gen)
        expected = hamming_diversity_v4(current, scores, g, num_beams, groups, penalty)
        earlier = current.view(batch, num_beams)[:, :g * sub]                  # (A, beams of groups < g)
        counts = diversity_counts(earlier, torch.ones_like(earlier, dtype=torch.bool), V)
        ours = (scores.view(batch, sub, V) - penalty * counts.unsqueeze(1)).view(batch * sub, V)
        torch.testing.assert_close(ours, expected)
    dead = diversity_counts(current.view(batch, num_beams), torch.zeros(batch, num_beams, dtype=torch.bool), V)
    assert not dead.any()                      # beams that are not live (-inf) count for nothing


def test_constrain_applies_every_ban(logits, history):
    config = DecodingConfig(beam_size=2, no_repeat_ngram_size=1, min_length=8)
    rules = LogitsRules(min_length=8, no_repeat_ngram_size=1, banned_ids=(6, 7))
    assert LogitsRules.of(config) == LogitsRules(min_length=8, no_repeat_ngram_size=1)
    scores = rules.constrain(log_probs(logits), history, 5)
    assert torch.isneginf(scores.gather(1, history)).all()          # 1-grams: every generated word banned
    assert torch.isneginf(scores[:, [6, 7, END_ID]]).all()
    assert torch.equal(LogitsRules().constrain(log_probs(logits), history, 5), log_probs(logits))


def test_bad_word_ids_name_what_the_vocabulary_lacks():
    vocab = Vocabulary(["<pad>", "<start>", "<end>", "<unk>", "a", "dog", "cat", "red"])
    assert bad_word_ids(("cat", "dog"), vocab) == (6, 5)
    with pytest.raises(ConfigError, match="'zebra', 'unicorn'"):
        bad_word_ids(("dog", "zebra", "unicorn"), vocab)
    with pytest.raises(ConfigError, match="every word"):
        bad_word_ids(("a", "dog", "cat", "red"), vocab)
    with pytest.raises(ConfigError, match="vocabulary"):
        LogitsRules.of(DecodingConfig(bad_words=("dog",)))          # words without a vocabulary to map them
