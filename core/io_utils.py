"""Atomic file writes, hashing, and user-supplied names made safe to show.

Everything CaptionScope persists (checkpoints, caches, logs' snapshots) goes through `atomic_write_*`:
write to a temporary file in the same folder, fsync, then `os.replace`. A kill at any moment leaves either
the old file or the new one, never a half-written file that later loads as valid.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import tempfile
import unicodedata
from pathlib import Path
from typing import Any

# Unicode control, format (bidi overrides, zero-width), line/paragraph separators, private use, surrogates
_HIDDEN_CATEGORIES = {"Cc", "Cf", "Zl", "Zp", "Co", "Cs", "Cn"}


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; caches and checkpoints are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def remove_stale_temp_files(folder: str | Path, names: list[str]) -> list[Path]:
    """Delete temp files that a killed `atomic_write_bytes` left behind for these file names in `folder`.

    A SIGKILL between mkstemp and os.replace leaves `.<name>.<random>.tmp`: never loaded (hidden, wrong
    suffix) but as large as the file it was becoming. Only call this while no other process writes the
    same files (e.g. when a training run starts in its own folder).
    """
    removed = []
    for name in names:
        for tmp in Path(folder).glob(f".{glob.escape(name)}.*.tmp"):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any, indent: int | None = 2) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=False) + "\n")


def mtime_ns(path: str | Path) -> int:
    """The file's modification time in ns, 0 if it cannot be read: part of cache keys, so a replaced file
    is read again."""
    try:
        return Path(path).stat().st_mtime_ns
    except OSError:
        return 0


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def printable_name(name: str, max_chars: int = 120) -> str:
    """A user-supplied name made safe to show: no control or format characters (U+202E and the other bidi
    overrides would show "photo\\u202egpj.exe" as "photoexe.jpg"; zero-width characters hide text), runs of
    whitespace as one space, at most `max_chars` characters (the middle elided)."""
    kept = "".join(" " if c.isspace() else c for c in str(name)
                   if c.isspace() or unicodedata.category(c) not in _HIDDEN_CATEGORIES)
    kept = " ".join(kept.split())
    if len(kept) > max_chars:
        half = (max_chars - 1) // 2
        kept = f"{kept[:half]}…{kept[len(kept) - (max_chars - 1 - half):]}"
    return kept
