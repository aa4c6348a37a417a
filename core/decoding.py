"""Turning a trained decoder into captions: greedy search, batched beam search and sampling.

All three drive `ShowAttendTell.step` one token at a time and record, per emitted token, its log-probability,
the attention row α_t (what the model looked at) and the gate β_t, so the dashboard can show *why* a word
was chosen. Conventions shared by every strategy:

* `max_length` counts generated tokens including the final <end>: a finished caption has at most
  max_length - 1 words; a hypothesis still running at max_length is returned with `finished=False`.
* <pad>, <start> and <unk> (`core.text.NEVER_GENERATED_IDS`) can never be generated: their logits are set
  to -inf before the softmax, so token log-probs are over the tokens a caption may contain.
* `no_repeat_ngram_size`, `min_length` and `bad_words` are search constraints: a blocked token is excluded
  from the choice, but the distribution is not renormalised, so reported log-probs stay the model's own.
  `repetition_penalty` (like a sampling temperature) reshapes the distribution the log-probs are of; the
  rules of these Hugging Face knobs live in `core.logits_rules`.
* score = sum of token log-probs / ((5 + length) / 6) ** length_penalty (GNMT, Wu et al. 2016), where
  length counts the emitted tokens (incl. <end>); length_penalty = 0 ranks by the raw sum.

The shared rules live in `core.decoding_rules`, the beam search (batched, and its plain per-image
reference) in `core.beam_search`; this module is the public face: import everything from here.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import Tensor, nn

from core.beam_search import beam_search, reference_beam_search
from core.decoding_rules import (NEG_INF, DecodingConfig, Hypothesis, check_features, eval_mode,
                                 length_penalty_factor, log_probs)
from core.logits_rules import LogitsRules, nucleus
from core.text import END_ID, START_ID, Vocabulary

__all__ = ["NEG_INF", "DecodingConfig", "Hypothesis", "beam_search", "generate", "greedy",
           "length_penalty_factor", "reference_beam_search", "sample", "sampling_probs"]


# -- greedy and sampling: one path per row -----------------------------------------------------------------

def _decode_paths(model: nn.Module, features: Tensor, config: DecodingConfig, rules: LogitsRules,
                  pick: Callable[[Tensor], Tensor], temperature: float) -> list[Hypothesis]:
    """Run every row until it emits <end> (or max_length); `pick` chooses the next token from (R, V) scores.

    Finished rows leave the batch (the state is compacted once an eighth of the live rows is done), so a
    batch costs its captions' lengths, not R times the longest one's."""
    R, T = features.shape[0], config.max_length
    device = features.device
    state = model.init_state(features)
    live = torch.arange(R, device=device)                 # original row of each live row
    tokens = torch.full((R,), START_ID, dtype=torch.long, device=device)
    history = tokens.new_zeros((R, 0))                    # of the live rows
    done = torch.zeros(R, dtype=torch.bool, device=device)
    tok = torch.full((R, T), END_ID, dtype=torch.long, device=device)
    lp = torch.zeros((R, T), device=device)
    att = torch.zeros((R, T, features.shape[1]), device=device)
    bet = torch.zeros((R, T), device=device)
    steps = 0
    for t in range(T):
        logits, alpha, beta, state = model.step(tokens, state)
        logp = log_probs(rules.reshape(logits, history), temperature)
        scores = rules.constrain(logp, history, t)
        tokens = pick(scores)
        tok[live, t] = tokens
        lp[live, t] = logp.gather(1, tokens[:, None]).squeeze(1).float()
        att[live, t] = alpha.float()
        bet[live, t] = beta.squeeze(1).float()
        history = torch.cat([history, tokens[:, None]], dim=1)
        done |= tokens == END_ID
        steps = t + 1
        n_done = int(done.sum())
        if n_done == len(live):
            break
        if n_done * 8 >= len(live):                      # drop the finished rows from the batch
            keep = (~done).nonzero().squeeze(1)
            live, tokens, history = live[keep], tokens[keep], history[keep]
            state = state.index_select(keep)
            done = done[keep]
    tok, lp = tok[:, :steps].cpu().numpy(), lp[:, :steps].cpu().numpy()
    att, bet = att[:, :steps].cpu().numpy(), bet[:, :steps].cpu().numpy()
    out = []
    for r in range(R):
        ends = np.flatnonzero(tok[r] == END_ID)
        finished = ends.size > 0      # every END in tok was emitted: a row is written until it ends
        row_steps = int(ends[0]) + 1 if finished else steps
        token_logprobs = [float(x) for x in lp[r, :row_steps]]
        score = float(np.sum(lp[r, :row_steps], dtype=np.float64)) / length_penalty_factor(row_steps,
                                                                                          config.length_penalty)
        out.append(Hypothesis(token_ids=[int(x) for x in tok[r, :row_steps - 1 if finished else row_steps]],
                              token_logprobs=token_logprobs, attention=att[r, :row_steps].copy(),
                              betas=bet[r, :row_steps].copy(), finished=finished, score=score))
    return out


def greedy(model: nn.Module, features: Tensor, config: DecodingConfig,
           vocab: Vocabulary | None = None) -> list[list[Hypothesis]]:
    """Argmax at every step: one hypothesis per image (honours the constraints, the repetition penalty and
    max_length). `vocab` (the checkpoint's Vocabulary) is needed only for bad_words."""
    rules = LogitsRules.of(config, vocab)
    features = check_features(model, features)
    if features.shape[0] == 0:
        return []
    with eval_mode(model):
        hyps = _decode_paths(model, features, config, rules, lambda s: s.argmax(dim=1), 1.0)
    return [[h] for h in hyps]


def sampling_probs(scores: Tensor, config: DecodingConfig) -> Tensor:
    """The distribution a sample is drawn from: softmax of the (tempered, constrained) log-probs (R, V) after
    top_k, then top_p (Hugging Face's order)."""
    if 0 < config.top_k < scores.shape[1]:
        kth = scores.topk(config.top_k, dim=1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, NEG_INF)
    return nucleus(scores, config.top_p).softmax(dim=1)


def sample(model: nn.Module, features: Tensor, config: DecodingConfig,
           vocab: Vocabulary | None = None) -> list[list[Hypothesis]]:
    """Ancestral sampling from softmax(logits / temperature), optionally restricted to the top_k tokens and
    then to the top_p nucleus (Hugging Face's order: temperature, top-k, top-p).

    `num_return_sequences` independent samples per image, sorted by score. A seeded torch.Generator makes
    the result reproducible for a given seed (on the same device and torch version).
    """
    rules = LogitsRules.of(config, vocab)
    features = check_features(model, features)
    B, n = features.shape[0], config.num_return_sequences
    if B == 0:
        return []
    generator = torch.Generator(device=features.device)
    if config.seed is None:
        generator.seed()
    else:
        generator.manual_seed(config.seed)

    def pick(scores: Tensor) -> Tensor:
        return torch.multinomial(sampling_probs(scores, config), 1, generator=generator).squeeze(1)

    with eval_mode(model):
        rows = features.repeat_interleave(n, dim=0)
        hyps = _decode_paths(model, rows, config, rules, pick, config.temperature)
    return [sorted(hyps[i * n:(i + 1) * n], key=lambda h: -h.score) for i in range(B)]


def generate(model: nn.Module, features: Tensor, config: DecodingConfig,
             vocab: Vocabulary | None = None) -> list[list[Hypothesis]]:
    """Caption a batch of encoded images (B, L, C): per image, num_return_sequences hypotheses, best first.

    Dispatch on `config.mode`: "sample" -> `sample`, "greedy" -> `greedy`, "beam" -> `beam_search` (diverse
    when num_beam_groups > 1). `vocab` (the checkpoint's core.text.Vocabulary) resolves bad_words.
    """
    strategy = {"sample": sample, "greedy": greedy, "beam": beam_search}[config.mode]
    return strategy(model, features, config, vocab)
