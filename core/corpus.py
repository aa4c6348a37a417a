"""Corpus-level work: caption a whole split (cached), score it, browse it, compare beam widths.

Captioning the 1,000 dev images takes seconds from the feature cache and minutes from the images, and the
dashboard revisits the same split with the same settings again and again. `CaptionCache` keeps the results
on disk, keyed by everything that determines them (checkpoint file hash, decoding settings, split, image
list). A cache file is only trusted if it carries exactly the key being looked up: a truncated, corrupt or
foreign file is ignored and the work redone.

    preds = caption_split(captioner, items, DecodingConfig(beam_size=3), cache=CaptionCache()).captions
    scores = score_split(preds, items, cache=cache)
    df = filter_table(browse_table(items, preds, scores), "dog", "references", "CIDEr-D", ascending=False)
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from core.data import ImageCaptions
from core.decoding import DecodingConfig, Hypothesis, generate
from core.errors import ConfigError, DataError, ImageError
from core.features import FeatureStore, model_features
from core.file_encoding import encode_files
from core.io_utils import atomic_write_json
from core.metrics import METRIC_NAMES, Scores, score_captions
from core.model import ShowAttendTell
from core.text import Vocabulary

CACHE_FORMAT = "captionscope-corpus-cache/1"
CACHE_ENV = "CAPTIONSCOPE_CACHE_DIR"
REPO_ROOT = Path(__file__).resolve().parents[1]
Progress = Callable[[int, int], None]


# -- beams of one image --------------------------------------------------------------------------------

def compare_beams(captioner, features: torch.Tensor, widths: Sequence[int], base: DecodingConfig) -> list[dict]:
    """Best caption of one image (L, C) at each beam width, with its log-prob and decode time.

    normalised = logprob / emitted tokens (incl. <end>), the per-token view that shows when a wider beam
    only wins by being shorter.
    """
    if features.dim() == 2:
        features = features.unsqueeze(0)
    rows = []
    for width in widths:
        config = dataclasses.replace(base, beam_size=int(width), num_return_sequences=1, do_sample=False)
        t0 = time.perf_counter()
        hyp = captioner.decode(features, config)[0][0]
        ms = (time.perf_counter() - t0) * 1e3
        rows.append({"width": int(width), "caption": " ".join(captioner.words(hyp)), "logprob": hyp.logprob,
                     "normalised": hyp.logprob / max(hyp.length, 1), "length": len(hyp.token_ids),
                     "finished": hyp.finished, "time_ms": ms})
    return rows


# -- on-disk cache --------------------------------------------------------------------------------------

def default_cache_dir() -> Path:
    """$CAPTIONSCOPE_CACHE_DIR, else the repo's .cache/captionscope/ (the CLIs and the dashboard share it)."""
    value = os.environ.get(CACHE_ENV, "").strip()
    return Path(value).expanduser() if value else REPO_ROOT / ".cache" / "captionscope"


def images_hash(images: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(images).encode("utf-8")).hexdigest()


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


