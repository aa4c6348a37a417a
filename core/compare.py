"""Checkpoint against checkpoint: the same split captioned by two models, scored together, image by image.

    python -m core.compare --a checkpoints/ce.safetensors --b checkpoints/scst.safetensors \
        --data ../shared/flickr8k --split dev --out eval/ce-vs-scst

writes `per_image.csv` (image, both captions, whether they differ, the word-level diff, the references,
each metric for A and B and the delta B - A; biggest |delta| of --metric first) and `summary.json` (corpus
metrics of both, their deltas, wins / losses / ties, how many captions changed, whether attention can be
lined up). Only captions and references are compared, so checkpoints with different vocabularies, grids or
encoders can be compared; comparing a checkpoint with itself gives zero deltas.
"""
from __future__ import annotations

import argparse
import difflib
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import pandas as pd

from core.batch_metrics import score_caption_sets
from core.data import ImageCaptions
from core.decoding import DecodingConfig
from core.errors import ConfigError, cli_main
from core.grid import caption_stats
from core.metrics import METRIC_NAMES, Scores

SIDES = ("a", "b")


def word_diff(a: str, b: str) -> list[tuple[str, str]]:
    """The words of both captions in reading order, each tagged "same", "removed" (only in a) or "added"
    (only in b): a replaced run shows the removed words first, then the added ones."""
    wa, wb = a.split(), b.split()
    out: list[tuple[str, str]] = []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(a=wa, b=wb, autojunk=False).get_opcodes():
        if op == "equal":
            out += [("same", w) for w in wa[i1:i2]]
            continue
        out += [("removed", w) for w in wa[i1:i2]]
        out += [("added", w) for w in wb[j1:j2]]
    return out


def diff_text(a: str, b: str) -> str:
    """word_diff as plain text: [-removed-] {+added+} (git's word-diff notation)."""
    marks = {"same": "{}", "removed": "[-{}-]", "added": "{{+{}+}}"}
    return " ".join(marks[tag].format(word) for tag, word in word_diff(a, b))


def attention_alignment(a, b) -> tuple[bool, str]:
    """Can the two captioners' attention maps be shown region by region? (same grid over the image)."""
    if a.grid != b.grid:
        return False, (f"A attends over a {a.grid}×{a.grid} grid and B over a {b.grid}×{b.grid} grid, so their "
                       "attention maps cannot be lined up region by region; captions and metrics are compared")
    if a.encoder_name != b.encoder_name:
        return True, (f"different encoders ({a.encoder_name} vs {b.encoder_name}) on the same {a.grid}×{a.grid} "
                      "grid: the regions line up, the features behind them differ")
    return True, ""


def shared_words(words_a: Sequence[str], words_b: Sequence[str]) -> list[tuple[str, int, int]]:
    """Words both captions contain: (word, its first position in a, its first position in b), in a's order."""
    first_b: dict[str, int] = {}
    for j, w in enumerate(words_b):
        first_b.setdefault(w, j)
    seen: set[str] = set()
    out = []
    for i, w in enumerate(words_a):
        if w in first_b and w not in seen:
            seen.add(w)
            out.append((w, i, first_b[w]))
    return out


@dataclass
class Comparison:
    captions: dict[str, dict[str, dict]]        # "a" / "b" -> image -> caption_split entry
    scores: dict[str, Scores]                   # "a" / "b" -> scores
    per_image: pd.DataFrame                     # see `per_image_table`
    summary: dict = field(default_factory=dict)


def per_image_table(items: Sequence[ImageCaptions], captions: dict[str, dict[str, dict]],
                    scores: dict[str, Scores], metric: str = "CIDEr-D") -> pd.DataFrame:
    """image, path, caption_a, caption_b, changed, diff, references, then <metric>_a, <metric>_b,
    <metric>_delta (b - a) for every metric scored; sorted by |delta of `metric`|, biggest first."""
    metrics = [m for m in METRIC_NAMES if m in scores["a"].corpus]
    if metric not in metrics:
        raise ConfigError(f"cannot rank by {metric!r}: scored metrics are {', '.join(metrics)}")
    rows = []
    for it in items:
        ca, cb = captions["a"][it.image]["caption"], captions["b"][it.image]["caption"]
        row = {"image": it.image, "path": str(it.path), "caption_a": ca, "caption_b": cb, "changed": ca != cb,
               "diff": diff_text(ca, cb), "references": " | ".join(it.captions)}
        for m in metrics:
            va = scores["a"].per_image[it.image].get(m, math.nan)
            vb = scores["b"].per_image[it.image].get(m, math.nan)
            row.update({f"{m}_a": va, f"{m}_b": vb, f"{m}_delta": vb - va})
        rows.append(row)
    frame = pd.DataFrame(rows)
    order = frame[f"{metric}_delta"].abs().sort_values(ascending=False, kind="stable").index
    return frame.loc[order].reset_index(drop=True)


