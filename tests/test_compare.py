"""core.compare: checkpoint against checkpoint on the tiny split (self vs self, a different vocabulary),
the word diff, shared words, attention alignment and the `python -m core.compare` files."""
from __future__ import annotations

import csv
import dataclasses
import json
from types import SimpleNamespace

import pytest

from core.captioner import Captioner
from core.checkpoint import load_checkpoint, save_checkpoint
from core.compare import (attention_alignment, compare_checkpoints, diff_text, shared_words, word_diff)
from core.data import load_dataset
from core.decoding import DecodingConfig
from core.model import ShowAttendTell
from core.text import Vocabulary

from conftest import run_cli

DECODING = DecodingConfig(beam_size=2, max_length=8)


def grow_vocabulary(source, target):
    """The checkpoint at `source` with three extra words (new, never-chosen output rows) saved to `target`:
    another vocabulary and shape, and, with a raised <end> bias, some shorter captions."""
    ckpt = load_checkpoint(source)
    vocab = Vocabulary(itos=ckpt.vocab.itos + ["zebra", "kite", "umbrella"])
    model = ShowAttendTell(dataclasses.replace(ckpt.config, vocab_size=len(vocab)))
    grown = model.state_dict()
    for name, value in ckpt.model.state_dict().items():
        if value.shape == grown[name].shape:
            grown[name] = value.clone()
        else:       # embedding / classifier: old rows kept, new rows small and out of the running
            grown[name][: value.shape[0]] = value
            grown[name][value.shape[0]:] = -20.0 if name.endswith("bias") else 0.0
    grown["classifier.bias"][2] += 8.0
    model.load_state_dict(grown)
    return save_checkpoint(target, model, vocab, encoder=ckpt.encoder, training={}, decoding={})


@pytest.fixture(scope="module")
def other_vocab_checkpoint(tiny_checkpoint, tmp_path_factory):
    return grow_vocabulary(tiny_checkpoint, tmp_path_factory.mktemp("other") / "other.safetensors")


def test_word_diff_marks_removed_and_added_words():
    assert word_diff("a red square", "a red square") == [("same", "a"), ("same", "red"), ("same", "square")]
    assert word_diff("a red square on a wall", "a blue square on a white wall") == [
        ("same", "a"), ("removed", "red"), ("added", "blue"), ("same", "square"), ("same", "on"), ("same", "a"),
        ("added", "white"), ("same", "wall")]
    assert diff_text("a dog", "a cat") == "a [-dog-] {+cat+}"
    assert word_diff("", "a") == [("added", "a")]


def test_shared_words_in_the_first_captions_order():
    assert shared_words("a red square on a wall".split(), "the wall has a red dot".split()) == [
        ("a", 0, 3), ("red", 1, 4), ("wall", 5, 1)]
    assert shared_words(["dog"], ["cat"]) == []


def test_attention_alignment_needs_the_same_grid():
    seven = SimpleNamespace(grid=7, encoder_name="efficientnet_lite2")
    ok, note = attention_alignment(seven, SimpleNamespace(grid=7, encoder_name="efficientnet_lite2"))
    assert ok and note == ""
    ok, note = attention_alignment(seven, SimpleNamespace(grid=8, encoder_name="other"))
    assert not ok and "7×7" in note and "8×8" in note and "cannot be lined up" in note
    ok, note = attention_alignment(seven, SimpleNamespace(grid=7, encoder_name="densenet201"))
    assert ok and "densenet201" in note


def test_a_checkpoint_against_itself_gives_zero_deltas(tiny_checkpoint, tiny_flickr, tiny_features):
    a = Captioner.from_checkpoint(tiny_checkpoint, device="cpu")
    b = Captioner.from_checkpoint(tiny_checkpoint, device="cpu")
    items = load_dataset(tiny_flickr).split("dev")
    result = compare_checkpoints(a, b, items, DECODING, features_dir=tiny_features, tokenizer="simple",
                                 with_meteor=False)
    table = result.per_image
    assert len(table) == len(items) and not table["changed"].any()
    deltas = [c for c in table.columns if c.endswith("_delta")]
    assert "CIDEr-D_delta" in deltas and (table[deltas] == 0).all().all()
    assert all(v == 0 for v in result.summary["delta"].values())
    s = result.summary
    assert s["wins"] == s["losses"] == 0 and s["ties"] == len(items) and s["changed_captions"] == 0
    assert s["attention"]["comparable"] and s["a"]["metrics"] == s["b"]["metrics"]


def test_a_different_vocabulary_is_compared_on_captions_and_metrics(tiny_checkpoint, other_vocab_checkpoint,
                                                                     tiny_flickr, tiny_features):
    a = Captioner.from_checkpoint(tiny_checkpoint, device="cpu")
    b = Captioner.from_checkpoint(other_vocab_checkpoint, device="cpu")
    assert len(b.vocab) == len(a.vocab) + 3
    items = load_dataset(tiny_flickr).split("dev")
    result = compare_checkpoints(a, b, items, DECODING, features_dir=tiny_features, tokenizer="simple",
                                 with_meteor=False)
    table = result.per_image
    assert list(table["CIDEr-D_delta"].abs()) == sorted(table["CIDEr-D_delta"].abs(), reverse=True)
    for _, row in table.iterrows():
        assert row["CIDEr-D_delta"] == pytest.approx(row["CIDEr-D_b"] - row["CIDEr-D_a"])
        assert row["changed"] == (row["caption_a"] != row["caption_b"])
        assert row["caption_b"] == result.captions["b"][row["image"]]["caption"]
    s = result.summary
    assert s["a"]["vocabulary_size"] + 3 == s["b"]["vocabulary_size"]
    assert s["wins"] + s["losses"] + s["ties"] == len(items) and s["changed_captions"] >= 1
    assert s["delta"]["CIDEr-D"] == pytest.approx(s["b"]["metrics"]["CIDEr-D"] - s["a"]["metrics"]["CIDEr-D"])


def test_compare_cli_writes_per_image_csv_and_summary_json(tiny_checkpoint, other_vocab_checkpoint, tiny_flickr,
                                                           tiny_features, tmp_path):
    out = tmp_path / "cmp"
    done = run_cli("core.compare", "--a", str(tiny_checkpoint), "--b", str(other_vocab_checkpoint), "--data",
                   str(tiny_flickr), "--split", "dev", "--out", str(out), "--features", str(tiny_features),
                   "--beam", "2", "--max-length", "8")
    assert done.returncode == 0, done.stderr[-3000:]
    with open(out / "per_image.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8 and {"caption_a", "caption_b", "diff", "CIDEr-D_a", "CIDEr-D_b", "CIDEr-D_delta"} <= set(rows[0])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"] == 8 and summary["decoding"]["beam_size"] == 2
    assert set(summary["a"]["metrics"]) == set(summary["delta"])


def test_compare_cli_bad_checkpoint_is_one_line(tiny_checkpoint, tiny_flickr, tmp_path):
    done = run_cli("core.compare", "--a", str(tiny_checkpoint), "--b", str(tmp_path / "missing.safetensors"),
                   "--data", str(tiny_flickr), "--out", str(tmp_path / "o"))
    assert done.returncode == 2 and "Traceback" not in done.stderr and "missing.safetensors" in done.stderr
    assert not (tmp_path / "o").exists()