class CaptionCache:
    """Results of corpus work, in memory and as one JSON file per key under `folder`.

    A file holds {format, kind, key, images, value}; `get` returns the value only when the format tag,
    kind, key and image list all match what was asked for, so a crash mid-write (impossible anyway with
    atomic writes), a hand-edited or a hash-colliding file can never pass for a result.
    """

    def __init__(self, folder: str | Path | None = None, *, memory: bool = True):
        self.folder = Path(folder) if folder is not None else default_cache_dir()
        self._memory: dict[str, Any] | None = {} if memory else None

    @staticmethod
    def make_key(kind: str, **parts: Any) -> dict:
        """A JSON-safe key; `images` (a list of names) is replaced by its hash (the file keeps the list)."""
        key = {"kind": kind, **parts}
        if "images" in key:
            key["images_sha256"] = images_hash(list(key.pop("images")))
        json.loads(_canonical(key))   # raises early on a non-JSON-safe key
        return key

    def path_for(self, key: Mapping) -> Path:
        digest = hashlib.sha256(_canonical(dict(key)).encode()).hexdigest()[:32]
        return self.folder / f"{key.get('kind', 'entry')}-{digest}.json"

    def get(self, key: Mapping, images: Sequence[str] | None = None) -> Any | None:
        key = dict(key)
        canon = _canonical(key)
        if self._memory is not None and canon in self._memory:
            return self._memory[canon]
        path = self.path_for(key)
        try:
            blob = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, UnicodeDecodeError):
            return None
        if not isinstance(blob, dict) or blob.get("format") != CACHE_FORMAT or "value" not in blob:
            return None
        if blob.get("key") != json.loads(canon):
            return None
        if images is not None and (blob.get("images") != list(images)
                                   or key.get("images_sha256", images_hash(images)) != images_hash(images)):
            return None
        if self._memory is not None:
            self._memory[canon] = blob["value"]
        return blob["value"]

    def put(self, key: Mapping, value: Any, images: Sequence[str] | None = None) -> Path:
        key = dict(key)
        path = self.path_for(key)
        atomic_write_json(path, {"format": CACHE_FORMAT, "kind": key.get("kind"), "key": key,
                                 "images": list(images) if images is not None else None, "value": value},
                          indent=None)
        if self._memory is not None:
            self._memory[_canonical(key)] = json.loads(_canonical(value))
        return path

    def discard(self, key: Mapping) -> None:
        key = dict(key)
        if self._memory is not None:
            self._memory.pop(_canonical(key), None)
        self.path_for(key).unlink(missing_ok=True)



# -- captioning a split ----------------------------------------------------------------------------------

def _cacheable(decoding: DecodingConfig) -> bool:
    """Unseeded sampling gives different captions every run: caching it would freeze one random draw."""
    return not (decoding.do_sample and decoding.seed is None)


def open_feature_store(captioner, features_dir: str | Path | None, split: str) -> FeatureStore | None:
    if features_dir is None:
        return None
    try:   # a wholly fine-tuned encoder makes other features than any cache: DataError too
        return model_features(captioner.encoder_meta, features_dir, split, captioner.encoder)
    except DataError:
        return None


def caption_entry(vocab: Vocabulary, hyp: Hypothesis) -> dict:
    return {"caption": vocab.decode(hyp.token_ids), "logprob": float(hyp.logprob),
            "length": len(hyp.token_ids), "finished": bool(hyp.finished)}


def best_entries(decode: Callable[[torch.Tensor, DecodingConfig], list[list[Hypothesis]]], vocab: Vocabulary,
                 features: torch.Tensor, decoding: DecodingConfig) -> list[dict]:
    """The one decode step of every corpus run: the best hypothesis of each (B, L, C) row as an entry
    {"caption", "logprob", "length", "finished"}."""
    return [caption_entry(vocab, nbest[0]) for nbest in decode(features, decoding)]


def decode_store(model: ShowAttendTell, vocab: Vocabulary, store: FeatureStore, images: Sequence[str],
                 decoding: DecodingConfig, *, batch_size: int = 100, device: str = "cpu") -> dict[str, str]:
    """Best caption per image name from a feature store (training's dev evaluation: no Captioner, no cache)."""
    row = store.index_of()
    captions: dict[str, str] = {}
    decode = functools.partial(generate, model)
    for start in range(0, len(images), batch_size):
        names = list(images[start:start + batch_size])
        feats = store.get(np.asarray([row[n] for n in names])).to(device)
        captions.update((n, e["caption"]) for n, e in zip(names, best_entries(decode, vocab, feats, decoding)))
    return captions


@dataclass
class SplitCaptions:
    """What `caption_split` returns: the best caption of every image, and how it was obtained."""
    captions: dict[str, dict]        # image -> {"caption", "logprob", "length", "finished"}, in item order
    decode_s: float = 0.0            # compute time (of the run that made a cached result)
    source: str = "cache"            # "features", "images", "features+images" or "cache"
    from_cache: bool = False