def compare_checkpoints(a, b, items: Sequence[ImageCaptions], decoding: DecodingConfig, *,
                        features_dir: str | Path | None = "features", split: str = "dev", cache=None,
                        progress=None, with_meteor: bool = True, tokenizer: str = "ptb",
                        metric: str = "CIDEr-D") -> Comparison:
    """Caption `items` with captioners a and b (same decoding settings), score both in one pass, line them up."""
    from core.corpus import caption_split

    if not items:
        raise ConfigError(f"the {split} split has no images to compare")
    captions = {}
    for k, (side, captioner) in enumerate(zip(SIDES, (a, b))):
        report = (lambda d, t, k=k: progress(k * t + d, 2 * t)) if progress else None
        captions[side] = caption_split(captioner, items, decoding, features_dir=features_dir, split=split,
                                       cache=cache, progress=report).captions
    references = {it.image: list(it.captions) for it in items}
    metrics = [m for m in METRIC_NAMES if with_meteor or m != "METEOR"]
    scores = score_caption_sets({s: {n: e["caption"] for n, e in captions[s].items()} for s in SIDES},
                                references, metrics=metrics, tokenizer=tokenizer)
    table = per_image_table(items, captions, scores, metric)
    comparable, reason = attention_alignment(a, b)
    delta = table[f"{metric}_delta"]
    summary = {
        "split": split, "images": len(items), "decoding": decoding.to_dict(), "ranked_by": metric,
        **{side: {"checkpoint": str(c.path), "checkpoint_sha256": c.checkpoint_id, "encoder": c.encoder_name,
                  "grid": c.grid, "vocabulary_size": len(c.vocab), "metrics": scores[side].corpus,
                  "vocabulary_used": len({w for e in captions[side].values() for w in e["caption"].split()}),
                  **caption_stats(captions[side])}
           for side, c in zip(SIDES, (a, b))},
        "delta": {m: scores["b"].corpus[m] - scores["a"].corpus[m] for m in scores["a"].corpus
                  if m in scores["b"].corpus},
        "changed_captions": int(table["changed"].sum()),
        "wins": int((delta > 0).sum()), "losses": int((delta < 0).sum()), "ties": int((delta == 0).sum()),
        "attention": {"comparable": comparable, "note": reason},
        "notes": sorted(set(scores["a"].notes) | set(scores["b"].notes)),
    }
    return Comparison(captions, scores, table, summary)


@cli_main
def main(argv: list[str] | None = None) -> int:
    from core.captioner import Captioner
    from core.data import load_dataset
    from core.io_utils import atomic_write_json, atomic_write_text
    from core.metrics import format_scores

    parser = argparse.ArgumentParser(prog="python -m core.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--a", required=True, help="checkpoint A")
    parser.add_argument("--b", required=True, help="checkpoint B (deltas are B - A)")
    parser.add_argument("--data", required=True, help="Flickr8K folder")
    parser.add_argument("--split", default="dev")
    parser.add_argument("--out", required=True, help="folder for per_image.csv and summary.json")
    parser.add_argument("--beam", type=int, default=3)
    parser.add_argument("--length-penalty", type=float, default=0.0)
    parser.add_argument("--no-repeat-ngram", type=int, default=0)
    parser.add_argument("--max-length", type=int, default=20)
    parser.add_argument("--metric", default="CIDEr-D", choices=METRIC_NAMES, help="rank images by its delta")
    parser.add_argument("--limit", type=int, default=0, help="only the first N images of the split")
    parser.add_argument("--features", default="features", help="feature cache folder (used when it matches)")
    parser.add_argument("--encoder-weights", default=None, help="imagenet (default) | none | PATH")
    args = parser.parse_args(argv)
    decoding = DecodingConfig(beam_size=args.beam, length_penalty=args.length_penalty,
                              no_repeat_ngram_size=args.no_repeat_ngram, max_length=args.max_length)
    items = load_dataset(args.data).split(args.split)
    items = items[: args.limit] if args.limit else items
    a, b = (Captioner.from_checkpoint(p, encoder_weights=args.encoder_weights) for p in (args.a, args.b))
    result = compare_checkpoints(a, b, items, decoding, features_dir=args.features, split=args.split,
                                 metric=args.metric)
    out = Path(args.out)
    atomic_write_text(out / "per_image.csv", result.per_image.to_csv(index=False, float_format="%.6f"))
    atomic_write_json(out / "summary.json", result.summary)
    s = result.summary
    print(f"A {Path(args.a).name}: {format_scores(s['a']['metrics'])}")
    print(f"B {Path(args.b).name}: {format_scores(s['b']['metrics'])}")
    print(f"{s['changed_captions']} of {s['images']} captions differ; by {args.metric} B wins {s['wins']}, "
          f"loses {s['losses']}, ties {s['ties']}")
    if s["attention"]["note"]:
        print(f"note: {s['attention']['note']}")
    for note in s["notes"]:
        print(f"note: {note}")
    print(f"wrote {out / 'per_image.csv'} and {out / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
