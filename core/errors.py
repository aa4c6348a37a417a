"""One exception family, so CLIs and the dashboard can turn any expected failure into one clear line."""
from __future__ import annotations

import functools
import sys
from typing import Callable


class CaptionScopeError(ValueError):
    """Base of every error CaptionScope raises on purpose; the message is meant for the user."""


class DataError(CaptionScopeError):
    """A dataset folder, caption file or split list is missing or malformed."""


class ImageError(CaptionScopeError):
    """An image cannot be decoded, is too large, or is not an image at all."""


class CheckpointError(CaptionScopeError):
    """A checkpoint is not ours, is corrupt, or its metadata disagrees with its weights."""


class ConfigError(CaptionScopeError):
    """A setting (decoding, training, encoder choice) is out of range or inconsistent."""


def cli_main(main: Callable[[list[str] | None], int]) -> Callable[[list[str] | None], int]:
    """For every `python -m core.X` entry point: an expected failure prints one `error:` line on stderr and
    exits with 2, never a traceback."""
    @functools.wraps(main)
    def wrapper(argv: list[str] | None = None) -> int:
        try:
            return main(argv)
        except CaptionScopeError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    return wrapper
