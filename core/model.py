"""Show, Attend and Tell (Xu et al., 2015): a soft-attention LSTM decoder over a CNN feature map.

The encoder (see `core.encoders`) turns an image into L = 7x7 region vectors a_i of size C. At each step t:

    e_ti  = w^T tanh(W_a a_i + W_h h_{t-1})       additive attention over the regions
    α_t   = softmax(e_t)                          where to look (rows sum to 1)
    β_t   = σ(f_β(h_{t-1}))                       a scalar gate: how much the image matters for this word
    z_t   = β_t Σ_i α_ti a_i                      the attended context
    h_t, c_t = LSTM([E y_{t-1}; z_t], (h_{t-1}, c_{t-1}))
    p(y_t) ∝ exp(L_o(E y_{t-1} + L_h h_t + L_z z_t))   the "deep output" layer (eq. 7 of the paper)

h_0 and c_0 come from the mean region vector. W_a a_i does not depend on t, so it is computed once per
image (`init_state`) and reused by every step and every beam. Training adds the doubly stochastic penalty
λ·mean_i (1 - Σ_t α_ti)^2 (`caption_loss`), which pushes the model to look at every region over a caption.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.errors import ConfigError


@dataclass
class ModelConfig:
    vocab_size: int
    encoder_dim: int                # C: channels of the encoder's feature map (1280 Lite2, 1920 DenseNet201)
    num_regions: int = 49           # L: 7x7 grid at 224 px
    embed_dim: int = 512
    attention_dim: int = 512
    decoder_dim: int = 512
    dropout: float = 0.5
    deep_output: bool = True

    def __post_init__(self) -> None:
        for name in ("vocab_size", "encoder_dim", "num_regions", "embed_dim", "attention_dim", "decoder_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"model_config.{name} must be a positive integer, got {value!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ConfigError(f"model_config.dropout must be in [0, 1), got {self.dropout!r}")
        if not isinstance(self.deep_output, bool):
            raise ConfigError("model_config.deep_output must be true or false")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown model config keys: {sorted(unknown)}")
        try:
            return cls(**data)
        except TypeError as e:
            raise ConfigError(f"bad model config: {e}") from None


class DecoderState(NamedTuple):
    """Recurrent state of R decoder rows over G images. Usually R == G (one row per image); beam search
    keeps G = R / K: the K consecutive rows of an image (its beams) share one copy of its features, so
    repeating or reordering beams never copies the (G, L, C) maps."""
    h: Tensor              # (R, D)
    c: Tensor              # (R, D)
    features: Tensor       # (G, L, C), G == R or G * K == R
    att_features: Tensor   # (G, L, A): W_a a_i, precomputed once per image

    def index_select(self, index: Tensor) -> "DecoderState":
        """Reorder or repeat rows, e.g. to follow the surviving beams."""
        return DecoderState(*(t.index_select(0, index) for t in self))


class SoftAttention(nn.Module):
    def __init__(self, encoder_dim: int, decoder_dim: int, attention_dim: int):
        super().__init__()
        self.encoder_proj = nn.Linear(encoder_dim, attention_dim)
        self.decoder_proj = nn.Linear(decoder_dim, attention_dim)
        self.score = nn.Linear(attention_dim, 1)

    def forward(self, att_features: Tensor, h: Tensor) -> Tensor:
        """α (R, L) for R rows of h over G = att_features.shape[0] images (R = G * K, rows grouped by image)."""
        G, R = att_features.shape[0], h.shape[0]
        if R == G:
            return self._energy(att_features + self.decoder_proj(h).unsqueeze(1)).softmax(dim=1)  # (B, L)
        # beams: broadcast the image's projection over its K rows instead of materialising K copies of it
        query = self.decoder_proj(h).view(G, R // G, 1, -1)
        return self._energy(att_features.unsqueeze(1) + query).softmax(dim=2).view(R, -1)

    def _energy(self, z: Tensor) -> Tensor:
        """w·tanh(z) + b over the last axis. Decoding computes it up to a constant per row, which the
        softmax drops: tanh(z) = 2σ(2z) − 1, so (2w)·σ(2z). torch's CPU tanh costs ~3.8 ns a float against
        sigmoid's ~0.6 ns (one core, AVX-512) and was ~30 % of beam search; the two agree to ~2e-7 (the
        1,000 dev captions at beams 1, 3 and 10 came out identical). Training and gradients keep tanh, so
        their numbers do not move. `z` is a fresh sum, so decoding overwrites it."""
        if torch.is_grad_enabled():
            return self.score(torch.tanh(z)).squeeze(-1)
        return F.linear(z.mul_(2).sigmoid_(), 2 * self.score.weight).squeeze(-1)


class ShowAttendTell(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        C, E, A, D, V = config.encoder_dim, config.embed_dim, config.attention_dim, config.decoder_dim, config.vocab_size
        self.attention = SoftAttention(C, D, A)
        self.embedding = nn.Embedding(V, E)
        self.init_h = nn.Linear(C, D)
        self.init_c = nn.Linear(C, D)
        self.f_beta = nn.Linear(D, 1)
        self.lstm = nn.LSTMCell(E + C, D)
        self.dropout = nn.Dropout(config.dropout)
        if config.deep_output:
            self.out_h = nn.Linear(D, E)
            self.out_z = nn.Linear(C, E)
            self.classifier = nn.Linear(E, V)
        else:
            self.classifier = nn.Linear(D, V)
        nn.init.uniform_(self.embedding.weight, -0.1, 0.1)
        nn.init.zeros_(self.classifier.bias)

    # -- one step (decoding and training share it) -------------------------------------------------
    def init_state(self, features: Tensor) -> DecoderState:
        mean = features.mean(dim=1)
        return DecoderState(self.init_h(mean), self.init_c(mean), features, self.attention.encoder_proj(features))

    def _attend(self, state: DecoderState) -> tuple[Tensor, Tensor, Tensor]:
        alpha = self.attention(state.att_features, state.h)
        beta = torch.sigmoid(self.f_beta(state.h))
        G, R = state.features.shape[0], state.h.shape[0]
        if R == G:
            context = torch.bmm(alpha.unsqueeze(1), state.features).squeeze(1)
        else:   # (G, K, L) x (G, L, C): one batched product per image for all its beams
            context = torch.bmm(alpha.view(G, R // G, -1), state.features).view(R, -1)
        context = beta * context
        return context, alpha, beta

    def _logits(self, embedded: Tensor, h: Tensor, context: Tensor) -> Tensor:
        if self.config.deep_output:
            return self.classifier(self.dropout(embedded + self.out_h(h) + self.out_z(context)))
        return self.classifier(self.dropout(h))

    def step(self, tokens: Tensor, state: DecoderState) -> tuple[Tensor, Tensor, Tensor, DecoderState]:
        """Feed the previous word; return next-word logits (B,V), attention α (B,L), gate β (B,1), new state."""
        embedded = self.embedding(tokens)
        context, alpha, beta = self._attend(state)
        h, c = self.lstm(torch.cat([embedded, context], dim=1), (state.h, state.c))
        logits = self._logits(embedded, h, context)
        return logits, alpha, beta, DecoderState(h, c, state.features, state.att_features)

    # -- teacher forcing ---------------------------------------------------------------------------
    def forward(self, features: Tensor, captions: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """Teacher forcing over padded captions (B,T) = <start> w1 .. wn <end> <pad>...

        Returns logits (B, T-1, V) predicting captions[:, 1:] and attention (B, T-1, L); positions past a
        caption's end are zero. Same maths as calling `step` T-1 times, arranged for speed:
        - rows run longest-first and the active batch shrinks as captions end (the packed-sequence
          trick), so padding costs no compute;
        - only the recurrence (attention, gate, LSTM) stays in the time loop. Everything that does not
          feed back — the word embedding's share of the LSTM gates and the whole output layer — runs once
          over all N real tokens as a few large matrix products, which is where a CPU reaches its peak.
        """
        B, T = captions.shape
        steps = (lengths - 1).clamp(min=0)                    # words to predict per caption
        order = torch.argsort(steps, descending=True)
        features, inputs, steps = features[order], captions[order, :-1], steps[order]
        active_per_step = [n for n in (int((steps > t).sum()) for t in range(T - 1)) if n > 0]
        # packed layout: step t holds rows 0..n_t-1 (rows are sorted, so the active ones are a prefix)
        rows = torch.tensor([r for n in active_per_step for r in range(n)], dtype=torch.long)
        times = torch.tensor([t for t, n in enumerate(active_per_step) for _ in range(n)], dtype=torch.long)
        rows, times = rows.to(captions.device), times.to(captions.device)

        embedded = self.embedding(inputs[rows, times])        # (N, E): the N real input tokens, packed
        E = self.config.embed_dim
        w_ih, w_hh, lstm = self.lstm.weight_ih, self.lstm.weight_hh, self.lstm
        # gates = W_ih [e; z] + W_hh h + b: the e part does not depend on the recurrence
        w_recurrent = torch.cat([w_ih[:, E:], w_hh], dim=1)  # one product per step for [z; h]
        recurrent_inputs: list[Tensor] = []                   # the [z; h] of every step, filled by the loop
        gates_from_words = _WordGates.apply(embedded, w_ih[:, :E], lstm.bias_ih + lstm.bias_hh, w_recurrent,
                                            recurrent_inputs)  # (N, 4D)

        state = self.init_state(features)
        h, c = state.h, state.c
        hs, contexts, alphas_packed = [], [], []
        # split, not slices: its backward is one concatenation instead of a zero-filled copy per step
        for n, word_gates in zip(active_per_step, gates_from_words.split(active_per_step)):
            h, c = h[:n], c[:n]                               # finished rows drop out for good
            context, alpha, _ = self._attend(DecoderState(h, c, state.features[:n], state.att_features[:n]))
            step_input = torch.cat([context, h], dim=1)
            recurrent_inputs.append(step_input.detach())
            # detached weight: its gradient comes from _WordGates, in one product over all steps
            gates = torch.addmm(word_gates, step_input, w_recurrent.detach().t())
            i, f, g, o = gates.chunk(4, dim=1)                # nn.LSTMCell's gate order
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            hs.append(h), contexts.append(context), alphas_packed.append(alpha)

        V, L = self.config.vocab_size, features.shape[1]
        if not hs:
            return features.new_zeros(B, T - 1, V), features.new_zeros(B, T - 1, L)
        token_logits = self._logits(embedded, torch.cat(hs), torch.cat(contexts))
        token_alphas = torch.cat(alphas_packed)
        # scatter straight to the caller's row order (order[rows]): no second copy to undo the sort. The
        # zeros take the products' dtype (bf16 under autocast).
        at = (order[rows], times)
        logits = token_logits.new_zeros(B, T - 1, V).index_put_(at, token_logits)
        alphas = token_alphas.new_zeros(B, T - 1, L).index_put_(at, token_alphas)
        return logits, alphas


class _WordGates(torch.autograd.Function):
    """The word half of the LSTM gates, W_e e + b, whose backward also returns the recurrent weight's gradient.

    Every step adds W_r [z_t; h_t] to its slice of these gates, so the gradient arriving here, stacked over
    steps, is exactly each step's gate gradient dG_t. The weight gradient Σ_t dG_tᵀ [z_t; h_t] is then one
    large product instead of T small ones accumulated one by one (the steps use W_r detached). That is the
    largest single saving in a CPU training step (`python -m bench --only train_step`).
    """

    @staticmethod
    def forward(ctx, embedded: Tensor, w_words: Tensor, bias: Tensor, w_recurrent: Tensor,
                recurrent_inputs: list[Tensor]) -> Tensor:
        ctx.save_for_backward(embedded, w_words)
        ctx.recurrent_inputs = recurrent_inputs       # complete by the time backward runs
        return F.linear(embedded, w_words, bias)

    @staticmethod
    def backward(ctx, d_gates: Tensor):
        # under autocast the gradient arrives in bf16: compute in its precision (autograd casts the results
        # back to each input's dtype)
        embedded, w_words = (t.to(d_gates.dtype) for t in ctx.saved_tensors)
        inputs = torch.cat(ctx.recurrent_inputs).to(d_gates.dtype)
        d_recurrent = d_gates.t() @ inputs if ctx.needs_input_grad[3] else None
        return d_gates @ w_words, d_gates.t() @ embedded, d_gates.sum(0), d_recurrent, None


def caption_loss(logits: Tensor, alphas: Tensor, captions: Tensor, lengths: Tensor, *,
                 alpha_c: float = 1.0, label_smoothing: float = 0.0, pad_id: int = 0) -> tuple[Tensor, Tensor]:
    """Cross-entropy over real tokens plus the doubly stochastic attention penalty.

    Returns (total loss, cross-entropy alone) so logs can show both.
    """
    targets = captions[:, 1:]
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                         ignore_index=pad_id, label_smoothing=label_smoothing)
    if alpha_c <= 0:
        return ce, ce
    mask = (targets != pad_id).unsqueeze(2).to(alphas.dtype)
    coverage = (alphas * mask).sum(dim=1)                       # (B, L): Σ_t α_ti
    # mean over regions and batch (as the sgrvinod tutorial), so λ = 1 is a sensible default
    penalty = ((1.0 - coverage) ** 2).mean()
    return ce + alpha_c * penalty, ce
