"""Beam search for one image, step by step in plain Python, with every decision recorded; prefix forcing.

`trace_beam_search` follows exactly the rule of `core.decoding.beam_search` (2K candidates per step; an
<end> ranked among the top K finishes a hypothesis, length-penalised; the K best others live on; the same
exact stopping bound; beams still live at max_length compete unfinished), so its final hypotheses equal
`beam_search`'s (a test checks it). On the way it records, per step, the kept hypotheses, the strongest
pruned candidates and the ones that finished, each with its raw and length-penalised score and the
attention row of its last token.

`continue_caption` forces a prefix: the given words are fed first (their log-probs are the model's, and
count in the total), then the search continues from there with every decoding setting applied (beam
width, length penalty, max length, which counts the prefix, no-repeat n-grams, n-best, or sampling).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from core.decoding import NEG_INF, DecodingConfig, Hypothesis, length_penalty_factor
from core.decoding_rules import block_repeated_ngrams, check_features, eval_mode, log_probs
from core.errors import ConfigError
from core.model import DecoderState
from core.text import END_ID, START_ID


# knobs added to DecodingConfig after this module (#13); the traced search does not apply them yet, so it refuses
# them by name rather than ignore them silently
_UNSUPPORTED = {"top_p": 1.0, "repetition_penalty": 1.0, "min_length": 0, "num_beam_groups": 1,
                "diversity_penalty": 0.0, "bad_words": ()}


def _check_supported(config: DecodingConfig) -> None:
    used = [k for k, default in _UNSUPPORTED.items() if hasattr(config, k) and getattr(config, k) not in (default, None, [], ())]
    if used:
        raise ConfigError(f"the traced beam search and prefix forcing do not support {', '.join(used)} yet; "
                          "reset them to use this view")


@dataclass
class BeamNode:
    tokens: list[int]            # every token so far (prefix included), <end> last when finished
    logprob: float               # summed log-prob
    score: float                 # logprob / length penalty of len(tokens)
    attention: np.ndarray        # (L,) α of the last token
    parent: int                  # index of the kept node of the previous step it extends (-1: the root)
    finished: bool = False


@dataclass
class BeamStep:
    t: int
    kept: list[BeamNode]
    pruned: list[BeamNode]       # the strongest candidates that did not make the beam
    finished: list[BeamNode]     # hypotheses that ended with <end> at this step


@dataclass
class BeamTrace:
    steps: list[BeamStep]
    hypotheses: list[Hypothesis]            # == beam_search's n-best
    prefix: list[int] = field(default_factory=list)


@dataclass
class _Beam:
    tokens: list[int]
    logprobs: list[float]
    attention: list[np.ndarray]
    betas: list[float]

    @property
    def total(self) -> float:
        return float(np.sum(self.logprobs, dtype=np.float64)) if self.logprobs else 0.0

    def extend(self, token: int, lp: float, att: np.ndarray, beta: float) -> "_Beam":
        return _Beam(self.tokens + [token], self.logprobs + [lp], self.attention + [att], self.betas + [beta])

    def hypothesis(self, finished: bool, score: float, L: int) -> Hypothesis:
        words = self.tokens[:-1] if finished else self.tokens
        att = np.stack(self.attention).astype(np.float32) if self.attention else np.zeros((0, L), np.float32)
        return Hypothesis(list(words), list(self.logprobs), att, np.asarray(self.betas, dtype=np.float32),
                          finished, score)


def _forced_prefix(model, features: Tensor, prefix: list[int]):
    """Feed <start> + prefix; returns the beam of the prefix and the state after it (and the next logits)."""
    state = model.init_state(features)
    beam = _Beam([], [], [], [])
    logits, alpha, beta, state = model.step(torch.tensor([START_ID], device=features.device), state)
    for word in prefix:
        lp = log_probs(logits)[0, word]
        if not torch.isfinite(lp):
            raise ConfigError(f"the prefix contains a token the decoder can never produce (id {word})")
        beam = beam.extend(word, float(lp), alpha[0].float().cpu().numpy(), float(beta[0, 0]))
        logits, alpha, beta, state = model.step(torch.tensor([word], device=features.device), state)
    return beam, state, logits, alpha, beta


def trace_beam_search(model, features: Tensor, config: DecodingConfig, *, prefix: list[int] | None = None,
                      pruned: int = 3) -> BeamTrace:
    """Beam search of one image's (L, C) or (1, L, C) features, recorded step by step (see the module doc)."""
    _check_supported(config)
    if features.dim() == 2:
        features = features.unsqueeze(0)
    features = check_features(model, features)
    if features.shape[0] != 1:
        raise ConfigError(f"trace_beam_search takes one image, got {features.shape[0]}")
    prefix = list(prefix or [])
    K, T, n, lp_alpha = config.beam_size, config.max_length, config.num_return_sequences, config.length_penalty
    if len(prefix) >= T:
        raise ConfigError(f"the prefix has {len(prefix)} words but max_length is {T} tokens including <end>")
    L, V = features.shape[1], model.config.vocab_size
    steps: list[BeamStep] = []
    pool: list[tuple[float, _Beam]] = []                 # finished (score, beam), best first, at most K
    with eval_mode(model):
        root, state, logits, alpha, beta = _forced_prefix(model, features, prefix)
        beams = [root]
        ran_out = False
        for t in range(len(prefix), T):
            logp = log_probs(logits)                                                    # (k, V)
            history = torch.tensor([b.tokens for b in beams], dtype=torch.long, device=features.device)
            allowed = block_repeated_ngrams(logp, history.view(len(beams), -1), config.no_repeat_ngram_size)
            prev = torch.tensor([b.total for b in beams], device=features.device, dtype=logp.dtype)
            top_score, top_idx = (prev.unsqueeze(1) + allowed).view(-1).topk(min(2 * K + pruned, len(beams) * V))
            alphas = alpha.float().cpu().numpy()
            kept, rows, cut, finished_now = [], [], [], []
            for rank, (score, idx) in enumerate(zip(top_score.tolist(), top_idx.tolist())):
                if score == NEG_INF:
                    break
                row, word = divmod(idx, V)
                child = beams[row].extend(word, float(logp[row, word]), alphas[row], float(beta[row, 0]))
                node = BeamNode(child.tokens, score, score / length_penalty_factor(len(child.tokens), lp_alpha),
                                alphas[row], row, finished=word == END_ID)
                if rank >= 2 * K:
                    if len(cut) < pruned:
                        cut.append(node)
                    continue
                if word == END_ID:
                    if rank < K:
                        finished_now.append(node)
                        pool.append((node.score, child))
                    else:
                        cut.append(node) if len(cut) < pruned else None
                elif len(kept) < K:
                    kept.append((node, child)), rows.append(row)
                elif len(cut) < pruned:
                    cut.append(node)
            pool = sorted(pool, key=lambda p: -p[0])[:K]
            steps.append(BeamStep(t, [k for k, _ in kept], cut, finished_now))
            beams = [c for _, c in kept]
            if t == T - 1:
                ran_out = True
                break
            if not beams:
                break
            bound = max(b.total for b in beams) / max(length_penalty_factor(t + 2, lp_alpha),
                                                     length_penalty_factor(T, lp_alpha))
            if len(pool) >= n and bound <= pool[n - 1][0]:
                break
            index = torch.tensor(rows, device=features.device)
            state = DecoderState(state.h.index_select(0, index), state.c.index_select(0, index),
                                 state.features, state.att_features)
            tokens = torch.tensor([b.tokens[-1] for b in beams], device=features.device)
            logits, alpha, beta, state = model.step(tokens, state)
    candidates = [b.hypothesis(True, s, L) for s, b in pool]
    if ran_out:
        penalty = length_penalty_factor(T, lp_alpha)
        candidates += [b.hypothesis(False, b.total / penalty, L) for b in beams]
    hypotheses = sorted(candidates, key=lambda h: -h.score)[:n]
    return BeamTrace(steps, hypotheses, prefix)


