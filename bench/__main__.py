"""`python -m bench`: every benchmark beside its baseline, in one run, with the ratio and its target.

    python -m bench                              # the full suite on the bundled checkpoint + Flickr8K caches
    python -m bench --only decoding --images 1000 --repeats 3
    python -m bench --quick --synthetic          # a short smoke run that needs no data (what the tests run)
    python -m bench --only grid                  # the decoding grid against its settings run one by one
    python -m bench --runs 3                     # three whole runs in fresh processes: per figure, the median run
    python -m bench --only first_visit dashboard --images 1000   # the first Flickr8K visit, cold start, load
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import subprocess
import tempfile
import platform
import sys
import time
from pathlib import Path

import core  # noqa: F401  (before torch: it sets the OpenMP spin policy core's CLIs run with)
import torch

from bench.common import DEFAULT_CHECKPOINT, DEFAULT_DATA, DEFAULT_FEATURES, Row, median_rows, print_table

BENCHES = ("decoding", "upload", "features", "train_step", "dashboard", "first_visit", "faithfulness", "grid")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="+", choices=BENCHES, default=list(BENCHES))
    p.add_argument("--quick", action="store_true", help="tiny sizes, 1 repeat: a smoke run, not a measurement")
    p.add_argument("--synthetic", action="store_true",
                   help="random model / features / images instead of the checkpoint and Flickr8K")
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    p.add_argument("--features", type=Path, default=DEFAULT_FEATURES)
    p.add_argument("--data", type=Path, default=Path(os.environ.get("FLICKR8K_DIR", DEFAULT_DATA)))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--images", type=int, default=1000, help="decoding: dev images")
    p.add_argument("--beam", type=int, default=3, help="decoding: beam width")
    p.add_argument("--decode-batch", type=int, default=250, help="decoding: images per generate() call")
    p.add_argument("--uploads", type=int, default=20, help="upload: timed uploads per path")
    p.add_argument("--feature-images", type=int, default=96, help="features: images per timed pass")
    p.add_argument("--workers", type=int, default=None,
                   help="features: DataLoader workers of the fast path (default: core.features' choice)")
    p.add_argument("--train-steps", type=int, default=5, help="train_step: timed steps")
    p.add_argument("--batch-size", type=int, default=64, help="train_step: batch size")
    p.add_argument("--grid-images", type=int, default=1000, help="grid: dev images")
    p.add_argument("--grid-repeats", type=int, default=1, help="grid: timed runs of each side (each takes minutes)")
    p.add_argument("--faith-images", type=int, default=100, help="faithfulness: dev images (feature space)")
    p.add_argument("--naive-images", type=int, default=2, help="faithfulness: images the naive loop runs on")
    p.add_argument("--pixel-step", type=int, default=7, help="faithfulness: regions per pixel-space curve point")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--runs", type=int, default=1, help="whole runs, each in a fresh process; prints the median")
    p.add_argument("--json", type=Path, default=None, help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.images, args.uploads, args.grid_images = 1, 8, 3, 8
        args.feature_images, args.train_steps, args.batch_size, args.decode_batch = 8, 1, 8, 8
        args.faith_images, args.naive_images, args.pixel_step = 2, 1, 25
    if not args.synthetic and not (args.checkpoint.is_file() and args.features.is_dir()):
        print(f"note: no checkpoint at {args.checkpoint} or no feature cache in {args.features}: using --synthetic")
        args.synthetic = True
    return args


def repeated_runs(args: argparse.Namespace, argv: list[str]) -> int:
    """`--runs N`: the suite N times, each in its own process, then the per-figure median run."""
    runs: list[list[Row]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(args.runs):
            print(f"== run {k + 1} of {args.runs}", flush=True)
            out = Path(tmp) / f"run{k}.json"
            # the same arguments; the later --runs 1 / --json win over the caller's
            subprocess.run([sys.executable, "-m", "bench", *argv, "--runs", "1", "--json", str(out)], check=True)
            runs.append([Row(**r) for r in json.loads(out.read_text())])
    print(f"\n== median of {args.runs} runs")
    rows = median_rows(runs)
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps([dataclasses.asdict(r) for r in rows], indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.runs > 1:
        return repeated_runs(args, argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"CaptionScope bench: torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), "
          f"{'CUDA' if torch.cuda.is_available() else 'no GPU'}; repeats {args.repeats}"
          f"{' (quick)' if args.quick else ''}{' (synthetic)' if args.synthetic else ''}", flush=True)
    if not torch.cuda.is_available():
        print("note: no GPU here: every figure is CPU; the GPU measurement is skipped")
    rows: list[Row] = []
    for name in BENCHES:
        if name not in args.only:
            continue
        t0 = time.time()
        print(f"-- {name} ...", flush=True)
        module = importlib.import_module(f"bench.{name}")
        try:
            got = module.run(args)
        except Exception as e:   # one broken benchmark must not hide the others' figures
            got = [Row(name, "failed", "-", "-", None, "-", False, [f"{type(e).__name__}: {e}"])]
        for row in got:
            print(f"   {row.figure}: {row.value} vs {row.baseline}"
                  + (f" -> ratio {row.ratio:.2f}x" if row.ratio is not None else ""), flush=True)
        print(f"   ({time.time() - t0:.0f} s)", flush=True)
        rows += got
    print()
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps([dataclasses.asdict(r) for r in rows], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
