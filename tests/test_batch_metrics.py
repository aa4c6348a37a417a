"""core.batch_metrics: scoring several caption sets together gives each set exactly its lone score_captions."""
from __future__ import annotations

import pytest

from core.batch_metrics import score_caption_sets
from core.errors import DataError
from core.metrics import METRIC_NAMES, java_available, score_captions

REFERENCES = {
    "1.jpg": ["a dog runs on the grass", "a brown dog is running", "the dog plays outside"],
    "2.jpg": ["two children play in the water", "kids splash at the beach", "children swimming in a lake"],
    "3.jpg": ["a man rides a red bike", "a cyclist on a road", "a person riding a bicycle down the street"],
}
SETS = {
    "a": {"1.jpg": "a dog runs on the grass", "2.jpg": "children play in water", "3.jpg": "a man on a bike"},
    "b": {"1.jpg": "a dog is running", "2.jpg": "children play in water", "3.jpg": "a man rides a bicycle"},
    "c": {"1.jpg": "a cat", "2.jpg": "two kids at the beach", "3.jpg": "a man on a bike"},
}


@pytest.mark.parametrize("tokenizer", ["simple", "ptb"])
def test_each_set_scores_as_it_would_alone(tokenizer):
    together = score_caption_sets(SETS, REFERENCES, tokenizer=tokenizer)
    assert list(together) == list(SETS)
    for name, preds in SETS.items():
        alone = score_captions(preds, REFERENCES, tokenizer=tokenizer)
        if any("METEOR skipped: the METEOR subprocess failed" in n for n in alone.notes + together[name].notes):
            pytest.skip("the METEOR jar failed on this machine (out of memory or stuck): nothing to compare")
        assert together[name].corpus.keys() == alone.corpus.keys()
        for metric, value in alone.corpus.items():
            assert together[name].corpus[metric] == pytest.approx(value, abs=1e-9), (name, metric)
        for image, per in alone.per_image.items():
            assert together[name].per_image[image] == pytest.approx(per, abs=1e-9)
        assert together[name].notes == alone.notes
    if java_available() and tokenizer == "ptb":
        assert "METEOR" in together["a"].corpus
        assert together["a"].corpus["METEOR"] != together["c"].corpus["METEOR"]   # per-set aggregates


def test_sets_over_different_images_and_metric_subsets():
    subset = {"x": {"1.jpg": "a dog"}, "y": SETS["b"]}
    scores = score_caption_sets(subset, REFERENCES, metrics=["BLEU-4", "CIDEr-D"], tokenizer="simple")
    assert list(scores["x"].corpus) == ["BLEU-4", "CIDEr-D"]
    assert any("not scored" in n for n in scores["x"].notes)
    assert set(scores["y"].per_image) == set(REFERENCES)
    assert METRIC_NAMES[0] not in scores["y"].corpus


def test_bad_input_is_one_clear_error():
    with pytest.raises(DataError, match="no caption sets"):
        score_caption_sets({}, REFERENCES)
    with pytest.raises(DataError, match="9.jpg"):
        score_caption_sets({"a": {"9.jpg": "a dog"}}, REFERENCES)
