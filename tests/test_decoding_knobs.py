"""The Hugging Face knobs end to end, on test_decoding's tiny random model: top_p, repetition_penalty,
min_length, diverse beam search (num_beam_groups, diversity_penalty) and bad_words.

Greedy search is checked against a greedy loop built from `transformers`' own logits processors; the
batched beam search against the plain reference with every knob on; each knob's promise (no bad word, no
early <end>, fewer repeats, more diverse beams) on every strategy. The rules themselves are checked against
transformers in test_logits_rules.py.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from core.decoding import DecodingConfig, beam_search, generate, greedy, reference_beam_search, sample
from core.decoding_rules import NEG_INF, NEVER_GENERATED
from core.errors import ConfigError
from core.text import END_ID, START_ID, Vocabulary
from test_decoding import V, make_model

VOCAB = Vocabulary(["<pad>", "<start>", "<end>", "<unk>", *(f"w{i}" for i in range(4, V))])


@pytest.fixture(scope="module")
def model():
    return make_model()


@pytest.fixture(scope="module")
def features() -> torch.Tensor:
    return torch.randn(16, 49, 8, generator=torch.Generator().manual_seed(1))


def all_hyps(model, features, config, vocab=VOCAB):
    return [h for hs in generate(model, features, config, vocab) for h in hs]


def strategies(**knobs) -> list[DecodingConfig]:
    return [DecodingConfig(beam_size=1, **knobs), DecodingConfig(beam_size=3, num_return_sequences=3, **knobs),
            DecodingConfig(do_sample=True, seed=0, num_return_sequences=3, **knobs)]


def words_most_used(model, features, count: int) -> list[str]:
    counts = np.bincount([t for h in all_hyps(model, features, DecodingConfig(beam_size=3)) for t in h.token_ids],
                         minlength=V)
    return [VOCAB.itos[i] for i in np.argsort(-counts)[:count]]


# -- greedy against a greedy loop over transformers' processors ----------------------------------------------

def hf_greedy(model, features, max_length: int, processors) -> list[list[int]]:
    """Hugging Face's greedy search for an encoder-decoder: input_ids start with the decoder start token,
    the processors run on the raw logits, argmax; tokens after <end> are dropped."""
    state = model.init_state(features)
    input_ids = torch.full((len(features), 1), START_ID)
    with torch.inference_mode():
        for _ in range(max_length):
            logits, _, _, state = model.step(input_ids[:, -1], state)
            scores = logits.clone()
            for processor in processors:
                scores = processor(input_ids, scores)
            scores[:, NEVER_GENERATED] = NEG_INF
            input_ids = torch.cat([input_ids, scores.argmax(dim=1, keepdim=True)], dim=1)
    out = []
    for row in input_ids[:, 1:].tolist():
        out.append(row[:row.index(END_ID)] if END_ID in row else row)
    return out


def test_greedy_matches_transformers_processors(model, features):
    hf = pytest.importorskip("transformers.generation.logits_process")
    bad = ["w5", "w9"]
    config = DecodingConfig(beam_size=1, max_length=15, repetition_penalty=1.8, min_length=6, bad_words=bad)
    processors = [hf.RepetitionPenaltyLogitsProcessor(1.8, prompt_ignore_length=1),
                  hf.NoBadWordsLogitsProcessor([[VOCAB.stoi[w]] for w in bad], eos_token_id=END_ID),
                  hf.MinLengthLogitsProcessor(6, eos_token_id=END_ID)]
    expected = hf_greedy(model, features, 15, processors)
    ours = [hs[0].token_ids for hs in greedy(model, features, config, VOCAB)]
    assert ours == expected
    assert ours != [hs[0].token_ids for hs in greedy(model, features, DecodingConfig(beam_size=1, max_length=15))]


# -- what each knob promises, in every strategy --------------------------------------------------------------

def test_bad_words_never_appear(model, features):
    banned = words_most_used(model, features, 3)
    ids = {VOCAB.stoi[w] for w in banned}
    for config in strategies():
        assert any(ids & set(h.token_ids) for h in all_hyps(model, features, config)), "ban would be untested"
    for config in strategies(bad_words=banned):
        hyps = all_hyps(model, features, config)
        assert hyps and not any(ids & set(h.token_ids) for h in hyps), config
    with pytest.raises(ConfigError, match="'zebra'"):
        generate(model, features, DecodingConfig(bad_words=("w4", "zebra")), VOCAB)


@pytest.mark.parametrize("min_length", [4, 8])
def test_min_length_is_respected(model, features, min_length):
    for config in strategies():
        assert any(h.finished and h.length < min_length for h in all_hyps(model, features, config))
    for config in strategies(min_length=min_length):
        hyps = all_hyps(model, features, config)
        assert all(h.length >= min_length for h in hyps), config
        assert any(h.finished for h in hyps)                   # they still end, later


def test_repetition_penalty_reduces_repeats(model, features):
    def repeats(hyps) -> int:
        return sum(len(h.token_ids) - len(set(h.token_ids)) for h in hyps)
    for config in strategies(max_length=20):
        plain = repeats(all_hyps(model, features, config))
        penalised = repeats(all_hyps(model, features, dataclasses.replace(config, repetition_penalty=3.0)))
        assert plain > 0 and penalised < plain, config
        encouraged = repeats(all_hyps(model, features, dataclasses.replace(config, repetition_penalty=0.5)))
        assert encouraged >= plain, config


def test_top_p_tiny_is_greedy_and_one_changes_nothing(model, features):
    expected = greedy(model, features, DecodingConfig(beam_size=1))
    nucleus = sample(model, features, DecodingConfig(do_sample=True, top_p=1e-6, seed=5, num_return_sequences=2))
    for [g], hs in zip(expected, nucleus):
        assert all(h.token_ids == g.token_ids for h in hs)
    base = DecodingConfig(do_sample=True, seed=7, num_return_sequences=3)
    full = [[h.token_ids for h in hs] for hs in sample(model, features, base)]
    half = [[h.token_ids for h in hs] for hs in sample(model, features, dataclasses.replace(base, top_p=0.5))]
    assert full == [[h.token_ids for h in hs] for hs in sample(model, features, dataclasses.replace(base, top_p=1.0))]
    assert half != full


@pytest.mark.parametrize("knobs", [dict(repetition_penalty=1.6), dict(min_length=7),
                                   dict(bad_words=("w4", "w11")), dict(min_length=5, no_repeat_ngram_size=2,
                                                                         repetition_penalty=1.3)],
                         ids=["repetition", "min-length", "bad-words", "all"])
def test_beam_width_one_is_greedy_with_knobs(model, features, knobs):
    config = DecodingConfig(beam_size=1, max_length=20, **knobs)
    for [g], [b] in zip(greedy(model, features, config, VOCAB), beam_search(model, features, config, VOCAB)):
        assert b.token_ids == g.token_ids and b.finished == g.finished
        assert b.token_logprobs == pytest.approx(g.token_logprobs, abs=1e-6)


# -- diverse beam search -------------------------------------------------------------------------------------

@pytest.mark.parametrize("config", [
    DecodingConfig(beam_size=4, num_beam_groups=2, diversity_penalty=0.5, max_length=12, num_return_sequences=4),
    DecodingConfig(beam_size=6, num_beam_groups=3, diversity_penalty=1.5, max_length=10, length_penalty=1.0,
                   num_return_sequences=3),
    DecodingConfig(beam_size=4, num_beam_groups=4, diversity_penalty=0.8, max_length=12, num_return_sequences=2),
    DecodingConfig(beam_size=4, num_beam_groups=2, diversity_penalty=0.5, max_length=12, num_return_sequences=2,
                   repetition_penalty=1.5, min_length=5, no_repeat_ngram_size=2, bad_words=("w7",)),
    DecodingConfig(beam_size=3, max_length=12, num_return_sequences=2, repetition_penalty=1.5, min_length=6,
                   bad_words=("w4", "w8")),
], ids=["k4-g2", "k6-g3-lp1", "k4-g4", "k4-g2-all-knobs", "k3-knobs"])
def test_batched_matches_reference_with_knobs(features, config):
    model = make_model(seed=3, scale=0.3, end_bias=1.0)
    images = features[:6]
    batched = beam_search(model, images, config, VOCAB)
    for i in range(len(images)):
        reference = reference_beam_search(model, images[i], config, stop_early=False, vocab=VOCAB)
        assert len(batched[i]) == len(reference) == config.num_return_sequences
        for hb, hr in zip(batched[i], reference):
            assert (hb.token_ids, hb.finished) == (hr.token_ids, hr.finished)
            assert hb.score == pytest.approx(hr.score, abs=1e-4)
            assert hb.token_logprobs == pytest.approx(hr.token_logprobs, abs=1e-5)
            np.testing.assert_allclose(hb.attention, hr.attention, atol=1e-5)
        stopped = reference_beam_search(model, images[i], config, vocab=VOCAB)
        assert [(h.token_ids, h.finished) for h in stopped] == [(h.token_ids, h.finished) for h in reference]


def test_one_group_is_plain_beam_search_and_tiny_penalty_repeats_it(model, features):
    plain = beam_search(model, features, DecodingConfig(beam_size=2, max_length=20, num_return_sequences=2))
    one_group = beam_search(model, features, DecodingConfig(beam_size=2, max_length=20, num_return_sequences=2,
                                                            num_beam_groups=1, diversity_penalty=0.0))
    def key(result):
        return [[(h.token_ids, h.token_logprobs, h.score, h.finished) for h in hs] for hs in result]
    assert key(one_group) == key(plain)
    # with a vanishing penalty every group runs the same width-2 search; the unpenalised first group wins ties
    twins = beam_search(model, features, DecodingConfig(beam_size=4, num_beam_groups=2, diversity_penalty=1e-7,
                                                        max_length=20, num_return_sequences=4))
    for p, t in zip(plain, twins):
        assert [h.token_ids for h in t] == [p[0].token_ids, p[0].token_ids, p[1].token_ids, p[1].token_ids]


def test_diversity_penalty_diversifies_the_n_best(model, features):
    def distinct_first_words(config) -> list[int]:
        return [len({h.token_ids[0] for h in hs if h.token_ids}) for hs in beam_search(model, features, config)]
    plain = distinct_first_words(DecodingConfig(beam_size=4, num_return_sequences=4))
    diverse = distinct_first_words(DecodingConfig(beam_size=4, num_beam_groups=4, diversity_penalty=3.0,
                                                  num_return_sequences=4))
    assert sum(diverse) > sum(plain)
    assert np.mean(np.array(diverse) >= np.array(plain)) >= 0.9


# -- the config ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad, word", [
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_p=float("nan")), "top_p"),
    (dict(repetition_penalty=0.0), "repetition_penalty"), (dict(repetition_penalty=-1.0), "repetition_penalty"),
    (dict(min_length=-1), "min_length"), (dict(min_length=21, max_length=20), "min_length"),
    (dict(min_length=2.5), "min_length"),
    (dict(beam_size=4, num_beam_groups=3, diversity_penalty=1.0), "num_beam_groups"),
    (dict(num_beam_groups=0), "num_beam_groups"),
    (dict(beam_size=4, diversity_penalty=0.5), "diversity_penalty"),
    (dict(beam_size=4, num_beam_groups=2), "diversity_penalty"),
    (dict(beam_size=4, num_beam_groups=2, diversity_penalty=-0.5), "diversity_penalty"),
    (dict(beam_size=4, num_beam_groups=2, diversity_penalty=0.5, do_sample=True), "num_beam_groups"),
    (dict(bad_words=("two words",)), "bad_words"), (dict(bad_words=(3,)), "bad_words"),
    (dict(bad_words=("",)), "bad_words"),
])
def test_invalid_knobs_raise_config_error_naming_the_setting(bad, word):
    with pytest.raises(ConfigError, match=word):
        DecodingConfig(**bad)
    with pytest.raises(ConfigError, match=word):
        DecodingConfig.from_dict(bad)


def test_knob_config_normalises_and_round_trips():
    config = DecodingConfig(beam_size=4, num_beam_groups=2, diversity_penalty=0.5, bad_words=["Dog", "cat", "dog"],
                            top_p=0.9, repetition_penalty=1.2, min_length=3)
    assert config.bad_words == ("cat", "dog")
    assert config == DecodingConfig(beam_size=4, num_beam_groups=2, diversity_penalty=0.5, bad_words=("dog", "cat"),
                                    top_p=0.9, repetition_penalty=1.2, min_length=3)
    assert len({config, dataclasses.replace(config, bad_words=["cat", "dog"])}) == 1
    import json
    assert DecodingConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert config.describe() == "diverse beam search, width 4 in 2 groups (diversity penalty 0.5)"
    assert DecodingConfig(bad_words="Dog").bad_words == ("dog",)
    assert config.describe_knobs() == ["repetition penalty 1.2", "min length 3", "bad words: cat, dog"]
    assert DecodingConfig(do_sample=True, top_p=0.9).describe_knobs() == ["top-p 0.9"]
    assert DecodingConfig().describe_knobs() == []
