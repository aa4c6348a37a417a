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
* Diverse beam search (num_beam_groups G > 1, Hugging Face's group beam search): the K beams form G groups
  of K/G, each run by the rules above (its own K/G finished, one beam at t = 0), group after group within a
  step; a group's candidates lose diversity_penalty per earlier group's new beam ending in the same word
  (Hamming diversity), and scores carry that penalty. The n-best list is the best of all groups' hypotheses;
  an image stops when no live beam of any group can beat its n-th best.
* The per-step rules of repetition_penalty, min_length and bad_words are `core.logits_rules`'.
* The length penalty α never steers the live beams (they are ranked by summed log-prob): it only scores the
  finished hypotheses, decides which K are kept, and decides when an image stops. So one search can serve
  several α (`beam_search_penalties`): each α keeps its own finished lists and its own stopped images (an
  image stopped for α is frozen for α, as a lone search would have dropped it), and the live beams run
  until every α has stopped. Each α gets exactly the n-best of a search run with that α alone.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from core.decoding_rules import (NEG_INF, DecodingConfig, Hypothesis, check_features, eval_mode,
                                 length_penalty_factor, log_probs)
from core.logits_rules import LogitsRules, diversity_counts
from core.model import DecoderState
from core.text import END_ID, START_ID, Vocabulary


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
class _Ranking:
    """What one length penalty α decides: the setting with that α, its K best finished hypotheses per image
    and group, and the images it has stopped (frozen from then on, as a lone search would drop them)."""
    config: DecodingConfig
    finished: _Finished
    stopped: Tensor          # (B,) bool


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


def beam_search(model: nn.Module, features: Tensor, config: DecodingConfig,
                vocab: Vocabulary | None = None) -> list[list[Hypothesis]]:
    """Beam search batched over images and beams: B*K decoder rows, one `model.step` per time step.

    The rules are the module docstring's (and `reference_beam_search`'s). Each step makes one topk per beam
    group over its K/G*V extensions of every image; images that stop leave the batch, so the rest run faster.
    `vocab` (the checkpoint's Vocabulary) is needed only for bad_words.
    """
    return beam_search_penalties(model, features, config, [config.length_penalty], vocab)[0]


def beam_search_penalties(model: nn.Module, features: Tensor, config: DecodingConfig,
                          length_penalties: Sequence[float],
                          vocab: Vocabulary | None = None) -> list[list[list[Hypothesis]]]:
    """One batched beam search, read under each length penalty α: per α (in order), exactly what
    `beam_search` returns for `config` with that α (the module docstring says why α can share the search).
    Costs about the search of the α that stops last, plus a finished-list merge per α and step."""
    rules = LogitsRules.of(config, vocab)
    features = check_features(model, features)
    B, L, _ = features.shape
    if B == 0:
        return [[] for _ in length_penalties]
    K, T, G = config.beam_size, config.max_length, config.num_beam_groups
    rankings = [_Ranking(dataclasses.replace(config, length_penalty=float(a)),
                         _Finished(features.new_full((B * G, K // G), NEG_INF),  # row b*G + g: image b, group g
                                   torch.zeros((B * G, K // G), dtype=torch.long, device=features.device),
                                   BeamHistories.zeros((B * G, K // G), T, L, features)),
                         torch.zeros(B, dtype=torch.bool, device=features.device)) for a in length_penalties]
    with eval_mode(model):
        live = _start(model, features, K, G, T)
        for t in range(T):
            live = _step(model, live, rankings, t, config, rules)
            if t == T - 1:
                return [_collect(r.finished, live, r.config, r.stopped) for r in rankings]
            live = _drop_stopped(live, rankings, t, config)
            if live is None:
                break
    return [_collect(r.finished, None, r.config, r.stopped) for r in rankings]


def _start(model: nn.Module, features: Tensor, K: int, G: int, T: int) -> _Live:
    B, L, _ = features.shape
    state = model.init_state(features)     # K rows per image share its features: no B*K*L*C copy
    state = state._replace(h=state.h.repeat_interleave(K, dim=0), c=state.c.repeat_interleave(K, dim=0))
    logp = features.new_full((B, K), NEG_INF)
    logp[:, ::K // G] = 0.0                # one live beam per group at t = 0
    tokens = torch.full((B * K,), START_ID, dtype=torch.long, device=features.device)
    return _Live(torch.arange(B, device=features.device), logp, tokens, state,
                 BeamHistories.zeros((B * K,), T, L, features))


def _step(model: nn.Module, live: _Live, rankings: list[_Ranking], t: int, config: DecodingConfig,
          rules: LogitsRules) -> _Live:
    """One time step for every active image, group after group: rank the group's extensions, finish the
    <end> ones, advance the rest. A group's scores lose diversity_penalty per earlier group's new beam that
    picked the same word at this step (Hugging Face's group beam search; one group = plain beam search)."""
    A, K = live.logp.shape
    G, V = config.num_beam_groups, model.config.vocab_size
    logits, alpha, beta, state = model.step(live.tokens, live.state)
    history = live.hist.tokens[:, :t]
    logp = log_probs(rules.reshape(logits, history))                             # (A*K, V)
    scores = (live.logp.reshape(-1, 1) + rules.constrain(logp, history, t)).view(A, G, K // G, V)
    beta = beta.squeeze(1)
    kept: list[tuple[Tensor, ...]] = []     # per group: decoder rows, tokens, token log-probs, summed scores
    for g in range(G):
        group = scores[:, g]
        if g:
            tokens, sums = torch.cat([k[1] for k in kept], 1), torch.cat([k[3] for k in kept], 1)
            counts = diversity_counts(tokens, torch.isfinite(sums), V)
            group = group - config.diversity_penalty * counts.unsqueeze(1)
        kept.append(_rank_group(group, g, logp, live, rankings, t, config, alpha, beta))
    rows, tokens, token_lp, sums = (torch.cat(parts, 1).reshape(-1) for parts in zip(*kept))
    hist = live.hist.extend(rows, t, tokens, token_lp, alpha, beta)
    # beams never leave their image and the K rows of an image share its features: only h, c are reordered
    state = state._replace(h=state.h.index_select(0, rows), c=state.c.index_select(0, rows))
    return _Live(live.images, sums.view(A, K), tokens, state, hist)


def _rank_group(group: Tensor, g: int, logp: Tensor, live: _Live, rankings: list[_Ranking], t: int,
                config: DecodingConfig, alpha: Tensor, beta: Tensor) -> tuple[Tensor, ...]:
    """Group g's step: its (A, Kg, V) candidate scores -> finished <end>s (scored and kept under each α that
    has not stopped the image), and its Kg next beams as (decoder rows, tokens, token log-probs, summed
    scores), each (A, Kg)."""
    A, Kg, V = group.shape
    K = live.logp.shape[1]
    top_score, top_idx = group.reshape(A, Kg * V).topk(min(2 * Kg, Kg * V), dim=1)
    rows = top_idx // V + g * Kg + torch.arange(A, device=logp.device).unsqueeze(1) * K  # row of the origin beam
    top_tok = top_idx % V
    top_lp = logp[rows, top_tok]                                                 # the model's log-prob of it
    is_end = top_tok == END_ID

    # 1) <end> among the group's top Kg ranks -> finished
    new = is_end[:, :Kg] & torch.isfinite(top_score[:, :Kg])
    if bool(new.any()):
        hist = live.hist.extend(rows[:, :Kg], t, top_tok[:, :Kg], top_lp[:, :Kg], alpha, beta)
        length = torch.full_like(top_tok[:, :Kg], t + 1)
        targets = live.images * config.num_beam_groups + g
        for ranking in rankings:
            score = torch.where(new, top_score[:, :Kg] / length_penalty_factor(t + 1, ranking.config.length_penalty),
                                torch.full_like(top_score[:, :Kg], NEG_INF))
            open_ = ~ranking.stopped[live.images]
            if bool(open_.all()):
                ranking.finished.merge(targets, score, length, hist)
            elif bool((new & open_.unsqueeze(1)).any()):
                idx = open_.nonzero().squeeze(1)
                ranking.finished.merge(targets[idx], score[idx], length[idx], hist.select(idx))

    # 2) the Kg best non-<end> candidates live on (at most Kg of the 2Kg are <end>: one per beam)
    width = top_score.shape[1]
    rank = torch.arange(width, device=logp.device).expand_as(top_score)
    key = torch.where(is_end, rank + width, rank).topk(Kg, dim=1, largest=False).values
    keep = key % width                       # key >= width only for a vocabulary smaller than 2Kg+3
    return (rows.gather(1, keep), top_tok.gather(1, keep), top_lp.gather(1, keep),
            top_score.gather(1, keep).masked_fill(key >= width, NEG_INF))


def _drop_stopped(live: _Live, rankings: list[_Ranking], t: int, config: DecodingConfig) -> _Live | None:
    """Stop, under each α, the images whose n-th best finished hypothesis (over all groups) no live beam can
    beat; remove those stopped under every α (None: all stopped)."""
    T, K = config.max_length, config.beam_size
    best_live = live.logp.max(dim=1).values
    done = torch.ones_like(live.images, dtype=torch.bool)
    for ranking in rankings:
        lp = ranking.config.length_penalty
        bound = best_live / max(length_penalty_factor(t + 2, lp), length_penalty_factor(T, lp))
        nth_best = ranking.finished.score.view(-1, K)[live.images].topk(config.num_return_sequences,
                                                                         dim=1).values[:, -1]
        stopped = ranking.stopped[live.images] | (bound <= nth_best) | torch.isneginf(bound)
        ranking.stopped[live.images] = stopped
        done &= stopped
    if not bool(done.any()):
        return live
    keep = (~done).nonzero().squeeze(1)
    return live.keep_images(keep, K) if keep.numel() else None


def _collect(finished: _Finished, ran_out: _Live | None, config: DecodingConfig,
             stopped: Tensor) -> list[list[Hypothesis]]:
    """Python objects, once, at the end: the n best of finished + (if max_length was hit) the unfinished beams
    of the images this α had not stopped."""
    G, K = config.num_beam_groups, config.beam_size
    Kg, B = K // G, finished.score.shape[0] // G
    scores, lengths = finished.score.view(B, K).cpu().numpy(), finished.length.view(B, K).cpu().numpy()
    pool = finished.hist.numpy()
    candidates: list[list[Hypothesis]] = [[] for _ in range(B)]
    for b in range(B):
        for k in range(K):            # group after group, each best first
            if np.isfinite(scores[b, k]):
                candidates[b].append(pool.hypothesis((b * G + k // Kg, k % Kg), int(lengths[b, k]), True,
                                                     float(scores[b, k])))
    if ran_out is not None:
        T = config.max_length
        penalty = length_penalty_factor(T, config.length_penalty)
        logp, rows, frozen = ran_out.logp.cpu().numpy(), ran_out.hist.numpy(), stopped.cpu().numpy()
        for i, b in enumerate(ran_out.images.tolist()):
            for k in range(K if not frozen[b] else 0):
                if np.isfinite(logp[i, k]):
                    candidates[b].append(rows.hypothesis((i * K + k,), T, False, float(logp[i, k]) / penalty))
    # stable sort: on equal scores a finished hypothesis (added first) wins
    return [sorted(c, key=lambda h: -h.score)[:config.num_return_sequences] for c in candidates]


# -- the plain version --------------------------------------------------------------------------------------

@dataclass
class _Beam:
    """One live hypothesis of the reference search: its histories, its summed score (log-probs minus any
    diversity penalties) and the decoder state after them."""
    tokens: list[int]
    logprobs: list[float]
    alphas: list[np.ndarray]
    betas: list[float]
    state: DecoderState
    score: float = 0.0

    def as_hypothesis(self, finished: bool, length_penalty: float) -> Hypothesis:
        words = self.tokens[:-1] if finished else self.tokens
        return Hypothesis(token_ids=list(words), token_logprobs=list(self.logprobs),
                          attention=np.stack(self.alphas).astype(np.float32),
                          betas=np.asarray(self.betas, dtype=np.float32), finished=finished,
                          score=self.score / length_penalty_factor(len(self.logprobs), length_penalty))


def _repeats_ngram(tokens: list[int], word: int, n: int) -> bool:
    """Would `tokens + [word]` contain the same n-gram twice?"""
    if n <= 0 or len(tokens) < n:
        return False
    tail = tokens[len(tokens) - n + 1:] + [word] if n > 1 else [word]
    return any(tokens[i:i + n] == tail for i in range(len(tokens) - n + 1))


def _penalised_logits(logits: Tensor, tokens: list[int], penalty: float) -> Tensor:
    """The repetition penalty, one generated word at a time: positive logits / penalty, negative * penalty."""
    if penalty == 1.0:
        return logits
    logits = logits.clone()
    for word in set(tokens):
        logits[word] = logits[word] * penalty if logits[word] < 0 else logits[word] / penalty
    return logits


def reference_beam_search(model: nn.Module, features: Tensor, config: DecodingConfig, *,
                          stop_early: bool = True, vocab: Vocabulary | None = None) -> list[Hypothesis]:
    """The n-best of ONE image's (L, C) features, by the rules of `beam_search`, one beam at a time.

    Slow and plain on purpose: it is what the batched search is tested against (`stop_early=False` runs
    every image to max_length, which checks that the stopping rule never changes the answer) and the
    baseline `bench/` measures the batched search against.
    """
    K, T, lp, G = config.beam_size, config.max_length, config.length_penalty, config.num_beam_groups
    rules = LogitsRules.of(config, vocab)
    features = check_features(model, features.unsqueeze(0))
    with eval_mode(model):
        groups = [[_Beam([], [], [], [], model.init_state(features))] for _ in range(G)]
        done: list[list[Hypothesis]] = [[] for _ in range(G)]     # per group, its K/G best finished
        for t in range(T):
            picked: list[int] = []           # this step's words of the earlier groups' new beams
            for g in range(G):
                groups[g], finished = _reference_group_step(model, groups[g], t, config, rules, picked)
                done[g] = sorted(done[g] + finished, key=lambda h: -h.score)[:K // G]
                picked += [beam.tokens[-1] for beam in groups[g]]
            beams = [beam for group in groups for beam in group]
            if not beams:
                break
            best = sorted((h for group in done for h in group), key=lambda h: -h.score)
            best_possible = max(b.score for b in beams) / max(length_penalty_factor(t + 2, lp),
                                                              length_penalty_factor(T, lp))
            if stop_early and t < T - 1 and len(best) >= config.num_return_sequences \
                    and best_possible <= best[config.num_return_sequences - 1].score:
                break
        else:
            done.append([b.as_hypothesis(False, lp) for b in beams])
    return sorted((h for group in done for h in group), key=lambda h: -h.score)[:config.num_return_sequences]


def _allowed(tokens: list[int], word: int, t: int, config: DecodingConfig, rules: LogitsRules,
             logp: Tensor) -> bool:
    """May a beam that emitted `tokens` emit `word` at step t? (n-gram block, bad words, min_length)."""
    if word in rules.banned_ids or _repeats_ngram(tokens, word, config.no_repeat_ngram_size):
        return False
    if word == END_ID and t + 1 < config.min_length:  # held, unless it is the only word left
        return not any(w != END_ID and float(logp[w]) != NEG_INF and _allowed(tokens, w, t, config, rules, logp)
                       for w in range(len(logp)))
    return True


def _reference_group_step(model: nn.Module, beams: list[_Beam], t: int, config: DecodingConfig,
                          rules: LogitsRules, picked: list[int]) -> tuple[list[_Beam], list[Hypothesis]]:
    """One step of one beam group: its next beams and the hypotheses it finished. A candidate's score is the
    beam's plus the word's log-prob, minus diversity_penalty for each time an earlier group picked it."""
    Kg = config.beam_size // config.num_beam_groups
    candidates = []                          # (summed score, beam, word, its log-prob, α, β, state)
    for beam in beams:
        last = beam.tokens[-1] if beam.tokens else START_ID
        logits, alpha, beta, state = model.step(torch.tensor([last], device=beam.state.h.device), beam.state)
        logp = log_probs(_penalised_logits(logits[0], beam.tokens, config.repetition_penalty)[None])[0]
        ranked = logp                        # the word's log-prob, minus its diversity penalty
        if picked:
            times_picked = torch.bincount(torch.tensor(picked, device=logp.device), minlength=len(logp))
            ranked = logp - config.diversity_penalty * times_picked.to(logp)
        kept = 0                             # a beam's 2Kg best words hold all its words that can rank in the top 2Kg
        for word in ranked.argsort(descending=True).tolist():
            if float(ranked[word]) == NEG_INF or kept == 2 * Kg:
                break
            if _allowed(beam.tokens, word, t, config, rules, logp):
                candidates.append((beam.score + float(ranked[word]), beam, word, float(logp[word]), alpha[0],
                                   beta[0, 0], state))
                kept += 1
    candidates.sort(key=lambda c: -c[0])
    next_beams, finished = [], []
    for rank, (score, beam, word, word_lp, alpha, beta, state) in enumerate(candidates):
        grown = _Beam(beam.tokens + [word], beam.logprobs + [word_lp], beam.alphas + [alpha.float().cpu().numpy()],
                      beam.betas + [float(beta)], state, score)
        if word == END_ID:
            if rank < Kg:
                finished.append(grown.as_hypothesis(True, config.length_penalty))
        elif len(next_beams) < Kg:
            next_beams.append(grown)
        if len(next_beams) == Kg and rank >= Kg - 1:
            break
    return next_beams, finished
