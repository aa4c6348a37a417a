"""Teacher-forced log-probs of one caption on many feature maps that each replace some regions by the image's
mean vector: the engine behind feature-space deletion curves and gradient saliency (`core.saliency`)."""
from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator, Sequence

import torch
from torch import Tensor

from core.errors import ConfigError

if TYPE_CHECKING:
    from core.saliency import Caption

_CHUNK_FLOATS = 1 << 19     # attention work per chunk: its floats fit a core's L2 cache (2 MB)


@contextmanager
def single_threaded() -> Iterator[None]:
    """torch's intra-op threads at 1 for the block, given back after. Scoring runs thousands of small kernels
    per image: split across 2 threads on a machine where another process holds a core, each waits for the
    descheduled one at every kernel's barrier, 20x slower than one thread (measured on the shared 2-core
    machine); images in parallel use the cores instead. OpenMP keeps the count per OS thread, so each
    thread (a dashboard session, a worker) sets and restores its own; threads started inside start at 1."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def log_softmax_banned(logits: Tensor, banned: Sequence[int]) -> Tensor:
    logits = logits.clone()
    logits[:, list(banned)] = float("-inf")
    return torch.log_softmax(logits, dim=-1)


class MaskedScorer:
    """Teacher-forced log-probs of one caption on feature maps built region by region from the image's own
    vectors and its mean vector: row r, region i holds a[r, i] * a_i + b[r, i] * mean.

    Deletion in feature space is a = keep, b = removed; gradient saliency is the derivative at a = 1, b = 0
    (d/da_i log p = Σ_c a_ic ∂log p/∂a_ic: grad × input summed over channels). Every per-region map the
    decoder applies is linear (the attention key W_a a_i, the LSTM's and the deep output's context weights,
    the initial state's), so each is applied to the L regions and the mean once; a row only weighs those
    L + 1 precomputed rows, and the weighing shares one matrix product with the recurrent one ([h, β·w] times
    [W_hh; W_z rows]). The word-embedding half of the LSTM gates is shared by all rows of a step. Equal to
    `model.step` on the built maps up to float rounding (tests check it).
    """

    def __init__(self, model, features: Tensor, caption: Caption):
        if model.training:
            raise ConfigError("MaskedScorer needs the model in eval mode (no dropout)")
        self.model, self.caption = model, caption
        F_ = features.float()
        self.num_regions, E = F_.shape[0], model.config.embed_dim
        both = torch.cat([F_, F_.mean(0, keepdim=True)])                  # (L + 1, C): regions, then the mean
        self.att = both @ model.attention.encoder_proj.weight.t()         # (L+1, A), bias added after mixing
        # 2 (W_a a_i + b): what a lookup reads, doubled for the sigmoid form of tanh (see _attend_kept)
        self.keys2 = 2 * (self.att + model.attention.encoder_proj.bias)
        self.init_h = both @ model.init_h.weight.t()
        self.init_c = both @ model.init_c.weight.t()
        # [h, β·w] @ step_weight = W_hh h + W_z (β Σ_i w_i a_i): the recurrent and the context half of the gates
        self.step_weight = torch.cat([model.lstm.weight_hh.t(), both @ model.lstm.weight_ih[:, E:].t()])
        tokens = torch.tensor(caption.inputs, dtype=torch.long, device=F_.device)
        self.emb = model.embedding(tokens)                                 # (T, E)
        self.gates_e = self.emb @ model.lstm.weight_ih[:, :E].t() + model.lstm.bias_ih + model.lstm.bias_hh
        if model.config.deep_output:                                       # L_h h + L_z z, the same way
            self.out_weight = torch.cat([model.out_h.weight.t(), both @ model.out_z.weight.t()])
            self.out_bias = self.emb + model.out_h.bias + model.out_z.bias   # (T, E)

    @staticmethod
    def _weights(own: Tensor, mean: Tensor, weights: Tensor) -> Tensor:
        """(R, L + 1) weight of each precomputed row (the L regions, then the mean) for per-region weights."""
        return torch.cat([weights * own, (weights * mean).sum(1, keepdim=True)], dim=1)

    def logprobs(self, removed: Tensor, upto: Tensor | None = None, every_step: Tensor | None = None,
                 wanted: Tensor | None = None) -> Tensor:
        """removed: (R, L) bool, True = region replaced by the mean. See `logprobs_mixed` (`wanted` (R, T)
        bool, when given, says exactly which positions each row is scored at); the same numbers, but each
        region's attention key is looked up (the region's own or the mean's), never mixed."""
        keep = ~removed.bool()
        if wanted is None:
            wanted = self._wanted(len(keep), upto, every_step)
        return self._run(keep.float(), (~keep).float(), wanted.bool().cpu(), keep.cpu())

    def logprobs_mixed(self, own: Tensor, mean: Tensor, upto: Tensor | None = None,
                       every_step: Tensor | None = None) -> Tensor:
        """(R, T) log-probs, NaN where not asked for: row r is scored at position upto[r] (default: the
        last), and at every position up to it when every_step[r]. A row stops once past its upto."""
        return self._run(own, mean, self._wanted(len(own), upto, every_step), None)

    def _wanted(self, R: int, upto: Tensor | None, every_step: Tensor | None) -> Tensor:
        T = len(self.caption)
        upto = torch.full((R,), T - 1, dtype=torch.long) if upto is None else upto.long().cpu()
        every = torch.zeros(R, dtype=torch.bool) if every_step is None else every_step.bool().cpu()
        positions = torch.arange(T)
        return (positions == upto[:, None]) | (every[:, None] & (positions < upto[:, None]))

    def _run(self, own: Tensor, mean: Tensor, wanted: Tensor, keep: Tensor | None) -> Tensor:
        m, D = self.model, self.model.config.decoder_dim
        R, L = own.shape
        T = len(self.caption)
        last = torch.where(wanted.any(1), T - 1 - wanted.flip(1).int().argmax(1), -1)   # last wanted position
        order = torch.argsort(last, descending=True, stable=True)       # rows that stop early leave the batch
        dev = self.att.device
        own, mean = own[order].to(dev), mean[order].to(dev)
        last_sorted, wanted_sorted = last[order], wanted[order]
        init_w = self._weights(own, mean, torch.full((R, L), 1.0 / L, device=dev))
        h = torch.addmm(m.init_h.bias, init_w, self.init_h)
        c = torch.addmm(m.init_c.bias, init_w, self.init_c)
        if keep is None:
            att = (own.unsqueeze(2) * self.att[:-1] + mean.unsqueeze(2) * self.att[-1]
                   + m.attention.encoder_proj.bias)                                   # (R, L, A)
        else:
            att = _KeptRegions(keep[order], dev)
        out = torch.full((R, T), float("nan"), dtype=torch.float32)
        for t in range(T):
            n = int((last_sorted >= t).sum())
            if n == 0:
                break
            h, c, own, mean = h[:n], c[:n], own[:n], mean[:n]
            alpha = m.attention(att[:n], h) if keep is None else self._attend_kept(att, h)      # (n, L)
            beta = torch.sigmoid(m.f_beta(h))                             # (n, 1)
            x = torch.cat([h, beta * self._weights(own, mean, alpha)], dim=1)          # (n, D + L + 1)
            i, f, g, o = torch.addmm(self.gates_e[t], x, self.step_weight).chunk(4, dim=1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            rows = wanted_sorted[:n, t].nonzero().squeeze(1)
            if rows.numel():
                r = rows.to(dev)
                if m.config.deep_output:
                    logits = m.classifier(torch.addmm(self.out_bias[t], torch.cat([h[r], x[r, D:]], 1),
                                                      self.out_weight))
                else:
                    logits = m.classifier(h[r])
                lp = log_softmax_banned(logits, self.caption.banned)[:, self.caption.targets[t]]
                out = out.index_put((order[rows], torch.full_like(rows, t)), lp.float().cpu())
        return out

    def _attend_kept(self, kept: "_KeptRegions", h: Tensor) -> Tensor:
        """α (n, L) as `SoftAttention` computes it, for the first n rows: every removed region holds the mean,
        so its energy w·tanh(W_a mean + b + W_h h_r) + b' is computed once per row; a kept region's key is
        looked up, and the kept (row, region) pairs (half of them along a deletion curve) are scored a
        cache-sized chunk at a time. The whole (n, L, A) sum (100 MB for 1,000 rows of 7×7 regions) would
        stream through memory three times per step; 5× slower on one core.

        Energies are scored as (2w)·σ(2z), as `SoftAttention._energy` decodes (why: there); here tanh was
        45 % of a deletion curve's time."""
        attention = self.model.attention
        query2 = 2 * attention.decoder_proj(h)                                     # (n, A)
        n, A = query2.shape
        w2 = 2 * attention.score.weight[0]
        energy = torch.mv(torch.sigmoid(query2 + self.keys2[-1]), w2).unsqueeze(1).repeat(1, kept.num_regions)
        pairs = kept.pairs_of_first(n)
        chunk = max(1, _CHUNK_FLOATS // (2 * A))
        keys, queries = (torch.empty(min(chunk, pairs), A, dtype=query2.dtype, device=query2.device) for _ in "kq")
        scored = torch.empty(pairs, dtype=query2.dtype, device=query2.device)
        for start in range(0, pairs, chunk):
            stop = min(pairs, start + chunk)
            k, q = keys[: stop - start], queries[: stop - start]
            torch.index_select(self.keys2, 0, kept.region[start:stop], out=k)
            torch.index_select(query2, 0, kept.row[start:stop], out=q)
            torch.mv(k.add_(q).sigmoid_(), w2, out=scored[start:stop])
        energy.view(-1)[kept.flat[:pairs]] = scored
        return energy.softmax(dim=1)


class _KeptRegions:
    """The kept (row, region) pairs of a batch of deletion masks, row-major, so the pairs of the first n rows
    (the rows still running at a step) are a prefix."""

    def __init__(self, keep: Tensor, device):
        self.num_regions = keep.shape[1]
        row, region = keep.nonzero(as_tuple=True)
        self.row, self.region = row.to(device), region.to(device)
        self.flat = self.row * self.num_regions + self.region
        self.ends = keep.sum(1).cumsum(0).tolist()

    def pairs_of_first(self, n: int) -> int:
        return int(self.ends[n - 1]) if n else 0
