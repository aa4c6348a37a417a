"""Checkpoints: one `.safetensors` file holding the decoder weights and everything needed to use them.

Why safetensors and not `torch.save`: a pickle can run arbitrary code when loaded, and the dashboard loads
whatever file sits in its checkpoint folder. A safetensors file is an 8-byte little-endian header length,
a JSON header (tensor name -> dtype/shape/byte range, plus a free-form `__metadata__` dict of str -> str),
then raw tensor bytes: parsing it cannot execute anything. This module never calls `torch.load` or `pickle`.

Metadata keys (all strings; the structured ones hold JSON):

    format          "captionscope-checkpoint"      plain string: marks the file as ours
    format_version  "1"                            plain string
    created         ISO-8601 UTC time              plain string
    dtype           "float16" | "bfloat16" | "float32": storage dtype of the weights
    model_config    JSON: `ModelConfig.to_dict()`
    vocab           JSON: `Vocabulary.to_dict()`
    encoder         JSON: {name, weights_sha256, weights_source, fine_tuned, image_size, grid, tail_stages}
                    (image_size 224 / grid 7 when absent; tail_stages: how many of the encoder's last
                    stages the "encoder." tensors hold, 0 = the whole backbone)
    training        JSON: summary dict (epochs, best score, data, ...)
    decoding        JSON: default `DecodingConfig` dict ({} = library defaults)
    tensors_sha256  sha256 of the tensor-data section, so silent corruption is caught on load

Decoder tensors use the model's own `state_dict()` names; a fine-tuned encoder's tensors are stored under
the prefix "encoder.". Everything is validated *before* a model is built, and every error names the file.
"""
from __future__ import annotations

import json
import math
import os
import re
import struct
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import Tensor

from core.checkpoint_metadata import FORMAT, FORMAT_VERSION, CheckpointMetadata, parse_metadata
from core.encoders import grid_for
from core.errors import CaptionScopeError, CheckpointError
from core.io_utils import atomic_write_bytes, sha256_bytes
from core.model import ModelConfig, ShowAttendTell
from core.text import Vocabulary

SUFFIX = ".safetensors"
ENCODER_PREFIX = "encoder."

DEFAULT_CHECKPOINT_DIR = Path(__file__).resolve().parent.parent / "checkpoints"
DEFAULT_CHECKPOINT_NAME = "captionscope-lite2.safetensors"

MAX_HEADER_BYTES = 100_000_000          # same cap as the safetensors library itself
MAX_CHECKPOINT_BYTES = 4 * 2**30        # a decoder (+ fine-tuned encoder) is tens of MB; refuse absurd files
_STORAGE_DTYPES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}
_FLOAT_CODES = {"F16", "BF16", "F32"}
_ITEM_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
               "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
_SHOW = 5                               # name at most this many missing/extra keys in a message


@dataclass
class Checkpoint:
    model: ShowAttendTell                       # float32, eval mode, on the requested device
    vocab: Vocabulary
    encoder: dict                               # {name, weights_sha256, weights_source, fine_tuned}
    training: dict
    decoding: dict
    path: Path | None = None
    encoder_state: dict[str, Tensor] | None = None   # only when the encoder was fine-tuned (prefix stripped)
    metadata: CheckpointMetadata | None = None       # the header, as `read_metadata` returns it

    @property
    def config(self) -> ModelConfig:
        return self.model.config


