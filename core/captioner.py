"""The captioner as a user sees it: checkpoint + encoder + vocabulary -> captions with attention.

`Captioner` is what the CLIs and the dashboard hold. An image's encoder features are cached by the hash of
its file's bytes (a bounded LRU shared by all callers, thread-safe), so stepping through words, beams and
pages re-runs only the cheap decoder.
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Sequence

import torch
from PIL import Image

from core.checkpoint import Checkpoint, load_checkpoint
from core.checkpoint_metadata import CheckpointMetadata
from core.decoding import DecodingConfig, Hypothesis, generate
from core.encoders import Encoder, build_trained_encoder
from core.errors import CaptionScopeError, CheckpointError, ConfigError
from core.file_encoding import batch_size_for
from core.io_utils import sha256_file
from core.logits_rules import LogitsRules
from core.images import ImageLimits, content_hash, load_image, read_source_bytes
from core.model import ShowAttendTell
from core.text import END, Vocabulary

ImageSource = str | Path | bytes | BinaryIO


@dataclass
class CaptionResult:
    """One image's captions, as the CLIs print them and the dashboard shows (and caches: it pickles)."""
    name: str
    hypotheses: list[Hypothesis]            # n-best, best first
    words: list[list[str]]                  # words of each hypothesis
    image: Image.Image | None = None        # upright RGB, downscaled for display
    encode_ms: float = 0.0
    decode_ms: float = 0.0
    from_cache: bool = False

    @property
    def caption(self) -> str:
        return " ".join(self.words[0]) if self.words else ""

    def tokens(self, index: int) -> list[str]:
        """Words of hypothesis `index` plus <end> when it finished: one per attention row."""
        return self.words[index] + ([END] if self.hypotheses[index].finished else [])


@dataclass
class CaptionFailure:
    name: str
    error: str                              # one line for the user


def checkpoint_encoder(ckpt: Checkpoint, weights: str | Path = "imagenet") -> Encoder:
    """The encoder `ckpt` was trained with (input size, fine-tuned tensors on top of `weights`)."""
    try:
        return build_trained_encoder(ckpt.encoder, ckpt.encoder_state, weights)
    except ConfigError as e:
        raise CheckpointError(f"{ckpt.path}: {e}") from None


