"""core.grid: building a decoding grid (and refusing bad ones), evaluating it on the tiny model, and the
`python -m core.evaluate` grid files."""
from __future__ import annotations

import csv
import dataclasses
import json

import pytest

from core.captioner import Captioner
from core.corpus import caption_split, score_split
from core.data import load_dataset
from core.decoding import DecodingConfig
from core.errors import ConfigError
from core.grid import (MAX_SETTINGS, build_grid, caption_stats, changed_images, decode_key, distinct_n,
                       evaluate_grid, setting_id, setting_label)
from core.metrics import METRIC_NAMES

from conftest import run_cli

AXES = {"beam_size": [1, 2], "length_penalty": [0.0, 1.0], "no_repeat_ngram_size": [0, 2]}


def test_grid_is_the_full_product_in_axis_order():
    settings = build_grid(DecodingConfig(max_length=12), AXES)
    assert len(settings) == 8
    assert [(c.beam_size, c.length_penalty, c.no_repeat_ngram_size) for c in settings[:3]] == [
        (1, 0.0, 0), (1, 0.0, 2), (1, 1.0, 0)]
    assert all(c.max_length == 12 for c in settings)                       # the base's other fields stay
    assert len(build_grid(DecodingConfig(), {"beam_size": [3, 3, 1]})) == 2   # repeated values count once
    assert setting_label(settings[-1], list(AXES)) == "beam 2 · α 1 · no-repeat 2"
    assert setting_id(settings[-1], list(AXES)) == "beam2_lp1_ngram2"
    assert setting_id(settings[-1], ["beam_size"]) == "beam2"


def test_sampling_rows_can_be_added_to_a_grid():
    extra = [DecodingConfig(do_sample=True, temperature=t, seed=0) for t in (0.5, 1.0)]
    settings = build_grid(DecodingConfig(), {"beam_size": [1, 3]}, extra=extra)
    assert len(settings) == 4 and settings[-1].do_sample
    assert setting_label(settings[-1], ["beam_size"]).endswith("sampling T 1")


def test_greedy_ignores_the_length_penalty_so_it_is_decoded_once():
    greedy = [DecodingConfig(beam_size=1, length_penalty=a) for a in (0.0, 0.5)]
    assert decode_key(greedy[0]) == decode_key(greedy[1])
    assert decode_key(DecodingConfig(beam_size=3, length_penalty=0.0)) != decode_key(
        DecodingConfig(beam_size=3, length_penalty=0.5))


@pytest.mark.parametrize("axes, needle", [
    ({"beam_size": [], "length_penalty": [0.0]}, "no values for beam_size"),
    ({}, "grid is empty"),
    ({"beam_size": list(range(1, 12)), "length_penalty": [0.1 * k for k in range(10)],
      "no_repeat_ngram_size": [0, 2]}, f"220 settings, over the limit of {MAX_SETTINGS}"),
    ({"beam_width": [3]}, "unknown setting 'beam_width'"),
    ({"beam_size": [0]}, "beam_size"),
    ({"length_penalty": [float("nan")]}, "length_penalty"),
])
def test_bad_grids_get_one_message_naming_the_setting(axes, needle):
    with pytest.raises(ConfigError, match="decoding grid") as info:
        build_grid(DecodingConfig(), axes)
    assert needle in str(info.value)


def test_a_contradictory_combination_names_the_setting_and_the_rule():
    with pytest.raises(ConfigError) as info:
        build_grid(DecodingConfig(num_return_sequences=3), {"beam_size": [3, 1]})
    message = str(info.value)
    assert "beam_size=1" in message and "num_return_sequences" in message


def test_distinct_n_and_caption_stats():
    assert distinct_n(["a dog runs", "a dog sits"], 1) == pytest.approx(4 / 6)
    assert distinct_n(["a dog runs", "a dog sits"], 2) == pytest.approx(3 / 4)
    assert distinct_n(["dog"], 2) == 0.0
    stats = caption_stats({"x": {"caption": "a b", "finished": True}, "y": {"caption": "a b c d", "finished": False}})
    assert stats["mean_length"] == 3 and stats["ended_with_end"] == 0.5


