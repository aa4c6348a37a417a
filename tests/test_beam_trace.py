"""The traced beam search (the dashboard's beam view) and prefix forcing: on a random model with a small
vocabulary (many ties broken, many hypotheses finishing at different steps) and on the tiny trained one."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from core.beam_trace import continue_caption, trace_beam_search
from core.decoding import DecodingConfig, beam_search
from core.errors import ConfigError
from test_decoding import make_model
from test_decoding_knobs import VOCAB
from core.text import END_ID as END, UNK_ID as UNK

CONFIGS = [DecodingConfig(beam_size=1, max_length=12), DecodingConfig(beam_size=3, max_length=12),
           DecodingConfig(beam_size=5, num_return_sequences=3, length_penalty=0.8, max_length=10),
           DecodingConfig(beam_size=4, no_repeat_ngram_size=2, num_return_sequences=2, max_length=8),
           DecodingConfig(beam_size=3, max_length=3)]


@pytest.fixture(scope="module")
def model():
    return make_model(seed=3)


@pytest.fixture(scope="module")
def features():
    return torch.randn(6, 49, 8, generator=torch.Generator().manual_seed(7))


def same(a, b) -> bool:
    return (a.token_ids == b.token_ids and a.finished == b.finished and abs(a.score - b.score) < 1e-5
            and np.allclose(a.token_logprobs, b.token_logprobs, atol=1e-5) and np.allclose(a.attention, b.attention, atol=1e-5))


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"K{c.beam_size}n{c.num_return_sequences}T{c.max_length}")
def test_final_hypotheses_equal_beam_search(model, features, config):
    expected = beam_search(model, features, config)
    for i in range(len(features)):
        trace = trace_beam_search(model, features[i], config)
        assert len(trace.hypotheses) == len(expected[i])
        assert all(same(a, b) for a, b in zip(trace.hypotheses, expected[i])), i


@pytest.mark.parametrize("config", CONFIGS[1:3], ids=["K3", "K5"])
def test_steps_record_kept_pruned_and_finished(model, features, config):
    trace = trace_beam_search(model, features[0], config, pruned=4)
    K = config.beam_size
    assert trace.steps and trace.steps[0].t == 0
    for prev, step in zip([None] + trace.steps[:-1], trace.steps):
        assert 1 <= len(step.kept) <= K and len(step.pruned) <= 4
        scores = [n.logprob for n in step.kept]
        assert scores == sorted(scores, reverse=True)
        assert all(p.logprob <= min(scores) + 1e-6 for p in step.pruned if not p.finished)
        assert all(n.finished and n.tokens[-1] == END for n in step.finished)
        assert all(not n.finished and len(n.tokens) == step.t + 1 for n in step.kept)
        for node in step.kept + step.pruned + step.finished:
            assert node.attention.shape == (49,) and node.attention.sum() == pytest.approx(1.0, abs=1e-4)
            if prev is not None:     # a child extends the kept node it names
                assert node.tokens[:-1] == prev.kept[node.parent].tokens
            penalty = ((5 + len(node.tokens)) / 6) ** config.length_penalty
            assert node.score == pytest.approx(node.logprob / penalty, rel=1e-5)
    finished = {tuple(n.tokens[:-1]) for s in trace.steps for n in s.finished}
    assert all(tuple(h.token_ids) in finished for h in trace.hypotheses if h.finished)


@pytest.mark.parametrize("config", CONFIGS[:3], ids=["greedy", "K3", "K5"])
def test_forcing_the_first_k_tokens_reproduces_the_result(tiny_checkpoint, tiny_flickr, config):
    from core.captioner import Captioner
    captioner = Captioner.from_checkpoint(tiny_checkpoint, device="cpu")
    for path in sorted((tiny_flickr / "images").glob("*.jpg"))[:4]:
        feats = captioner.features(path)[0]
        best = captioner.decode(feats[None], config)[0][0]
        assert best.finished and len(best.token_ids) > 3
        for k in range(1, len(best.token_ids) + 1):
            forced = continue_caption(captioner.model, feats, config, best.token_ids[:k])[0]
            assert same(forced, best), (k, captioner.words(best), captioner.words(forced))


def test_forcing_a_prefix_keeps_it_and_applies_the_settings(model, features):
    config = DecodingConfig(beam_size=3, num_return_sequences=2, max_length=9)
    hyps = continue_caption(model, features[1], config, [5, 6])
    assert len(hyps) == 2 and all(h.token_ids[:2] == [5, 6] for h in hyps)
    assert all(h.length <= 9 for h in hyps) and hyps[0].score >= hyps[1].score
    sampled = DecodingConfig(do_sample=True, seed=4, num_return_sequences=3, max_length=9)
    a = continue_caption(model, features[1], sampled, [5, 6])
    b = continue_caption(model, features[1], sampled, [5, 6])
    assert [h.token_ids for h in a] == [h.token_ids for h in b] and all(h.token_ids[:2] == [5, 6] for h in a)
    with pytest.raises(ConfigError, match="prefix has 9 words but max_length is 9"):
        continue_caption(model, features[1], config, [5] * 9)
    with pytest.raises(ConfigError, match="prefix is empty"):
        continue_caption(model, features[1], config, [])
    with pytest.raises(ConfigError, match="can never produce"):
        continue_caption(model, features[1], config, [UNK])


# -- the Hugging Face knobs in the beam view and in prefix forcing ------------------------------------------------

KNOB_CONFIGS = [
    DecodingConfig(beam_size=3, max_length=12, num_return_sequences=2, repetition_penalty=1.6),
    DecodingConfig(beam_size=3, max_length=12, min_length=7),
    DecodingConfig(beam_size=4, max_length=10, num_return_sequences=2, bad_words=("w4", "w11")),
    DecodingConfig(beam_size=4, num_beam_groups=2, diversity_penalty=0.5, max_length=12, num_return_sequences=4),
    DecodingConfig(beam_size=6, num_beam_groups=3, diversity_penalty=1.5, max_length=10, length_penalty=1.0,
                   num_return_sequences=3),
    DecodingConfig(beam_size=4, num_beam_groups=2, diversity_penalty=0.5, max_length=12, num_return_sequences=2,
                   repetition_penalty=1.5, min_length=5, no_repeat_ngram_size=2, bad_words=("w7",)),
]
KNOB_IDS = ["repetition", "min-length", "bad-words", "k4-g2", "k6-g3-lp1", "g2-all-knobs"]


@pytest.fixture(scope="module")
def knob_model():
    return make_model(seed=3, scale=0.3, end_bias=1.0)     # test_decoding_knobs' model for the same configs


@pytest.mark.parametrize("config", KNOB_CONFIGS, ids=KNOB_IDS)
def test_trace_with_knobs_ends_where_beam_search_does(knob_model, features, config):
    expected = beam_search(knob_model, features, config, VOCAB)
    banned = {VOCAB.stoi[w] for w in config.bad_words}
    for i in range(len(features)):
        trace = trace_beam_search(knob_model, features[i], config, pruned=4, vocab=VOCAB)
        assert len(trace.hypotheses) == len(expected[i])
        assert all(same(a, b) for a, b in zip(trace.hypotheses, expected[i])), i
        groups = config.num_beam_groups
        for prev, step in zip([None] + trace.steps[:-1], trace.steps):
            nodes = step.kept + step.pruned + step.finished
            assert not any(set(n.tokens) & banned for n in nodes)                  # bad words never candidates
            assert all(len(n.tokens) >= config.min_length for n in step.finished)   # no <end> before min_length
            assert len(step.kept) <= config.beam_size and {n.group for n in nodes} <= set(range(groups))
            for g in range(groups):     # within a group the kept beams are the best-ranked, best first
                kept = [n.score for n in step.kept if n.group == g]
                assert kept == sorted(kept, reverse=True) and len(kept) <= config.beam_size // groups
            if prev is not None:
                assert all(n.tokens[:-1] == prev.kept[n.parent].tokens for n in nodes)
            if groups == 1:             # no diversity penalty: the score is the log-prob, length-penalised
                penalty = ((5 + step.t + 1) / 6) ** config.length_penalty
                assert all(n.score == pytest.approx(n.logprob / penalty, rel=1e-5) for n in nodes)
            else:                       # a later group's scores carry its diversity penalties
                assert all(n.score * ((5 + step.t + 1) / 6) ** config.length_penalty <= n.logprob + 1e-5
                           for n in nodes)


@pytest.mark.parametrize("knobs", [dict(repetition_penalty=1.6), dict(min_length=7), dict(bad_words=("w4", "w11")),
                                   dict(repetition_penalty=1.8, min_length=6, no_repeat_ngram_size=2,
                                        bad_words=("w5",))], ids=["repetition", "min-length", "bad-words", "all"])
def test_forcing_a_knob_decoded_prefix_reproduces_the_result(knob_model, features, knobs):
    """The forced words count as generated ones (min_length, repetition penalty, n-gram history), so forcing
    the first k tokens of a greedy caption gives back that caption, log-probs and score included. (At beam
    width > 1 that holds only where the search is not fooled by the prefix: a forced prefix has one beam,
    so an <end> that lost to other beams' words may now win; the tiny model's test above checks it there.)"""
    config = DecodingConfig(beam_size=1, max_length=12, **knobs)
    for i in range(len(features)):
        best = beam_search(knob_model, features[i:i + 1], config, VOCAB)[0][0]
        for k in range(1, min(len(best.token_ids), config.max_length - 1) + 1):
            forced = continue_caption(knob_model, features[i], config, best.token_ids[:k], vocab=VOCAB)[0]
            assert same(forced, best), (i, k, best.token_ids, forced.token_ids)


def test_forced_words_count_towards_min_length(knob_model, features):
    config = DecodingConfig(beam_size=3, max_length=12, min_length=6)
    for i in range(len(features)):
        for prefix in ([5], [5, 6, 7, 8]):
            hyps = continue_caption(knob_model, features[i], config, prefix, vocab=VOCAB)
            assert all(h.length >= 6 for h in hyps if h.finished)


def test_repetition_penalty_sees_the_forced_words(knob_model, features):
    """A word of the prefix is penalised when the continuation would repeat it, as a prompt is in HF."""
    prefix = [5, 6]
    plain = DecodingConfig(beam_size=1, max_length=12)
    strong = DecodingConfig(beam_size=1, max_length=12, repetition_penalty=50.0)
    repeats = {True: 0, False: 0}
    for i in range(len(features)):
        for config in (plain, strong):
            h = continue_caption(knob_model, features[i], config, prefix, vocab=VOCAB)[0]
            repeats[config is strong] += sum(t in prefix for t in h.token_ids[2:])
    assert repeats[True] < repeats[False]


def test_diverse_groups_from_a_prefix_repeat_the_plain_search_at_a_tiny_penalty(knob_model, features):
    plain = DecodingConfig(beam_size=2, max_length=12, num_return_sequences=2)
    twins = DecodingConfig(beam_size=4, num_beam_groups=2, diversity_penalty=1e-7, max_length=12,
                           num_return_sequences=4)
    for i in range(len(features)):
        p = continue_caption(knob_model, features[i], plain, [5, 6])
        t = continue_caption(knob_model, features[i], twins, [5, 6])
        assert [h.token_ids for h in t] == [p[0].token_ids, p[0].token_ids, p[1].token_ids, p[1].token_ids]


def test_sampling_from_a_prefix_applies_top_p_and_the_constraints(knob_model, features):
    knobs = dict(max_length=12, repetition_penalty=1.8, min_length=6, bad_words=("w5",))
    greedy = DecodingConfig(beam_size=1, **knobs)
    nucleus = DecodingConfig(do_sample=True, seed=1, top_p=1e-6, num_return_sequences=2, **knobs)
    for i in range(len(features)):
        g = continue_caption(knob_model, features[i], greedy, [6, 7], vocab=VOCAB)[0]
        for s in continue_caption(knob_model, features[i], nucleus, [6, 7], vocab=VOCAB):
            assert same(s, g)       # a vanishing nucleus keeps only the top word: greedy, every rule included
    wide = DecodingConfig(do_sample=True, seed=2, temperature=2.0, num_return_sequences=8, **knobs)
    for i in range(len(features)):
        for h in continue_caption(knob_model, features[i], wide, [6, 7], vocab=VOCAB):
            assert VOCAB.stoi["w5"] not in h.token_ids and (not h.finished or h.length >= 6)


def test_a_prefix_with_a_bad_word_is_refused_by_name(knob_model, features):
    config = DecodingConfig(beam_size=3, bad_words=("w6",))
    with pytest.raises(ConfigError, match="'w6', which bad_words bans"):
        continue_caption(knob_model, features[0], config, [5, 6], vocab=VOCAB)
    with pytest.raises(ConfigError, match="bad_words need the checkpoint's vocabulary"):
        trace_beam_search(knob_model, features[0], config)