# -- saving ----------------------------------------------------------------------------------------
def save_checkpoint(path: str | Path, model: ShowAttendTell, vocab: Vocabulary, *, encoder: dict,
                    training: dict, decoding: dict | None = None,
                    encoder_state: dict[str, Tensor] | None = None,
                    dtype: torch.dtype = torch.float16) -> Path:
    """Write model + vocab + metadata to one `.safetensors` file atomically (old file intact on a crash)."""
    path = Path(path)
    if path.suffix != SUFFIX:
        raise CheckpointError(f"{path}: checkpoint files must end in {SUFFIX}")
    if dtype not in _STORAGE_DTYPES:
        raise CheckpointError(f"{path}: unsupported storage dtype {dtype} (use float16, bfloat16 or float32)")
    config = model.config
    if len(vocab) != config.vocab_size:
        raise CheckpointError(f"{path}: vocab has {len(vocab)} tokens but model_config.vocab_size is "
                              f"{config.vocab_size}")
    encoder = _normalise_encoder(path, encoder, has_state=encoder_state is not None)

    tensors = {name: _to_storage(path, name, t, dtype) for name, t in model.state_dict().items()}
    for name, t in (encoder_state or {}).items():
        tensors[ENCODER_PREFIX + name] = _to_storage(path, ENCODER_PREFIX + name, t, dtype)

    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "dtype": _STORAGE_DTYPES[dtype],
        "model_config": _to_json(path, "model_config", config.to_dict()),
        "vocab": _to_json(path, "vocab", vocab.to_dict()),
        "encoder": _to_json(path, "encoder", encoder),
        "training": _to_json(path, "training", dict(training)),
        "decoding": _to_json(path, "decoding", dict(decoding or {})),
    }
    # The tensor-data section does not depend on the metadata, so serialise once to hash it, then again
    # with the hash recorded. Costs one extra in-memory copy; buys detection of bit rot / bad copies.
    draft = safetensors.torch.save(tensors, metadata=metadata)
    (header_len,) = struct.unpack("<Q", draft[:8])
    metadata["tensors_sha256"] = sha256_bytes(draft[8 + header_len:])
    return atomic_write_bytes(path, safetensors.torch.save(tensors, metadata=metadata))


def store_decoding_defaults(path: str | Path, decoding: dict, tuned: dict) -> Path:
    """Rewrite checkpoint `path` atomically with `decoding` (a DecodingConfig dict) as its default settings.
    The weights stay bit for bit (same storage dtype); `tuned` (how the settings were chosen, e.g. the split
    and the metric) is recorded as `training["decoding_tuned"]`."""
    ckpt = load_checkpoint(path)
    dtype = {name: dt for dt, name in _STORAGE_DTYPES.items()}.get(ckpt.metadata.dtype, torch.float32)
    return save_checkpoint(path, ckpt.model, ckpt.vocab, encoder=ckpt.encoder, decoding=decoding,
                           training={**ckpt.training, "decoding_tuned": tuned}, encoder_state=ckpt.encoder_state,
                           dtype=dtype)


def _to_storage(path: Path, name: str, tensor: Tensor, dtype: torch.dtype) -> Tensor:
    tensor = tensor.detach().to("cpu")
    if not tensor.is_floating_point():
        return tensor.clone().contiguous()       # e.g. BatchNorm's num_batches_tracked in an encoder
    if not torch.isfinite(tensor).all():
        raise CheckpointError(f"{path}: refusing to save, tensor {name!r} contains NaN or inf values")
    stored = tensor.to(dtype).clone().contiguous()   # clone: safetensors refuses tensors sharing memory
    if not torch.isfinite(stored).all():
        raise CheckpointError(f"{path}: tensor {name!r} overflows {_STORAGE_DTYPES[dtype]} (max |w| = "
                              f"{tensor.abs().max().item():.4g}); save with dtype=torch.float32")
    return stored


def _normalise_encoder(path: Path, encoder: dict, *, has_state: bool) -> dict:
    if not isinstance(encoder, dict) or not isinstance(encoder.get("name"), str) or not encoder["name"]:
        raise CheckpointError(f"{path}: encoder must be a dict with a non-empty 'name'")
    out = {"name": encoder["name"], "weights_sha256": encoder.get("weights_sha256"),
           "weights_source": encoder.get("weights_source"),
           "fine_tuned": bool(encoder.get("fine_tuned", has_state))}
    out.update({k: v for k, v in encoder.items() if k not in out})
    if out["fine_tuned"] != has_state:
        raise CheckpointError(f"{path}: encoder fine_tuned={out['fine_tuned']} but encoder_state was "
                              f"{'given' if has_state else 'not given'}")
    return out


def _to_json(path: Path, key: str, obj: Any) -> str:
    def fallback(value: Any) -> Any:
        if isinstance(value, Path):
            return str(value)
        if hasattr(value, "item"):                # numpy / torch scalars
            return value.item()
        raise TypeError(f"{type(value).__name__} is not JSON serialisable")
    try:
        return json.dumps(obj, default=fallback)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: metadata {key!r} cannot be stored as JSON: {e}") from None