@pytest.fixture(scope="module")
def tiny_grid(tiny_checkpoint, tiny_flickr, tiny_features):
    captioner = Captioner.from_checkpoint(tiny_checkpoint, encoder_weights="imagenet", device="cpu")
    items = load_dataset(tiny_flickr).split("dev")
    settings = build_grid(DecodingConfig(max_length=8), AXES)
    result = evaluate_grid(captioner, items, settings, list(AXES), features_dir=tiny_features, split="dev",
                           tokenizer="simple", with_meteor=False)
    return captioner, items, result


def test_each_row_equals_scoring_that_setting_alone(tiny_grid, tiny_features):
    captioner, items, result = tiny_grid
    table = result.table
    assert list(table["setting"]) == result.labels and len(table) == 8
    assert list(table.columns[:4]) == ["setting", *AXES]
    for config, label in zip(result.settings, result.labels):
        alone = caption_split(captioner, items, config, features_dir=tiny_features, split="dev").captions
        assert result.captions[label] == alone
        scores = score_split(alone, items, with_meteor=False, tokenizer="simple")
        row = table[table["setting"] == label].iloc[0]
        for metric, value in scores.corpus.items():
            assert row[metric] == pytest.approx(value, abs=1e-12), (label, metric)
        assert row["mean_length"] == pytest.approx(sum(e["length"] for e in alone.values()) / len(items))
        assert row["ended_with_end"] == pytest.approx(sum(e["finished"] for e in alone.values()) / len(items))
        assert row["decode_s"] >= 0 and row["images"] == 8


def test_beam_settings_that_differ_only_in_alpha_share_one_search(tiny_checkpoint, tiny_flickr, tiny_features,
                                                                   tmp_path, monkeypatch):
    import core.grid
    from core.corpus import CaptionCache

    calls = []
    shared = core.grid.beam_search_penalties
    monkeypatch.setattr(core.grid, "beam_search_penalties",
                        lambda *a, **k: calls.append(a[3]) or shared(*a, **k))
    captioner = Captioner.from_checkpoint(tiny_checkpoint, encoder_weights="imagenet", device="cpu")
    items = load_dataset(tiny_flickr).split("dev")
    penalties = [0.0, 0.5, 1.0, 2.0]
    settings = build_grid(DecodingConfig(max_length=8), {"beam_size": [3], "length_penalty": penalties})
    cache = CaptionCache(tmp_path / "cache")
    result = evaluate_grid(captioner, items, settings, ["beam_size", "length_penalty"], features_dir=tiny_features,
                           split="dev", tokenizer="simple", with_meteor=False, cache=cache)
    assert calls == [penalties]                                   # one search (8 images: one batch) for all α
    assert len(set(result.table["decode_s"])) == 1                # each row reports the shared search's time
    for config, label in zip(settings, result.labels):          # exactly what each setting gives alone
        assert result.captions[label] == caption_split(captioner, items, config, features_dir=tiny_features,
                                                       split="dev").captions
        assert caption_split(captioner, items, config, split="dev", cache=cache).from_cache   # cached per setting
    again = evaluate_grid(captioner, items, settings, ["beam_size", "length_penalty"], features_dir=tiny_features,
                          split="dev", tokenizer="simple", with_meteor=False, cache=cache)
    assert calls == [penalties] and again.captions == result.captions


