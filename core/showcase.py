"""In-domain showcase images: the dev images the model captions best (CIDEr-D) and a "where it fails" set.

The bundled example photos are public-domain pictures from outside Flickr8K's world, so they show the model
at its worst. With a Flickr8K folder, the dashboard offers these dev images first instead. The lists come
from a scored split (`corpus.score_split` per-image values); for the bundled checkpoint they are stored in
`assets/showcase.json` (file names and scores only, no dataset file), made by

    python -m core.showcase --data ../shared/flickr8k --split dev --out assets/showcase.json
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from core.errors import DataError, cli_main
from core.io_utils import atomic_write_json

FORMAT = "captionscope-showcase/1"
REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLED = REPO_ROOT / "assets" / "showcase.json"


@dataclass(frozen=True)
class Showcase:
    best: tuple[str, ...]          # highest CIDEr-D first
    fails: tuple[str, ...]         # lowest CIDEr-D first
    scores: Mapping[str, float]    # image -> CIDEr-D

    def label(self, name: str) -> str | None:
        if name in self.best:
            return f"best #{self.best.index(name) + 1}"
        if name in self.fails:
            return f"fails #{self.fails.index(name) + 1}"
        return None


def pick(per_image: Mapping[str, Mapping[str, float]], k: int = 6, metric: str = "CIDEr-D") -> Showcase:
    """The k best and the k worst images by `metric` (ties: by name, so the pick is deterministic)."""
    values = {name: float(m[metric]) for name, m in per_image.items()
              if metric in m and math.isfinite(float(m[metric]))}
    ranked = sorted(values, key=lambda n: (-values[n], n))
    best = tuple(ranked[:k])
    fails = tuple(n for n in sorted(values, key=lambda n: (values[n], n)) if n not in best)[:k]
    return Showcase(best, fails, {n: values[n] for n in best + fails})


def to_json(showcase: Showcase, *, checkpoint_sha256: str, decoding: dict, split: str) -> dict:
    return {"format": FORMAT, "checkpoint_sha256": checkpoint_sha256, "decoding": decoding, "split": split,
            "metric": "CIDEr-D", "best": list(showcase.best), "fails": list(showcase.fails),
            "scores": dict(showcase.scores)}


def load(path: str | Path = BUNDLED, *, checkpoint_sha256: str | None = None) -> Showcase | None:
    """The stored showcase, or None if absent, unreadable or made for another checkpoint."""
    try:
        blob = json.loads(Path(path).read_text(encoding="utf-8"))
        if blob.get("format") != FORMAT:
            return None
        if checkpoint_sha256 and blob.get("checkpoint_sha256") != checkpoint_sha256:
            return None
        return Showcase(tuple(map(str, blob["best"])), tuple(map(str, blob["fails"])),
                        {str(k): float(v) for k, v in blob["scores"].items()})
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


@cli_main
def main(argv: list[str] | None = None) -> int:
    from core import corpus
    from core.captioner import Captioner
    from core.checkpoint import default_checkpoint_path
    from core.data import load_dataset

    p = argparse.ArgumentParser(prog="python -m core.showcase", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--split", default="dev")
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--features", default="features", help="feature cache folder (used when it matches)")
    p.add_argument("-k", type=int, default=6)
    p.add_argument("--out", default=str(BUNDLED))
    args = p.parse_args(argv)
    path = args.checkpoint or default_checkpoint_path()
    captioner = Captioner.from_checkpoint(path)
    decoding = dataclasses.replace(captioner.default_decoding(), num_return_sequences=1)
    items = load_dataset(args.data).split(args.split)
    if not items:
        raise DataError(f"the {args.split} split is empty")
    preds = corpus.caption_split(captioner, items, decoding, features_dir=args.features, split=args.split,
                                 cache=corpus.CaptionCache()).captions
    scores = corpus.score_split(preds, items, with_meteor=False, cache=corpus.CaptionCache())
    showcase = pick(scores.per_image, args.k)
    atomic_write_json(Path(args.out), to_json(showcase, checkpoint_sha256=captioner.checkpoint_id,
                                              decoding=decoding.to_dict(), split=args.split))
    print(f"wrote {args.out}: best {', '.join(showcase.best)}; fails {', '.join(showcase.fails)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