# -- reading the header (cheap) ---------------------------------------------------------------------
def read_metadata(path: str | Path) -> CheckpointMetadata:
    """Validated metadata of a checkpoint, reading only its header (the dashboard lists files with it)."""
    path = Path(path)
    size = _file_size(path)
    with open(path, "rb") as f:
        head = f.read(8)
        header_len = _header_length(path, head, size)
        header_bytes = f.read(header_len)
    header = _parse_header(path, head + header_bytes, size)
    return parse_metadata(path, header)


def _file_size(path: Path) -> int:
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    size = path.stat().st_size
    if size > MAX_CHECKPOINT_BYTES:
        raise CheckpointError(f"{path} is too large to be a CaptionScope checkpoint ({size / 2**30:.1f} GiB)")
    return size


def _header_length(path: Path, head: bytes, size: int) -> int:
    header_len = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
    if 2 <= header_len <= MAX_HEADER_BYTES and 8 + header_len <= size:
        return header_len
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":    # zip (torch.save) or pickle protocol >= 2
        raise CheckpointError(f"{path} is not a CaptionScope checkpoint: it looks like a pickle / torch.save "
                              f"file, which is never loaded (unpickling can run arbitrary code)")
    detail = f"{size} bytes" if header_len < 0 else f"header length {header_len}, file size {size}"
    raise CheckpointError(f"{path} is truncated or not a safetensors file ({detail})")


