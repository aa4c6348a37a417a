"""`python -m core.faithfulness` over the tiny dev split: words.csv and summary.json, and the summary's maths."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from conftest import run_cli
from core.corpus import CaptionCache
from core.decoding import DecodingConfig
from core.errors import ConfigError
from core.faithfulness import (COLUMNS, FaithfulnessConfig, frequency_band, least_faithful, run_split,
                               summarise)


def faithfulness_cli(tiny_checkpoint, tiny_flickr, tiny_features, out, *extra: str):
    return run_cli("core.faithfulness", "--checkpoint", str(tiny_checkpoint), "--data", str(tiny_flickr),
                   "--split", "dev", "--limit", "3", "--features", str(tiny_features), "--out", str(out), *extra)


@pytest.mark.parametrize("space", ["feature", "pixel"])
def test_cli_writes_words_and_summary(tiny_checkpoint, tiny_flickr, tiny_features, tmp_path, space):
    extra = ["--space", space, "--beam", "1"] + (["--step", "7", "--seeds", "2"] if space == "pixel" else [])
    done = faithfulness_cli(tiny_checkpoint, tiny_flickr, tiny_features, tmp_path, *extra)
    assert done.returncode == 0, done.stderr[-2000:]
    with open(tmp_path / "words.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == COLUMNS
    assert len({r["image"] for r in rows}) == 3
    # every generated token of each caption ("a <colour> <shape> on a white wall" + <end>)
    assert len(rows) == 3 * 8 and [r["word"] for r in rows[:8]][-1] == "<end>"
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert {"attention", "saliency", "random", "by_word", "by_frequency"} <= set(summary)
    assert summary["space"] == space and summary["words"] == len(rows) and summary["images"] == 3
    for method in ("attention", "saliency", "random"):
        lo, hi = summary[method]["ci95"]
        assert lo <= summary[method]["mean_auc"] <= hi
    aucs = np.array([[float(r[f"auc_{m}"]) for m in ("attention", "saliency", "random")] for r in rows])
    assert summary["attention"]["mean_auc"] == pytest.approx(aucs[:, 0].mean(), abs=1e-5)
    assert summary["attention"]["beats_random"] == pytest.approx((aucs[:, 0] < aucs[:, 2]).mean())
    assert summary["by_word"]["a"]["count"] == 6 and summary["by_frequency"]["top 10"]["count"] > 0
    assert "<end>" in summary["by_frequency"]


def test_bad_arguments_exit_2(tiny_checkpoint, tiny_flickr, tiny_features, tmp_path):
    for extra, message in ((["--step", "0"], "step must be"), (["--limit", "0"], "--limit"),
                           (["--seeds", "0"], "seeds must be"), (["--workers", "0"], "--workers")):
        done = faithfulness_cli(tiny_checkpoint, tiny_flickr, tiny_features, tmp_path, *extra)
        assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr


def rows_of(pairs):
    return [{"image": f"i{i}", "position": i, "word": w, "frequency_band": frequency_band(r), "auc_attention": a,
             "auc_saliency": s, "auc_random": 0.5} for i, (w, r, a, s) in enumerate(pairs)]


def test_summary_shares_bands_and_least_faithful():
    rows = rows_of([("a", 1, 0.4, 0.3), ("a", 1, 0.6, 0.3), ("dog", 40, 0.2, 0.1), ("<end>", None, 0.7, 0.6)])
    s = summarise(rows, resamples=200)
    assert s["attention"]["mean_auc"] == pytest.approx(0.475) and s["attention"]["beats_random"] == 0.5
    assert s["saliency"]["beats_random"] == 0.75 and "beats_random" not in s["random"]
    assert s["by_word"]["a"] == pytest.approx({"count": 2, "attention": 0.5, "saliency": 0.3, "random": 0.5,
                                               "attention_beats_random": 0.5, "saliency_beats_random": 1.0})
    assert list(s["by_word"])[0] == "a"
    assert set(s["by_frequency"]) == {"top 10", "11-100", "<end>"}
    assert [r["word"] for r in least_faithful(rows, 2)] == ["<end>", "a"]
    assert frequency_band(1000) == "101-1000" and frequency_band(1001) == "over 1000"


def test_run_split_caches_and_reports_progress(tiny_checkpoint, tiny_flickr, tmp_path):
    from core.captioner import Captioner
    from core.data import load_dataset
    captioner = Captioner.from_checkpoint(tiny_checkpoint, device="cpu")
    items = load_dataset(tiny_flickr).split("dev")[:2]
    config, decoding = FaithfulnessConfig(step=7, seeds=2), DecodingConfig(beam_size=1)
    seen = []
    first = run_split(captioner, items, decoding, config, cache=CaptionCache(tmp_path), progress=lambda d, t: seen.append((d, t)))
    assert seen == [(1, 2), (2, 2)]
    again = run_split(captioner, items, decoding, config, cache=CaptionCache(tmp_path))     # a fresh memory layer
    assert again == json.loads(json.dumps(first))
    with pytest.raises(ConfigError, match="deletion space"):
        run_split(captioner, items, decoding, FaithfulnessConfig(space="latent"))


def test_images_scored_in_parallel_give_the_same_rows(tiny_checkpoint, tiny_flickr, tiny_features):
    """workers > 1 runs images on threads (cached features only); the rows, their order and the progress
    reports are those of one image at a time, and torch's thread setting is given back."""
    import torch
    from core.captioner import Captioner
    from core.data import load_dataset
    captioner = Captioner.from_checkpoint(tiny_checkpoint, device="cpu")
    items = load_dataset(tiny_flickr).split("dev")[:4]
    config, decoding = FaithfulnessConfig(seeds=2), DecodingConfig(beam_size=2)
    threads = torch.get_num_threads()
    runs = {}
    for workers in (1, 3):
        seen = []
        runs[workers] = run_split(captioner, items, decoding, config, features_dir=tiny_features, workers=workers,
                                  progress=lambda d, t: seen.append((d, t)))
        assert seen == [(d, 4) for d in range(1, 5)]
        assert torch.get_num_threads() == threads
    assert runs[3] == runs[1] and [r["image"] for r in runs[1]][0] == items[0].image
    assert len({r["image"] for r in runs[1]}) == 4