def _sample_from_prefix(model, features: Tensor, config: DecodingConfig, prefix: list[int]) -> list[Hypothesis]:
    """num_return_sequences samples that all start with the prefix (temperature, top_k, seed honoured)."""
    generator = torch.Generator(device=features.device)
    generator.manual_seed(config.seed) if config.seed is not None else generator.seed()
    root, state, logits, alpha, beta = _forced_prefix(model, features, prefix)
    out = []
    for _ in range(config.num_return_sequences):
        beam, s, lg, al, be = root, state, logits, alpha, beta
        finished = False
        for _t in range(len(prefix), config.max_length):
            logp = log_probs(lg, config.temperature)
            history = torch.tensor([beam.tokens], dtype=torch.long, device=features.device).view(1, -1)
            scores = block_repeated_ngrams(logp, history, config.no_repeat_ngram_size)
            if 0 < config.top_k < scores.shape[1]:
                kth = scores.topk(config.top_k, dim=1).values[:, -1:]
                scores = scores.masked_fill(scores < kth, NEG_INF)
            word = int(torch.multinomial(scores.softmax(dim=1), 1, generator=generator))
            beam = beam.extend(word, float(logp[0, word]), al[0].float().cpu().numpy(), float(be[0, 0]))
            if word == END_ID:
                finished = True
                break
            lg, al, be, s = model.step(torch.tensor([word], device=features.device), s)
        score = beam.total / length_penalty_factor(len(beam.tokens), config.length_penalty)
        out.append(beam.hypothesis(finished, score, features.shape[1]))
    return sorted(out, key=lambda h: -h.score)


def continue_caption(model, features: Tensor, config: DecodingConfig, prefix: list[int]) -> list[Hypothesis]:
    """n-best captions that start with `prefix` (word ids), decoded with `config` from there on."""
    if not prefix:
        raise ConfigError("the prefix is empty: type the first words of the caption")
    _check_supported(config)
    if config.mode == "sample":
        if len(prefix) >= config.max_length:
            raise ConfigError(f"the prefix has {len(prefix)} words but max_length is {config.max_length} "
                              "tokens including <end>")
        feats = check_features(model, features.unsqueeze(0) if features.dim() == 2 else features)
        with eval_mode(model):
            return _sample_from_prefix(model, feats, config, list(prefix))
    return trace_beam_search(model, features, config, prefix=prefix).hypotheses
