"""Score a checkpoint on a split: decode every image, compare with its references (COCO caption metrics).

    python -m core.evaluate --checkpoint checkpoints/captionscope-lite2.safetensors \
        --data ../shared/flickr8k --split dev --beam 3 --out eval/dev-beam3

writes `metrics.json` (corpus scores, settings, timing) and `captions.csv` (image, caption, references
joined by " | ", then one column per metric). Features come from the cache in --features when it holds
the split for this checkpoint's encoder weights, else the encoder runs on the images.
"""
from __future__ import annotations

import argparse
import csv
import io
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from core.corpus import caption_split, score_split
from core.data import ImageCaptions, load_dataset
from core.decoding import DecodingConfig
from core.cli import add_decoding_knobs, decoding_knobs
from core.errors import cli_main
from core.io_utils import atomic_write_json, atomic_write_text
from core.metrics import Scores, format_scores


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


@cli_main
def main(argv: list[str] | None = None) -> int:
    from core.captioner import Captioner
    from core.checkpoint import default_checkpoint_path
    from core.model_card import write_eval_card

    parser = argparse.ArgumentParser(prog="python -m core.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=None, help="default: the bundled checkpoint")
    parser.add_argument("--encoder-weights", default=None,
                        help="the encoder's weights: imagenet (default) | none | PATH to a local file")
    parser.add_argument("--data", required=True, help="Flickr8K folder")
    parser.add_argument("--split", default="dev")
    parser.add_argument("--beam", type=int, nargs="+", default=[3], help="one or more beam widths")
    parser.add_argument("--length-penalty", type=float, default=0.0)
    parser.add_argument("--max-length", type=int, default=20)
    parser.add_argument("--no-repeat-ngram", type=int, default=0)
    parser.add_argument("--limit", type=int, default=0, help="only the first N images of the split")
    parser.add_argument("--features", default="features", help="feature cache folder (used when it matches)")
    parser.add_argument("--out", required=True, help="folder for metrics.json and captions.csv")
    parser.add_argument("--card", action="store_true",
                        help="also write NAME.eval.json next to the checkpoint (the model card's table), with a "
                             "50-image subset scored from the image files for the regression test")
    add_decoding_knobs(parser, sampling=False)
    args = parser.parse_args(argv)
    decodings = {beam: DecodingConfig(beam_size=beam, length_penalty=args.length_penalty, max_length=args.max_length,
                                      no_repeat_ngram_size=args.no_repeat_ngram, **decoding_knobs(args))
                 for beam in args.beam}     # every setting checked before the checkpoint loads
    captioner = Captioner.from_checkpoint(args.checkpoint or default_checkpoint_path(),
                                          encoder_weights=args.encoder_weights)
    for decoding in decodings.values():
        captioner.check_decoding(decoding)     # bad words this vocabulary lacks: one error before any work
    items = load_dataset(args.data).split(args.split)
    items = items[: args.limit] if args.limit else items
    card = {"split": args.split, "images": len(items), "checkpoint_sha256": captioner.checkpoint_id, "beams": {}}
    for beam, decoding in decodings.items():
        predictions, scores, summary = evaluate_beam(captioner, items, decoding,
                                                     features_dir=args.features, split=args.split)
        out = Path(args.out) if len(args.beam) == 1 else Path(args.out) / f"beam{beam}"
        atomic_write_json(out / "metrics.json", summary)
        atomic_write_text(out / "captions.csv", captions_csv(predictions, items, scores))
        card["beams"][str(beam)] = {**scores.corpus, "mean_length": summary["mean_length"],
                                    "vocabulary_used": summary["vocabulary_used"]}
        print(f"{args.split} ({len(items)} images, beam {beam}): {format_scores(scores.corpus)} "
              f"| mean length {summary['mean_length']:.1f}")
        for note in scores.notes:
            print(f"note: {note}")
        print(f"wrote {out / 'metrics.json'} and {out / 'captions.csv'}")
    if args.card:
        subset = items[:50]
        decoding = DecodingConfig(beam_size=3, max_length=args.max_length)
        _, scores, _ = evaluate_beam(captioner, subset, decoding, features_dir=None, split=args.split)
        card["dev_subset"] = {"images": len(subset), "beam": 3, "from": "image files",
                              "BLEU-4": scores.corpus["BLEU-4"], "CIDEr-D": scores.corpus["CIDEr-D"]}
        print(f"wrote {write_eval_card(captioner.path, card)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
