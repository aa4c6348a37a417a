"""Feature cache: run the encoder once over a split, store (N, L, C) float16 maps memory-mapped on disk.

Training and corpus evaluation then read features instead of images (the encoder dominates the cost).

Layout for split `train` of encoder `efficientnet_lite2` under `features/`:
    features/efficientnet_lite2/train.f16        raw float16 array (N, L, C), memory-mapped
    features/efficientnet_lite2/train.json       index: image names, shape, encoder + weights sha256
The folder is the cache key (`core.encoders.feature_key`): `efficientnet_lite2@320` at 320 px, and
`efficientnet_lite2@320-tail2` for `--tail-stages 2`, the activations *entering* the encoder's last two stages
(the frozen part's output, for fine-tuning those stages on a CPU). The index records the key, so a cache
copied under another name, made at another size or with other weights, is refused, never reused.

Crash safety: a run writes `train.f16.partial` and a progress file after every flushed chunk. A killed run
resumes from the last recorded image. The finished array is renamed into place and only then is the index
written; the index is the commit point, so a file without a valid index is never loaded as a cache.
With torchrun (`torchrun --nproc_per_node N -m core.features ...`), each rank extracts a contiguous shard
into its own `.rankR.partial`; after a barrier rank 0 concatenates them in rank order into one `.partial`,
renames it into place and writes the index (the same commit point as a single run), then the other ranks
open the finished cache.

    python -m core.features --data ../shared/flickr8k --split train dev --encoder efficientnet_lite2
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from core.distributed import rank_world, torchrun_group
from core.encoders import Encoder, _CompiledOrEager, build_encoder, feature_key
from core.errors import ConfigError, DataError, cli_main
from core.images import load_image
from core.io_utils import atomic_write_json

FORMAT = "captionscope-features/1"


@dataclass
class FeatureStore:
    """A finished cache: `array[i]` are the (L, C) features of `images[i]`."""
    path: Path
    images: list[str]
    array: np.ndarray           # memmap float16 (N, L, C)
    encoder: str
    weights_sha256: str | None
    key: str = ""

    def __len__(self) -> int:
        return len(self.images)

    def index_of(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.images)}

    def get(self, indices) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.array[indices])).float()


class LiveFeatures:
    """The FeatureStore interface over image files, encoded on demand: for fine-tuning the encoder, whose
    features change with every step, so no cache can hold them. Gradients flow when called under autograd."""

    def __init__(self, encoder: Encoder, paths: list[Path]):
        self.encoder, self.paths = encoder, list(paths)
        self.images = [p.name for p in self.paths]
        self.weights_sha256 = encoder.weights_sha256

    def __len__(self) -> int:
        return len(self.images)

    def index_of(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.images)}

    def get(self, indices) -> torch.Tensor:
        pixels = torch.stack([self.encoder.preprocess(load_image(self.paths[int(i)])) for i in np.atleast_1d(indices)])
        return self.encoder(pixels.to(self.encoder.mean.device))


class TailFeatures:
    """The FeatureStore interface over a cache of activations entering the encoder's last `tail_stages`
    stages: `get` runs those stages (with gradients under autograd), so they can be fine-tuned from a cache."""

    def __init__(self, activations: FeatureStore, encoder: Encoder, tail_stages: int):
        self.activations, self.encoder, self.tail_stages = activations, encoder, tail_stages
        self.images, self.weights_sha256 = activations.images, activations.weights_sha256

    def __len__(self) -> int:
        return len(self.images)

    def index_of(self) -> dict[str, int]:
        return self.activations.index_of()

    def get(self, indices) -> torch.Tensor:
        acts = self.activations.get(indices).to(self.encoder.mean.device)
        return self.encoder.tail(acts, self.tail_stages)


def cache_paths(out_dir: str | Path, key: str, split: str) -> tuple[Path, Path]:
    folder = Path(out_dir) / key
    return folder / f"{split}.f16", folder / f"{split}.json"


def _cli_hint(key: str) -> str:
    """The core.features flags that make the cache `key` (the inverse of `feature_key`)."""
    name, size, tail = re.fullmatch(r"(.+?)(?:@(\d+))?(?:-tail(\d+))?", key).groups()
    return f"--encoder {name}" + (f" --image-size {size}" if size else "") + (f" --tail-stages {tail}" if tail else "")


def open_features(out_dir: str | Path, key: str, split: str, *, weights_sha256: str | None = None) -> FeatureStore:
    """Open a finished cache. `key` is `feature_key(encoder, image_size, tail_stages)` (the plain encoder
    name for 224 px features)."""
    data_path, index_path = cache_paths(out_dir, key, split)
    if not index_path.is_file():
        raise DataError(f"no finished feature cache at {index_path}: run python -m core.features "
                        f"--split {split} {_cli_hint(key)} --out {out_dir}")
    try:
        index = json.loads(index_path.read_text())
        shape = tuple(index["shape"])
        images = list(index["images"])
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{index_path}: unreadable feature index ({e})") from None
    if index.get("format") != FORMAT or len(images) != shape[0]:
        raise DataError(f"{index_path}: not a {FORMAT} index")
    made_as = index.get("key", index.get("encoder"))   # caches from before keys were recorded: 224 px, no tail
    if made_as != key:
        raise DataError(f"{index_path}: this cache was made as {made_as!r} (encoder, image size, tail), "
                        f"not {key!r}: rerun python -m core.features {_cli_hint(key)}")
    expected = int(np.prod(shape)) * 2
    if not data_path.is_file() or data_path.stat().st_size != expected:
        raise DataError(f"{data_path}: size does not match its index {shape} (incomplete or foreign file)")
    if weights_sha256 and index.get("weights_sha256") and index["weights_sha256"] != weights_sha256:
        raise DataError(f"{index_path}: features were made with other encoder weights "
                        f"({index['weights_sha256'][:12]} != {weights_sha256[:12]})")
    array = np.memmap(data_path, dtype=np.float16, mode="r", shape=shape)
    return FeatureStore(data_path, images, array, index["encoder"], index.get("weights_sha256"), key)


def model_features(encoder_meta: dict, out_dir: str | Path, split: str,
                   tail_encoder: Encoder | None = None) -> FeatureStore | TailFeatures:
    """What a checkpoint's decoder reads for `split`, from the caches under `out_dir`, given the checkpoint's
    encoder metadata: the feature cache of its encoder at its input size; for a fine-tuned tail of n stages,
    the activations entering that tail, run through `tail_encoder` (the checkpoint's encoder, tail loaded)."""
    size, tail = encoder_meta.get("image_size", 224), encoder_meta.get("tail_stages", 0)
    if encoder_meta["fine_tuned"] and not tail:
        raise DataError("the whole encoder was fine-tuned, so no feature cache fits this checkpoint")
    store = open_features(out_dir, feature_key(encoder_meta["name"], size, tail), split,
                          weights_sha256=encoder_meta.get("weights_sha256"))
    if not tail:
        return store
    if tail_encoder is None:
        raise ConfigError("a fine-tuned tail needs the checkpoint's encoder to run it")
    return TailFeatures(store, tail_encoder, tail)


def derive_features(encoder: Encoder, source: FeatureStore, source_tail: int, out_dir: str | Path, split: str, *,
                    tail_stages: int = 0, batch_size: int = 64) -> FeatureStore:
    """The cache for `tail_stages` (0 = the encoder's output), computed from `source`, a cache of activations
    entering the last `source_tail` > `tail_stages` stages, by running only the stages in between: the same
    numbers as from the images (up to float16 storage), in seconds instead of minutes."""
    if not 0 <= tail_stages < source_tail:
        raise ConfigError(f"--from-tail {source_tail} can only make caches nearer the output "
                          f"(--tail-stages 0..{source_tail - 1}), not {tail_stages}")
    if source.weights_sha256 != encoder.weights_sha256:
        raise DataError(f"{source.path}: made with other encoder weights than these")
    key = feature_key(encoder.spec.name, encoder.spec.image_size, tail_stages)
    data_path, index_path = cache_paths(out_dir, key, split)
    L, C = _output_shape(encoder, tail_stages)
    partial = Path(f"{data_path}.partial")
    partial.parent.mkdir(parents=True, exist_ok=True)
    out = np.memmap(partial, dtype=np.float16, mode="w+", shape=(max(len(source), 1), L, C))
    stages = encoder.sequence[len(encoder.sequence) - source_tail: len(encoder.sequence) - tail_stages]
    side = math.isqrt(source.array.shape[1])
    with torch.inference_mode():
        for lo in tqdm(range(0, len(source), batch_size), desc=f"derive {key}/{split}", unit="batch"):
            x = source.get(np.arange(lo, min(lo + batch_size, len(source))))
            x = x.transpose(1, 2).reshape(len(x), x.shape[2], side, side)
            for module in stages:
                x = module(x)
            out[lo:lo + len(x)] = x.flatten(2).transpose(1, 2).numpy().astype(np.float16)
    out.flush()
    del out
    _finish(encoder, source.images, data_path, index_path, 1, key, (L, C))
    return open_features(out_dir, key, split, weights_sha256=encoder.weights_sha256)


class _ImageFiles(Dataset):
    def __init__(self, paths: list[Path], encoder: Encoder):
        self.paths, self.encoder = paths, encoder

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.encoder.preprocess(load_image(self.paths[i]))


def default_batch_size(device: str) -> int:
    """On a CPU small batches are fastest: at 8+ images Lite2's wide early activations spill the cache
    (measured on 2 cores: batch 4 gives 163 img/s, batch 16 gives 99). A GPU wants large ones."""
    return 64 if str(device).startswith("cuda") else 4


def default_workers(device: str) -> int:
    """DataLoader workers: JPEG decoding costs ~0.6 ms an image against ~6 ms of CNN, so on a small CPU
    machine workers only steal cores from the encoder; a GPU run needs them to keep the GPU fed."""
    spare = (os.cpu_count() or 1) - (0 if str(device).startswith("cuda") else 2)
    return max(0, min(4, spare))


class _Trunk(torch.nn.Module):
    """`encoder.trunk(pixels, n)` as a module, so it can be compiled like the whole encoder."""

    def __init__(self, encoder: Encoder, tail_stages: int):
        super().__init__()
        self.encoder, self.tail_stages = encoder, tail_stages

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.encoder.trunk(pixels, self.tail_stages)


def _output_shape(encoder: Encoder, tail_stages: int) -> tuple[int, int]:
    """(L, C) of what the cache stores: the encoder's regions, or the activations entering its tail."""
    if not tail_stages:
        return encoder.spec.num_regions, encoder.spec.feature_dim
    size = encoder.spec.image_size
    with torch.inference_mode():
        probe = encoder.trunk(torch.zeros(1, 3, size, size, device=encoder.mean.device), tail_stages)
    return int(probe.shape[1]), int(probe.shape[2])


def extract_features(encoder: Encoder, image_paths: list[Path], out_dir: str | Path, split: str, *,
                     batch_size: int | None = None, num_workers: int | None = None, chunk: int = 256,
                     device: str = "cpu", progress: bool = True, tail_stages: int = 0) -> FeatureStore:
    """Extract (or resume) the cache for `image_paths`; returns the finished store.

    Work is flushed every `chunk` images; `rank`/`world` (from torch.distributed) split the list into
    contiguous shards. `batch_size` / `num_workers` default to what is fastest on `device`. With
    `tail_stages` n > 0 the cache holds the activations entering the encoder's last n stages instead.
    """
    batch_size = batch_size or default_batch_size(device)
    num_workers = default_workers(device) if num_workers is None else num_workers
    rank, world = rank_world()
    key = feature_key(encoder.spec.name, encoder.spec.image_size, tail_stages)
    data_path, index_path = cache_paths(out_dir, key, split)
    images = [p.name for p in image_paths]
    try:
        store = open_features(out_dir, key, split, weights_sha256=encoder.weights_sha256)
        if store.images == images:
            return store
    except DataError:
        pass
    shard = np.array_split(np.arange(len(image_paths)), world)[rank]
    lo, hi = (int(shard[0]), int(shard[-1]) + 1) if len(shard) else (0, 0)
    suffix = f".rank{rank}" if world > 1 else ""
    shape = _output_shape(encoder, tail_stages)
    _extract_range(encoder, image_paths, lo, hi, Path(f"{data_path}{suffix}.partial"), images, key, shape,
                   tail_stages, batch_size=batch_size, num_workers=num_workers, chunk=chunk, device=device,
                   progress=progress and rank == 0)
    if world > 1:
        torch.distributed.barrier()
    if rank == 0:
        _finish(encoder, images, data_path, index_path, world, key, shape)
    if world > 1:
        torch.distributed.barrier()
    return open_features(out_dir, key, split, weights_sha256=encoder.weights_sha256)


def _progress_path(partial: Path) -> Path:
    return partial.with_name(partial.name + ".progress.json")


def _extract_range(encoder: Encoder, image_paths: list[Path], lo: int, hi: int, partial: Path,
                   images: list[str], key: str, shape: tuple[int, int], tail_stages: int, *, batch_size: int,
                   num_workers: int, chunk: int, device: str, progress: bool) -> None:
    L, C = shape
    n = hi - lo
    progress_file = _progress_path(partial)
    identity = {"encoder": encoder.spec.name, "key": key, "weights_sha256": encoder.weights_sha256,
                "images": images[lo:hi], "shape": [n, L, C]}
    done = 0
    if partial.is_file() and progress_file.is_file():
        try:
            state = json.loads(progress_file.read_text())
            if {k: state.get(k) for k in identity} == identity and partial.stat().st_size == n * L * C * 2:
                done = int(state["done"])
        except (ValueError, KeyError):
            done = 0
    partial.parent.mkdir(parents=True, exist_ok=True)
    if n == 0:   # more ranks than images: an empty shard (a 1-row memmap would break the merge)
        partial.write_bytes(b"")
        return
    if done == 0:
        np.memmap(partial, dtype=np.float16, mode="w+", shape=(max(n, 1), L, C)).flush()
    if done >= n:
        return
    out = np.memmap(partial, dtype=np.float16, mode="r+", shape=(max(n, 1), L, C))
    encoder = encoder.to(device).eval().to(memory_format=torch.channels_last)
    forward = encoder.inference_forward() if not tail_stages else (
        _CompiledOrEager(_Trunk(encoder, tail_stages)) if os.environ.get("CAPTIONSCOPE_COMPILE", "1") != "0"
        else _Trunk(encoder, tail_stages))
    loader = DataLoader(_ImageFiles(image_paths[lo + done:hi], encoder), batch_size=batch_size,
                        num_workers=num_workers, persistent_workers=False)
    bar = tqdm(total=n, initial=done, unit="img", desc=f"features {partial.name}", disable=not progress)
    since_flush, t0 = 0, time.time()
    with torch.inference_mode():
        for pixels in loader:
            real = len(pixels)
            if real < batch_size:   # pad the last batch: one fixed shape, so the compiled graph is reused
                pixels = torch.cat([pixels, pixels.new_zeros(batch_size - real, *pixels.shape[1:])])
            pixels = pixels.to(device).contiguous(memory_format=torch.channels_last)
            feats = forward(pixels)[:real].to("cpu", torch.float16).numpy()
            out[done:done + len(feats)] = feats
            done += len(feats)
            since_flush += len(feats)
            bar.update(len(feats))
            if since_flush >= chunk or done == n:
                out.flush()  # data first, then the progress that vouches for it
                atomic_write_json(progress_file, {**identity, "done": done,
                                                  "images_per_s": done / max(time.time() - t0, 1e-9)}, indent=None)
                since_flush = 0
    bar.close()
    del out


def _finish(encoder: Encoder, images: list[str], data_path: Path, index_path: Path, world: int, key: str,
            shape: tuple[int, int]) -> None:
    L, C = shape
    partials = [Path(f"{data_path}.rank{r}.partial") for r in range(world)] if world > 1 else [Path(f"{data_path}.partial")]
    if world > 1:  # concatenate shards into one partial, then commit like a single run
        merged = Path(f"{data_path}.partial")
        with open(merged, "wb") as out:
            for p in partials:
                with open(p, "rb") as f:
                    while block := f.read(1 << 24):
                        out.write(block)
            out.flush()
            os.fsync(out.fileno())
    else:
        merged = partials[0]
    if len(images) == 0:
        merged.write_bytes(b"")
    if merged.stat().st_size != len(images) * L * C * 2:
        raise DataError(f"{merged}: size does not match {len(images)} images; delete it and rerun")
    # withdraw the old index first: between the rename and the new index, an old index of the same shape
    # would otherwise vouch for the new array (another image order, other weights)
    index_path.unlink(missing_ok=True)
    os.replace(merged, data_path)
    atomic_write_json(index_path, {"format": FORMAT, "encoder": encoder.spec.name, "key": key,
                                   "image_size": encoder.spec.image_size, "weights_sha256": encoder.weights_sha256, "shape": [len(images), L, C],
                                   "dtype": "float16", "images": images}, indent=None)
    for p in partials:
        _progress_path(p).unlink(missing_ok=True)
        if world > 1:
            p.unlink(missing_ok=True)


@cli_main
def main(argv: list[str] | None = None) -> int:
    from core.data import load_dataset

    parser = argparse.ArgumentParser(prog="python -m core.features", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="Flickr8K folder (token file + split lists + images)")
    parser.add_argument("--images", default=None, help="images folder, if not discovered under --data")
    parser.add_argument("--split", nargs="+", default=["train", "dev"])
    parser.add_argument("--encoder", default="efficientnet_lite2")
    parser.add_argument("--encoder-weights", default="imagenet", help="imagenet | none | PATH")
    parser.add_argument("--image-size", type=int, default=224, help="square input side in px (grid = size/32)")
    parser.add_argument("--tail-stages", type=int, default=0,
                        help="cache the activations entering the encoder's last N stages (for fine-tuning them)")
    parser.add_argument("--from-tail", type=int, default=0,
                        help="compute the cache from the finished --tail-stages M cache (M > --tail-stages) "
                             "instead of the images: runs only the stages in between")
    parser.add_argument("--out", default="features", help="cache folder (default: features/)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 4 on CPU, 64 on CUDA")
    parser.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: CPUs - 2 on CPU)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N images of each split")
    args = parser.parse_args(argv)
    with torchrun_group("gloo") as (rank, _):
        dataset = load_dataset(args.data, args.images)
        encoder = build_encoder(args.encoder, args.encoder_weights, args.image_size)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        for split in args.split:
            items = dataset.split(split)[: args.limit]
            t0 = time.time()
            if args.from_tail:
                source = open_features(args.out, feature_key(args.encoder, args.image_size, args.from_tail), split,
                                       weights_sha256=encoder.weights_sha256)
                store = derive_features(encoder, source, args.from_tail, args.out, split,
                                        tail_stages=args.tail_stages)
                print(f"{split}: {len(store)} images -> {store.path} ({time.time() - t0:.0f} s)")
                continue
            store = extract_features(encoder, [it.path for it in items], args.out, split,
                                     batch_size=args.batch_size, num_workers=args.workers, device=device,
                                     tail_stages=args.tail_stages)
            if rank == 0:
                print(f"{split}: {len(store)} images -> {store.path} ({time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
