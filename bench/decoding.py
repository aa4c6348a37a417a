"""Bench 1 — corpus decoding: N dev images at beam K from cached features.

Fast: `core.decoding.generate` (batched over images AND beams, one `model.step` per time step).
Baseline: `core.beam_search.reference_beam_search`, the plain search, one image and one beam at a time. Both must give identical captions.
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

from bench.common import DEFAULT_CHECKPOINT, Row, fmt_s, interleaved
from core.decoding import DecodingConfig, generate, reference_beam_search
from core.model import ModelConfig, ShowAttendTell


def load_model_and_features(args: argparse.Namespace, n: int) -> tuple[ShowAttendTell, torch.Tensor, str]:
    """The bundled checkpoint + n cached dev features, or (synthetic) a random model on random features."""
    if not args.synthetic:
        from core.checkpoint import load_checkpoint
        from core.features import open_features
        ckpt = load_checkpoint(args.checkpoint)
        store = open_features(args.features, ckpt.encoder["name"], "dev")
        n = min(n, len(store))
        return ckpt.model.eval(), store.get(np.arange(n)), f"{DEFAULT_CHECKPOINT.name}, dev features"
    torch.manual_seed(0)
    model = ShowAttendTell(ModelConfig(vocab_size=2500, encoder_dim=1280)).eval()
    with torch.no_grad():   # a random model rarely ends a caption: a strong <end> bias gives realistic lengths
        model.classifier.bias[2] = 4.0
    return model, torch.rand(n, 49, 1280) * 2, "synthetic model + features"


def run(args: argparse.Namespace) -> list[Row]:
    model, feats, source = load_model_and_features(args, args.images)
    K, T = args.beam, 20
    config = DecodingConfig(beam_size=K, max_length=T)
    out: dict[str, list[list[int]]] = {}

    def fast() -> None:
        ids = []
        for start in range(0, len(feats), args.decode_batch):
            ids += [h[0].token_ids for h in generate(model, feats[start:start + args.decode_batch], config)]
        out["fast"] = ids

    def baseline() -> None:
        out["baseline"] = [reference_beam_search(model, f, config)[0].token_ids for f in feats]

    times = interleaved({"fast": fast, "baseline": baseline}, args.repeats)
    same = sum(a == b for a, b in zip(out["fast"], out["baseline"]))
    ratio = times["baseline"] / times["fast"]
    n = len(feats)
    row = Row("decoding", f"{n} images, beam {K} (img/s {n / times['fast']:.0f})", fmt_s(times["fast"]),
              f"{fmt_s(times['baseline'])} per-image loop", ratio, ">= 8x, identical",
              ratio >= 8 and same == n,
              [f"{source}; batch {args.decode_batch}; identical captions {same}/{n}; median of {args.repeats}"])
    return [row]
