"""Beam search, twice: batched over images and beams (what the product runs) and plainly, one image and one
beam at a time (`reference_beam_search`, to read and to test against), the way nanoGPT keeps its manual
attention beside the fused kernel. Both follow the same rules, so they return the same hypotheses:

* Each step, the extensions of an image's live beams are ranked by summed log-prob. As in fairseq / Hugging
  Face, an <end> candidate ranked among the top K becomes a finished hypothesis (the K best finished are
  kept, with their length-penalised score); the K best candidates that are not <end> become the next beams.
  At t = 0 there is one beam, so the beams start out different. With K = 1 this is exactly greedy search.
* Stopping (exact, never changes the answer): an image stops once it has num_return_sequences finished
  hypotheses and no live beam can still beat the worst of them. A live beam's summed log-prob can only
  fall, so its best possible final score is logprob / max(penalty(t + 2), penalty(max_length)).
* Beams still live at max_length are returned as unfinished hypotheses competing on the same score.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from core.decoding_rules import (NEG_INF, DecodingConfig, Hypothesis, block_repeated_ngrams, check_features,
                                 eval_mode, length_penalty_factor, log_probs)
from core.model import DecoderState
from core.text import END_ID, START_ID


@dataclass
class BeamHistories:
    """What each hypothesis emitted so far, one row per hypothesis (leading dims: any shape): token ids,
    their log-probs, and the attention row α and gate β behind each token, over max_length steps."""
    tokens: Tensor      # (..., T) long
    logprobs: Tensor    # (..., T)
    attention: Tensor   # (..., T, L)
    betas: Tensor       # (..., T)

    @classmethod
    def zeros(cls, leading: tuple[int, ...], steps: int, regions: int, like: Tensor) -> "BeamHistories":
        return cls(torch.zeros((*leading, steps), dtype=torch.long, device=like.device),
                   like.new_zeros((*leading, steps)), like.new_zeros((*leading, steps, regions)),
                   like.new_zeros((*leading, steps)))

    def parts(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return self.tokens, self.logprobs, self.attention, self.betas

    def select(self, indices: Tensor) -> "BeamHistories":
        """The rows at `indices` (a copy; the result's leading dims are the shape of `indices`)."""
        return BeamHistories(*(part[indices] for part in self.parts()))

    def extend(self, indices: Tensor, t: int, tokens: Tensor, logprobs: Tensor, alpha: Tensor,
               beta: Tensor) -> "BeamHistories":
        """The rows at `indices`, each followed by step t's token, its log-prob and the α row and β of the
        decoder row it came from (alpha (R, L) and beta (R,) are indexed by the same `indices`)."""
        out = self.select(indices)
        out.tokens[..., t], out.logprobs[..., t] = tokens, logprobs
        out.attention[..., t, :], out.betas[..., t] = alpha[indices], beta[indices]
        return out

    def put(self, where: Tensor, other: "BeamHistories") -> None:
        for part, new in zip(self.parts(), other.parts()):
            part[where] = new

    def numpy(self) -> "BeamHistories":
        """The same histories as numpy arrays (one device-to-host copy per part, for `hypothesis`)."""
        return BeamHistories(*(part.cpu().numpy() for part in self.parts()))

    def hypothesis(self, index: tuple, length: int, finished: bool, score: float) -> Hypothesis:
        """Row `index` (of the `numpy()` form) as a Hypothesis of `length` emitted tokens, the last one
        <end> when finished."""
        tokens, logprobs, attention, betas = (part[index] for part in self.parts())
        words = length - 1 if finished else length
        return Hypothesis(token_ids=tokens[:words].tolist(), token_logprobs=logprobs[:length].tolist(),
                          attention=attention[:length].copy(), betas=betas[:length].copy(), finished=finished,
                          score=score)


@dataclass
class _Finished:
    """Per image, the K best finished hypotheses so far, best first (score -inf = an empty slot)."""
    score: Tensor            # (B, K)
    length: Tensor           # (B, K) emitted tokens incl. <end>
    hist: BeamHistories      # (B, K, ...)

    def merge(self, images: Tensor, score: Tensor, length: Tensor, hist: BeamHistories) -> None:
        """Add the candidates (A, K) of the active `images`, keeping each image's K best."""
        A, K = score.shape
        merged, order = torch.cat([self.score[images], score], 1).topk(K, dim=1)
        flat = order + torch.arange(A, device=order.device).unsqueeze(1) * (2 * K)   # rows of the (A*2K) union
        union = BeamHistories(*(torch.cat([old[images], new], 1).flatten(0, 1)
                                for old, new in zip(self.hist.parts(), hist.parts())))
        self.hist.put(images, union.select(flat))
        self.length[images] = torch.cat([self.length[images], length], 1).flatten().gather(0, flat.flatten()) \
            .view(A, K)
        self.score[images] = merged


@dataclass
class _Live:
    """The beams still searching: K decoder rows per active image, in image order."""
    images: Tensor          # (A,) which images
    logp: Tensor            # (A, K) summed log-prob of each beam (-inf = no beam)
    tokens: Tensor          # (A*K,) last token of each row
    state: DecoderState     # A*K rows; the K rows of an image share its features (grouped form)
    hist: BeamHistories     # (A*K, ...)

    def keep_images(self, keep: Tensor, K: int) -> "_Live":
        rows = (keep.unsqueeze(1) * K + torch.arange(K, device=keep.device)).reshape(-1)
        s = self.state
        return _Live(self.images[keep], self.logp[keep], self.tokens[rows],
                     DecoderState(s.h[rows], s.c[rows], s.features[keep], s.att_features[keep]),
                     self.hist.select(rows))


def beam_search(model: nn.Module, features: Tensor, config: DecodingConfig) -> list[list[Hypothesis]]:
    """Beam search batched over images and beams: B*K decoder rows, one `model.step` per time step.

    The rules are the module docstring's (and `reference_beam_search`'s). Each step makes one topk over the
    K*V extensions of every image; images that stop leave the batch, so the rest run faster.
    """
    features = check_features(model, features)
    B, L, _ = features.shape
    if B == 0:
        return []
    K, T = config.beam_size, config.max_length
    with eval_mode(model):
        live = _start(model, features, K, T)
        finished = _Finished(features.new_full((B, K), NEG_INF),
                             torch.zeros((B, K), dtype=torch.long, device=features.device),
                             BeamHistories.zeros((B, K), T, L, features))
        for t in range(T):
            live = _step(model, live, finished, t, config)
            if t == T - 1:
                return _collect(finished, live, config)
            live = _drop_stopped(live, finished, t, config)
            if live is None:
                break
    return _collect(finished, None, config)


def _start(model: nn.Module, features: Tensor, K: int, T: int) -> _Live:
    B, L, _ = features.shape
    state = model.init_state(features)     # K rows per image share its features: no B*K*L*C copy
    state = state._replace(h=state.h.repeat_interleave(K, dim=0), c=state.c.repeat_interleave(K, dim=0))
    logp = features.new_full((B, K), NEG_INF)
    logp[:, 0] = 0.0                       # one live beam at t = 0
    tokens = torch.full((B * K,), START_ID, dtype=torch.long, device=features.device)
    return _Live(torch.arange(B, device=features.device), logp, tokens, state,
                 BeamHistories.zeros((B * K,), T, L, features))


def _step(model: nn.Module, live: _Live, finished: _Finished, t: int, config: DecodingConfig) -> _Live:
    """One time step for every active image: rank the extensions, finish the <end> ones, advance the rest."""
    A, K = live.logp.shape
    V = model.config.vocab_size
    logits, alpha, beta, state = model.step(live.tokens, live.state)
    logp = log_probs(logits)                                                     # (A*K, V)
    allowed = block_repeated_ngrams(logp, live.hist.tokens[:, :t], config.no_repeat_ngram_size)
    top_score, top_idx = (live.logp.reshape(-1, 1) + allowed).view(A, K * V).topk(min(2 * K, K * V), dim=1)
    rows = top_idx // V + torch.arange(A, device=logp.device).unsqueeze(1) * K  # decoder row of the origin beam
    top_tok = top_idx % V
    top_lp = logp[rows, top_tok]                                                 # the model's log-prob of it
    is_end = top_tok == END_ID
    beta = beta.squeeze(1)

    # 1) <end> among the top K ranks -> finished
    new = is_end[:, :K] & torch.isfinite(top_score[:, :K])
    if bool(new.any()):
        score = torch.where(new, top_score[:, :K] / length_penalty_factor(t + 1, config.length_penalty),
                            torch.full_like(top_score[:, :K], NEG_INF))
        hist = live.hist.extend(rows[:, :K], t, top_tok[:, :K], top_lp[:, :K], alpha, beta)
        finished.merge(live.images, score, torch.full_like(top_tok[:, :K], t + 1), hist)

    # 2) the K best non-<end> candidates live on (at most K of the 2K are <end>: one per beam)
    width = top_score.shape[1]
    rank = torch.arange(width, device=logp.device).expand_as(top_score)
    key = torch.where(is_end, rank + width, rank).topk(K, dim=1, largest=False).values
    keep = key % width                       # key >= width only for a vocabulary smaller than 2K+3
    new_rows = rows.gather(1, keep).reshape(-1)
    tokens = top_tok.gather(1, keep).reshape(-1)
    hist = live.hist.extend(new_rows, t, tokens, top_lp.gather(1, keep).reshape(-1), alpha, beta)
    # beams never leave their image and the K rows of an image share its features: only h, c are reordered
    state = state._replace(h=state.h.index_select(0, new_rows), c=state.c.index_select(0, new_rows))
    return _Live(live.images, top_score.gather(1, keep).masked_fill(key >= width, NEG_INF), tokens, state, hist)


def _drop_stopped(live: _Live, finished: _Finished, t: int, config: DecodingConfig) -> _Live | None:
    """Remove the images whose n-th best finished hypothesis no live beam can beat (None: all stopped)."""
    lp, T = config.length_penalty, config.max_length
    bound = live.logp.max(dim=1).values / max(length_penalty_factor(t + 2, lp), length_penalty_factor(T, lp))
    done = (bound <= finished.score[live.images, config.num_return_sequences - 1]) | torch.isneginf(bound)
    if not bool(done.any()):
        return live
    keep = (~done).nonzero().squeeze(1)
    return live.keep_images(keep, config.beam_size) if keep.numel() else None


def _collect(finished: _Finished, ran_out: _Live | None, config: DecodingConfig) -> list[list[Hypothesis]]:
    """Python objects, once, at the end: the n best of finished + (if max_length was hit) unfinished beams."""
    B, K = finished.score.shape
    scores, lengths = finished.score.cpu().numpy(), finished.length.cpu().numpy()
    pool = finished.hist.numpy()
    candidates: list[list[Hypothesis]] = [[] for _ in range(B)]
    for b in range(B):
        for k in range(K):
            if np.isfinite(scores[b, k]):
                candidates[b].append(pool.hypothesis((b, k), int(lengths[b, k]), True, float(scores[b, k])))
    if ran_out is not None:
        T = config.max_length
        penalty = length_penalty_factor(T, config.length_penalty)
        logp, rows = ran_out.logp.cpu().numpy(), ran_out.hist.numpy()
        for i, b in enumerate(ran_out.images.tolist()):
            for k in range(K):
                if np.isfinite(logp[i, k]):
                    candidates[b].append(rows.hypothesis((i * K + k,), T, False, float(logp[i, k]) / penalty))
    # stable sort: on equal scores a finished hypothesis (added first) wins
    return [sorted(c, key=lambda h: -h.score)[:config.num_return_sequences] for c in candidates]


# -- the plain version --------------------------------------------------------------------------------------

@dataclass
class _Beam:
    """One live hypothesis of the reference search: its histories and the decoder state after them."""
    tokens: list[int]
    logprobs: list[float]
    alphas: list[np.ndarray]
    betas: list[float]
    state: DecoderState

    @property
    def logprob(self) -> float:
        return float(sum(self.logprobs))

    def as_hypothesis(self, finished: bool, length_penalty: float) -> Hypothesis:
        words = self.tokens[:-1] if finished else self.tokens
        return Hypothesis(token_ids=list(words), token_logprobs=list(self.logprobs),
                          attention=np.stack(self.alphas).astype(np.float32),
                          betas=np.asarray(self.betas, dtype=np.float32), finished=finished,
                          score=self.logprob / length_penalty_factor(len(self.logprobs), length_penalty))


def _repeats_ngram(tokens: list[int], word: int, n: int) -> bool:
    """Would `tokens + [word]` contain the same n-gram twice?"""
    if n <= 0 or len(tokens) < n:
        return False
    tail = tokens[len(tokens) - n + 1:] + [word] if n > 1 else [word]
    return any(tokens[i:i + n] == tail for i in range(len(tokens) - n + 1))


def reference_beam_search(model: nn.Module, features: Tensor, config: DecodingConfig, *,
                          stop_early: bool = True) -> list[Hypothesis]:
    """The n-best of ONE image's (L, C) features, by the rules of `beam_search`, one beam at a time.

    Slow and plain on purpose: it is what the batched search is tested against (`stop_early=False` runs
    every image to max_length, which checks that the stopping rule never changes the answer) and the
    baseline `bench/` measures the batched search against.
    """
    K, T, lp = config.beam_size, config.max_length, config.length_penalty
    features = check_features(model, features.unsqueeze(0))
    with eval_mode(model):
        beams = [_Beam([], [], [], [], model.init_state(features))]
        done: list[Hypothesis] = []
        for t in range(T):
            candidates = []                  # (summed log-prob, beam, word, its log-prob, α, β, state)
            for beam in beams:
                last = beam.tokens[-1] if beam.tokens else START_ID
                logits, alpha, beta, state = model.step(torch.tensor([last], device=features.device), beam.state)
                logp = log_probs(logits)[0]
                kept = 0                     # a beam's 2K best words hold all of its words that can rank in the top 2K
                for word in logp.argsort(descending=True).tolist():
                    word_lp = float(logp[word])
                    if word_lp == NEG_INF or kept == 2 * K:
                        break
                    if not _repeats_ngram(beam.tokens, word, config.no_repeat_ngram_size):
                        candidates.append((beam.logprob + word_lp, beam, word, word_lp, alpha[0], beta[0, 0], state))
                        kept += 1
            candidates.sort(key=lambda c: -c[0])
            beams = []
            for rank, (_, beam, word, word_lp, alpha, beta, state) in enumerate(candidates):
                grown = _Beam(beam.tokens + [word], beam.logprobs + [word_lp],
                              beam.alphas + [alpha.float().cpu().numpy()], beam.betas + [float(beta)], state)
                if word == END_ID:
                    if rank < K:
                        done.append(grown.as_hypothesis(True, lp))
                elif len(beams) < K:
                    beams.append(grown)
                if len(beams) == K and rank >= K - 1:
                    break
            done = sorted(done, key=lambda h: -h.score)[:K]
            if not beams:
                break
            best_possible = max(b.logprob for b in beams) / max(length_penalty_factor(t + 2, lp),
                                                                length_penalty_factor(T, lp))
            if stop_early and t < T - 1 and len(done) >= config.num_return_sequences \
                    and best_possible <= done[config.num_return_sequences - 1].score:
                break
        else:
            done += [b.as_hypothesis(False, lp) for b in beams]
    return sorted(done, key=lambda h: -h.score)[:config.num_return_sequences]
