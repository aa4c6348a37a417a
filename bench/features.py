"""Bench 3 — feature extraction, images/s: `core.features.extract_features` (its CPU defaults: batches of 4,
torch.compile, inference mode, channels-last, workers only where cores are spare) against a naive batch-1
loop (eager, autograd on, NCHW). The one-off compile is timed apart, in the warm-up."""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from bench.common import Row, interleaved
from core.encoders import build_encoder
from core.features import default_batch_size, default_workers, extract_features
from core.images import load_image


def image_paths(args: argparse.Namespace, tmp: Path) -> tuple[list[Path], str]:
    if not args.synthetic:
        from core.data import load_dataset
        items = load_dataset(args.data).split("dev")[: args.feature_images]
        return [it.path for it in items], "Flickr8K dev images"
    rng = np.random.default_rng(0)
    paths = []
    for i in range(args.feature_images):
        p = tmp / f"synthetic_{i}.jpg"
        Image.fromarray(rng.integers(0, 255, (375, 500, 3), dtype=np.uint8)).save(p, quality=90)
        paths.append(p)
    return paths, "synthetic 500x375 JPEGs"


def run(args: argparse.Namespace) -> list[Row]:
    weights = "none" if args.synthetic else "imagenet"
    fast_encoder, naive_encoder = build_encoder("efficientnet_lite2", weights), build_encoder("efficientnet_lite2", weights)
    naive_encoder.eval()
    with tempfile.TemporaryDirectory() as tmp:
        paths, source = image_paths(args, Path(tmp))
        runs = iter(range(10**6))

        batch = default_batch_size("cpu")
        workers = default_workers("cpu") if args.workers is None else args.workers

        def fast() -> None:
            extract_features(fast_encoder, paths, Path(tmp) / f"out{next(runs)}", "bench", batch_size=batch,
                             num_workers=workers, progress=False)

        def naive() -> None:
            for p in paths:
                naive_encoder(naive_encoder.preprocess(load_image(p)).unsqueeze(0))

        t0 = time.perf_counter()
        fast()                                  # warm-up: compiles the encoder once
        warmup = time.perf_counter() - t0
        naive() if args.repeats > 1 else None
        times = interleaved({"fast": fast, "naive": naive}, args.repeats)
    n = len(paths)
    f_ips, n_ips = n / times["fast"], n / times["naive"]
    return [Row("features", f"images/s, {n} images", f"{f_ips:.1f} img/s", f"{n_ips:.1f} img/s batch-1",
                f_ips / n_ips, ">= 2x", f_ips / n_ips >= 2,
                [f"{source}; batch {batch}, {workers} workers, torch.compile, inference mode, channels-last; "
                 f"first pass incl. compile {warmup:.1f} s; median of {args.repeats}"])]
