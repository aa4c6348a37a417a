"""A checkpoint's header as one typed object: what the pages show without loading any weights.

The safetensors `__metadata__` is a dict of str -> str (see core.checkpoint for the keys); `parse_metadata`
checks it and decodes the JSON-valued keys, so a `CheckpointMetadata` is valid once built and nobody
downstream checks the dicts again.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.decoding import DecodingConfig
from core.encoders import MAX_IMAGE_SIZE, MIN_IMAGE_SIZE, grid_for
from core.errors import CaptionScopeError, CheckpointError

FORMAT = "captionscope-checkpoint"
FORMAT_VERSION = "1"
SUPPORTED_FORMAT_VERSIONS = ("1",)
REQUIRED_METADATA = ("format", "format_version", "model_config", "vocab", "encoder", "training", "decoding")
JSON_METADATA = ("model_config", "vocab", "encoder", "training", "decoding")


@dataclass(frozen=True)
class CheckpointMetadata:
    format_version: str
    created: str                   # ISO-8601 UTC time of saving ("" if absent)
    dtype: str                     # storage dtype of the weights ("" if absent)
    model_config: dict             # ModelConfig.to_dict()
    vocab: dict                    # Vocabulary.to_dict()
    encoder: dict                  # {name, weights_sha256, weights_source, fine_tuned, ...}
    training: dict                 # summary: config, epoch, dev scores, log file name, ...
    decoding: dict                 # default DecodingConfig dict ({} = library defaults)
    tensors_sha256: str | None = None
    extra: dict[str, str] = field(default_factory=dict)     # keys this version does not know

    @property
    def vocab_size(self) -> int:
        return int(self.model_config.get("vocab_size") or len(self.vocab.get("itos", [])))

    @property
    def training_config(self) -> dict:
        config = self.training.get("config")
        return config if isinstance(config, dict) else {}

    @property
    def dev_scores(self) -> dict:
        """The dev scores training recorded ({"BLEU-4": ..., "CIDEr-D": ...}), {} if none."""
        dev = self.training.get("dev")
        return dev if isinstance(dev, dict) else {}

    def decoding_config(self) -> DecodingConfig:
        """The checkpoint's default decoding settings; the library defaults when they are not valid."""
        try:
            return DecodingConfig.from_dict(dict(self.decoding))
        except CaptionScopeError:
            return DecodingConfig()


def parse_metadata(path: Path, header: dict) -> CheckpointMetadata:
    """The validated `__metadata__` of a safetensors header; CheckpointError naming the file otherwise."""
    raw = header.get("__metadata__")
    if not isinstance(raw, dict) or not all(isinstance(v, str) for v in raw.values()):
        raise CheckpointError(f"{path} is not a CaptionScope checkpoint (no string metadata in its header)")
    if raw.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a CaptionScope checkpoint (format is {raw.get('format')!r}, "
                              f"expected {FORMAT!r})")
    version = raw.get("format_version")
    if version not in SUPPORTED_FORMAT_VERSIONS:
        raise CheckpointError(f"{path}: checkpoint format_version {version!r} is not supported by this "
                              f"CaptionScope (supported: {', '.join(SUPPORTED_FORMAT_VERSIONS)})")
    missing = [k for k in REQUIRED_METADATA if k not in raw]
    if missing:
        raise CheckpointError(f"{path}: checkpoint metadata is missing {', '.join(missing)}")
    meta: dict[str, Any] = dict(raw)
    for key in JSON_METADATA:
        try:
            meta[key] = json.loads(raw[key])
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path}: metadata {key!r} is not valid JSON ({e.msg})") from None
        if not isinstance(meta[key], dict):
            raise CheckpointError(f"{path}: metadata {key!r} must be a JSON object, got "
                                  f"{type(meta[key]).__name__}")
    _check_encoder_meta(path, meta["encoder"])
    known = {"format", "format_version", "created", "dtype", "tensors_sha256", *JSON_METADATA}
    return CheckpointMetadata(
        format_version=meta["format_version"], created=meta.get("created", ""), dtype=meta.get("dtype", ""),
        model_config=meta["model_config"], vocab=meta["vocab"], encoder=meta["encoder"],
        training=meta["training"], decoding=meta["decoding"], tensors_sha256=meta.get("tensors_sha256"),
        extra={k: v for k, v in meta.items() if k not in known})


def _check_encoder_meta(path: Path, enc: dict) -> None:
    if not isinstance(enc.get("name"), str) or not enc["name"]:
        raise CheckpointError(f"{path}: metadata 'encoder' needs a non-empty 'name'")
    if not isinstance(enc.get("fine_tuned"), bool):
        raise CheckpointError(f"{path}: metadata 'encoder.fine_tuned' must be true or false")
    for key in ("weights_sha256", "weights_source"):
        if enc.get(key) is not None and not isinstance(enc[key], str):
            raise CheckpointError(f"{path}: metadata 'encoder.{key}' must be a string or null")
    size, grid, tail = enc.get("image_size", 224), enc.get("grid"), enc.get("tail_stages", 0)
    if type(size) is not int or not MIN_IMAGE_SIZE <= size <= MAX_IMAGE_SIZE:
        raise CheckpointError(f"{path}: metadata 'encoder.image_size' must be an integer in "
                              f"{MIN_IMAGE_SIZE}..{MAX_IMAGE_SIZE}, got {size!r}")
    if grid is not None and grid != grid_for(size):
        raise CheckpointError(f"{path}: metadata 'encoder.grid' is {grid!r} but a {size} px input gives a "
                              f"{grid_for(size)}x{grid_for(size)} grid")
    if type(tail) is not int or tail < 0 or (tail and not enc["fine_tuned"]):
        raise CheckpointError(f"{path}: metadata 'encoder.tail_stages' must be an integer >= 0, and 0 unless "
                              f"the encoder is fine_tuned; got {tail!r}")


