"""Corpus work: beam comparison, the on-disk caption cache, split captioning/scoring, browser table, sweeps."""
from __future__ import annotations

import json

import pandas as pd
import pytest

import core.corpus as corpus
from core.corpus import (CaptionCache, beam_sweep, browse_table, caption_split, compare_beams, default_cache_dir,
                         filter_table, score_split)
from core.data import load_dataset
from core.decoding import DecodingConfig
from core.errors import ConfigError, DataError
from core.images import load_image
from core.metrics import Scores


@pytest.fixture(scope="module")
def captioner(tiny_checkpoint):
    from core.captioner import Captioner
    return Captioner.from_checkpoint(tiny_checkpoint, device="cpu")


@pytest.fixture(scope="module")
def items(tiny_flickr):
    return load_dataset(tiny_flickr).split("dev")


@pytest.fixture(scope="module")
def greedy_preds(captioner, items, tiny_features):
    return caption_split(captioner, items, DecodingConfig(beam_size=1), features_dir=tiny_features).captions


# -- compare_beams ------------------------------------------------------------------------------------------

def test_compare_beams_width_one_is_greedy(captioner, items):
    feats = captioner.encode([load_image(items[0].path)])[0]
    rows = compare_beams(captioner, feats, [1, 2, 4], DecodingConfig(beam_size=3, num_return_sequences=2))
    assert [r["width"] for r in rows] == [1, 2, 4]
    greedy = captioner.decode(feats[None], DecodingConfig(beam_size=1))[0][0]
    assert rows[0]["caption"] == " ".join(captioner.words(greedy))
    assert rows[0]["logprob"] == pytest.approx(greedy.logprob, abs=1e-5)
    for r in rows:
        assert set(r) == {"width", "caption", "logprob", "normalised", "length", "finished", "time_ms"}
        assert r["length"] == len(r["caption"].split()) and r["time_ms"] >= 0
        assert r["normalised"] == pytest.approx(r["logprob"] / (r["length"] + int(r["finished"])))


# -- CaptionCache -------------------------------------------------------------------------------------------------

