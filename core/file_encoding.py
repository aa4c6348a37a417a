"""Encoder features of many image files, fast: the path every caller that starts from files shares.

`python -m core.features` is fast because it runs the *compiled* encoder at batch 4 with channels-last
weights (see `Encoder.inference_forward`); the corpus code used to call the eager encoder at batch 50,
which spills the CPU cache (20 images/s instead of ~160). `encode_files` is that fast path for any list of
files or bytes: a reader thread decodes and resizes the next images (`core.images.load_image`, which
releases the GIL inside libjpeg) while the encoder runs, and every batch has one fixed shape so the
compiled graph is reused. A file that cannot be read becomes a one-line failure; the others go on.

    for batch in encode_files(captioner.encoder, paths):
        captioner.decode(batch.features, config)       # (n, L, C), batch.indices say which inputs
"""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterator, Sequence

import torch
from PIL import Image

from core.encoders import Encoder
from core.errors import CaptionScopeError
from core.images import ImageLimits, content_hash, load_image, read_source_bytes

ImageSource = str | Path | bytes | BinaryIO
CPU_BATCH = 4          # fastest on a CPU (measured in core/features.default_batch_size)
GPU_BATCH = 64
# torch.compile costs ~4 s (inductor's disk cache warm) to ~20 s (cold) once per process; below this many
# images the eager encoder (same batches, same channels-last weights) finishes first
COMPILE_MIN_IMAGES = 200


@dataclass
class EncodedBatch:
    """Features of some inputs, in input order: `features[k]` belongs to input `indices[k]`."""
    indices: list[int]
    features: torch.Tensor                                   # (n, L, C) float32 on the CPU
    images: list[Image.Image] = field(default_factory=list)  # upright display images (with_images=True)
    keys: list[str] = field(default_factory=list)            # sha256 of each file's bytes
    failures: dict[int, str] = field(default_factory=dict)   # input index -> one-line error


@dataclass
class _Decoded:
    index: int
    pixels: torch.Tensor | None = None
    image: Image.Image | None = None
    key: str = ""
    error: str | None = None


def batch_size_for(device: str) -> int:
    return GPU_BATCH if str(device).startswith("cuda") else CPU_BATCH


def prepare_encoder(encoder: Encoder, images: int = COMPILE_MIN_IMAGES):
    """The encoder in eval mode with channels-last weights, and its forward for `images` images: compiled
    (once per encoder) for a corpus, eager for a few. Idempotent; channels-last weights give the same
    features to the eager single-image path too."""
    encoder.eval().to(memory_format=torch.channels_last)
    if images >= COMPILE_MIN_IMAGES or "_inference_forward" in encoder.__dict__:
        return encoder.inference_forward()
    return encoder


def _read(index: int, source: ImageSource, name: str, encoder: Encoder, limits: ImageLimits,
          keep_image: bool) -> _Decoded:
    try:
        data, name = read_source_bytes(source, limits, name=name)
        image = load_image(data, name=name, limits=limits)
        return _Decoded(index, encoder.preprocess(image), image if keep_image else None, content_hash(data))
    except CaptionScopeError as e:
        return _Decoded(index, error=str(e).splitlines()[0])


def _reader(sources: Sequence[ImageSource], names: Sequence[str], encoder: Encoder, limits: ImageLimits,
            keep_image: bool, out: queue.Queue, stop: threading.Event) -> None:
    for i, source in enumerate(sources):
        if stop.is_set():
            return
        out.put(_read(i, source, names[i], encoder, limits, keep_image))
    out.put(None)


def encode_files(encoder: Encoder, sources: Sequence[ImageSource], *, names: Sequence[str] | None = None,
                 batch_size: int | None = None, device: str | None = None, with_images: bool = False,
                 limits: ImageLimits = ImageLimits(), prefetch: int = 16) -> Iterator[EncodedBatch]:
    """Yield EncodedBatch for `sources` (paths, bytes or file objects), in order, `batch_size` at a time.

    Decoding runs one image ahead of the encoder in a reader thread (bounded by `prefetch`); the last batch
    is padded to the fixed shape and trimmed. Unreadable inputs are reported in `failures` of the batch
    they would have been in, so progress counts add up to len(sources).
    """
    device = device or str(encoder.mean.device)
    batch_size = batch_size or batch_size_for(device)
    names = list(names) if names is not None else [_name_of(s) for s in sources]
    forward = prepare_encoder(encoder, len(sources))
    decoded: queue.Queue = queue.Queue(maxsize=max(prefetch, batch_size))
    stop = threading.Event()
    reader = threading.Thread(target=_reader, args=(sources, names, encoder, limits, with_images, decoded, stop),
                              name="captionscope-image-reader", daemon=True)
    reader.start()
    try:
        pending: list[_Decoded] = []
        failures: dict[int, str] = {}
        while True:
            item = decoded.get()
            if item is not None:
                if item.error is not None:
                    failures[item.index] = item.error
                else:
                    pending.append(item)
                if len(pending) < batch_size:
                    continue
            if pending or failures:
                yield _encode(forward, pending, failures, batch_size, device)
                pending, failures = [], {}
            if item is None:
                return
    finally:
        stop.set()
        while reader.is_alive():          # unblock a reader waiting on a full queue, then let it end
            try:
                decoded.get_nowait()
            except queue.Empty:
                reader.join(timeout=0.05)


def _encode(forward, items: list[_Decoded], failures: dict[int, str], batch_size: int,
            device: str) -> EncodedBatch:
    if not items:
        return EncodedBatch([], torch.empty(0), failures=failures)
    pixels = torch.stack([it.pixels for it in items])
    real = len(items)
    if real < batch_size:   # one fixed shape: the compiled graph is reused, never recompiled
        pixels = torch.cat([pixels, pixels.new_zeros(batch_size - real, *pixels.shape[1:])])
    pixels = pixels.to(device).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        feats = forward(pixels)[:real].float().cpu()
    return EncodedBatch([it.index for it in items], feats, [it.image for it in items if it.image is not None],
                        [it.key for it in items], failures)


def _name_of(source: ImageSource) -> str:
    if isinstance(source, (str, Path)):
        return Path(source).name
    return Path(str(getattr(source, "name", "") or "image")).name
