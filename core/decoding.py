"""Turning a trained decoder into captions: greedy search, batched beam search and sampling.

All three drive `ShowAttendTell.step` one token at a time and record, per emitted token, its log-probability,
the attention row α_t (what the model looked at) and the gate β_t, so the dashboard can show *why* a word
was chosen. Conventions shared by every strategy:

* `max_length` counts generated tokens including the final <end>: a finished caption has at most
  max_length - 1 words; a hypothesis still running at max_length is returned with `finished=False`.
* <pad> and <start> (and <unk> when `unk_id` is given) can never be generated: their logits are set to -inf
  before the softmax, so token log-probs are over the tokens a caption may contain.
* `no_repeat_ngram_size` is a search constraint: a blocked token is excluded from the choice, but the
  distribution is not renormalised, so reported log-probs stay the model's own.
* score = sum of token log-probs / ((5 + length) / 6) ** length_penalty (GNMT, Wu et al. 2016), where
  length counts the emitted tokens (incl. <end>); length_penalty = 0 ranks by the raw sum.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from typing import Callable, Iterator

import numpy as np
import torch
from torch import Tensor, nn

from core.errors import ConfigError
from core.model import DecoderState

NEG_INF = float("-inf")


@dataclass
class DecodingConfig:
    """Every decoding knob in one place (like Hugging Face's GenerationConfig).

    do_sample=True samples (temperature / top_k, `num_return_sequences` samples per image, beam_size is
    ignored); otherwise beam_size == 1 is greedy search and beam_size > 1 beam search, returning the
    `num_return_sequences` best hypotheses (at most beam_size).
    """
    beam_size: int = 3
    max_length: int = 20               # generated tokens incl. <end>
    length_penalty: float = 0.0        # GNMT alpha; > 0 favours longer captions, 0 = raw sum of log-probs
    no_repeat_ngram_size: int = 0      # 0 = off; n: never produce the same n-gram twice in a caption
    do_sample: bool = False
    temperature: float = 1.0           # sampling only
    top_k: int = 0                     # sampling only; 0 = the whole vocabulary
    num_return_sequences: int = 1
    seed: int | None = None            # sampling only; None = a fresh random seed

    def validate(self) -> None:
        def need_int(name: str, minimum: int) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"decoding: {name} must be an integer, got {value!r}")
            if value < minimum:
                raise ConfigError(f"decoding: {name} must be >= {minimum}, got {value}")

        need_int("beam_size", 1)
        need_int("max_length", 1)
        need_int("no_repeat_ngram_size", 0)
        need_int("top_k", 0)
        need_int("num_return_sequences", 1)
        for name in ("length_penalty", "temperature"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"decoding: {name} must be a finite number, got {value!r}")
        if self.temperature <= 0:
            raise ConfigError(f"decoding: temperature must be > 0, got {self.temperature} "
                              "(use do_sample=False for deterministic decoding)")
        if not isinstance(self.do_sample, bool):
            raise ConfigError(f"decoding: do_sample must be true or false, got {self.do_sample!r}")
        if self.seed is not None:
            need_int("seed", 0)
        if not self.do_sample and self.num_return_sequences > self.beam_size:
            raise ConfigError(f"decoding: num_return_sequences ({self.num_return_sequences}) cannot exceed "
                              f"beam_size ({self.beam_size}) without sampling; raise beam_size or set do_sample")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "DecodingConfig":
        if not isinstance(data, dict):
            raise ConfigError(f"decoding config must be a mapping, got {type(data).__name__}")
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ConfigError(f"unknown decoding config keys: {sorted(unknown)}")
        config = cls(**data)
        config.validate()
        return config


def length_penalty_factor(length: int, length_penalty: float) -> float:
    """GNMT's ((5 + |Y|) / 6) ** alpha: dividing a (negative) log-prob by it makes long captions less unlikely."""
    return ((5.0 + length) / 6.0) ** length_penalty


@dataclass
class Hypothesis:
    token_ids: list[int]          # words only (no <start>, no <end>)
    token_logprobs: list[float]   # one per emitted token, incl. the final <end> when finished
    attention: np.ndarray         # (steps, L) float32, α row used to emit each token; rows sum to 1
    betas: np.ndarray             # (steps,) float32, the gate β for each token
    finished: bool                # <end> was produced
    score: float = field(default=NEG_INF)   # length-penalised log-prob, what the n-best list is sorted by

    @property
    def logprob(self) -> float:
        return float(sum(self.token_logprobs))

    @property
    def length(self) -> int:
        """Emitted tokens incl. <end> (the length the penalty uses); len(token_ids) is the word count."""
        return len(self.token_logprobs)


# -- shared helpers --------------------------------------------------------------------------------------

@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Dropout off while decoding; give the caller back the mode it had (a training loop may be mid-epoch)."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def _check_inputs(model: nn.Module, features: Tensor, config: DecodingConfig) -> Tensor:
    config.validate()
    if not isinstance(features, Tensor) or features.dim() != 3:
        shape = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
        raise ConfigError(f"decoding: features must be a (batch, regions, channels) tensor, got {shape}")
    expected = model.config.encoder_dim
    if features.shape[2] != expected:
        raise ConfigError(f"decoding: features have {features.shape[2]} channels but the model expects "
                          f"{expected} (checkpoint trained with another encoder?)")
    device = next(model.parameters()).device
    return features.to(device=device, dtype=torch.float32)


def _log_probs(logits: Tensor, banned_ids: list[int], temperature: float = 1.0) -> Tensor:
    """log_softmax(logits / T) with the never-generated tokens removed from the distribution."""
    logits = logits / temperature if temperature != 1.0 else logits.clone()
    logits[:, banned_ids] = NEG_INF
    return torch.log_softmax(logits, dim=-1)


def _block_repeated_ngrams(scores: Tensor, history: Tensor, n: int) -> Tensor:
    """-inf for every token that would complete an n-gram already present in the row's history (R, t).

    Vectorised over rows: slide an n-window over the history, find the windows whose first n-1 tokens equal
    the row's last n-1 tokens, and ban their last token.
    """
    t = history.shape[1]
    if n <= 0 or t < n:  # off, or not a single complete n-gram yet
        return scores
    windows = history.unfold(1, n, 1)                                   # (R, t-n+1, n)
    prefix = history[:, t - (n - 1):]                                   # (R, n-1)
    match = (windows[:, :, : n - 1] == prefix.unsqueeze(1)).all(dim=2)  # (R, t-n+1)
    hits = torch.zeros_like(scores).scatter_add_(1, windows[:, :, n - 1], match.to(scores.dtype))
    return scores.masked_fill(hits > 0, NEG_INF)


def _banned(pad_id: int, start_id: int, unk_id: int | None) -> list[int]:
    return [pad_id, start_id] + ([unk_id] if unk_id is not None else [])


# -- greedy and sampling: one path per row -----------------------------------------------------------------

def _decode_paths(model: nn.Module, features: Tensor, config: DecodingConfig,
                  pick: Callable[[Tensor], Tensor], temperature: float, *,
                  start_id: int, end_id: int, banned_ids: list[int]) -> list[Hypothesis]:
    """Run every row until it emits <end> (or max_length); `pick` chooses the next token from (R, V) scores."""
    R = features.shape[0]
    state = model.init_state(features)
    tokens = torch.full((R,), start_id, dtype=torch.long, device=features.device)
    history = tokens.new_zeros((R, 0))
    done = torch.zeros(R, dtype=torch.bool, device=features.device)
    logprobs, alphas, betas = [], [], []
    for _ in range(config.max_length):
        logits, alpha, beta, state = model.step(tokens, state)
        logp = _log_probs(logits, banned_ids, temperature)
        scores = _block_repeated_ngrams(logp, history, config.no_repeat_ngram_size)
        tokens = pick(scores)
        logprobs.append(logp.gather(1, tokens[:, None]).squeeze(1))
        alphas.append(alpha)
        betas.append(beta.squeeze(1))
        history = torch.cat([history, tokens[:, None]], dim=1)
        done |= tokens == end_id
        if bool(done.all()):
            break
    tok = history.cpu().numpy()
    lp = torch.stack(logprobs, 1).cpu().numpy()
    att = torch.stack(alphas, 1).float().cpu().numpy()
    bet = torch.stack(betas, 1).float().cpu().numpy()
    out = []
    for r in range(R):
        ends = np.flatnonzero(tok[r] == end_id)
        finished = ends.size > 0
        steps = int(ends[0]) + 1 if finished else tok.shape[1]
        token_logprobs = [float(x) for x in lp[r, :steps]]
        score = float(np.sum(lp[r, :steps], dtype=np.float64)) / length_penalty_factor(steps, config.length_penalty)
        out.append(Hypothesis(token_ids=[int(x) for x in tok[r, :steps - 1 if finished else steps]],
                              token_logprobs=token_logprobs, attention=att[r, :steps].copy(),
                              betas=bet[r, :steps].copy(), finished=finished, score=score))
    return out


def greedy(model: nn.Module, features: Tensor, config: DecodingConfig, *, start_id: int = 1, end_id: int = 2,
           pad_id: int = 0, unk_id: int | None = None) -> list[list[Hypothesis]]:
    """Argmax at every step: one hypothesis per image (honours no_repeat_ngram_size and max_length)."""
    features = _check_inputs(model, features, config)
    if features.shape[0] == 0:
        return []
    with _eval_mode(model):
        hyps = _decode_paths(model, features, config, lambda s: s.argmax(dim=1), 1.0, start_id=start_id,
                             end_id=end_id, banned_ids=_banned(pad_id, start_id, unk_id))
    return [[h] for h in hyps]


def sample(model: nn.Module, features: Tensor, config: DecodingConfig, *, start_id: int = 1, end_id: int = 2,
           pad_id: int = 0, unk_id: int | None = None) -> list[list[Hypothesis]]:
    """Ancestral sampling from softmax(logits / temperature), optionally restricted to the top_k tokens.

    `num_return_sequences` independent samples per image, sorted by score. A seeded torch.Generator makes
    the result reproducible for a given seed (on the same device and torch version).
    """
    features = _check_inputs(model, features, config)
    B, n = features.shape[0], config.num_return_sequences
    if B == 0:
        return []
    generator = torch.Generator(device=features.device)
    if config.seed is None:
        generator.seed()
    else:
        generator.manual_seed(config.seed)

    def pick(scores: Tensor) -> Tensor:
        if 0 < config.top_k < scores.shape[1]:
            kth = scores.topk(config.top_k, dim=1).values[:, -1:]
            scores = scores.masked_fill(scores < kth, NEG_INF)
        probs = scores.softmax(dim=1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)

    with _eval_mode(model):
        rows = features.repeat_interleave(n, dim=0)
        hyps = _decode_paths(model, rows, config, pick, config.temperature, start_id=start_id,
                             end_id=end_id, banned_ids=_banned(pad_id, start_id, unk_id))
    return [sorted(hyps[i * n:(i + 1) * n], key=lambda h: -h.score) for i in range(B)]


# -- beam search ---------------------------------------------------------------------------------------------

def beam_search(model: nn.Module, features: Tensor, config: DecodingConfig, *, start_id: int = 1,
                end_id: int = 2, pad_id: int = 0, unk_id: int | None = None) -> list[list[Hypothesis]]:
    """Beam search batched over images and beams: B*K decoder rows, one `model.step` per time step.

    Each step, for every image, the K*V extensions of its K live beams are ranked by summed log-prob
    (one topk over the flattened scores). As in fairseq / Hugging Face: an <end> candidate ranked among the
    top K becomes a finished hypothesis (kept aside with its length-penalised score, the K best per image);
    the best K candidates that are not <end> become the next beams. At t = 0 only beam 0 is live, so the
    beams start out different. With K = 1 this is exactly greedy search.

    Stopping rule (exact, never changes the answer): an image stops once it has num_return_sequences
    finished hypotheses and no live beam can still beat the worst of them. A live beam's summed log-prob
    can only fall, so its best possible final score is logprob / max(penalty(t + 2), penalty(max_length)).
    Images that stop leave the batch (their rows are dropped) so the rest run faster. Beams still live at
    max_length are returned as unfinished hypotheses competing on the same score.
    """
    features = _check_inputs(model, features, config)
    B, L, _ = features.shape
    if B == 0:
        return []
    K, T, n, lp = config.beam_size, config.max_length, config.num_return_sequences, config.length_penalty
    V = model.config.vocab_size
    banned = _banned(pad_id, start_id, unk_id)
    dev = features.device

    with _eval_mode(model):
        # K rows per image share the image's features (DecoderState's grouped form): no B*K*L*C copy
        state = model.init_state(features)
        state = state._replace(h=state.h.repeat_interleave(K, dim=0), c=state.c.repeat_interleave(K, dim=0))
        tokens = torch.full((B * K,), start_id, dtype=torch.long, device=dev)
        beam_logp = features.new_full((B, K), NEG_INF)
        beam_logp[:, 0] = 0.0
        # per live row: everything emitted so far (rows follow their beams through index_select)
        hist_tok = torch.zeros((B * K, T), dtype=torch.long, device=dev)
        hist_lp = features.new_zeros((B * K, T))
        hist_att = features.new_zeros((B * K, T, L))
        hist_beta = features.new_zeros((B * K, T))
        # finished hypotheses, per image, sorted by score (-inf = empty slot)
        pool_score = features.new_full((B, K), NEG_INF)
        pool_len = torch.zeros((B, K), dtype=torch.long, device=dev)
        pool_tok = torch.zeros((B, K, T), dtype=torch.long, device=dev)
        pool_lp = features.new_zeros((B, K, T))
        pool_att = features.new_zeros((B, K, T, L))
        pool_beta = features.new_zeros((B, K, T))
        active = torch.arange(B, device=dev)       # images still searching, in row order
        ran_out = False                              # did the active images reach max_length?

        for t in range(T):
            A = active.numel()
            logits, alpha, beta, state = model.step(tokens, state)
            logp = _log_probs(logits, banned)                                     # (A*K, V)
            allowed = _block_repeated_ngrams(logp, hist_tok[:, :t], config.no_repeat_ngram_size)
            candidates = (beam_logp.reshape(-1, 1) + allowed).view(A, K * V)
            top_score, top_idx = candidates.topk(min(2 * K, K * V), dim=1)       # sorted, (A, 2K)
            rows = top_idx // V + torch.arange(A, device=dev).unsqueeze(1) * K   # live row of the origin beam
            top_tok = top_idx % V
            is_end = top_tok == end_id
            top_lp = logp[rows, top_tok]                                          # model log-prob of the token

            def extend(sel_rows: Tensor, sel_tok: Tensor, sel_lp: Tensor) -> tuple[Tensor, ...]:
                """Histories of the origin beams plus this step's token, log-prob, α and β."""
                tok_h, lp_h = hist_tok[sel_rows], hist_lp[sel_rows]
                att_h, beta_h = hist_att[sel_rows], hist_beta[sel_rows]
                tok_h[..., t], lp_h[..., t] = sel_tok, sel_lp
                att_h[..., t, :], beta_h[..., t] = alpha[sel_rows], beta[sel_rows, 0]
                return tok_h, lp_h, att_h, beta_h

            # 1) <end> among the top K ranks -> finished; merge into the per-image pool (keep the K best)
            new_fin = is_end[:, :K] & torch.isfinite(top_score[:, :K])
            if bool(new_fin.any()):
                fin_score = torch.where(new_fin, top_score[:, :K] / length_penalty_factor(t + 1, lp),
                                        torch.full_like(top_score[:, :K], NEG_INF))
                f_tok, f_lp, f_att, f_beta = extend(rows[:, :K], top_tok[:, :K], top_lp[:, :K])
                merged_score, order = torch.cat([pool_score[active], fin_score], 1).topk(K, dim=1)

                def merge(old: Tensor, new: Tensor) -> Tensor:
                    both = torch.cat([old[active], new], 1)
                    idx = order.view(A, K, *([1] * (both.dim() - 2))).expand(A, K, *both.shape[2:])
                    return both.gather(1, idx)

                pool_tok[active] = merge(pool_tok, f_tok)
                pool_lp[active] = merge(pool_lp, f_lp)
                pool_att[active] = merge(pool_att, f_att)
                pool_beta[active] = merge(pool_beta, f_beta)
                pool_len[active] = merge(pool_len, torch.full_like(f_tok[..., 0], t + 1))
                pool_score[active] = merged_score

            # 2) the K best non-<end> candidates live on (at most K of the 2K are <end>: one per beam)
            width = top_score.shape[1]
            rank = torch.arange(width, device=dev).expand_as(top_score)
            key = torch.where(is_end, rank + width, rank).topk(K, dim=1, largest=False).values
            keep = key % width                       # key >= width only for a vocabulary smaller than 2K+3
            new_rows = rows.gather(1, keep).reshape(-1)
            tokens = top_tok.gather(1, keep).reshape(-1)
            beam_logp = top_score.gather(1, keep).masked_fill(key >= width, NEG_INF)
            hist_tok, hist_lp, hist_att, hist_beta = extend(new_rows, tokens, top_lp.gather(1, keep).reshape(-1))
            # beams never leave their image, and all K rows of an image hold the same features, so only the
            # recurrent state needs reordering (index_select of the features would copy B*K*L*C floats per step)
            state = state._replace(h=state.h.index_select(0, new_rows), c=state.c.index_select(0, new_rows))

            if t == T - 1:
                ran_out = True
                break
            # 3) stop the images whose n-th best finished hypothesis no live beam can beat
            divisor = max(length_penalty_factor(t + 2, lp), length_penalty_factor(T, lp))
            bound = beam_logp.max(dim=1).values / divisor
            nth = pool_score[active, n - 1]
            done = (bound <= nth) | torch.isneginf(bound)
            if bool(done.any()):
                live = (~done).nonzero().squeeze(1)
                if live.numel() == 0:
                    break
                live_rows = (live.unsqueeze(1) * K + torch.arange(K, device=dev)).reshape(-1)
                active, beam_logp, tokens = active[live], beam_logp[live], tokens[live_rows]
                hist_tok, hist_lp = hist_tok[live_rows], hist_lp[live_rows]
                hist_att, hist_beta = hist_att[live_rows], hist_beta[live_rows]
                state = DecoderState(state.h[live_rows], state.c[live_rows], state.features[live],
                                     state.att_features[live])

    return _collect(pool_score, pool_len, pool_tok, pool_lp, pool_att, pool_beta,
                    active if ran_out else active[:0], beam_logp, hist_tok, hist_lp, hist_att, hist_beta,
                    n=n, steps=T, length_penalty=lp)


def _collect(pool_score, pool_len, pool_tok, pool_lp, pool_att, pool_beta,
             unfinished_images, beam_logp, hist_tok, hist_lp, hist_att, hist_beta,
             *, n: int, steps: int, length_penalty: float) -> list[list[Hypothesis]]:
    """Python objects, once, at the end: the n best of finished + (if max_length was hit) unfinished beams."""
    to_np = lambda x: x.cpu().numpy()  # noqa: E731
    p_score, p_len, p_tok, p_lp, p_att, p_beta = map(to_np, (pool_score, pool_len, pool_tok, pool_lp,
                                                               pool_att, pool_beta))
    B, K = p_score.shape
    candidates: list[list[Hypothesis]] = [[] for _ in range(B)]
    for b in range(B):
        for k in range(K):
            if np.isfinite(p_score[b, k]):
                m = int(p_len[b, k])
                candidates[b].append(Hypothesis(
                    token_ids=p_tok[b, k, :m - 1].tolist(), token_logprobs=p_lp[b, k, :m].tolist(),
                    attention=p_att[b, k, :m].copy(), betas=p_beta[b, k, :m].copy(), finished=True,
                    score=float(p_score[b, k])))
    if unfinished_images.numel():
        penalty = length_penalty_factor(steps, length_penalty)
        u_img, u_logp = to_np(unfinished_images), to_np(beam_logp)
        u_tok, u_lp, u_att, u_beta = map(to_np, (hist_tok, hist_lp, hist_att, hist_beta))
        for i, b in enumerate(u_img):
            for k in range(K):
                if np.isfinite(u_logp[i, k]):
                    r = i * K + k
                    candidates[b].append(Hypothesis(
                        token_ids=u_tok[r].tolist(), token_logprobs=u_lp[r].tolist(), attention=u_att[r].copy(),
                        betas=u_beta[r].copy(), finished=False, score=float(u_logp[i, k]) / penalty))
    # stable sort: on equal scores a finished hypothesis (added first) wins
    return [sorted(c, key=lambda h: -h.score)[:n] for c in candidates]


def generate(model: nn.Module, features: Tensor, config: DecodingConfig, *, start_id: int = 1, end_id: int = 2,
             pad_id: int = 0, unk_id: int | None = None) -> list[list[Hypothesis]]:
    """Caption a batch of encoded images (B, L, C): per image, num_return_sequences hypotheses, best first.

    Dispatch: do_sample -> `sample`; beam_size == 1 -> `greedy`; otherwise `beam_search`.
    """
    config.validate()
    strategy = sample if config.do_sample else greedy if config.beam_size == 1 else beam_search
    return strategy(model, features, config, start_id=start_id, end_id=end_id, pad_id=pad_id, unk_id=unk_id)