def test_cache_round_trip_key_sensitivity_and_corruption(tmp_path, monkeypatch):
    images = ["a.jpg", "b.jpg"]
    key = CaptionCache.make_key("captions", checkpoint="abc", decoding=DecodingConfig().to_dict(), split="dev",
                                images=images)
    cache = CaptionCache(tmp_path)
    assert cache.get(key, images) is None
    value = {"captions": {"a.jpg": {"caption": "a dog"}, "b.jpg": {"caption": "a cat"}}}
    path = cache.put(key, value, images)
    assert path.parent == tmp_path and path.is_file()
    assert cache.get(key, images) == value
    fresh = CaptionCache(tmp_path)                               # from disk, not memory
    assert fresh.get(key, images) == value
    other = CaptionCache.make_key("captions", checkpoint="abc", decoding=DecodingConfig(beam_size=5).to_dict(),
                                  split="dev", images=images)
    assert fresh.get(other, images) is None                        # different decoding -> miss
    assert fresh.get(CaptionCache.make_key("captions", checkpoint="abc", decoding=DecodingConfig().to_dict(),
                                           split="dev", images=images[::-1]), images[::-1]) is None
    # truncated file: ignored
    text = path.read_text()
    path.write_text(text[: len(text) // 2])
    assert CaptionCache(tmp_path).get(key, images) is None
    # valid JSON but a foreign key / format at the same path: ignored
    blob = json.loads(text)
    path.write_text(json.dumps({**blob, "key": {**blob["key"], "checkpoint": "zzz"}}))
    assert CaptionCache(tmp_path).get(key, images) is None
    path.write_text(json.dumps({**blob, "format": "something-else"}))
    assert CaptionCache(tmp_path).get(key, images) is None
    path.write_text(json.dumps({**blob, "images": ["x.jpg", "y.jpg"]}))
    assert CaptionCache(tmp_path).get(key, images) is None
    path.write_bytes(b"\xff\xfe\x00garbage")
    assert CaptionCache(tmp_path).get(key, images) is None

    monkeypatch.setenv("CAPTIONSCOPE_CACHE_DIR", str(tmp_path / "elsewhere"))
    assert default_cache_dir() == tmp_path / "elsewhere" and CaptionCache().folder == tmp_path / "elsewhere"
    monkeypatch.delenv("CAPTIONSCOPE_CACHE_DIR")
    assert default_cache_dir().parts[-2:] == (".cache", "captionscope")


# -- caption_split ------------------------------------------------------------------------------------------------

def test_caption_split_features_equals_images_and_reports_progress(captioner, items, tiny_features, greedy_preds):
    calls = []
    run = caption_split(captioner, items, DecodingConfig(beam_size=1), features_dir=None,
                        progress=lambda d, t: calls.append((d, t)), batch_size=2)
    from_images = run.captions
    assert run.source == "images" and run.from_cache is False and run.decode_s > 0
    assert [c for c, _ in calls] == [2, 4, 6, 8] and all(t == len(items) for _, t in calls)
    assert list(greedy_preds) == [it.image for it in items]
    assert {k: v["caption"] for k, v in from_images.items()} == {k: v["caption"] for k, v in greedy_preds.items()}
    for name, entry in greedy_preds.items():
        assert set(entry) == {"caption", "logprob", "length", "finished"}
        assert entry["length"] == len(entry["caption"].split()) and entry["logprob"] <= 0
        assert from_images[name]["logprob"] == pytest.approx(entry["logprob"], abs=0.05)
    # the memorised model names the colour and shape of each image
    for it in items:
        colour, shape = it.image[:-4].split("_")[1:]
        assert colour in greedy_preds[it.image]["caption"] and shape in greedy_preds[it.image]["caption"]
    # a feature cache for another split name does not cover these images -> encoder runs
    run = caption_split(captioner, items[:2], DecodingConfig(beam_size=1), features_dir=tiny_features, split="test")
    assert run.source == "images"


def test_caption_split_uses_and_resumes_cache(captioner, items, tiny_features, tmp_path, monkeypatch):
    cache = CaptionCache(tmp_path)
    decoding = DecodingConfig(beam_size=2)
    first = caption_split(captioner, items, decoding, features_dir=tiny_features, cache=cache)
    decoded = []
    real_decode = captioner.decode
    monkeypatch.setattr(captioner, "decode", lambda f, d: decoded.append(len(f)) or real_decode(f, d))
    calls = []
    again = caption_split(captioner, items, decoding, features_dir=tiny_features, cache=CaptionCache(tmp_path),
                          progress=lambda d, t: calls.append(d))
    assert again.captions == first.captions and decoded == [] and again.from_cache and calls == [len(items)]
    assert again.source == first.source == "features" and again.decode_s == first.decode_s
    # other settings: recomputed
    caption_split(captioner, items, DecodingConfig(beam_size=1), features_dir=tiny_features, cache=cache)
    assert sum(decoded) == len(items)
    # a crash left a partial result for 5 images: only the other 3 are decoded
    decoded.clear()
    key = CaptionCache.make_key("captions", checkpoint=captioner.checkpoint_id,
                                decoding=DecodingConfig(beam_size=3).to_dict(), split="dev",
                                images=[it.image for it in items])
    done = {it.image: {"caption": "stale but trusted", "logprob": -1.0, "length": 3, "finished": True}
            for it in items[:5]}
    cache.put({**key, "kind": "captions-partial"}, {"captions": done, "decode_s": 1.0}, [it.image for it in items])
    resumed = caption_split(captioner, items, DecodingConfig(beam_size=3), features_dir=tiny_features,
                            cache=cache).captions
    assert sum(decoded) == 3
    assert [resumed[it.image]["caption"] for it in items[:5]] == ["stale but trusted"] * 5
    assert cache.get({**key, "kind": "captions-partial"}, [it.image for it in items]) is None   # cleaned up
    assert cache.get(key, [it.image for it in items]) is not None


# -- scores and the browser table -----------------------------------------------------------------------------------

def test_score_split_and_its_cache(items, greedy_preds, tmp_path, monkeypatch):
    cache = CaptionCache(tmp_path)
    scores = score_split(greedy_preds, items, with_meteor=False, tokenizer="simple", cache=cache)
    assert "METEOR" not in scores.corpus and {"BLEU-4", "CIDEr-D"} <= set(scores.corpus)
    assert set(scores.per_image) == {it.image for it in items}
    assert all(0.0 <= s["BLEU-4"] <= 1.0 for s in scores.per_image.values())
    computed = []
    real = corpus.score_captions
    monkeypatch.setattr(corpus, "score_captions", lambda *a, **k: computed.append(1) or real(*a, **k))
    again = score_split(greedy_preds, items, with_meteor=False, tokenizer="simple", cache=CaptionCache(tmp_path))
    assert computed == [] and again.corpus == pytest.approx(scores.corpus) and again.per_image == scores.per_image
    changed = dict(greedy_preds, **{items[0].image: "something else entirely"})
    other = score_split(changed, items, with_meteor=False, tokenizer="simple", cache=cache)   # new content
    assert computed == [1] and other.per_image[items[0].image] != scores.per_image[items[0].image]
    with pytest.raises(DataError, match="no prediction"):
        score_split({}, items, with_meteor=False, tokenizer="simple")


def test_browse_and_filter_table(items, greedy_preds):
    per_image = {it.image: {"BLEU-4": i / 10, "CIDEr-D": float(i)} for i, it in enumerate(items)}
    df = browse_table(items, greedy_preds, Scores(corpus={}, per_image=per_image))
    assert list(df.columns[:5]) == ["image", "path", "caption", "references", "references_text"]
    assert {"BLEU-4", "METEOR", "CIDEr-D", "length"} <= set(df.columns) and len(df) == len(items)
    assert all(isinstance(r, list) and len(r) == 5 for r in df["references"])
    assert df["references_text"].iloc[0] == " | ".join(items[0].captions)
    assert df["METEOR"].isna().all()                              # not computed -> NaN, not 0

    red = filter_table(df, "RED", "references", "CIDEr-D", ascending=False)
    assert len(red) == 2 and all("red" in t for t in red["references_text"])
    assert list(red["CIDEr-D"]) == sorted(red["CIDEr-D"], reverse=True)
    both_terms = filter_table(df, "red circle", "both", "image", ascending=True)
    assert list(both_terms["image"]) == [it.image for it in items if "red_circle" in it.image]
    the = filter_table(df, "the", "caption", "CIDEr-D", ascending=True)      # only references say "the ..."
    assert len(the) < len(filter_table(df, "the", "references", "CIDEr-D", ascending=True)) == len(items)
    everything = filter_table(df, "", "both", "CIDEr-D", ascending=True)
    assert list(everything["CIDEr-D"]) == sorted(df["CIDEr-D"])
    assert filter_table(df, "(.*", "both", "length", ascending=True).empty     # no regex
    with pytest.raises(ConfigError, match="where"):
        filter_table(df, "x", "title", "length", ascending=True)
    with pytest.raises(ConfigError, match="sort"):
        filter_table(df, "x", "both", "nope", ascending=True)


def test_beam_sweep_one_row_per_width(captioner, items, tiny_features, tmp_path):
    seen = []
    df = beam_sweep(captioner, items, [1, 3], DecodingConfig(), features_dir=tiny_features,
                    cache=CaptionCache(tmp_path), progress=lambda d, t: seen.append((d, t)), tokenizer="simple")
    assert isinstance(df, pd.DataFrame) and list(df["width"]) == [1, 3]
    assert {"BLEU-4", "CIDEr-D", "mean_length", "decode_s"} <= set(df.columns)
    assert (df["BLEU-4"].between(0, 1)).all() and (df["mean_length"] > 0).all() and (df["decode_s"] >= 0).all()
    counts = [d for d, _ in seen]
    assert counts == sorted(counts) and seen[-1] == (2 * len(items), 2 * len(items))
    with pytest.raises(ConfigError):
        beam_sweep(captioner, items, [], DecodingConfig(), features_dir=tiny_features)


def test_table_cells_stay_bounded_and_search_still_sees_every_reference(tmp_path):
    from core.corpus import MAX_REFERENCE_CHARS, TABLE_REFERENCES, reference_preview
    from core.data import ImageCaptions
    refs = tuple(f"reference {k} " + ("long " * 200 if k == 0 else "") for k in range(100_000)) + ("a zebra",)
    items = [ImageCaptions("a.jpg", tmp_path / "a.jpg", refs)]
    df = browse_table(items, {"a.jpg": {"caption": "a dog"}}, None)
    cell = df["references_text"].iloc[0]
    assert len(cell) <= TABLE_REFERENCES * (MAX_REFERENCE_CHARS + 3) + 40 and cell.endswith("… and 99,996 more")
    assert reference_preview(refs[1:3]) == "reference 1  | reference 2 "
    assert len(filter_table(df, "zebra", "references", "length")) == 1          # the last of 100,001
    assert len(filter_table(df.iloc[:0], "zebra", "both", "length")) == 0
