"""Score a checkpoint on a split: decode every image, compare with its references (COCO caption metrics).

    python -m core.evaluate --checkpoint checkpoints/captionscope-lite2.safetensors \
        --data ../shared/flickr8k --split dev --beam 3 --out eval/dev-beam3

Decoding flags left out (--beam, --length-penalty, --max-length, --no-repeat-ngram) take the checkpoint's
stored defaults, as the dashboard does. Writes `metrics.json` (corpus scores, settings, timing) and
`captions.csv` (image, caption, references joined by " | ", then one column per metric). Features come from the cache in --features when it holds
the split for this checkpoint's encoder weights, else the encoder runs on the images.

Several values of --beam, --length-penalty or --no-repeat-ngram make a decoding grid (their full product,
at most 200 settings, see core/grid.py):

    python -m core.evaluate ... --beam 1 3 5 --length-penalty 0 0.5 1 --no-repeat-ngram 0 3 --out eval/grid

writes `grid.csv` and `metrics.json` with one row per setting, and `<setting>/captions.csv` (plus that
setting's `metrics.json`) per setting, e.g. `beam3_lp0.5_ngram3/`. Under torchrun the settings are
sharded across ranks and rank 0 scores and writes everything.
"""
from __future__ import annotations

import argparse
import csv
import io
import sys
from datetime import timedelta
from pathlib import Path
from typing import Sequence

import numpy as np

from core.corpus import caption_split, score_split
from core.data import ImageCaptions, load_dataset
from core.decoding import DecodingConfig
from core.distributed import rank_world, torchrun_group
from core.cli import add_decoding_knobs, decoding_knobs, stored_knobs
from core.errors import ConfigError, cli_main
from core.grid import build_grid, setting_id
from core.io_utils import atomic_write_json, atomic_write_text
from core.metrics import METRIC_NAMES, Scores, format_scores

# how long the other ranks may wait for rank 0 evaluating a single setting alone (see main)
RANK_0_ALONE = timedelta(hours=12)


def captions_csv(predictions: dict[str, str], items: Sequence[ImageCaptions], scores: Scores) -> str:
    metric_names = list(scores.corpus)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["image", "caption", "references", *metric_names])
    for it in items:
        per = scores.per_image.get(it.image, {})
        writer.writerow([it.image, predictions[it.image], " | ".join(it.captions),
                         *(f"{per[m]:.6f}" if m in per else "" for m in metric_names)])
    return buffer.getvalue()


def evaluate_beam(captioner, items: Sequence[ImageCaptions], decoding: DecodingConfig, *,
                  features_dir: str | None, split: str) -> tuple[dict[str, str], Scores, dict]:
    """Decode `items` with one setting and score them; returns captions, scores and a summary dict."""
    run = caption_split(captioner, items, decoding, features_dir=features_dir, split=split)
    predictions = {name: entry["caption"] for name, entry in run.captions.items()}
    scores = score_split(predictions, items)
    lengths = [len(c.split()) for c in predictions.values()]
    summary = {"checkpoint": str(captioner.path), "split": split, "images": len(items),
               "decoding": decoding.to_dict(), "metrics": scores.corpus, "notes": scores.notes,
               "mean_length": float(np.mean(lengths)) if lengths else 0.0,
               "vocabulary_used": len({w for c in predictions.values() for w in c.split()}),
               "features_from": run.source, "decode_time_s": run.decode_s}
    return predictions, scores, summary


