"""Is attention faithful over a whole split? Deletion AUCs of attention, gradient saliency and random order
for every generated word of the first N images, summarised with bootstrap intervals.

    python -m core.faithfulness --checkpoint C --data D --split dev --limit N --space feature|pixel --out DIR
    torchrun --nproc_per_node 4 -m core.faithfulness ...     # images sharded across ranks, rank 0 merges

Writes DIR/words.csv (one row per generated token: the words, then <end>) and DIR/summary.json (keys
`attention`, `saliency`, `random`: mean AUC with a bootstrap 95 % interval, the share of words where the
method beats random; then `by_word` and `by_frequency`). A lower deletion AUC means p(word) falls sooner as
the regions the method ranks first are removed: the method found what the word depended on. Word frequency
is the word's rank in the vocabulary, which is ordered by training count ("a" is rank 1).
"""
from __future__ import annotations

import argparse
import csv
import io
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from core import evidence
from core.data import ImageCaptions
from core.decoding import DecodingConfig
from core.distributed import rank_world, torchrun_group
from core.errors import ConfigError, DataError, cli_main
from core.features import open_features
from core.images import load_image
from core.io_utils import atomic_write_bytes, atomic_write_json
from core.masked_scorer import single_threaded

FORMAT = "captionscope-faithfulness/1"
METHODS = ("attention", "saliency", "random")
COLUMNS = ["image", "position", "word", "frequency_rank", "frequency_band", "p_word", "auc_attention",
           "auc_saliency", "auc_random", "auc_random_low", "auc_random_high"]
