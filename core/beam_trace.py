"""Beam search for one image, step by step in plain Python, with every decision recorded; prefix forcing.

`trace_beam_search` follows exactly the rule of `core.decoding.beam_search` (2K candidates per step; an
<end> ranked among the top K finishes a hypothesis, length-penalised; the K best others live on; the same
exact stopping bound; beams still live at max_length compete unfinished), so its final hypotheses equal
`beam_search`'s (a test checks it). Every knob applies as it does there: the repetition penalty reshapes the
distribution the log-probs are of, no-repeat n-grams, bad words and min_length ban candidates, and diverse
beam search (num_beam_groups) runs the groups one after the other within a step, each losing
diversity_penalty per earlier group's new beam that picked the same word. On the way it records, per step,
the kept hypotheses, the strongest pruned candidates and the ones that finished, each with its summed
log-prob, the score the search ranks it by (length-penalised, diversity penalties included) and the
attention row of its last token. top_p is a sampling knob; the beam view, like beam search, ignores it.

`continue_caption` forces a prefix: the given words are fed first (their log-probs are the model's, under
the repetition penalty like any generated word, and count in the total), then the search continues from
there with every decoding setting applied (beam width, length penalty, max length, which counts the prefix,
no-repeat n-grams, n-best, sampling with temperature / top-k / top-p, and the Hugging Face knobs). The
forced words count as generated ones, as Hugging Face counts a prompt: towards min_length, and in the history
the repetition penalty and the n-gram block look at. A prefix that contains a bad word is refused by name.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from core.decoding import NEG_INF, DecodingConfig, Hypothesis, length_penalty_factor, sampling_probs
from core.decoding_rules import check_features, eval_mode, log_probs
from core.errors import ConfigError
from core.logits_rules import LogitsRules
from core.model import DecoderState
from core.text import END_ID, START_ID, Vocabulary


@dataclass
class BeamNode:
    tokens: list[int]            # every token so far (prefix included), <end> last when finished
    logprob: float               # summed log-prob
    score: float                 # what the search ranks by: (logprob - diversity penalties) / length penalty
    attention: np.ndarray        # (L,) α of the last token
    parent: int                  # index of the kept node of the previous step it extends (first step: the root)
    finished: bool = False
    group: int = 0               # its beam group (diverse beam search; always 0 otherwise)


@dataclass
class BeamStep:
    t: int
    kept: list[BeamNode]         # group after group
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
    ranked: float = 0.0          # the summed score the search ranks by (log-probs minus diversity penalties)
    penalty: float = 0.0         # the diversity penalties in it (0 without beam groups)

    @property
    def total(self) -> float:
        return float(np.sum(self.logprobs, dtype=np.float64)) if self.logprobs else 0.0

    def extend(self, token: int, lp: float, att: np.ndarray, beta: float, ranked: float,
               penalty: float = 0.0) -> "_Beam":
        return _Beam(self.tokens + [token], self.logprobs + [lp], self.attention + [att], self.betas + [beta],
                     ranked, self.penalty + penalty)

    def hypothesis(self, finished: bool, score: float, L: int) -> Hypothesis:
        words = self.tokens[:-1] if finished else self.tokens
        att = np.stack(self.attention).astype(np.float32) if self.attention else np.zeros((0, L), np.float32)
        return Hypothesis(list(words), list(self.logprobs), att, np.asarray(self.betas, dtype=np.float32),
                          finished, score)


def _history(beams: list[_Beam], device) -> Tensor:
    return torch.tensor([b.tokens for b in beams], dtype=torch.long, device=device).view(len(beams), -1)


def _forced_prefix(model, features: Tensor, prefix: list[int], rules: LogitsRules, vocab: Vocabulary | None):
    """Feed <start> + prefix; returns the beam of the prefix and the state after it (and the next logits).
    Each forced word's log-prob is taken as a generated word's would be (repetition penalty included)."""
    state = model.init_state(features)
    beam = _Beam([], [], [], [])
    logits, alpha, beta, state = model.step(torch.tensor([START_ID], device=features.device), state)
    for word in prefix:
        if word in rules.banned_ids:
            name = vocab.itos[word] if vocab is not None else f"id {word}"
            raise ConfigError(f"the prefix contains {name!r}, which bad_words bans; remove it from one or the other")
        lp = log_probs(rules.reshape(logits, _history([beam], features.device)))[0, word]
        if not torch.isfinite(lp):
            raise ConfigError(f"the prefix contains a token the decoder can never produce (id {word})")
        beam = beam.extend(word, float(lp), alpha[0].float().cpu().numpy(), float(beta[0, 0]), beam.ranked + float(lp))
        logits, alpha, beta, state = model.step(torch.tensor([word], device=features.device), state)
    return beam, state, logits, alpha, beta


@dataclass
class _GroupStep:
    """One beam group's decisions at one step: kept (node, beam, decoder row), pruned and finished nodes."""
    kept: list[tuple[BeamNode, _Beam, int]]
    pruned: list[BeamNode]
    finished: list[tuple[BeamNode, _Beam]]


