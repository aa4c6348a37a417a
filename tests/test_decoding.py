"""Decoding: greedy / batched beam search / sampling on a tiny random Show-Attend-Tell model.

The batched beam search is checked against `core.beam_search.reference_beam_search`, the plain per-image,
per-beam implementation of the same rules, run to max_length (so it also checks that the batched search's
early stopping never changes the answer).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from core.decoding import (DecodingConfig, Hypothesis, beam_search, generate, greedy, length_penalty_factor,
                           reference_beam_search, sample)
from core.errors import ConfigError
from core.model import ModelConfig, ShowAttendTell

PAD, START, END, UNK = 0, 1, 2, 3
V, C, L = 20, 8, 49


def make_model(seed: int = 0, scale: float = 0.4, end_bias: float = 2.0) -> ShowAttendTell:
    """Random weights, larger than the default init so the next-word distributions are peaked and depend on
    the image; an <end> bias so captions finish at different steps (some run to max_length)."""
    torch.manual_seed(seed)
    model = ShowAttendTell(ModelConfig(vocab_size=V, encoder_dim=C, num_regions=L, embed_dim=16,
                                       attention_dim=16, decoder_dim=16))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, scale)
        model.classifier.bias[END] += end_bias
    return model.eval()


@pytest.fixture(scope="module")
def model() -> ShowAttendTell:
    return make_model()


@pytest.fixture(scope="module")
def features() -> torch.Tensor:
    return torch.randn(16, L, C, generator=torch.Generator().manual_seed(1))


def repeated_ngrams(tokens: list[int], n: int) -> bool:
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return len(grams) != len(set(grams))


# -- beam search vs greedy -------------------------------------------------------------------------------------

@pytest.mark.parametrize("ngram", [0, 2])
def test_beam_width_one_is_greedy(model, features, ngram):
    config = DecodingConfig(beam_size=1, max_length=20, no_repeat_ngram_size=ngram)
    by_greedy, by_beam = greedy(model, features, config), beam_search(model, features, config)
    assert len(by_greedy) == len(by_beam) == len(features)
    for [g], [b] in zip(by_greedy, by_beam):
        assert b.token_ids == g.token_ids
        # same numbers up to float rounding (the beam search drops finished images from its batch, which
        # changes the BLAS blocking of the remaining rows)
        assert b.token_logprobs == pytest.approx(g.token_logprobs, abs=1e-6)
        assert b.finished == g.finished
        np.testing.assert_allclose(b.attention, g.attention, atol=1e-6)
        assert b.score == pytest.approx(g.score, abs=1e-5)
    assert len({h[0].length for h in by_greedy}) > 1, "fixture should give captions of different lengths"


def test_beam_search_usually_beats_greedy(model, features):
    """Not a theorem (greedy's prefix can fall out of a K-beam), so: never worse on most images, better on
    average, and strictly better somewhere (otherwise the search would be doing nothing)."""
    g = np.array([h[0].score for h in greedy(model, features, DecodingConfig(beam_size=1))])
    b = np.array([h[0].score for h in beam_search(model, features, DecodingConfig(beam_size=4))])
    assert np.mean(b >= g - 1e-5) >= 0.9
    assert b.mean() > g.mean()
    assert np.any(b > g + 1e-3)


@pytest.mark.parametrize("config", [
    DecodingConfig(beam_size=3, max_length=12),
    DecodingConfig(beam_size=4, max_length=10, length_penalty=1.0, num_return_sequences=3),
    DecodingConfig(beam_size=3, max_length=12, no_repeat_ngram_size=2, num_return_sequences=2),
], ids=["k3", "k4-lp1-n3", "k3-ngram2"])
def test_batched_beam_search_matches_single_image_and_reference(features, config):
    model = make_model(seed=3, scale=0.3, end_bias=1.0)   # a second model: more ties between lengths
    images = features[:6]
    batched = beam_search(model, images, config)
    for i in range(len(images)):
        alone = beam_search(model, images[i:i + 1], config)[0]
        reference = reference_beam_search(model, images[i], config, stop_early=False)
        assert len(batched[i]) == len(alone) == len(reference) == config.num_return_sequences
        for hb, ha, hr in zip(batched[i], alone, reference):
            assert hb.token_ids == ha.token_ids == hr.token_ids
            assert hb.finished == ha.finished == hr.finished
            assert hb.score == pytest.approx(hr.score, abs=1e-5)
            assert ha.score == pytest.approx(hr.score, abs=1e-5)
            assert hb.token_logprobs == pytest.approx(ha.token_logprobs, abs=1e-5)
            assert hb.token_logprobs == pytest.approx(hr.token_logprobs, abs=1e-5)
            np.testing.assert_allclose(hb.attention, hr.attention, atol=1e-5)
            np.testing.assert_allclose(hb.betas, hr.betas, atol=1e-5)
        # with its early stop on, the reference gives the same list
        stopped = reference_beam_search(model, images[i], config)
        assert [(h.token_ids, h.finished) for h in stopped] == [(h.token_ids, h.finished) for h in reference]


def test_one_decoder_step_per_time_step_for_the_whole_batch(model, features):
    calls = []
    original = model.step
    model.step = lambda tokens, state: calls.append(tokens.shape[0]) or original(tokens, state)
    try:
        config = DecodingConfig(beam_size=3, max_length=15)
        beam_search(model, features, config)
    finally:
        del model.step
    assert 0 < len(calls) <= config.max_length
    assert calls[0] == len(features) * 3
    assert all(b <= a for a, b in zip(calls, calls[1:]))   # finished images leave the batch


def test_greedy_drops_finished_rows_and_each_row_decodes_as_if_alone(model, features):
    calls = []
    original = model.step
    model.step = lambda tokens, state: calls.append(tokens.shape[0]) or original(tokens, state)
    try:
        config = DecodingConfig(beam_size=1, max_length=20, no_repeat_ngram_size=2)
        batch = greedy(model, features, config)
    finally:
        del model.step
    assert calls[0] == len(features) and calls[-1] < len(features)   # the batch shrank as rows finished
    assert all(b <= a for a, b in zip(calls, calls[1:]))
    assert sum(calls) < len(features) * len(calls)
    for i, [h] in enumerate(batch):
        [alone] = greedy(model, features[i:i + 1], config)[0]   # the row on its own
        assert h.token_ids == alone.token_ids and h.finished == alone.finished
        assert h.token_logprobs == pytest.approx(alone.token_logprobs, abs=1e-6)
        np.testing.assert_allclose(h.attention, alone.attention, atol=1e-6)
        np.testing.assert_allclose(h.betas, alone.betas, atol=1e-6)


# -- what a hypothesis carries ------------------------------------------------------------------------------------

@pytest.mark.parametrize("config", [DecodingConfig(beam_size=1), DecodingConfig(beam_size=3),
                                    DecodingConfig(do_sample=True, seed=0, num_return_sequences=2)],
                         ids=["greedy", "beam", "sample"])
def test_hypothesis_fields_are_consistent(model, features, config):
    for hyps in generate(model, features, config):
        for h in hyps:
            steps = len(h.token_ids) + (1 if h.finished else 0)
            assert len(h.token_logprobs) == h.length == steps
            assert h.attention.shape == (steps, L) and h.attention.dtype == np.float32
            np.testing.assert_allclose(h.attention.sum(axis=1), 1.0, atol=1e-5)
            assert h.betas.shape == (steps,) and np.all((h.betas > 0) & (h.betas < 1))
            assert all(lp <= 0 for lp in h.token_logprobs)
            assert h.score == pytest.approx(h.logprob / length_penalty_factor(h.length, config.length_penalty),
                                            abs=1e-4)
            assert not {PAD, START, END} & set(h.token_ids)


def test_n_best_list_is_sorted_distinct_and_complete(model, features):
    config = DecodingConfig(beam_size=5, num_return_sequences=4, length_penalty=0.5)
    for hyps in beam_search(model, features, config):
        assert len(hyps) == 4
        scores = [h.score for h in hyps]
        assert scores == sorted(scores, reverse=True)
        assert len({tuple(h.token_ids) + (h.finished,) for h in hyps}) == 4


def test_never_generates_pad_start_or_unk_even_when_the_model_prefers_them(features):
    model = make_model()
    with torch.no_grad():
        model.classifier.bias[[PAD, START, UNK]] += 10.0
    state = model.init_state(features)
    logits = model.step(torch.full((len(features),), START), state)[0]
    assert set(logits.argmax(dim=1).tolist()) <= {PAD, START, UNK}, "the model should prefer them"
    for config in (DecodingConfig(beam_size=1), DecodingConfig(beam_size=3),
                   DecodingConfig(do_sample=True, seed=0, num_return_sequences=3)):
        hyps = [h for hs in generate(model, features, config) for h in hs]
        assert all(not {PAD, START, UNK} & set(h.token_ids) for h in hyps)


# -- constraints and scoring --------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 2, 3])
def test_no_repeat_ngram(model, features, n):
    base = DecodingConfig(beam_size=3, max_length=20)
    unconstrained = [h for hs in beam_search(model, features, base) for h in hs]
    assert any(repeated_ngrams(h.token_ids, n) for h in unconstrained), "constraint would be untested"
    for config in (DecodingConfig(beam_size=3, max_length=20, no_repeat_ngram_size=n, num_return_sequences=3),
                   DecodingConfig(beam_size=1, max_length=20, no_repeat_ngram_size=n),
                   DecodingConfig(do_sample=True, seed=1, max_length=20, no_repeat_ngram_size=n,
                                  num_return_sequences=2)):
        for hs in generate(model, features, config):
            for h in hs:
                assert not repeated_ngrams(h.token_ids, n), (config, h.token_ids)


def test_length_penalty_never_shortens_the_best_caption(model, features):
    """Guaranteed here: beams are ranked by the raw log-prob, so the penalty only re-ranks the same finished
    set, and dividing by a factor that grows with length can only favour longer hypotheses."""
    base = [h[0] for h in beam_search(model, features, DecodingConfig(beam_size=4, max_length=15))]
    for lp in (0.5, 1.0, 3.0):
        penalised = [h[0] for h in beam_search(model, features,
                                               DecodingConfig(beam_size=4, max_length=15, length_penalty=lp))]
        assert all(p.length >= b.length for p, b in zip(penalised, base))
        assert all(p.logprob <= b.logprob + 1e-5 for p, b in zip(penalised, base))


def test_max_length_is_respected(model, features):
    for config in (DecodingConfig(beam_size=1, max_length=4), DecodingConfig(beam_size=3, max_length=4,
                                                                            num_return_sequences=3),
                   DecodingConfig(do_sample=True, seed=0, max_length=4)):
        hyps = [h for hs in generate(model, features, config) for h in hs]
        assert all(h.length <= 4 for h in hyps)
        assert all(len(h.token_ids) == 4 for h in hyps if not h.finished)
        assert any(not h.finished for h in hyps) and any(h.finished for h in hyps)


# -- sampling ---------------------------------------------------------------------------------------------------

def test_sampling_is_reproducible_for_a_seed(model, features):
    config = DecodingConfig(do_sample=True, seed=123, num_return_sequences=3, temperature=1.5)
    first = generate(model, features, config)
    again = generate(model, features, config)
    other = generate(model, features, DecodingConfig(do_sample=True, seed=124, num_return_sequences=3,
                                                     temperature=1.5))
    tokens = lambda result: [[h.token_ids for h in hs] for hs in result]  # noqa: E731
    assert tokens(first) == tokens(again)
    assert tokens(first) != tokens(other)
    for hs in first:
        assert len(hs) == 3 and [h.score for h in hs] == sorted((h.score for h in hs), reverse=True)


def test_top_k_one_or_cold_temperature_is_greedy(model, features):
    expected = greedy(model, features, DecodingConfig(beam_size=1))
    top1 = sample(model, features, DecodingConfig(do_sample=True, top_k=1, seed=5, num_return_sequences=2))
    cold = sample(model, features, DecodingConfig(do_sample=True, temperature=1e-3, seed=5))
    for [g], s1, [c] in zip(expected, top1, cold):
        for h in s1:
            assert h.token_ids == g.token_ids and h.token_logprobs == pytest.approx(g.token_logprobs, abs=1e-6)
        assert c.token_ids == g.token_ids


def test_temperature_changes_the_reported_logprobs(model, features):
    """Sampling reports log-probs of the tempered distribution it sampled from."""
    [hot] = sample(model, features[:1], DecodingConfig(do_sample=True, top_k=1, temperature=2.0, seed=0))[0:1]
    [g] = greedy(model, features[:1], DecodingConfig(beam_size=1))[0]
    assert hot[0].token_ids == g.token_ids
    assert all(h < e for h, e in zip(hot[0].token_logprobs, g.token_logprobs))  # flatter -> less sure


# -- config and housekeeping -------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad, word", [
    (dict(beam_size=0), "beam_size"), (dict(beam_size=2.5), "beam_size"), (dict(beam_size=True), "beam_size"),
    (dict(max_length=0), "max_length"), (dict(temperature=0.0), "temperature"),
    (dict(temperature=float("nan")), "temperature"), (dict(length_penalty=float("inf")), "length_penalty"),
    (dict(top_k=-1), "top_k"), (dict(no_repeat_ngram_size=-2), "no_repeat_ngram_size"),
    (dict(num_return_sequences=0), "num_return_sequences"),
    (dict(beam_size=2, num_return_sequences=3), "num_return_sequences"),
    (dict(do_sample="yes"), "do_sample"), (dict(seed=-1), "seed"), (dict(seed="abc"), "seed"),
])
def test_invalid_configs_raise_config_error(bad, word):
    with pytest.raises(ConfigError, match=word):
        DecodingConfig(**bad)
    with pytest.raises(ConfigError, match=word):
        DecodingConfig.from_dict(bad)
    with pytest.raises(ConfigError, match=word):
        dataclasses.replace(DecodingConfig(beam_size=2), **bad)


def test_config_round_trip_and_unknown_keys():
    config = DecodingConfig(beam_size=5, length_penalty=0.7, do_sample=True, seed=3, num_return_sequences=2)
    assert DecodingConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match="beam_width"):
        DecodingConfig.from_dict({"beam_width": 3})
    with pytest.raises(ConfigError, match="max_length"):
        DecodingConfig.from_dict({"max_length": -1})
    # sampling with more samples than beams is fine: beam_size is ignored when sampling
    DecodingConfig(beam_size=1, do_sample=True, num_return_sequences=5)


def test_config_is_frozen_hashable_by_value_and_names_its_mode():
    assert DecodingConfig(beam_size=4) == DecodingConfig(beam_size=4)
    assert len({DecodingConfig(beam_size=4), DecodingConfig(beam_size=4), DecodingConfig()}) == 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        DecodingConfig().beam_size = 5
    assert [DecodingConfig(beam_size=1).mode, DecodingConfig(beam_size=3).mode,
            DecodingConfig(do_sample=True).mode] == ["greedy", "beam", "sample"]
    assert DecodingConfig(beam_size=3).describe() == "beam search, width 3"


def test_bad_features_raise_config_error(model):
    with pytest.raises(ConfigError, match="channels"):
        generate(model, torch.randn(2, L, C + 1), DecodingConfig())
    with pytest.raises(ConfigError, match="batch, regions, channels"):
        generate(model, torch.randn(L, C), DecodingConfig())
    assert generate(model, torch.randn(0, L, C), DecodingConfig()) == []


def test_training_mode_is_restored_and_dropout_is_off(features):
    model = make_model()
    model.config.dropout = 0.5
    model.dropout.p = 0.5
    expected = [h[0].token_ids for h in beam_search(model.eval(), features, DecodingConfig())]
    model.train()
    for _ in range(2):   # dropout would make these differ from each other and from eval mode
        assert [h[0].token_ids for h in beam_search(model, features, DecodingConfig())] == expected
    assert model.training


def test_hypothesis_properties():
    h = Hypothesis(token_ids=[5, 6], token_logprobs=[-1.0, -0.5, -0.25], attention=np.zeros((3, L), np.float32),
                   betas=np.zeros(3, np.float32), finished=True, score=-1.75)
    assert h.logprob == -1.75 and h.length == 3
