"""Bench 6 — a decoding grid: 3 beam widths × 3 length penalties × 2 no-repeat sizes over 1,000 dev images,
from cached features, all seven metrics (METEOR included).

Fast: `core.grid.evaluate_grid` (large decode batches, each read once for all searches, greedy decoded
once for all α, one beam search for all α of a width and no-repeat size, every setting scored in one PTB and
one METEOR JVM, each distinct caption scored once). Baseline: the settings one after another,
naively: `caption_split` + `score_split` per setting (a tokenizer and a METEOR JVM per setting). Both must
give the same corpus scores. Target: the grid in <= 3 min on this machine.
"""
from __future__ import annotations

import argparse

from bench.common import Row, fmt_s, interleaved

AXES = {"beam_size": [1, 3, 5], "length_penalty": [0.0, 0.5, 1.0], "no_repeat_ngram_size": [0, 3]}
TARGET_S = 180.0


def run(args: argparse.Namespace) -> list[Row]:
    figure = f"3×3×2 grid, {args.grid_images} dev images, METEOR incl."
    if args.synthetic or not args.data.is_dir():
        return [Row("grid", figure, "skipped", "-", None, f"<= {TARGET_S:.0f} s", None,
                    ["needs the bundled checkpoint, Flickr8K dev and its feature cache (python -m core.features)"])]
    from core.captioner import Captioner
    from core.corpus import caption_split, score_split
    from core.data import load_dataset
    from core.decoding import DecodingConfig
    from core.grid import build_grid, evaluate_grid

    captioner = Captioner.from_checkpoint(args.checkpoint, device="cpu")
    items = load_dataset(args.data).split("dev")[: args.grid_images]
    settings = build_grid(DecodingConfig(), AXES)
    out: dict = {}

    def grid() -> None:
        result = evaluate_grid(captioner, items, settings, list(AXES), features_dir=args.features, split="dev")
        out["grid"] = [result.scores[label].corpus for label in result.labels]
        out["timings"] = result.timings

    def naive() -> None:
        out["naive"] = [score_split(caption_split(captioner, items, config, features_dir=args.features,
                                                  split="dev").captions, items, with_meteor=True).corpus
                        for config in settings]

    times = interleaved({"grid": grid, "naive": naive}, args.grid_repeats)
    same = sum(all(abs(a[m] - b.get(m, float("nan"))) < 1e-9 for m in a) and a.keys() == b.keys()
               for a, b in zip(out["grid"], out["naive"]))
    ratio = times["naive"] / times["grid"]
    ok = times["grid"] <= TARGET_S and same == len(settings)
    return [Row("grid", figure, fmt_s(times["grid"]), f"{fmt_s(times['naive'])} one setting after another", ratio,
                f"<= {TARGET_S:.0f} s", ok,
                [f"{len(settings)} settings; identical corpus scores {same}/{len(settings)}; "
                 f"median of {args.grid_repeats}; metrics: {', '.join(out['grid'][0])}",
                 "grid stages (s): " + ", ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}"
                                                 for k, v in out["timings"].items())])]
