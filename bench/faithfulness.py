"""Bench 6 — faithfulness: deletion curves for every word, against a naive loop, side by side.

Feature space: `core.faithfulness.run_split` over N dev images, all words, three methods (attention,
grad×input saliency, 3 random orders, one region removed at a time): every per-region projection computed
once per image and looked up per row, the attention scored a cache-sized chunk of rows at a time, one
request per caption in which each distinct deletion mask runs once and only as far as the last word that
needs it, images on one thread per core with single-threaded kernels. Baseline: the same curves the
obvious way, one masked feature map and one teacher-forced `model.step` pass per curve point, one backward
per word for saliency, single-threaded; it runs on the first few images and its per-image time is scaled
to N. Both must give the same AUCs.

Pixel space: one image's caption, curves of `--pixel-step` regions per point. Fast: each distinct masked
image encoded once, in the encoder's device batch (4 on a CPU). Baseline: one re-encode per (word, method,
point), one image at a time.
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
from PIL import Image

from bench.common import Row, fmt_s
from core import evidence, saliency
from core.decoding import DecodingConfig
from core.faithfulness import FaithfulnessConfig, default_workers, run_split, single_threaded

SEEDS = 3


def _setup(args: argparse.Namespace):
    """(captioner, list of (name, features, image)), real or synthetic."""
    if not args.synthetic:
        from core.captioner import Captioner
        from core.data import load_dataset
        from core.images import load_image
        captioner = Captioner.from_checkpoint(args.checkpoint, device="cpu")
        items = load_dataset(args.data).split("dev")[: args.faith_images]
        images = [load_image(it.path) for it in items]
        feats = [captioner.encode([im])[0] for im in images]
        return captioner, [(it.image, f, im) for it, f, im in zip(items, feats, images)], "bundled checkpoint, dev"
    from core.captioner import Captioner
    from core.encoders import build_encoder
    from core.model import ModelConfig, ShowAttendTell
    from core.text import SPECIALS, Vocabulary
    torch.manual_seed(0)
    model = ShowAttendTell(ModelConfig(vocab_size=2500, encoder_dim=1280)).eval()
    with torch.no_grad():
        model.classifier.bias[2] = 3.0
    vocab = Vocabulary(list(SPECIALS) + [f"w{i}" for i in range(2500 - len(SPECIALS))])
    captioner = Captioner(model, vocab, build_encoder("efficientnet_lite2", "none"), device="cpu")
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (160, 160, 3), dtype=np.uint8)) for _ in range(args.faith_images)]
    return captioner, [(f"synthetic{i}", captioner.encode([im])[0], im) for i, im in enumerate(images)], "synthetic"


class _Store:
    """The FeatureStore interface over features already in memory (the timed run reads no files)."""

    def __init__(self, items):
        self.images = [name for name, _, _ in items]
        self.array = torch.stack([f for _, f, _ in items])

    def index_of(self) -> dict[str, int]:
        return {n: i for i, n in enumerate(self.images)}

    def get(self, indices) -> torch.Tensor:
        return self.array[torch.as_tensor(indices)]


def _load() -> str:
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def feature_row(args, captioner, items, source: str) -> Row:
    from core.data import ImageCaptions
    decoding = DecodingConfig(beam_size=3)
    config = FaithfulnessConfig(space="feature", seeds=SEEDS, step=1)
    store = _Store(items)
    entries = [ImageCaptions(name, None, []) for name, _, _ in items]
    workers, load = default_workers(), _load()
    t0, c0 = time.perf_counter(), time.process_time()
    rows = run_split(captioner, entries, decoding, config, store=store, workers=workers)
    fast_s, fast_cpu = time.perf_counter() - t0, time.process_time() - c0
    k = min(args.naive_images, len(items))
    t0 = time.perf_counter()
    naive = []
    with single_threaded():     # batch-1 kernels: a second thread only waits on a shared machine (both paths)
        for _, feats, _ in items[:k]:
            naive += evidence.reference_caption_faithfulness(captioner, feats,
                                                             captioner.decode(feats[None], decoding)[0][0], seeds=SEEDS)
    naive_per_image = (time.perf_counter() - t0) / k
    fast_first = [r for r in rows if r["image"] in {n for n, _, _ in items[:k]}]
    worst = max(abs(r[f"auc_{m}"] - plain[f"auc_{m}"]) for r, plain in zip(fast_first, naive)
                for m in ("attention", "saliency", "random"))
    n = len(items)
    return Row("faithfulness", f"feature space: {n} images, {len(rows)} words, 3 methods", fmt_s(fast_s),
               f"{fmt_s(naive_per_image * n)} naive loop (scaled from {k} image{'s' * (k > 1)})",
               naive_per_image * n / fast_s, "<= 60 s for 100 images", fast_s <= 60 * n / 100 and worst < 1e-3,
               [f"{source}; one region per point, {SEEDS} random orders; largest AUC difference to the naive "
                f"loop {worst:.1e}; {workers} image{'s' * (workers > 1)} at once, 1 torch thread each (the naive "
                f"loop: 1 thread); process CPU time {fast_cpu:.1f} s (wall x workers / CPU shows how much of the "
                f"machine this process got); load average before {load}"])


def pixel_row(args, captioner, items, source: str) -> Row:
    name, feats, image = items[0]
    hyp = captioner.decode(feats[None], DecodingConfig(beam_size=3))[0][0]
    caption = saliency.caption_of(captioner, hyp)
    step, L = args.pixel_step, feats.shape[0]
    sal = saliency.saliency_maps(captioner.model, feats, caption)
    orders = [(t, o) for t in range(len(caption)) for o in (saliency.ranking(hyp.attention[t]), saliency.ranking(sal[t]))]
    random = saliency.random_orders(L, SEEDS, 0)
    t0 = time.perf_counter()
    fast = evidence.caption_faithfulness(captioner, feats, hyp, space="pixel", image=image, seeds=SEEDS, step=step)
    fast_s = time.perf_counter() - t0
    masks = [(t, m) for t, o in orders for m in saliency.deletion_masks(o, step)]
    masks += [(t, m) for o in random for m in saliency.deletion_masks(o, step) for t in range(len(caption))]
    t0 = time.perf_counter()
    for t, m in masks:                                    # one re-encode per (word, method, point)
        f = saliency.encode_masks(captioner, image, m[None], batch_size=1)
        with torch.inference_mode():
            saliency.teacher_forced_logprobs(captioner.model, f, caption)[0, t]
    naive_s = time.perf_counter() - t0
    return Row("faithfulness", f"pixel space: 1 image, {len(fast)} words, {len(masks)} curve points",
               fmt_s(fast_s), f"{fmt_s(naive_s)} one re-encode at a time", naive_s / fast_s, ">= 3x",
               naive_s / fast_s >= 3, [f"{source}; {step} regions per point, distinct masked images encoded once, "
                                       "4 per encoder batch on a CPU"])


def run(args: argparse.Namespace) -> list[Row]:
    args.faith_images = getattr(args, "faith_images", 100)
    args.naive_images = getattr(args, "naive_images", 2)
    args.pixel_step = getattr(args, "pixel_step", 7)
    captioner, items, source = _setup(args)
    return [feature_row(args, captioner, items, source), pixel_row(args, captioner, items, source)]
