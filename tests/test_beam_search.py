"""`beam_search_penalties`: one beam search read under several length penalties gives, per α, what a search
run with that α alone gives (the decoding grid decodes every α of a width × no-repeat pair this way)."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from test_decoding import L, C, make_model

from core.beam_search import beam_search_penalties
from core.decoding import DecodingConfig, beam_search

PENALTIES = [0.0, 0.5, 1.0, 2.0]


@pytest.fixture(scope="module")
def features() -> torch.Tensor:
    return torch.randn(24, L, C, generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("config", [
    DecodingConfig(beam_size=3, max_length=12),
    DecodingConfig(beam_size=5, max_length=8, num_return_sequences=3),            # many run out at max_length
    DecodingConfig(beam_size=4, max_length=12, no_repeat_ngram_size=2, num_return_sequences=2),
    DecodingConfig(beam_size=4, max_length=12, num_beam_groups=2, diversity_penalty=0.7),
    DecodingConfig(beam_size=4, max_length=12, repetition_penalty=1.2, min_length=3),
], ids=["k3", "k5-short-n3", "k4-ngram2-n2", "k4-diverse", "k4-reppen-minlen"])
def test_one_search_under_each_length_penalty_equals_a_search_per_penalty(features, config):
    model = make_model(seed=3, scale=0.3, end_bias=1.0)   # close calls between lengths: α matters here
    shared = beam_search_penalties(model, features, config, PENALTIES)
    assert len(shared) == len(PENALTIES)
    for alpha, got in zip(PENALTIES, shared):
        alone = beam_search(model, features, dataclasses.replace(config, length_penalty=alpha))
        assert len(got) == len(alone) == len(features)
        for hs, ha in zip(got, alone):
            assert [(h.token_ids, h.finished) for h in hs] == [(h.token_ids, h.finished) for h in ha]
            # same hypotheses; their numbers agree to float noise: a lone search drops its stopped images at
            # other steps, so its matmuls run on other batch shapes (as in test_decoding's batched vs alone)
            for a, b in zip(hs, ha):
                assert a.score == pytest.approx(b.score, abs=1e-5)
                assert a.token_logprobs == pytest.approx(b.token_logprobs, abs=1e-5)
                np.testing.assert_allclose(a.attention, b.attention, atol=1e-5)
                np.testing.assert_allclose(a.betas, b.betas, atol=1e-5)
    # the test has teeth: on these images the penalties do change some n-best lists
    best = [[[tuple(h.token_ids) for h in n] for n in got] for got in shared]
    assert any(best[0] != other for other in best[1:])


def test_a_single_penalty_and_an_empty_batch(features):
    model = make_model()
    config = DecodingConfig(beam_size=3, length_penalty=0.5)
    [one] = beam_search_penalties(model, features[:4], config, [0.5])
    assert [[h.token_ids for h in n] for n in one] == [[h.token_ids for h in n] for n in
                                                       beam_search(model, features[:4], config)]
    assert beam_search_penalties(model, features[:0], config, [0.0, 1.0]) == [[], []]