def _parse_header(path: Path, raw: bytes | memoryview, size: int) -> dict:
    """JSON header of a safetensors file whose first bytes are `raw`; checks every tensor's byte range."""
    header_len = _header_length(path, bytes(raw[:8]), size)
    try:
        header = json.loads(bytes(raw[8:8 + header_len]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{path} is truncated or not a safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} is not a safetensors file (header is not a JSON object)")
    data_size = size - 8 - header_len
    needed = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = entry["data_offsets"]
            shape, code = entry["shape"], entry["dtype"]
            ok = (all(isinstance(v, int) and v >= 0 for v in (begin, end, *shape)) and begin <= end
                  and code in _ITEM_SIZES and end - begin == math.prod(shape) * _ITEM_SIZES[code])
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            raise CheckpointError(f"{path} is not a valid safetensors file (bad header entry for {name!r})")
        needed = max(needed, end)
    if needed > data_size:
        raise CheckpointError(f"{path} is truncated: the header describes {needed} bytes of tensor data "
                              f"but only {data_size} are present")
    return header


# -- loading ----------------------------------------------------------------------------------------
def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> Checkpoint:
    """Validate and load a checkpoint; the model comes back in float32 and eval mode."""
    path = Path(path)
    _file_size(path)            # exists, not absurdly large
    data = path.read_bytes()    # read once: what we validate is exactly what we load
    size = len(data)
    header_len = _header_length(path, data[:8], size)
    header = _parse_header(path, memoryview(data)[:8 + header_len], size)
    meta = parse_metadata(path, header)
    config = _model_config(path, meta.model_config)
    try:
        vocab = Vocabulary.from_dict(meta.vocab, source=f"{path}: vocab")
    except CaptionScopeError as e:
        raise CheckpointError(str(e)) from None
    if len(vocab) != config.vocab_size:
        raise CheckpointError(f"{path}: vocab has {len(vocab)} tokens but model_config.vocab_size is "
                              f"{config.vocab_size}")

    stored = {name: (tuple(e["shape"]), e["dtype"]) for name, e in header.items() if name != "__metadata__"}
    decoder_stored = {k: v for k, v in stored.items() if not k.startswith(ENCODER_PREFIX)}
    _check_weights_match(path, config, decoder_stored)
    side = grid_for(meta.encoder.get("image_size", 224))
    recorded = "grid" in meta.encoder or "image_size" in meta.encoder   # older files record neither
    if recorded and config.num_regions != side * side:
        raise CheckpointError(f"{path}: model_config.num_regions is {config.num_regions} but the encoder's "
                              f"{meta.encoder.get('image_size', 224)} px input gives {side}x{side} = "
                              f"{side * side} regions")
    has_encoder = len(decoder_stored) < len(stored)
    if meta.encoder["fine_tuned"] != has_encoder:
        raise CheckpointError(f"{path}: metadata says encoder fine_tuned={meta.encoder['fine_tuned']} "
                              f"but the file {'has' if has_encoder else 'has no'} '{ENCODER_PREFIX}*' tensors")
    expected_sha = meta.tensors_sha256
    if expected_sha is not None and sha256_bytes(memoryview(data)[8 + header_len:]) != expected_sha:
        raise CheckpointError(f"{path}: tensor data does not match its recorded sha256 (file corrupted?)")

    try:
        tensors = safetensors.torch.load(data)
    except Exception as e:  # SafetensorError is not exported under a stable name
        raise CheckpointError(f"{path} is not a valid safetensors file ({e})") from None
    for name, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise CheckpointError(f"{path}: tensor {name!r} contains NaN or inf values")

    with torch.device("meta"):      # no random init of weights that are replaced at once (~0.4 s)
        model = ShowAttendTell(config)
    state = {k: t.to(torch.float32) for k, t in tensors.items() if not k.startswith(ENCODER_PREFIX)}
    # keys and shapes were checked above, so this cannot fail; assign: the loaded tensors become the weights
    model.load_state_dict(state, strict=True, assign=True)
    model.to(device).eval()
    encoder_state = None
    if has_encoder:
        encoder_state = {k[len(ENCODER_PREFIX):]: (t.to(torch.float32) if t.is_floating_point() else t).to(device)
                         for k, t in tensors.items() if k.startswith(ENCODER_PREFIX)}
    return Checkpoint(model=model, vocab=vocab, encoder=meta.encoder, training=meta.training,
                      decoding=meta.decoding, path=path, encoder_state=encoder_state, metadata=meta)


def _model_config(path: Path, d: dict) -> ModelConfig:
    try:
        config = ModelConfig.from_dict(d)
    except CaptionScopeError as e:
        raise CheckpointError(f"{path}: {e}") from None     # ModelConfig validates its own values
    return config


def _check_weights_match(path: Path, config: ModelConfig, stored: dict[str, tuple[tuple, str]]) -> None:
    """Compare the header's tensors with what `ShowAttendTell(config)` expects, without allocating it."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in ShowAttendTell(config).state_dict().items()}

    def rows(name: str) -> int | None:
        shape = stored.get(name, ((),))[0]
        return shape[0] if shape else None

    for name in ("embedding.weight", "classifier.weight"):
        if name in stored and rows(name) != config.vocab_size:
            raise CheckpointError(f"{path}: vocab size mismatch: {name} has {rows(name)} rows but "
                                  f"model_config.vocab_size is {config.vocab_size}")
    enc_in = stored.get("attention.encoder_proj.weight", ((),))[0]
    if len(enc_in) == 2 and enc_in[1] != config.encoder_dim:
        raise CheckpointError(f"{path}: encoder_dim mismatch: model_config.encoder_dim is {config.encoder_dim} "
                              f"but attention.encoder_proj.weight takes {enc_in[1]}-dim features")
    lstm_in = stored.get("lstm.weight_ih", ((),))[0]
    if len(lstm_in) == 2 and lstm_in[1] != config.embed_dim + config.encoder_dim:
        raise CheckpointError(f"{path}: encoder_dim mismatch: lstm.weight_ih takes {lstm_in[1]} inputs but "
                              f"embed_dim + encoder_dim = {config.embed_dim + config.encoder_dim}")

    missing = sorted(set(expected) - set(stored))
    extra = sorted(set(stored) - set(expected))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s): {', '.join(missing[:_SHOW])}"
                         + (", ..." if len(missing) > _SHOW else ""))
        if extra:
            parts.append(f"unexpected {len(extra)} tensor(s): {', '.join(extra[:_SHOW])}"
                         + (", ..." if len(extra) > _SHOW else ""))
        raise CheckpointError(f"{path}: weights do not match model_config ({'; '.join(parts)})")
    for name, shape in expected.items():
        got, code = stored[name]
        if got != shape:
            raise CheckpointError(f"{path}: shape mismatch for {name}: file has {list(got)}, "
                                  f"model_config expects {list(shape)}")
        if code not in _FLOAT_CODES:
            raise CheckpointError(f"{path}: tensor {name} has dtype {code}, expected F16, BF16 or F32")


# -- finding checkpoints ----------------------------------------------------------------------------
def list_checkpoints(folder: str | Path | None = None) -> list[Path]:
    """`*.safetensors` files directly inside `folder` (default: checkpoints/), sorted by name.

    Symlinks that lead out of the folder are skipped, so everything listed passes `resolve_checkpoint`.
    Hidden files are skipped too: they are work in progress (e.g. an upload being validated, left behind
    by a kill), not checkpoints anyone chose to put there.
    """
    folder = Path(DEFAULT_CHECKPOINT_DIR if folder is None else folder)
    if not folder.is_dir():
        return []
    root = folder.resolve()
    return sorted(p for p in folder.glob(f"*{SUFFIX}")
                  if not p.name.startswith(".") and p.is_file() and _real_parent(p) == root)


def _real_parent(path: Path) -> Path | None:
    try:
        return path.resolve().parent
    except (OSError, RuntimeError):      # symlink loop
        return None


def resolve_checkpoint(name_or_path: str | Path, folder: str | Path | None = None, *,
                       allow_outside: bool = False) -> Path:
    """Turn a picker's choice (a file name) into a checkpoint path that is guaranteed to be inside `folder`.

    The dashboard passes user-controlled strings here, so '..', absolute paths, sub-folders and symlinks
    pointing elsewhere are refused. CLIs pass `allow_outside=True` to accept any existing path.
    """
    folder = Path(DEFAULT_CHECKPOINT_DIR if folder is None else folder)
    text = str(name_or_path)
    if allow_outside:
        candidate = Path(text).expanduser()
        if not candidate.exists() and len(candidate.parts) == 1:
            candidate = folder / candidate
        if not candidate.is_file():
            raise CheckpointError(f"checkpoint not found: {candidate}")
        return candidate
    name = Path(text)
    if not text or "\x00" in text or name.is_absolute() or "\\" in text or len(name.parts) != 1 \
            or name.name in (".", ".."):
        raise CheckpointError(f"{text!r} is not a checkpoint file name inside {folder} "
                              f"(paths, '..' and absolute paths are refused)")
    if name.suffix != SUFFIX:
        raise CheckpointError(f"{text!r}: checkpoint files end in {SUFFIX}")
    candidate = folder / name
    if _real_parent(candidate) != folder.resolve():
        raise CheckpointError(f"{candidate} points outside the checkpoint folder {folder}")
    if not candidate.is_file():
        raise CheckpointError(f"checkpoint not found: {candidate}")
    return candidate


def upload_file_name(name: str) -> str:
    """The file name an uploaded checkpoint is kept, listed and shown under: the stem of `name` reduced to
    ASCII letters, digits, '.', '_' and '-' (no path, control or bidi characters), at most 100 of them."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(str(name)).stem).strip("._")[:100].strip("._")
    return f"{stem or 'checkpoint'}{SUFFIX}"


def save_uploaded_checkpoint(folder: str | Path, name: str, data: bytes) -> Path:
    """Validate uploaded checkpoint bytes and keep them in `folder` under a safe version of `name`.

    The bytes go to a hidden temporary name first (never listed) and are fully loaded (header, shapes,
    hashes); only a checkpoint that loads is renamed into the folder, so a bad upload never reaches the
    picker. Raises CheckpointError with the loader's one-line message, naming the cleaned file name (what
    the disk, the picker and messages show), never the temp file.
    """
    file_name = upload_file_name(name)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    digest = sha256_bytes(data)
    temp = folder / f".upload-{digest[:16]}{SUFFIX}"
    atomic_write_bytes(temp, data)
    try:
        load_checkpoint(temp)
    except CaptionScopeError as e:
        temp.unlink(missing_ok=True)
        raise CheckpointError(str(e).replace(str(temp), file_name).splitlines()[0]) from None
    target = folder / file_name
    if target.exists() and sha256_bytes(target.read_bytes()) != digest:
        target = folder / f"{target.stem}-{digest[:8]}{SUFFIX}"
    os.replace(temp, target)
    return target


def default_checkpoint_path(*, must_exist: bool = True) -> Path:
    """The bundled model, `checkpoints/captionscope-lite2.safetensors`."""
    path = DEFAULT_CHECKPOINT_DIR / DEFAULT_CHECKPOINT_NAME
    if must_exist and not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}. Train one with `python -m core.train` "
                              f"(it writes {DEFAULT_CHECKPOINT_NAME}) or copy a trained checkpoint there")
    return path
