"""`python -m core.evaluate` on the tiny dataset, as a subprocess: the files it writes and how it fails."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from core.data import load_dataset
from core.metrics import METRIC_NAMES, java_available

from conftest import run_cli

def evaluate_cli(*args: str):
    return run_cli("core.evaluate", *args)


def test_writes_metrics_and_captions(tiny_checkpoint, tiny_flickr, tiny_features, tmp_path):
    out = tmp_path / "eval"
    result = evaluate_cli("--checkpoint", str(tiny_checkpoint), "--data", str(tiny_flickr), "--split", "dev",
                          "--beam", "2", "--features", str(tiny_features), "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr

    summary = json.loads((out / "metrics.json").read_text())
    expected = [m for m in METRIC_NAMES if m != "METEOR" or java_available()]
    assert list(summary["metrics"]) == expected
    assert all(0.0 <= summary["metrics"][m] <= (10.0 if m == "CIDEr-D" else 1.0) for m in expected)
    assert summary["images"] == 8 and summary["split"] == "dev" and summary["decoding"]["beam_size"] == 2
    assert summary["features_from"] == "features"                 # read from the feature cache
    if not java_available():
        assert any("METEOR" in note for note in summary["notes"])

    with open(out / "captions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
        f.seek(0)
        header = next(csv.reader(f))
    assert header == ["image", "caption", "references", *expected]
    items = load_dataset(tiny_flickr).split("dev")
    assert [r["image"] for r in rows] == [it.image for it in items]
    for row, it in zip(rows, items):
        assert row["references"].split(" | ") == list(it.captions)
        assert row["caption"].strip()
        assert all(0.0 <= float(row[m]) for m in expected)
    # the corpus scores are the per-image rows aggregated (CIDEr-D and ROUGE-L are plain means)
    for metric in ("CIDEr-D", "ROUGE-L"):
        assert np.mean([float(r[metric]) for r in rows]) == pytest.approx(summary["metrics"][metric], abs=1e-5)
    # the tiny model has memorised its 8 images: near-perfect scores
    assert summary["metrics"]["BLEU-4"] > 0.8


def test_bad_data_folder_is_one_line_and_exit_2(tiny_checkpoint, tmp_path):
    result = evaluate_cli("--checkpoint", str(tiny_checkpoint), "--data", str(tmp_path / "no_such_folder"),
                          "--out", str(tmp_path / "eval"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
    assert "no_such_folder" in result.stderr
    assert not (tmp_path / "eval").exists()


def test_bad_split_and_checkpoint_exit_2(tiny_checkpoint, tiny_flickr, tmp_path, capsys):
    from core.evaluate import main
    assert main(["--checkpoint", str(tiny_checkpoint), "--data", str(tiny_flickr), "--split", "test",
                 "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "test" in err and "dev" in err          # names what exists
    assert main(["--checkpoint", str(tmp_path / "missing.safetensors"), "--data", str(tiny_flickr),
                 "--out", str(tmp_path)]) == 2
    assert "missing.safetensors" in capsys.readouterr().err
    assert not (tmp_path / "metrics.json").exists()


def test_decoding_knobs_reach_the_captions_and_metrics(tiny_checkpoint, tiny_flickr, tiny_features, tmp_path,
                                                       capsys):
    from core.evaluate import main
    out = tmp_path / "knobs"
    assert main(["--checkpoint", str(tiny_checkpoint), "--data", str(tiny_flickr), "--features", str(tiny_features),
                 "--beam", "2", "4", "--num-beam-groups", "2", "--diversity-penalty", "0.5", "--bad-words", "wall",
                 "--min-length", "9", "--out", str(out)]) == 0
    for beam in (2, 4):
        summary = json.loads((out / f"beam{beam}" / "metrics.json").read_text())
        knobs = {k: summary["decoding"][k] for k in ("beam_size", "num_beam_groups", "diversity_penalty",
                                                     "min_length", "bad_words")}
        assert knobs == dict(beam_size=beam, num_beam_groups=2, diversity_penalty=0.5, min_length=9,
                             bad_words=["wall"])
        with open(out / f"beam{beam}" / "captions.csv", newline="") as f:
            captions = [row["caption"].split() for row in csv.DictReader(f)]
        assert len(captions) == 8 and all("wall" not in c and len(c) >= 8 for c in captions)
    capsys.readouterr()
    assert main(["--checkpoint", str(tiny_checkpoint), "--data", str(tiny_flickr), "--beam", "2", "3",
                 "--num-beam-groups", "2", "--diversity-penalty", "0.5", "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert "num_beam_groups (2) must divide beam_size (3)" in err and not (tmp_path / "bad").exists()
    assert main(["--checkpoint", str(tiny_checkpoint), "--data", str(tiny_flickr), "--bad-words", "zebra",
                 "--out", str(tmp_path / "bad")]) == 2
    assert "'zebra'" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_flags_left_out_take_the_checkpoints_stored_decoding(tiny_checkpoint, tiny_flickr, tiny_features, tmp_path):
    from core.checkpoint import load_checkpoint, save_checkpoint
    from core.evaluate import main
    ckpt = load_checkpoint(tiny_checkpoint)
    stored = {**ckpt.decoding, "beam_size": 2, "length_penalty": 0.5, "no_repeat_ngram_size": 2, "max_length": 4,
              "repetition_penalty": 1.25, "min_length": 3}
    tuned = save_checkpoint(tmp_path / "tuned.safetensors", ckpt.model, ckpt.vocab, encoder=ckpt.encoder,
                            training=ckpt.training, decoding=stored)
    common = ["--checkpoint", str(tuned), "--data", str(tiny_flickr), "--features", str(tiny_features)]
    assert main([*common, "--out", str(tmp_path / "stored")]) == 0
    used = json.loads((tmp_path / "stored" / "metrics.json").read_text())["decoding"]
    assert {k: used[k] for k in ("beam_size", "length_penalty", "no_repeat_ngram_size", "max_length")} == \
        {"beam_size": 2, "length_penalty": 0.5, "no_repeat_ngram_size": 2, "max_length": 4}
    assert (used["repetition_penalty"], used["min_length"]) == (1.25, 3)        # the knobs too
    assert main([*common, "--beam", "1", "--max-length", "20", "--repetition-penalty", "1", "--out",
                 str(tmp_path / "given")]) == 0
    given = json.loads((tmp_path / "given" / "metrics.json").read_text())["decoding"]
    assert (given["beam_size"], given["max_length"], given["length_penalty"]) == (1, 20, 0.5)
    assert (given["repetition_penalty"], given["min_length"]) == (1.0, 3)