def write_grid(result, items: Sequence[ImageCaptions], out: Path, *, checkpoint: str, split: str,
               varying: Sequence[str]) -> None:
    """`grid.csv` and `metrics.json` (one row per setting) in `out`, and `<setting>/captions.csv` (with that
    setting's `metrics.json` summary) per setting; folder names use only the axes that vary."""
    rows = []
    for config, label in zip(result.settings, result.labels):
        folder = out / setting_id(config, varying)
        row = result.table[result.table["setting"] == label].iloc[0].to_dict()
        row = {k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()}
        row.update(folder=folder.name, decoding=config.to_dict())
        rows.append(row)
        summary = {"checkpoint": checkpoint, "split": split, "images": len(items), "decoding": config.to_dict(),
                   "metrics": result.scores[label].corpus, "notes": result.scores[label].notes,
                   **{k: row[k] for k in ("mean_length", "distinct_1", "distinct_2", "ended_with_end")},
                   "decode_time_s": row["decode_s"]}
        predictions = {n: e["caption"] for n, e in result.captions[label].items()}
        atomic_write_json(folder / "metrics.json", summary)
        atomic_write_text(folder / "captions.csv", captions_csv(predictions, items, result.scores[label]))
    atomic_write_text(out / "grid.csv", result.table.to_csv(index=False, float_format="%.6g"))
    atomic_write_json(out / "metrics.json", {"checkpoint": checkpoint, "split": split, "images": len(items),
                                             "axes": list(result.axes), "notes": result.notes, "settings": rows})


def _grid_axes(args: argparse.Namespace, stored: DecodingConfig) -> dict[str, list]:
    """The grid's axes: the values given, else the one value `stored` (a checkpoint's defaults) has."""
    return {"beam_size": args.beam or [stored.beam_size],
            "length_penalty": args.length_penalty or [stored.length_penalty],
            "no_repeat_ngram_size": args.no_repeat_ngram or [stored.no_repeat_ngram_size]}


def _grid_settings(args: argparse.Namespace, stored: DecodingConfig):
    """(axes, settings, varying axes) of the grid the flags ask for, around a checkpoint's `stored` defaults."""

    axes = _grid_axes(args, stored)
    base = DecodingConfig(beam_size=axes["beam_size"][0], max_length=args.max_length or stored.max_length,
                          **{**stored_knobs(stored), **decoding_knobs(args)})
    varying = [a for a, values in axes.items() if len(dict.fromkeys(values)) > 1]
    if args.card and set(varying) - {"beam_size"}:
        raise ConfigError("--card records beam widths only: give one --length-penalty and one --no-repeat-ngram")
    return axes, build_grid(base, axes), varying