def caption_split(captioner, items: Sequence[ImageCaptions], decoding: DecodingConfig, *,
                  features_dir: str | Path | None = "features", split: str = "dev",
                  cache: CaptionCache | None = None, progress: Progress | None = None,
                  batch_size: int = 50, partial_every: int = 200) -> SplitCaptions:
    """Best caption of every image of `items`, with where the features came from and the time it took.

    Features come from the feature cache `features_dir/<encoder>/<split>` for the images it holds (when it
    was made with this encoder's weights), the encoder runs on the image files for the rest. With `cache`,
    a finished result is reused, and work in progress is saved every `partial_every` images so a revisit
    after a crash resumes. `progress(done, total)` is called after every batch.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    names = [it.image for it in items]
    if len(set(names)) != len(names):
        raise DataError(f"split {split!r}: image names are not unique")
    total = len(names)
    run = split_run(captioner, decoding, split, names, cache)
    hit = run.finished()
    if hit is not None:
        if progress:
            progress(total, total)
        return hit
    done, elapsed = run.partial()
    store = open_feature_store(captioner, features_dir, split)
    row = store.index_of() if store is not None else {}
    todo = [it for it in items if it.image not in done]
    sources: set[str] = set()
    since_save = 0
    if progress and done:
        progress(len(done), total)
    batches = feature_batches(captioner, todo, store, row, batch_size, sources)
    while True:
        t0 = time.perf_counter()
        got = next(batches, None)
        if got is None:
            break
        chunk, feats = got
        done.update(zip((it.image for it in chunk), best_entries(captioner.decode, captioner.vocab, feats, decoding)))
        elapsed += time.perf_counter() - t0
        since_save += len(chunk)
        if progress:
            progress(len(done), total)
        if since_save >= partial_every and len(done) < total:
            run.save_partial(done, elapsed)
            since_save = 0
    result = SplitCaptions({n: done[n] for n in names}, elapsed, "+".join(sorted(sources)) or "cache")
    run.save(result)
    return result


def feature_batches(captioner, todo: Sequence[ImageCaptions], store: FeatureStore | None, row: dict[str, int],
                    batch_size: int, sources: set[str]) -> Iterator[tuple[list[ImageCaptions], torch.Tensor]]:
    """(items, (n, L, C) features) in decode batches of `batch_size`: first the images the feature cache
    holds, then the rest from their files through core.file_encoding's compiled, overlapped encoder."""
    cached = [it for it in todo if it.image in row]
    for start in range(0, len(cached), batch_size):
        chunk = cached[start:start + batch_size]
        sources.add("features")
        yield chunk, store.get(np.asarray([row[it.image] for it in chunk]))
    files = [it for it in todo if it.image not in row]
    if not files:
        return
    sources.add("images")
    chunk, parts = [], []
    for batch in encode_files(captioner.encoder, [it.path for it in files], names=[it.image for it in files],
                              device=captioner.device):
        if batch.failures:
            raise ImageError(next(iter(batch.failures.values())))
        chunk += [files[i] for i in batch.indices]
        parts.append(batch.features)
        while len(chunk) >= batch_size:
            feats = torch.cat(parts)
            yield chunk[:batch_size], feats[:batch_size]
            chunk, parts = chunk[batch_size:], [feats[batch_size:]]
    if chunk:
        yield chunk, torch.cat(parts)


def split_is_cached(captioner, items: Sequence[ImageCaptions], decoding: DecodingConfig, split: str,
                    cache: CaptionCache) -> bool:
    """Whether caption_split would answer from `cache` without computing anything."""
    names = [it.image for it in items]
    return _cacheable(decoding) and split_run(captioner, decoding, split, names, cache).finished() is not None


def split_run(captioner, decoding: DecodingConfig, split: str, names: list[str],
              cache: CaptionCache | None) -> "_SplitRun":
    return _SplitRun(cache if cache is not None and _cacheable(decoding) else None, names, CaptionCache.make_key(
        "captions", checkpoint=captioner.checkpoint_id, decoding=decoding.to_dict(), split=split, images=names))


