"""torchrun scale-out on 2 CPU ranks (gloo): replicas agree, the N-rank update equals the 1-rank update with
the same global batch, and sharded feature extraction equals a single-process run."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from core.checkpoint import load_checkpoint
from core.features import open_features
from core.train import main as train_main

from conftest import REPO, TINY_MODEL

TIMEOUT = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(module: str, args: list[str], ranks: int = 2, **env: str) -> subprocess.CompletedProcess:
    """`module` is a module name (core.train) or a script path (tests/ddp_weights.py)."""
    target = [module] if module.endswith(".py") else ["-m", module]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *target, *args]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **env}
    done = subprocess.run(cmd, cwd=REPO, env=environment, capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, f"torchrun failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def uneven_flickr(tiny_flickr: Path, root: Path) -> Path:
    """The tiny images with captions of very different lengths, so the 2 ranks get different token counts
    (with equal lengths a wrong per-rank normalisation would go unnoticed)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "images").symlink_to(tiny_flickr / "images")
    lines = []
    for i, line in enumerate((tiny_flickr / "Flickr8k.token.txt").read_text().splitlines()):
        key, caption = line.split("\t")
        words = caption.split()
        lines.append(f"{key}\t{' '.join(words[: 2 + (i * 5) % 7])}" if i % 3 else
                     f"{key}\t{caption} next to a very long and winding road")
    (root / "Flickr8k.token.txt").write_text("\n".join(lines) + "\n")
    for split in ("train", "dev"):
        shutil.copyfile(tiny_flickr / f"Flickr_8k.{split}Images.txt", root / f"Flickr_8k.{split}Images.txt")
    return root


def common(data: Path, features: Path) -> list[str]:
    return ["--data", str(data), "--features", str(features), "--min-count", "1", "--eval-beam", "1",
            "--lr", "3e-3", "--precision", "fp32", "--seed", "1", "--patience", "99", *TINY_MODEL]


def test_two_ranks_end_with_identical_weights_and_loss_falls(tiny_flickr, tiny_features, tmp_path):
    out = tmp_path / "ddp"
    torchrun(str(Path(__file__).with_name("ddp_weights.py")),
             [*common(tiny_flickr, tiny_features), "--out", str(out), "--epochs", "6", "--batch-size", "8"])
    shas = [(out / f"rank{r}.sha").read_text().strip() for r in range(2)]
    assert shas[0] == shas[1] and len(shas[0]) == 64
    log = [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines()]   # rank 0 only: one line/epoch
    assert [r["epoch"] for r in log] == list(range(6))
    assert log[-1]["train_loss"] < 0.7 * log[0]["train_loss"]
    assert (out / "last.safetensors").is_file() and not list(out.glob("*rank1*.safetensors"))


def test_two_rank_update_equals_one_rank_update_with_the_same_global_batch(tiny_flickr, tiny_features, tmp_path):
    data = uneven_flickr(tiny_flickr, tmp_path / "uneven")
    # two optimiser steps: Adam's first step is ~lr*sign(grad) whatever the gradient's scale, the second is not
    args = [*common(data, tiny_features), "--epochs", "1", "--batch-size", "10", "--max-steps", "2",
            "--alpha-c", "1.0"]
    torchrun("core.train", [*args, "--out", str(tmp_path / "two")])
    torch.set_num_threads(1)
    assert train_main([*args, "--out", str(tmp_path / "one")]) == 0
    two = load_checkpoint(tmp_path / "two" / "last.safetensors").model.state_dict()
    one = load_checkpoint(tmp_path / "one" / "last.safetensors").model.state_dict()
    # the softmax ignores a shift of all energies, so attention.score.bias has a true gradient of 0: Adam
    # turns its rounding noise into +-lr steps, different on every run; every other weight must agree
    for name in (n for n in one if n != "attention.score.bias"):
        assert torch.allclose(two[name], one[name], rtol=1e-4, atol=2e-6), name
    log_one = json.loads((tmp_path / "one" / "log.jsonl").read_text().splitlines()[0])
    log_two = json.loads((tmp_path / "two" / "log.jsonl").read_text().splitlines()[0])
    assert abs(log_one["train_loss"] - log_two["train_loss"]) < 1e-5 * log_one["train_loss"]
    assert log_one["steps"] == log_two["steps"] == 2


def test_sharded_feature_extraction_equals_a_single_process_run(tiny_flickr, tiny_features, tmp_path):
    out = tmp_path / "sharded"
    torchrun("core.features", ["--data", str(tiny_flickr), "--split", "train", "--out", str(out),
                               "--workers", "0", "--batch-size", "3"])
    sharded, single = open_features(out, "efficientnet_lite2", "train"), open_features(tiny_features,
                                                                                      "efficientnet_lite2", "train")
    assert sharded.images == single.images and sharded.weights_sha256 == single.weights_sha256
    np.testing.assert_allclose(np.asarray(sharded.array, np.float32), np.asarray(single.array, np.float32),
                               rtol=1e-2, atol=1e-2)
    assert not list((out / "efficientnet_lite2").glob("*partial*"))      # shards merged and cleaned up