@cli_main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m core.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=None, help="default: the bundled checkpoint")
    parser.add_argument("--encoder-weights", default=None,
                        help="the encoder's weights: imagenet (default) | none | PATH to a local file")
    parser.add_argument("--data", required=True, help="Flickr8K folder")
    parser.add_argument("--split", default="dev")
    parser.add_argument("--beam", type=int, nargs="+", default=None,
                        help="one or more beam widths (default, here and below: the checkpoint's stored setting)")
    parser.add_argument("--length-penalty", type=float, nargs="+", default=None,
                        help="one or more length penalties alpha (the grid is the product of all axes)")
    parser.add_argument("--max-length", type=int, default=None)
    parser.add_argument("--no-repeat-ngram", type=int, nargs="+", default=None,
                        help="one or more no-repeat n-gram sizes (0 = off)")
    parser.add_argument("--limit", type=int, default=0, help="only the first N images of the split")
    parser.add_argument("--features", default="features", help="feature cache folder (used when it matches)")
    parser.add_argument("--out", required=True, help="folder for metrics.json and captions.csv (+ grid.csv)")
    parser.add_argument("--card", action="store_true",
                        help="also write NAME.eval.json next to the checkpoint (the model card's table), with a "
                             "50-image subset scored from the image files for the regression test")
    add_decoding_knobs(parser, sampling=False)
    args = parser.parse_args(argv)
    # the knobs sit in the base setting; every grid point is checked before the checkpoint loads
    _grid_settings(args, DecodingConfig())
    # under torchrun the grid's settings are sharded across ranks, which leave the gloo group together; a
    # single setting is evaluated by rank 0 alone while the others wait at the closing barrier, for as long
    # as that takes (COCO's 40k images from their files is more than gloo's default 30 min here)
    with torchrun_group("gloo", timeout=RANK_0_ALONE):
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    from core.captioner import Captioner
    from core.checkpoint import default_checkpoint_path
    from core.grid import evaluate_grid

    captioner = Captioner.from_checkpoint(args.checkpoint or default_checkpoint_path(),
                                          encoder_weights=args.encoder_weights)
    stored = captioner.default_decoding()        # what a flag leaves out comes from the checkpoint
    axes, settings, varying = _grid_settings(args, stored)
    args.max_length = args.max_length or stored.max_length
    for decoding in settings:
        captioner.check_decoding(decoding)     # bad words this vocabulary lacks: one error before any work
    items = load_dataset(args.data).split(args.split)
    items = items[: args.limit] if args.limit else items
    if len(settings) == 1:
        return _evaluate_one(args, captioner, items, settings[0])
    result = evaluate_grid(captioner, items, settings, list(axes), features_dir=args.features, split=args.split)
    if rank_world()[0] != 0:
        return 0
    out = Path(args.out)
    write_grid(result, items, out, checkpoint=str(captioner.path), split=args.split, varying=varying)
    print(result.table[["setting", *METRIC_NAMES[3:], "mean_length", "decode_s"]].to_string(
        index=False, float_format=lambda v: f"{v:.3f}"))
    for note in result.notes:
        print(f"note: {note}")
    print(f"wrote {out / 'grid.csv'}, {out / 'metrics.json'} and captions.csv for {len(settings)} settings")
    if args.card:
        card = {"split": args.split, "images": len(items), "checkpoint_sha256": captioner.checkpoint_id,
                "beams": {str(c.beam_size): {**result.scores[label].corpus,
                                             "mean_length": float(np.mean([e["length"] for e in
                                                                           result.captions[label].values()])),
                                             "vocabulary_used": len({w for e in result.captions[label].values()
                                                                     for w in e["caption"].split()})}
                          for c, label in zip(result.settings, result.labels)}}
        _write_card(args, captioner, items, card)
    return 0


def _evaluate_one(args: argparse.Namespace, captioner, items: Sequence[ImageCaptions],
                  decoding: DecodingConfig) -> int:
    if rank_world()[0] != 0:
        return 0
    predictions, scores, summary = evaluate_beam(captioner, items, decoding, features_dir=args.features,
                                                 split=args.split)
    out = Path(args.out)
    atomic_write_json(out / "metrics.json", summary)
    atomic_write_text(out / "captions.csv", captions_csv(predictions, items, scores))
    print(f"{args.split} ({len(items)} images, beam {decoding.beam_size}): {format_scores(scores.corpus)} "
          f"| mean length {summary['mean_length']:.1f}")
    for note in scores.notes:
        print(f"note: {note}")
    print(f"wrote {out / 'metrics.json'} and {out / 'captions.csv'}")
    if args.card:
        card = {"split": args.split, "images": len(items), "checkpoint_sha256": captioner.checkpoint_id,
                "beams": {str(decoding.beam_size): {**scores.corpus, "mean_length": summary["mean_length"],
                                                    "vocabulary_used": summary["vocabulary_used"]}}}
        _write_card(args, captioner, items, card)
    return 0


def _write_card(args: argparse.Namespace, captioner, items: Sequence[ImageCaptions], card: dict) -> None:
    from core.model_card import write_eval_card

    subset = items[:50]
    decoding = DecodingConfig(beam_size=3, max_length=args.max_length)
    _, scores, _ = evaluate_beam(captioner, subset, decoding, features_dir=None, split=args.split)
    card["dev_subset"] = {"images": len(subset), "beam": 3, "from": "image files",
                          "BLEU-4": scores.corpus["BLEU-4"], "CIDEr-D": scores.corpus["CIDEr-D"]}
    print(f"wrote {write_eval_card(captioner.path, card)}")


if __name__ == "__main__":
    sys.exit(main())
