"""Where the dashboard finds and keeps things, from environment variables (no machine path is baked in).

  checkpoints   $CAPTIONSCOPE_CHECKPOINT_DIR or the repo's checkpoints/
  cache         $CAPTIONSCOPE_CACHE_DIR or the repo's .cache/captionscope/ (uploaded checkpoints, captions)
  features      $CAPTIONSCOPE_FEATURES_DIR or the repo's features/ (written by `python -m core.features`)
  Flickr8K      $FLICKR8K_DIR or the sidebar's text field (see ui.state.flickr_dir)

and the checkpoints there are to choose from: the bundled folder's and the uploaded ones.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from core.checkpoint import DEFAULT_CHECKPOINT_DIR, list_checkpoints, resolve_checkpoint
from core.corpus import CACHE_ENV, default_cache_dir

REPO = Path(__file__).resolve().parents[1]
EXAMPLES_DIR = REPO / "assets" / "examples"
CHECKPOINT_DIR_ENV = "CAPTIONSCOPE_CHECKPOINT_DIR"
CACHE_DIR_ENV = CACHE_ENV
FEATURES_DIR_ENV = "CAPTIONSCOPE_FEATURES_DIR"
BUNDLED, UPLOADED = "bundled", "uploaded"


def _env_dir(name: str, default: Path) -> Path:
    value = os.environ.get(name, "").strip()
    return Path(value).expanduser() if value else default


def checkpoint_dir() -> Path:
    return _env_dir(CHECKPOINT_DIR_ENV, DEFAULT_CHECKPOINT_DIR)


def cache_dir() -> Path:
    return default_cache_dir()


def upload_dir() -> Path:
    return cache_dir() / "uploaded_checkpoints"


def features_dir() -> Path:
    """Where `python -m core.features` wrote the Flickr8K feature caches (lets corpus runs skip the CNN)."""
    return _env_dir(FEATURES_DIR_ENV, REPO / "features")


def example_images() -> dict[str, Path]:
    """Bundled example photos, {display name: path} (see assets/examples/README.md for their licences)."""
    if not EXAMPLES_DIR.is_dir():
        return {}
    return {p.stem.replace("_", " "): p for p in sorted(EXAMPLES_DIR.glob("*.jpg"))}


@dataclass(frozen=True)
class CheckpointChoice:
    origin: str        # BUNDLED | UPLOADED
    name: str          # file name inside its folder

    @property
    def label(self) -> str:
        return self.name if self.origin == BUNDLED else f"{self.name} (uploaded)"

    def folder(self) -> Path:
        return checkpoint_dir() if self.origin == BUNDLED else upload_dir()

    def path(self) -> Path:
        """Resolved through core.checkpoint, so a choice can never point outside its folder."""
        return resolve_checkpoint(self.name, self.folder())


def available_checkpoints() -> list[CheckpointChoice]:
    return ([CheckpointChoice(BUNDLED, p.name) for p in list_checkpoints(checkpoint_dir())]
            + [CheckpointChoice(UPLOADED, p.name) for p in list_checkpoints(upload_dir())])
