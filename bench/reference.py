"""The baselines: decoding the way the reference Show-Attend-Tell eval does it, one image at a time.

`reference_beam_search` is the per-image loop of sgrvinod's a-PyTorch-Tutorial-to-Image-Captioning
(`eval.py` / `caption.py`): the K beams of ONE image are the batch, the encoder-side attention projection
W_a a_i is recomputed at every step (its `Attention.forward` does so), and the beam bookkeeping (which
candidates finish, which live on) is Python work per beam. The search rule itself is the one
`core.decoding.beam_search` implements (2K candidates, <end> in the top K finishes, the K best others live
on, the same exact stopping bound), so both must return the same captions: the comparison measures the
implementation, not a different algorithm.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from core.decoding import NEG_INF, length_penalty_factor
from core.model import DecoderState, ShowAttendTell


def reference_beam_search(model: ShowAttendTell, features: Tensor, *, beam_size: int, max_length: int,
                          banned: list[int], start_id: int = 1, end_id: int = 2,
                          length_penalty: float = 0.0) -> list[int]:
    """Best caption (word ids) of one image's (L, C) features; model in eval mode, grad as the caller set."""
    K, T, V = beam_size, max_length, model.config.vocab_size
    encoder_out = features.unsqueeze(0)                                   # (1, L, C)
    mean = encoder_out.mean(dim=1)
    h, c = model.init_h(mean), model.init_c(mean)
    beams = [(0.0, [start_id])]                                           # (summed log-prob, tokens)
    finished: list[tuple[float, list[int]]] = []                         # (score, words)
    ran_out = False
    for t in range(T):
        n = len(beams)
        enc = encoder_out.expand(n, -1, -1)
        state = DecoderState(h, c, enc, model.attention.encoder_proj(enc))   # recomputed every step
        tokens = torch.tensor([b[1][-1] for b in beams])
        logits, _, _, state = model.step(tokens, state)
        logits = logits.clone()
        logits[:, banned] = NEG_INF
        logp = torch.log_softmax(logits, dim=-1)
        prev = torch.tensor([b[0] for b in beams]).unsqueeze(1)
        top_score, top_idx = (prev + logp).view(-1).topk(min(2 * K, n * V))
        survivors, keep_rows = [], []
        for rank, (score, idx) in enumerate(zip(top_score.tolist(), top_idx.tolist())):
            if score == NEG_INF:
                break
            row, word = divmod(idx, V)
            if word == end_id:
                if rank < K:
                    finished.append((score / length_penalty_factor(t + 1, length_penalty), beams[row][1][1:]))
                continue
            if len(survivors) < K:
                survivors.append((score, beams[row][1] + [word]))
                keep_rows.append(row)
        finished = sorted(finished, key=lambda f: -f[0])[:K]
        if t == T - 1:
            beams, ran_out = survivors, True
            break
        if not survivors:
            beams = []
            break
        bound = max(s for s, _ in survivors) / max(length_penalty_factor(t + 2, length_penalty),
                                                   length_penalty_factor(T, length_penalty))
        beams = survivors
        rows = torch.tensor(keep_rows)
        h, c = state.h.index_select(0, rows), state.c.index_select(0, rows)
        if finished and bound <= finished[0][0]:
            break
    candidates = list(finished)
    if ran_out:
        penalty = length_penalty_factor(T, length_penalty)
        candidates += [(s / penalty, toks[1:]) for s, toks in beams if math.isfinite(s)]
    return sorted(candidates, key=lambda f: -f[0])[0][1] if candidates else []