def test_features_are_read_once_for_all_searches(tiny_checkpoint, tiny_flickr, tiny_features, monkeypatch):
    import core.grid

    reads = []
    batches = core.grid.corpus.feature_batches
    monkeypatch.setattr(core.grid.corpus, "feature_batches", lambda *a, **k: reads.append(a[4]) or batches(*a, **k))
    captioner = Captioner.from_checkpoint(tiny_checkpoint, encoder_weights="imagenet", device="cpu")
    items = load_dataset(tiny_flickr).split("dev")
    settings = build_grid(DecodingConfig(max_length=8), AXES)
    result = evaluate_grid(captioner, items, settings, list(AXES), features_dir=tiny_features, split="dev",
                           tokenizer="simple", with_meteor=False, batch_size=3)
    assert reads == [3]                     # one pass over the features (3 batches) served every search
    for config, label in zip(settings, result.labels):   # batch sizes differ: equal up to float rounding
        alone = caption_split(captioner, items, config, features_dir=tiny_features, split="dev").captions
        for name, entry in alone.items():
            assert result.captions[label][name]["caption"] == entry["caption"]
            assert result.captions[label][name]["logprob"] == pytest.approx(entry["logprob"], abs=1e-4)


def test_changed_images_lists_only_differing_captions_biggest_change_first(tiny_grid):
    _, items, result = tiny_grid
    # a 2-token limit truncates every caption, so every image changes against the normal setting
    short = dataclasses.replace(result.settings[0], max_length=2)
    result.captions["short"] = {it.image: {"caption": "a", "finished": False, "length": 1} for it in items}
    result.scores["short"] = dataclasses.replace(result.scores[result.labels[0]],
                                                 per_image={it.image: {"CIDEr-D": float(i)}
                                                            for i, it in enumerate(items)})
    result.labels.append("short")
    result.settings.append(short)
    try:
        frame = changed_images(result, items, result.labels[0], "short")
        assert len(frame) == len(items)
        assert list(frame["delta"].abs()) == sorted(frame["delta"].abs(), reverse=True)
        assert (frame["caption_a"] != frame["caption_b"]).all()
        assert changed_images(result, items, result.labels[0], result.labels[0]).empty
        with pytest.raises(ConfigError, match="no setting"):
            changed_images(result, items, "nope", "short")
    finally:
        for store in (result.captions, result.scores):
            store.pop("short")
        result.labels.pop()
        result.settings.pop()


def test_evaluate_cli_writes_grid_csv_metrics_json_and_captions_per_setting(tiny_checkpoint, tiny_flickr,
                                                                           tiny_features, tmp_path):
    out = tmp_path / "grid"
    done = run_cli("core.evaluate", "--checkpoint", str(tiny_checkpoint), "--data", str(tiny_flickr),
                   "--features", str(tiny_features), "--out", str(out), "--max-length", "8",
                   "--beam", "1", "2", "--length-penalty", "0", "1", "--no-repeat-ngram", "0", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    with open(out / "grid.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8
    assert {"BLEU-1", "BLEU-4", "ROUGE-L", "CIDEr-D", "mean_length", "distinct_1", "distinct_2",
            "ended_with_end", "decode_s"} <= set(rows[0])
    summary = json.loads((out / "metrics.json").read_text())
    assert len(summary["settings"]) == 8 and summary["images"] == 8
    folders = {s["folder"] for s in summary["settings"]}
    assert folders == {f"beam{b}_lp{a}_ngram{n}" for b in (1, 2) for a in (0, 1) for n in (0, 2)}
    for setting in summary["settings"]:
        with open(out / setting["folder"] / "captions.csv", newline="") as f:
            captions = list(csv.DictReader(f))
        assert len(captions) == 8 and captions[0]["caption"].strip()
        assert setting["decoding"]["beam_size"] in (1, 2)
        assert all(m in setting for m in METRIC_NAMES if m != "METEOR")


@pytest.mark.parametrize("args, needle", [
    (["--beam", "1", "--length-penalty", "nan"], "length_penalty"),
    (["--beam", *map(str, range(1, 12)), "--length-penalty", *map(str, range(10)), "--no-repeat-ngram", "0", "2"],
     "over the limit of 200"),
])
def test_evaluate_cli_refuses_a_bad_grid_in_one_line(args, needle, tiny_flickr, tmp_path):
    done = run_cli("core.evaluate", "--data", str(tiny_flickr), "--out", str(tmp_path / "x"), *args)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.startswith("error: decoding grid") and needle in done.stderr
    assert not (tmp_path / "x").exists()