def _rank_group(beams: list[_Beam], first_row: int, g: int, Kg: int, logp: Tensor, allowed: Tensor,
                picked: list[int], alphas: np.ndarray, beta: Tensor, config: DecodingConfig,
                pruned: int) -> _GroupStep:
    """Group g's step, as `core.beam_search._rank_group`: its candidates (rows first_row.. of the step's
    decoder rows) lose diversity_penalty per earlier group's new beam that picked the word; <end> among the
    top Kg finishes; the Kg best others live on; the next `pruned` strongest are recorded."""
    rows = slice(first_row, first_row + len(beams))
    V = logp.shape[1]
    ranked = allowed[rows]
    times = torch.zeros(V, dtype=ranked.dtype, device=ranked.device)
    if picked:
        times = torch.bincount(torch.tensor(picked, device=logp.device), minlength=V).to(ranked)
        ranked = ranked - config.diversity_penalty * times
    prev = torch.tensor([b.ranked for b in beams], device=logp.device, dtype=logp.dtype)
    top_score, top_idx = (prev.unsqueeze(1) + ranked).view(-1).topk(min(2 * Kg + pruned, len(beams) * V))
    out = _GroupStep([], [], [])
    for rank, (score, idx) in enumerate(zip(top_score.tolist(), top_idx.tolist())):
        if score == NEG_INF:
            break
        row, word = divmod(idx, V)
        row += first_row
        penalty = config.diversity_penalty * float(times[word]) if picked else 0.0
        child = beams[row - first_row].extend(word, float(logp[row, word]), alphas[row], float(beta[row, 0]), score,
                                              penalty)
        node = BeamNode(child.tokens, score + child.penalty,
                        score / length_penalty_factor(len(child.tokens), config.length_penalty), alphas[row], row,
                        finished=word == END_ID, group=g)
        if rank < 2 * Kg and word == END_ID and rank < Kg:
            out.finished.append((node, child))
        elif rank < 2 * Kg and word != END_ID and len(out.kept) < Kg:
            out.kept.append((node, child, row))
        elif len(out.pruned) < pruned:
            out.pruned.append(node)
    return out


