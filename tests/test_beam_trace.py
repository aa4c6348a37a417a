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
