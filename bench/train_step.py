"""Bench 4 — one training step of the decoder: achieved GFLOP/s (FLOPs of one step counted by
torch.utils.flop_counter) against this machine's fp32 matmul peak measured in the same run, and the time
of one Flickr8K epoch (30 000 captions / batch size steps) at that speed."""
from __future__ import annotations

import argparse
import math

import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence
from torch.utils.flop_counter import FlopCounterMode

from bench.common import Row, median_time
from core.model import ModelConfig, ShowAttendTell, caption_loss

FLICKR8K_TRAIN_CAPTIONS = 30_000


def matmul_peak_gflops(n: int = 1024, repeats: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    t, _ = median_time(lambda: torch.mm(a, b), repeats, warmup=2)
    return 2 * n ** 3 / t / 1e9


def batch(args: argparse.Namespace, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Features (real cached train features when present) + captions with Flickr8K-like lengths."""
    g = torch.Generator().manual_seed(0)
    B = args.batch_size
    feats = None
    if not args.synthetic:
        from core.features import open_features
        feats = open_features(args.features, "efficientnet_lite2", "train").get(np.arange(B))
    if feats is None:
        feats = torch.rand(B, 49, 1280, generator=g) * 2
    words = (torch.randn(B, generator=g) * 3.5 + 11).round().clamp(3, 22).long()   # Flickr8K: ~11 words
    caps = [torch.cat([torch.tensor([1]), torch.randint(4, vocab_size, (int(n),), generator=g), torch.tensor([2])])
            for n in words]
    return feats, pad_sequence(caps, batch_first=True), torch.tensor([len(c) for c in caps])


def run(args: argparse.Namespace) -> list[Row]:
    vocab_size = 2538
    if not args.synthetic:
        from core.checkpoint import read_metadata
        vocab_size = read_metadata(args.checkpoint).vocab_size
    torch.manual_seed(0)
    model = ShowAttendTell(ModelConfig(vocab_size=vocab_size, encoder_dim=1280)).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=4e-4, fused=True)   # as core.train
    feats, caps, lengths = batch(args, vocab_size)

    def step(precision: str) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            logits, alphas = model(feats, caps, lengths)
        loss, _ = caption_loss(logits.float(), alphas.float(), caps, lengths)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        optimizer.step()

    with FlopCounterMode(display=False) as counter:
        step("fp32")
    flops = counter.get_total_flops()
    peak = [matmul_peak_gflops()]
    t32, _ = median_time(lambda: step("fp32"), args.train_steps, warmup=1)
    tbf, _ = median_time(lambda: step("bf16"), args.train_steps, warmup=1)
    peak.append(matmul_peak_gflops())
    peak_gflops = max(peak)
    achieved = flops / t32 / 1e9
    steps_per_epoch = math.ceil(FLICKR8K_TRAIN_CAPTIONS / args.batch_size)
    return [
        Row("train_step", f"decoder step fp32, batch {args.batch_size}", f"{achieved:.1f} GFLOP/s",
            f"{peak_gflops:.1f} GFLOP/s fp32 mm peak", achieved / peak_gflops, ">= 0.55 of peak",
            achieved / peak_gflops >= 0.55,
            [f"{flops / 1e9:.2f} GFLOP per step (fwd+bwd, FlopCounterMode); step fp32 {t32 * 1e3:.0f} ms, "
             f"bf16 autocast {tbf * 1e3:.0f} ms; median of {args.train_steps}"]),
        Row("train_step", f"Flickr8K epoch ({steps_per_epoch} steps, bf16)", f"{steps_per_epoch * tbf / 60:.1f} min",
            f"{steps_per_epoch * t32 / 60:.1f} min fp32", t32 / tbf, "-", None,
            ["epoch = steps x median step time (no dev eval); the ratio is fp32 / bf16 step time"]),
    ]