def trace_beam_search(model, features: Tensor, config: DecodingConfig, *, prefix: list[int] | None = None,
                      pruned: int = 3, vocab: Vocabulary | None = None) -> BeamTrace:
    """Beam search of one image's (L, C) or (1, L, C) features, recorded step by step (see the module doc).
    `vocab` (the checkpoint's Vocabulary) is needed only for bad_words."""
    rules = LogitsRules.of(config, vocab)
    if features.dim() == 2:
        features = features.unsqueeze(0)
    features = check_features(model, features)
    if features.shape[0] != 1:
        raise ConfigError(f"trace_beam_search takes one image, got {features.shape[0]}")
    prefix = list(prefix or [])
    K, T, n, lp_alpha, G = (config.beam_size, config.max_length, config.num_return_sequences,
                            config.length_penalty, config.num_beam_groups)
    if len(prefix) >= T:
        raise ConfigError(f"the prefix has {len(prefix)} words but max_length is {T} tokens including <end>")
    L, Kg = features.shape[1], K // G
    steps: list[BeamStep] = []
    pools: list[list[tuple[float, _Beam]]] = [[] for _ in range(G)]    # per group: finished, best first, <= Kg
    with eval_mode(model):
        root, state, logits, alpha, beta = _forced_prefix(model, features, prefix, rules, vocab)
        groups = [[root] for _ in range(G)]                              # one live beam per group at first
        index = torch.zeros(G, dtype=torch.long, device=features.device)
        state = DecoderState(state.h[index], state.c[index], state.features, state.att_features)
        logits, alpha, beta = logits[index], alpha[index], beta[index]
        ran_out = False
        for t in range(len(prefix), T):
            beams = [b for group in groups for b in group]
            history = _history(beams, features.device)
            logp = log_probs(rules.reshape(logits, history))                            # (rows, V)
            allowed = rules.constrain(logp, history, t)
            alphas = alpha.float().cpu().numpy()
            step, picked, first_row, rows = BeamStep(t, [], [], []), [], 0, []
            for g, group in enumerate(groups):
                if group:
                    ranked = _rank_group(group, first_row, g, Kg, logp, allowed, picked, alphas, beta, config, pruned)
                    first_row += len(group)
                else:
                    ranked = _GroupStep([], [], [])
                step.kept += [node for node, _, _ in ranked.kept]
                step.pruned += ranked.pruned
                step.finished += [node for node, _ in ranked.finished]
                pools[g] = sorted(pools[g] + [(node.score, b) for node, b in ranked.finished], key=lambda p: -p[0])[:Kg]
                groups[g] = [b for _, b, _ in ranked.kept]
                rows += [row for _, _, row in ranked.kept]
                picked += [b.tokens[-1] for b in groups[g]]
            step.pruned = sorted(step.pruned, key=lambda node: -node.score)[:pruned]
            steps.append(step)
            if t == T - 1:
                ran_out = True
                break
            live = [b for group in groups for b in group]
            if not live:
                break
            best = sorted((s for pool in pools for s, _ in pool), reverse=True)
            bound = max(b.ranked for b in live) / max(length_penalty_factor(t + 2, lp_alpha),
                                                      length_penalty_factor(T, lp_alpha))
            if len(best) >= n and bound <= best[n - 1]:
                break
            index = torch.tensor(rows, device=features.device)
            state = DecoderState(state.h.index_select(0, index), state.c.index_select(0, index),
                                 state.features, state.att_features)
            tokens = torch.tensor([b.tokens[-1] for b in live], device=features.device)
            logits, alpha, beta, state = model.step(tokens, state)
    candidates = [b.hypothesis(True, s, L) for pool in pools for s, b in pool]
    if ran_out:
        penalty = length_penalty_factor(T, lp_alpha)
        candidates += [b.hypothesis(False, b.ranked / penalty, L) for group in groups for b in group]
    hypotheses = sorted(candidates, key=lambda h: -h.score)[:n]
    return BeamTrace(steps, hypotheses, prefix)


def _sample_from_prefix(model, features: Tensor, config: DecodingConfig, prefix: list[int], rules: LogitsRules,
                        vocab: Vocabulary | None) -> list[Hypothesis]:
    """num_return_sequences samples that all start with the prefix, drawn as `core.decoding.sample` draws
    (temperature, repetition penalty, the constraints, then top_k and top_p; seed honoured)."""
    generator = torch.Generator(device=features.device)
    generator.manual_seed(config.seed) if config.seed is not None else generator.seed()
    root, state, logits, alpha, beta = _forced_prefix(model, features, prefix, rules, vocab)
    out = []
    for _ in range(config.num_return_sequences):
        beam, s, lg, al, be = root, state, logits, alpha, beta
        finished = False
        for t in range(len(prefix), config.max_length):
            history = _history([beam], features.device)
            logp = log_probs(rules.reshape(lg, history), config.temperature)
            scores = rules.constrain(logp, history, t)
            word = int(torch.multinomial(sampling_probs(scores, config), 1, generator=generator))
            beam = beam.extend(word, float(logp[0, word]), al[0].float().cpu().numpy(), float(be[0, 0]), 0.0)
            if word == END_ID:
                finished = True
                break
            lg, al, be, s = model.step(torch.tensor([word], device=features.device), s)
        score = beam.total / length_penalty_factor(len(beam.tokens), config.length_penalty)
        out.append(beam.hypothesis(finished, score, features.shape[1]))
    return sorted(out, key=lambda h: -h.score)


def continue_caption(model, features: Tensor, config: DecodingConfig, prefix: list[int], *,
                     vocab: Vocabulary | None = None) -> list[Hypothesis]:
    """n-best captions that start with `prefix` (word ids), decoded with `config` from there on. `vocab`
    (the checkpoint's Vocabulary) is needed only for bad_words."""
    if not prefix:
        raise ConfigError("the prefix is empty: type the first words of the caption")
    rules = LogitsRules.of(config, vocab)
    if config.mode == "sample":
        if len(prefix) >= config.max_length:
            raise ConfigError(f"the prefix has {len(prefix)} words but max_length is {config.max_length} "
                              "tokens including <end>")
        feats = check_features(model, features.unsqueeze(0) if features.dim() == 2 else features)
        with eval_mode(model):
            return _sample_from_prefix(model, feats, config, list(prefix), rules, vocab)
    return trace_beam_search(model, features, config, prefix=prefix, vocab=vocab).hypotheses