def test_a_decoding_grid_sharded_over_two_ranks_equals_one_rank(tiny_checkpoint, tiny_flickr, tiny_features,
                                                                tmp_path):
    import pandas as pd

    from conftest import run_cli

    # 5 settings after greedy's alpha collapses: the ranks get different numbers of decodes
    args = ["--checkpoint", str(tiny_checkpoint), "--data", str(tiny_flickr), "--features", str(tiny_features),
            "--max-length", "8", "--beam", "1", "2", "3", "--length-penalty", "0", "1"]
    torchrun("core.evaluate", [*args, "--out", str(tmp_path / "two")])
    single = run_cli("core.evaluate", *args, "--out", str(tmp_path / "one"))
    assert single.returncode == 0, single.stderr[-3000:]
    two, one = (pd.read_csv(tmp_path / name / "grid.csv").drop(columns="decode_s") for name in ("two", "one"))
    pd.testing.assert_frame_equal(two, one)
    assert len(one) == 6
    summary = json.loads((tmp_path / "one" / "metrics.json").read_text())
    for setting in summary["settings"]:
        folder = setting["folder"]
        assert (tmp_path / "two" / folder / "captions.csv").read_text() == \
            (tmp_path / "one" / folder / "captions.csv").read_text()
def test_sharded_faithfulness_equals_a_single_process_run(tiny_checkpoint, tiny_flickr, tiny_features, tmp_path):
    args = ["--checkpoint", str(tiny_checkpoint), "--data", str(tiny_flickr), "--split", "dev", "--limit", "5",
            "--features", str(tiny_features), "--beam", "1", "--step", "7", "--seeds", "2"]
    torchrun("core.faithfulness", [*args, "--out", str(tmp_path / "two")])
    from core.faithfulness import main as faithfulness_main
    assert faithfulness_main([*args, "--out", str(tmp_path / "one")]) == 0
    two = (tmp_path / "two" / "words.csv").read_text().splitlines()
    one = (tmp_path / "one" / "words.csv").read_text().splitlines()
    assert len(one) == 1 + 5 * 8 and len(two) == len(one)
    for a, b in zip(one, two):
        fa, fb = a.split(","), b.split(",")
        assert fa[:5] == fb[:5]                                   # image, position, word, frequency
        np.testing.assert_allclose([float(x) for x in fa[5:]] if fa[0] != "image" else [0],
                                   [float(x) for x in fb[5:]] if fb[0] != "image" else [0], atol=1e-5)
    s1, s2 = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("one", "two"))
    assert s1["attention"]["mean_auc"] == pytest.approx(s2["attention"]["mean_auc"], abs=1e-6)
    assert s1["by_word"].keys() == s2["by_word"].keys()


# -- core.distributed: joining and leaving the group ----------------------------------------------------------

def test_outside_torchrun_the_group_helper_does_nothing(monkeypatch):
    from core.distributed import torchrun_group

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    with torchrun_group("gloo") as (rank, world):
        assert (rank, world) == (0, 1)
        assert not torch.distributed.is_initialized()


def test_a_group_is_destroyed_even_when_the_run_fails(monkeypatch):
    from core.distributed import torchrun_group

    for key, value in {"LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(RuntimeError, match="boom"):
        with torchrun_group("gloo") as (rank, world):
            assert (rank, world) == (0, 1) and torch.distributed.is_initialized()
            raise RuntimeError("boom")
    assert not torch.distributed.is_initialized()


def test_ranks_leave_the_group_only_after_rank_0_has_finished_its_writes(tmp_path):
    # a rank that tore gloo down while rank 0 still wrote its outputs aborted at exit in CI (core.faithfulness)
    torchrun(str(Path("tests") / "ddp_leave_together.py"), [str(tmp_path)])
    finished = json.loads((tmp_path / "rank0.json").read_text())["finished_writing"]
    for rank in (0, 1):
        left = json.loads((tmp_path / f"left{rank}.json").read_text())
        assert left["left"] >= finished, f"rank {rank} left before rank 0 finished writing"
        assert left["group_after"] is False and left["rank_world_after"] == [0, 1]
        assert left["gathered"] == [0, 1]


def test_the_group_timeout_reaches_the_process_group(monkeypatch):
    """core.evaluate lets the other ranks wait for rank 0 longer than gloo's 30 min default: the timeout given
    to torchrun_group must reach init_process_group (and none is passed when it is not given)."""
    from datetime import timedelta

    from core import distributed

    for key, value in {"LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(key, value)
    seen = []
    real = torch.distributed.init_process_group
    monkeypatch.setattr(torch.distributed, "init_process_group",
                        lambda backend, **kw: (seen.append(kw), real(backend, **kw))[1])
    with distributed.torchrun_group("gloo", timeout=timedelta(hours=2)):
        pass
    with distributed.torchrun_group("gloo"):
        pass
    assert seen == [{"timeout": timedelta(hours=2)}, {}]
    assert not torch.distributed.is_initialized()