@dataclass
class _SplitRun:
    """The cache entries of one `caption_split` run: the finished result and the work in progress."""
    cache: CaptionCache | None
    names: list[str]
    key: dict

    @property
    def partial_key(self) -> dict:
        return {**self.key, "kind": "captions-partial"}

    def finished(self) -> SplitCaptions | None:
        hit = self.cache.get(self.key, self.names) if self.cache is not None else None
        if not (isinstance(hit, dict) and isinstance(hit.get("captions"), dict)
                and set(hit["captions"]) == set(self.names)):
            return None
        return SplitCaptions({n: hit["captions"][n] for n in self.names}, float(hit.get("decode_s", 0.0)),
                             hit.get("source", "cache"), from_cache=True)

    def partial(self) -> tuple[dict[str, dict], float]:
        part = self.cache.get(self.partial_key, self.names) if self.cache is not None else None
        if not (isinstance(part, dict) and isinstance(part.get("captions"), dict)):
            return {}, 0.0
        wanted = set(self.names)
        done = {n: v for n, v in part["captions"].items() if n in wanted and isinstance(v, dict)}
        return done, float(part.get("decode_s", 0.0))

    def save_partial(self, done: dict[str, dict], elapsed: float) -> None:
        if self.cache is not None:
            self.cache.put(self.partial_key, {"captions": done, "decode_s": elapsed}, self.names)

    def save(self, result: SplitCaptions) -> None:
        if self.cache is not None:
            self.cache.put(self.key, {"captions": result.captions, "decode_s": result.decode_s,
                                      "source": result.source}, self.names)
            self.cache.discard(self.partial_key)


# -- scores ------------------------------------------------------------------------------------------------

def _captions_of(predictions: Mapping[str, Any]) -> dict[str, str]:
    return {k: v["caption"] if isinstance(v, Mapping) else str(v) for k, v in predictions.items()}


def score_split(predictions: Mapping[str, Any], items: Sequence[ImageCaptions], *, with_meteor: bool = True,
                tokenizer: str = "ptb", cache: CaptionCache | None = None,
                metrics: Sequence[str] = METRIC_NAMES) -> Scores:
    """Per-image and corpus `metrics` (default BLEU-1..4, METEOR, ROUGE-L, CIDEr-D; METEOR only
    `with_meteor`) of `predictions` (image -> caption or caption_split entry) against the items' references.
    With `cache`, cached by the content of predictions and references; a result where a requested METEOR
    was skipped (Java trouble) is not cached."""
    captions = _captions_of(predictions)
    missing = [it.image for it in items if it.image not in captions]
    if missing:
        raise DataError(f"{len(missing)} image(s) have no prediction (first: {', '.join(missing[:3])})")
    preds = {it.image: captions[it.image] for it in items}
    refs = {it.image: list(it.captions) for it in items}
    metrics = [m for m in metrics if with_meteor or m != "METEOR"]
    key = None
    if cache is not None:
        digest = hashlib.sha256(_canonical([preds, refs]).encode()).hexdigest()
        key = CaptionCache.make_key("scores", content_sha256=digest, metrics=metrics, tokenizer=tokenizer)
        hit = cache.get(key)
        if isinstance(hit, dict) and {"corpus", "per_image", "notes"} <= set(hit) \
                and set(hit["per_image"]) == set(preds):
            return Scores(corpus=dict(hit["corpus"]), per_image={k: dict(v) for k, v in hit["per_image"].items()},
                          notes=list(hit["notes"]))
    scores = score_captions(preds, refs, metrics=metrics, tokenizer=tokenizer)
    if cache is not None and not (with_meteor and "METEOR" not in scores.corpus):
        cache.put(key, {"corpus": scores.corpus, "per_image": scores.per_image, "notes": scores.notes})
    return scores


# -- the browser table ---------------------------------------------------------------------------------------

TABLE_METRICS = ("BLEU-4", "METEOR", "CIDEr-D")
TABLE_REFERENCES = 5          # references in a table cell (Flickr8K's usual count); the detail view pages the rest
MAX_REFERENCE_CHARS = 300     # per reference shown anywhere: a cell's payload stays bounded whatever the file holds
SEARCH_WHERE = ("references", "caption", "both")


