"""Cached calls into core/, so moving between words, beams and pages never recomputes anything.

Per-image results go through `st.cache_data`, keyed by a `CaptionKey` (checkpoint id = file sha256, image
content hash, decoding config) and the view's own settings. The heavy live objects (captioner, image, features) are passed as `_`-prefixed
arguments, which Streamlit does not hash. Corpus work reports progress while it runs, and a cached
function may not draw into elements created outside it, so corpus results use core.corpus.CaptionCache
(memory + disk) instead, one instance per server process.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import pandas as pd
import streamlit as st
from PIL import Image

from core import analysis, corpus
from core.captioner import CaptionResult, Captioner
from core.data import ImageCaptions
from core.decoding import DecodingConfig
from core.images import ImageLimits, content_hash, read_source_bytes
from core.io_utils import printable_name
from core.metrics import java_available
from core.worker import CorpusJob, CorpusWorker
from ui import state
from ui.settings import cache_dir, features_dir


@dataclass(frozen=True)
class ImageInput:
    """An image the user picked: its bytes, a display name and the content key everything is cached by."""
    name: str
    data: bytes
    key: str
    origin: str = "upload"      # upload | example | flickr8k

    @classmethod
    def from_bytes(cls, name: str, data: bytes, origin: str = "upload") -> "ImageInput":
        return cls(name, data, content_hash(data), origin)

    @classmethod
    def from_upload(cls, upload) -> "ImageInput":
        """Streamlit UploadedFile -> ImageInput (name cleaned for display); ImageError if over the size cap."""
        name = printable_name(Path(str(upload.name)).name) or "upload"
        data, name = read_source_bytes(upload, ImageLimits(), name=name)
        return cls.from_bytes(name, data, "upload")

    @classmethod
    def from_path(cls, path: Path, origin: str) -> "ImageInput":
        data, _ = read_source_bytes(path, ImageLimits(), name=Path(path).name)
        return cls.from_bytes(Path(path).name, data, origin)


@dataclass(frozen=True)
class CaptionKey:
    """What one image's captions depend on, the key of every per-image cache: the weights, the image's
    content and the decoding settings (a frozen DecodingConfig hashes by value)."""
    checkpoint_id: str
    image_key: str
    decoding: DecodingConfig

    @classmethod
    def of(cls, captioner: Captioner, image: ImageInput, decoding: DecodingConfig) -> "CaptionKey":
        return cls(captioner.checkpoint_id, image.key, decoding)


@dataclass(frozen=True)
class HeatmapStyle:
    """How attention heatmaps are drawn."""
    opacity: float = 0.5
    cmap: str = "jet"
    smooth: bool = True
    cols: int = 5                # words per row of the grid


@st.cache_data(max_entries=512, show_spinner="Captioning…")
def _decode(key: CaptionKey, name: str, _captioner: Captioner, _data: bytes) -> CaptionResult:
    return _captioner.caption(_data, key.decoding, name=name)


def caption(captioner: Captioner, image: ImageInput, decoding: DecodingConfig) -> CaptionResult:
    """The n-best captions with the upright display image; raises ImageError for a bad file."""
    return _decode(CaptionKey.of(captioner, image, decoding), image.name, captioner, image.data)


def display_image(captioner: Captioner, image: ImageInput) -> Image.Image:
    return captioner.features(image.data, name=image.name)[1]      # LRU-cached by content inside Captioner


def features(captioner: Captioner, image: ImageInput):
    return captioner.features(image.data, name=image.name)[0]


# -- attention views ----------------------------------------------------------------------------------------------
@st.cache_data(max_entries=128, show_spinner="Drawing the attention grid…")
def attention_grid_png(key: CaptionKey, index: int, style: HeatmapStyle, _result: CaptionResult,
                       _grid: int) -> bytes:
    """Every word of hypothesis `index` over the image, as one PNG."""
    grid_image = analysis.attention_grid(_result.image, _result.words[index], _result.hypotheses[index].attention,
                                         _grid, cols=style.cols, opacity=style.opacity, cmap=style.cmap,
                                         smooth=style.smooth)
    return analysis.image_to_png_bytes(grid_image)


@st.cache_data(max_entries=32, show_spinner=False)
def attention_gif(key: CaptionKey, index: int, style: HeatmapStyle, _result: CaptionResult, _grid: int) -> bytes:
    return analysis.attention_gif_bytes(_result.image, _result.words[index], _result.hypotheses[index].attention,
                                        _grid, opacity=style.opacity, cmap=style.cmap, smooth=style.smooth)


@st.cache_data(max_entries=64, show_spinner="Re-encoding the occluded image…")
def occlusion(key: CaptionKey, index: int, word_index: int, region: tuple[int, int, int, int] | None,
              _captioner: Captioner, _result: CaptionResult) -> analysis.OcclusionResult:
    return analysis.occlusion_test(_captioner, _result.image, _result.hypotheses[index], word_index,
                                   key.decoding, region=region)


@st.cache_data(max_entries=64, show_spinner="Decoding at each beam width…")
def beam_rows(key: CaptionKey, widths: tuple[int, ...], _captioner: Captioner, _features) -> list[dict]:
    """`key.decoding` is the base config; each width replaces its beam size."""
    return corpus.compare_beams(_captioner, _features, list(widths), key.decoding)


# -- corpus work (progress bars, so no st.cache_data: see the module docstring) ----------------------------------
@st.cache_resource
def caption_cache() -> corpus.CaptionCache:
    """One CaptionCache per server process (its memory layer survives reruns), files under the cache dir."""
    return corpus.CaptionCache(cache_dir() / "corpus")


def _progress_bar(text: str):
    bar = st.progress(0.0, text=text)

    def update(done: int, total: int) -> None:
        bar.progress(min(done / max(total, 1), 1.0), text=f"{text} {done:,}/{total:,}")
    return bar, update


# below this many images x settings a corpus job runs in the session itself (a few seconds at most)
WORKER_MIN_IMAGES = int(os.environ.get("CAPTIONSCOPE_WORKER_MIN_IMAGES", "100"))


@st.cache_resource
def corpus_worker() -> CorpusWorker:
    """One low-priority worker process per server (core/worker.py): corpus jobs never slow other sessions."""
    return CorpusWorker()


def _worker_job(captioner: Captioner, items: Sequence[ImageCaptions], decodings: Sequence[DecodingConfig],
                split: str, with_meteor: bool) -> CorpusJob | None:
    """The worker job that reproduces `items`, or None where only this process can (no checkpoint file,
    unseeded sampling, items that are not the sidebar dataset's split or a prefix of it)."""
    dataset, _ = state.get_dataset()
    if captioner.path is None or dataset is None or split not in dataset.splits:
        return None
    if any(d.do_sample and d.seed is None for d in decodings):
        return None
    full = dataset.splits[split]
    if [it.image for it in full[:len(items)]] != [it.image for it in items]:
        return None
    return CorpusJob(checkpoint=str(captioner.path), data_dir=str(dataset.root), split=split,
                     decodings=tuple(CorpusJob.encode_decoding(d.to_dict()) for d in decodings),
                     cache_dir=str(caption_cache().folder), features_dir=str(features_dir()),
                     limit=0 if len(items) == len(full) else len(items), with_meteor=with_meteor)


def run_corpus_job(captioner: Captioner, items: Sequence[ImageCaptions], decodings: Sequence[DecodingConfig],
                   split: str, text: str, *, with_meteor: bool) -> bool:
    """Caption + score in the worker process, with a progress bar; True when done there (the results are
    then in the on-disk cache), False where the caller must compute in this process."""
    if len(items) * len(decodings) < WORKER_MIN_IMAGES:
        return False            # seconds of work at most: not worth starting (or waiting for) the worker
    job = _worker_job(captioner, items, decodings, split, with_meteor)
    if job is None:
        return False
    bar, update = _progress_bar(text)
    try:
        running = corpus_worker().submit(job)
        while not running.wait(0.25):
            if running.progress[1]:
                update(*running.progress)
        running.result()        # raises CaptionScopeError with the worker's message
    finally:
        bar.empty()
    return True


def caption_split(captioner: Captioner, items: Sequence[ImageCaptions], decoding: DecodingConfig,
                  split: str) -> dict[str, dict]:
    """Best caption of every image of the split, with a progress bar while it runs (cached on disk).
    A split not yet cached is captioned and scored by the low-priority worker process."""
    if not corpus.split_is_cached(captioner, items, decoding, split, caption_cache()):
        run_corpus_job(captioner, items, [decoding], split, f"Captioning the {split} split…",
                       with_meteor=java_available())
    bar, update = _progress_bar(f"Captioning the {split} split…")
    try:
        return corpus.caption_split(captioner, items, decoding, features_dir=features_dir(), split=split,
                                    cache=caption_cache(), progress=update).captions
    finally:
        bar.empty()


def score_split(predictions: dict[str, dict], items: Sequence[ImageCaptions]):
    with st.spinner("Scoring (BLEU, METEOR, ROUGE-L, CIDEr-D)…"):
        return corpus.score_split(predictions, items, with_meteor=java_available(), cache=caption_cache())


def beam_sweep(captioner: Captioner, items: Sequence[ImageCaptions], widths: Sequence[int],
               base: DecodingConfig, split: str) -> pd.DataFrame:
    base = dataclasses.replace(base, do_sample=False)
    configs = [dataclasses.replace(base, beam_size=int(w), num_return_sequences=1) for w in widths]
    if not all(corpus.split_is_cached(captioner, items, c, split, caption_cache()) for c in configs):
        run_corpus_job(captioner, items, configs, split, "Decoding the subset at each width…",
                       with_meteor=False)
    bar, update = _progress_bar("Decoding the subset at each width…")
    try:
        return corpus.beam_sweep(captioner, items, list(widths), base, features_dir=features_dir(), split=split,
                                 cache=caption_cache(), progress=update)
    finally:
        bar.empty()