BANDS = ((1, 10, "top 10"), (11, 100, "11-100"), (101, 1000, "101-1000"), (1001, 10**9, "over 1000"))
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class FaithfulnessConfig:
    space: str = "feature"       # feature | pixel
    seeds: int = 3               # random deletion orders per caption
    step: int = 1                # regions removed between two points of a curve (1 = one at a time)
    seed: int = 0
    batch_size: int = 16         # re-encodes per batch (pixel space)

    def validate(self) -> None:
        evidence.check_space(self.space)
        for name, low in (("seeds", 1), ("step", 1), ("batch_size", 1), ("seed", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"faithfulness: {name} must be an integer >= {low}, got {value!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def frequency_band(rank: int | None) -> str:
    if rank is None:
        return "<end>"
    return next(label for low, high, label in BANDS if low <= rank <= high)


def _rank(captioner, word: str) -> int | None:
    index = captioner.vocab.stoi.get(word)
    return None if index is None or index < 4 else index - 3


def _store(captioner, features_dir, split: str):
    if features_dir is None or captioner.fine_tuned:
        return None
    try:
        return open_features(features_dir, captioner.encoder_name, split, weights_sha256=captioner.encoder_sha256)
    except DataError:
        return None


def image_rows(captioner, item: ImageCaptions, decoding: DecodingConfig, config: FaithfulnessConfig,
               store=None) -> list[dict]:
    """Rows of words.csv for one image: decode its best caption, then score every word's deletion curves."""
    image = None
    if config.space == "pixel" or store is None or item.image not in store.index_of():
        image = load_image(item.path)
        feats = captioner.encode([image])[0]
    else:
        feats = store.get(np.asarray([store.index_of()[item.image]]))[0]
    hyp = captioner.decode(feats.unsqueeze(0), decoding)[0][0]
    rows = evidence.caption_faithfulness(captioner, feats, hyp, space=config.space, image=image,
                                         seeds=config.seeds, step=config.step, seed=config.seed,
                                         batch_size=config.batch_size)
    out = []
    for row in rows:
        rank = _rank(captioner, row["word"])
        out.append({"image": item.image, **row, "frequency_rank": rank, "frequency_band": frequency_band(rank)})
    return out


def default_workers() -> int:
    """Images scored at once in feature space: one per CPU core this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:                     # not Linux
        return max(1, os.cpu_count() or 1)


def _score_images(captioner, items: Sequence[ImageCaptions], shard: np.ndarray, decoding: DecodingConfig,
                  config: FaithfulnessConfig, store, workers: int, progress: Progress | None) -> list[dict]:
    """image_rows of each image of the shard, in order; feature space from cached features runs `workers`
    images at once on threads (torch releases the GIL in its kernels; the model is only read), each kernel
    single-threaded."""
    def one(i) -> list[dict]:
        return image_rows(captioner, items[int(i)], decoding, config, store)
    rows: list[dict] = []
    # only from cached features: re-encoding (pixel space, or images the store lacks) stays on one thread,
    # the encoder's first call compiles it
    index = store.index_of() if store is not None else {}
    cached = all(items[int(i)].image in index for i in shard)
    parallel = workers > 1 and config.space == "feature" and len(shard) > 1 and cached
    # feature space: small kernels, single-threaded (see single_threaded); pixel space keeps the encoder's threads
    threads = single_threaded() if config.space == "feature" else nullcontext()
    with threads, ThreadPoolExecutor(workers if parallel else 1) as pool:
        results = pool.map(one, shard) if parallel else map(one, shard)
        for done, part in enumerate(results, start=1):
            rows += part
            if progress:
                progress(done, len(shard))
    return rows


def run_split(captioner, items: Sequence[ImageCaptions], decoding: DecodingConfig, config: FaithfulnessConfig, *,
              features_dir: str | Path | None = None, split: str = "dev", progress: Progress | None = None,
              cache=None, store=None, workers: int | None = None) -> list[dict]:
    """Rows for every generated word of `items`, in image order. Under torch.distributed each rank takes a
    contiguous shard and every rank gets the merged rows back (rank order = image order). `cache` (a
    core.corpus.CaptionCache) keeps finished results keyed by everything that determines them. `store` (a
    FeatureStore) is used instead of opening `features_dir`; `workers` images are scored at once in feature
    space (default: one per core, one per rank under torch.distributed); the rows do not depend on it."""
    config.validate()
    names = [it.image for it in items]
    key = None
    if cache is not None:
        key = cache.make_key("faithfulness", format=FORMAT, checkpoint=captioner.checkpoint_id,
                             decoding=decoding.to_dict(), config=config.to_dict(), split=split, images=names)
        hit = cache.get(key, names)
        if isinstance(hit, list):
            if progress:
                progress(len(items), len(items))
            return hit
    rank, world = rank_world()
    shard = np.array_split(np.arange(len(items)), world)[rank] if world > 1 else np.arange(len(items))
    store = _store(captioner, features_dir, split) if store is None else store
    workers = (default_workers() if world == 1 else 1) if workers is None else max(1, int(workers))
    rows = _score_images(captioner, items, shard, decoding, config, store, workers, progress)
    if world > 1:
        gathered: list = [None] * world
        torch.distributed.all_gather_object(gathered, rows)
        rows = [r for part in gathered for r in part]
    if cache is not None and rank == 0:
        cache.put(key, rows, names)
    return rows


# -- summary -----------------------------------------------------------------------------------------------------

def _bootstrap_ci(values: np.ndarray, resamples: int, rng: np.random.Generator) -> list[float]:
    if len(values) == 0:
        return [float("nan"), float("nan")]
    means = values[rng.integers(0, len(values), size=(resamples, len(values)))].mean(axis=1)
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def _methods(rows: list[dict], resamples: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    random = np.array([r["auc_random"] for r in rows], dtype=np.float64)
    out = {}
    for method in METHODS:
        values = np.array([r[f"auc_{method}"] for r in rows], dtype=np.float64)
        entry = {"mean_auc": float(values.mean()) if len(values) else float("nan"),
                 "ci95": _bootstrap_ci(values, resamples, rng)}
        if method != "random":
            entry["beats_random"] = float((values < random).mean()) if len(values) else float("nan")
        out[method] = entry
    return out


def _group(rows: list[dict], key: str) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(str(r[key]), []).append(r)
    return groups


def _brief(rows: list[dict]) -> dict:
    """Mean AUC per method and attention's share beating random, for a group of words (no intervals)."""
    entry: dict = {"count": len(rows)}
    for method in METHODS:
        entry[method] = float(np.mean([r[f"auc_{method}"] for r in rows]))
    entry["attention_beats_random"] = float(np.mean([r["auc_attention"] < r["auc_random"] for r in rows]))
    entry["saliency_beats_random"] = float(np.mean([r["auc_saliency"] < r["auc_random"] for r in rows]))
    return entry


def summarise(rows: list[dict], *, resamples: int = 1000, seed: int = 0, min_count: int = 1) -> dict:
    """summary.json's content: per method over all words, then by word (most frequent first) and by band."""
    by_word = {w: _brief(g) for w, g in sorted(_group(rows, "word").items(), key=lambda kv: (-len(kv[1]), kv[0]))
               if len(g) >= min_count}
    band_order = [label for _, _, label in BANDS] + ["<end>"]
    bands = _group(rows, "frequency_band")
    by_frequency = {b: {**_brief(bands[b]), "ci95": {m: v["ci95"] for m, v in _methods(bands[b], resamples, seed).items()}}
                    for b in band_order if b in bands}
    return {"format": FORMAT, "images": len({r["image"] for r in rows}), "words": len(rows),
            **_methods(rows, resamples, seed), "by_word": by_word, "by_frequency": by_frequency}


def least_faithful(rows: list[dict], n: int = 20) -> list[dict]:
    """The words where attention does worst against chance (largest AUC above the random mean)."""
    return sorted(rows, key=lambda r: -(r["auc_attention"] - r["auc_random"]))[:n]


def words_csv(rows: list[dict]) -> bytes:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({c: (f"{r[c]:.6f}" if isinstance(r[c], float) else "" if r[c] is None else r[c])
                         for c in COLUMNS})
    return buffer.getvalue().encode("utf-8")


def write_outputs(rows: list[dict], summary: dict, out_dir: str | Path) -> tuple[Path, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "words.csv", words_csv(rows))
    atomic_write_json(out / "summary.json", summary)
    return out / "words.csv", out / "summary.json"


@cli_main
def main(argv: list[str] | None = None) -> int:
    from core.captioner import Captioner
    from core.data import load_dataset

    p = argparse.ArgumentParser(prog="python -m core.faithfulness", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True, help="Flickr8K folder (captions + split lists + images)")
    p.add_argument("--split", default="dev")
    p.add_argument("--limit", type=int, default=None, help="only the first N images of the split")
    p.add_argument("--space", choices=evidence.saliency.SPACES, default="feature")
    p.add_argument("--out", required=True, help="folder for words.csv and summary.json")
    p.add_argument("--features", default="features", help="feature cache folder (feature space uses it if present)")
    p.add_argument("--encoder-weights", default=None, help="imagenet (default) | none | PATH")
    p.add_argument("--seeds", type=int, default=3, help="random deletion orders per caption")
    p.add_argument("--step", type=int, default=1, help="regions removed per curve point (1 = one at a time)")
    p.add_argument("--beam", type=int, default=3)
    p.add_argument("--max-length", type=int, default=20)
    p.add_argument("--length-penalty", type=float, default=0.0)
    p.add_argument("--workers", type=int, default=None,
                   help="images scored at once in feature space (default: one per CPU core; 1 per rank under torchrun)")
    args = p.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit must be >= 1, got {args.limit}")
    if args.workers is not None and args.workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {args.workers}")
    with torchrun_group("gloo") as (rank, _):
        config = FaithfulnessConfig(space=args.space, seeds=args.seeds, step=args.step)
        decoding = DecodingConfig(beam_size=args.beam, max_length=args.max_length,
                                  length_penalty=args.length_penalty)
        config.validate()
        items = load_dataset(args.data).split(args.split)[: args.limit]
        captioner = Captioner.from_checkpoint(args.checkpoint, encoder_weights=args.encoder_weights,
                                              device="cuda" if torch.cuda.is_available() else "cpu")
        t0 = time.perf_counter()
        rows = run_split(captioner, items, decoding, config, features_dir=args.features, split=args.split,
                         workers=args.workers)
        if rank == 0:
            summary = {**summarise(rows), "space": config.space, "seeds": config.seeds, "step": config.step,
                       "split": args.split, "checkpoint": Path(args.checkpoint).name, "decoding": decoding.to_dict()}
            csv_path, json_path = write_outputs(rows, summary, args.out)
            a, s, r = (summary[m]["mean_auc"] for m in METHODS)
            print(f"{len(items)} images, {len(rows)} words, {time.perf_counter() - t0:.0f} s: mean deletion AUC "
                  f"attention {a:.3f}, saliency {s:.3f}, random {r:.3f}; attention beats random on "
                  f"{summary['attention']['beats_random']:.0%} of words -> {csv_path}, {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