def browse_table(items: Sequence[ImageCaptions], predictions: Mapping[str, Any], scores: Scores | None) -> pd.DataFrame:
    """One row per image: image, path, caption, references (list), references_text (reference_preview: what
    the table shows), BLEU-4, METEOR, CIDEr-D, length. A metric not computed (METEOR without Java) is NaN."""
    captions = _captions_of(predictions)
    per_image = scores.per_image if scores is not None else {}
    rows = []
    for it in items:
        caption = captions.get(it.image, "")
        per = per_image.get(it.image, {})
        rows.append({"image": it.image, "path": str(it.path), "caption": caption, "references": list(it.captions),
                     "references_text": reference_preview(it.captions),
                     **{m: float(per[m]) if m in per else math.nan for m in TABLE_METRICS},
                     "length": len(caption.split())})
    columns = ["image", "path", "caption", "references", "references_text", *TABLE_METRICS, "length"]
    return pd.DataFrame(rows, columns=columns)


def clip_text(text: str, max_chars: int = MAX_REFERENCE_CHARS) -> str:
    return text if len(text) <= max_chars else text[:max_chars - 1] + "…"


def reference_preview(references: Sequence[str], count: int = TABLE_REFERENCES) -> str:
    """The first `count` references, each clipped, and how many more: a table cell of bounded size."""
    shown = " | ".join(clip_text(r) for r in references[:count])
    more = len(references) - count
    return shown + (f" | … and {more:,} more" if more > 0 else "")


def filter_table(df: pd.DataFrame, query: str, where: str = "both", sort_by: str = "CIDEr-D",
                 ascending: bool = False) -> pd.DataFrame:
    """Rows whose caption and/or references contain every whitespace-separated term of `query`
    (case-insensitive substrings, no regex), sorted by `sort_by` (NaN last)."""
    if where not in SEARCH_WHERE:
        raise ConfigError(f"where must be one of {', '.join(SEARCH_WHERE)}, got {where!r}")
    if sort_by not in df.columns:
        raise ConfigError(f"cannot sort by {sort_by!r}: columns are {', '.join(map(str, df.columns))}")
    references = df["references"].str.join(" | ")        # all of them, not just the ones a cell shows
    if where == "references":
        text = references
    elif where == "caption":
        text = df["caption"]
    else:
        text = df["caption"] + " | " + references
    text = text.str.lower()
    mask = pd.Series(True, index=df.index)
    for term in (query or "").lower().split():
        mask &= text.str.contains(term, regex=False)
    return df[mask].sort_values(sort_by, ascending=ascending, na_position="last", kind="stable")


# -- beam sweep ------------------------------------------------------------------------------------------------

def beam_sweep(captioner, items: Sequence[ImageCaptions], widths: Sequence[int], base: DecodingConfig, *,
               features_dir: str | Path | None = "features", split: str = "dev", cache: CaptionCache | None = None,
               progress: Progress | None = None, with_meteor: bool = False, tokenizer: str = "ptb") -> pd.DataFrame:
    """Corpus scores of the split at each beam width: width, BLEU-4, CIDEr-D, (METEOR), mean_length,
    finished (share of captions that ended with <end>), decode_s. Captions come from `caption_split`
    (cached per width); progress(done, total) counts images over all widths."""
    widths = [int(w) for w in widths]
    if not widths:
        raise ConfigError("beam_sweep: no beam widths given")
    n = len(items)
    rows = []
    for k, width in enumerate(widths):
        config = dataclasses.replace(base, beam_size=width, num_return_sequences=1, do_sample=False)
        step = (lambda d, t, k=k: progress(k * n + d, len(widths) * n)) if progress else None
        run = caption_split(captioner, items, config, features_dir=features_dir, split=split, cache=cache,
                            progress=step)
        preds = run.captions
        scores = score_split(preds, items, with_meteor=with_meteor, tokenizer=tokenizer, cache=cache)
        row = {"width": width, "BLEU-4": scores.corpus.get("BLEU-4", math.nan),
               "CIDEr-D": scores.corpus.get("CIDEr-D", math.nan)}
        if with_meteor:
            row["METEOR"] = scores.corpus.get("METEOR", math.nan)
        row.update(mean_length=float(np.mean([p["length"] for p in preds.values()])) if preds else 0.0,
                   finished=float(np.mean([p["finished"] for p in preds.values()])) if preds else 0.0,
                   decode_s=run.decode_s)
        rows.append(row)
    return pd.DataFrame(rows)