class Captioner:
    def __init__(self, model: ShowAttendTell, vocab: Vocabulary, encoder: Encoder, *,
                 metadata: CheckpointMetadata | None = None, path: Path | None = None, device: str = "cpu",
                 cache_size: int = 256, checkpoint_sha256: str | None = None, encoder_weights_match: bool = True):
        self.model, self.vocab = model.to(device).eval(), vocab
        # channels-last weights: the layout oneDNN's CPU convolutions run fastest in (Lite2 at 320 px, eager,
        # batch 4: 34 against 21 images/s in one run here), the one `core.file_encoding` runs the corpus in
        self.encoder = encoder.to(device).eval().to(memory_format=torch.channels_last)
        self.metadata, self.path, self.device = metadata, path, device
        self.checkpoint_sha256 = checkpoint_sha256
        self.encoder_weights_match = encoder_weights_match   # False: not the encoder the decoder was trained on
        self._cache: OrderedDict[str, tuple[torch.Tensor, Image.Image]] = OrderedDict()
        self._cache_size, self._lock = cache_size, threading.Lock()

    @classmethod
    def from_checkpoint(cls, path: str | Path, *, encoder_weights: str | None = None,
                        device: str | None = None) -> "Captioner":
        """Load a checkpoint and its encoder ("imagenet" source by default; "none" = random, for tests)."""
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        ckpt = load_checkpoint(path)
        enc_meta = ckpt.encoder
        encoder = checkpoint_encoder(ckpt, encoder_weights or "imagenet")
        whole_backbone = bool(ckpt.encoder_state) and not enc_meta.get("tail_stages")   # a tail sits on the base
        match = (not enc_meta.get("weights_sha256") or encoder.weights_sha256 == enc_meta["weights_sha256"]
                 or whole_backbone)
        return cls(ckpt.model, ckpt.vocab, encoder, metadata=ckpt.metadata, path=Path(path), device=device,
                   checkpoint_sha256=sha256_file(path), encoder_weights_match=match)

    # -- facts the UIs show ----------------------------------------------------------------------
    @property
    def encoder_meta(self) -> dict:
        """The checkpoint's encoder metadata (name, weights sha256, image size, fine-tuned tail)."""
        if self.metadata is not None:
            return self.metadata.encoder
        return {"name": self.encoder_name, "fine_tuned": False, "weights_sha256": self.encoder.weights_sha256,
                "image_size": self.encoder.spec.image_size}

    @property
    def encoder_name(self) -> str:
        return self.encoder.spec.name

    @property
    def encoder_sha256(self) -> str | None:
        return self.encoder_meta.get("weights_sha256") or self.encoder.weights_sha256

    @property
    def checkpoint_id(self) -> str:
        """Identity of the weights, for cache keys: the checkpoint file's sha256 (or the object's id)."""
        return self.checkpoint_sha256 or f"mem-{id(self.model)}"

    @property
    def fine_tuned(self) -> bool:
        return bool(self.encoder_meta.get("fine_tuned"))

    def default_decoding(self) -> DecodingConfig:
        """The checkpoint's default decoding settings (library defaults without a checkpoint)."""
        return self.metadata.decoding_config() if self.metadata is not None else DecodingConfig()

    @property
    def grid(self) -> int:
        return self.encoder.spec.grid

    # -- features ----------------------------------------------------------------------------------
    def encode(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """(N, L, C) features of PIL images, encoded a device-sized batch at a time: on a CPU 4 (batches of 16
        spill the cache and ran at half the images/s of 4 for Lite2 at 320 px)."""
        pixels = torch.stack([self.encoder.preprocess(im) for im in images]).to(self.device)
        pixels = pixels.contiguous(memory_format=torch.channels_last)
        step = batch_size_for(self.device)
        with torch.inference_mode():
            return torch.cat([self.encoder(pixels[i:i + step]) for i in range(0, len(pixels), step)])

    def features(self, source: ImageSource, *, name: str | None = None,
                 limits: ImageLimits = ImageLimits()) -> tuple[torch.Tensor, Image.Image, bool, str]:
        """(L, C) features, the display image, whether it came from the cache, and the content key."""
        data, name = read_source_bytes(source, limits) if not isinstance(source, bytes) else (source, name)
        key = content_hash(data)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                feats, image = self._cache[key]
                return feats, image, True, key
        image = load_image(data, name=name or "image", limits=limits)
        feats = self.encode([image])[0]
        with self._lock:
            self._cache[key] = (feats, image)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return feats, image, False, key

    # -- captions ----------------------------------------------------------------------------------
    def decode(self, features: torch.Tensor, decoding: DecodingConfig) -> list[list[Hypothesis]]:
        """Decode a (B, L, C) batch of features (bad_words resolved against this checkpoint's vocabulary)."""
        return generate(self.model, features.to(self.device).float(), decoding, self.vocab)

    def check_decoding(self, decoding: DecodingConfig) -> None:
        """ConfigError naming what this checkpoint cannot honour (bad_words outside its vocabulary)."""
        LogitsRules.of(decoding, self.vocab)

    def words(self, hyp: Hypothesis) -> list[str]:
        return self.vocab.decode_tokens(hyp.token_ids)

    def caption(self, source: ImageSource, decoding: DecodingConfig, *, name: str | None = None,
                limits: ImageLimits = ImageLimits()) -> CaptionResult:
        """Caption one image (path, bytes or an uploaded file); raises ImageError on a bad image."""
        t0 = time.perf_counter()
        feats, image, cached, _ = self.features(source, name=name, limits=limits)
        t1 = time.perf_counter()
        nbest = self.decode(feats.unsqueeze(0), decoding)[0]
        t2 = time.perf_counter()
        label = name or getattr(source, "name", None) or (Path(source).name if isinstance(source, (str, Path)) else "image")
        return CaptionResult(label, nbest, [self.words(h) for h in nbest], image,
                             encode_ms=(t1 - t0) * 1e3, decode_ms=(t2 - t1) * 1e3, from_cache=cached)

    def caption_many(self, sources: Sequence[ImageSource], decoding: DecodingConfig, *,
                     names: Sequence[str] | None = None, limits: ImageLimits = ImageLimits(),
                     decode_batch: int = 50) -> list[CaptionResult | CaptionFailure]:
        """Caption each source; a bad one becomes a CaptionFailure and the others go on.

        Files go through core.file_encoding (compiled encoder at its fastest batch, decoding overlapped)
        and beam search runs batched over `decode_batch` images; encode_ms / decode_ms are per-image shares
        of their batch. Sampling decodes image by image, so a seed gives the same draws as `caption`.
        """
        from core.file_encoding import encode_files

        labels = [str(names[i]) if names else getattr(s, "name", None) or str(s)[:80] for i, s in enumerate(sources)]
        results: list[CaptionResult | CaptionFailure | None] = [None] * len(sources)
        pending: list[tuple[int, torch.Tensor, Image.Image, float]] = []

        def flush() -> None:
            t0 = time.perf_counter()
            feats = torch.stack([p[1] for p in pending])
            nbests = ([self.decode(f.unsqueeze(0), decoding)[0] for f in feats] if decoding.do_sample
                      else self.decode(feats, decoding))
            ms = (time.perf_counter() - t0) * 1e3 / len(pending)
            for (i, _, image, enc_ms), nbest in zip(pending, nbests):
                results[i] = CaptionResult(labels[i], nbest, [self.words(h) for h in nbest], image,
                                           encode_ms=enc_ms, decode_ms=ms)
            pending.clear()

        t0 = time.perf_counter()
        for batch in encode_files(self.encoder, sources, names=labels, device=self.device, with_images=True,
                                  limits=limits):
            enc_ms = (time.perf_counter() - t0) * 1e3 / max(len(batch.indices) + len(batch.failures), 1)
            for i, error in batch.failures.items():
                results[i] = CaptionFailure(labels[i], error)
            pending += [(i, f, im, enc_ms) for i, f, im in zip(batch.indices, batch.features, batch.images)]
            if len(pending) >= decode_batch:
                flush()
            t0 = time.perf_counter()
        if pending:
            flush()
        return [r for r in results if r is not None]
