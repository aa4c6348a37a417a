"""core.failures: unsupported words, BLEU's reference matches, and the model-vs-references statistics."""
from __future__ import annotations

import pandas as pd
import pytest

from core.corpus import browse_table
from core.data import load_dataset
from core.failures import (FUNCTION_WORDS, length_histogram, over_under_produced, reference_matches, stem,
                           top_unsupported, unsupported_by_image, unsupported_share, unsupported_words,
                           vocabulary_comparison, with_unsupported, word_usage)

REFS = ["A dog runs on the sand .", "Two dogs play with a ball", "The brown dog is running outside"]


def test_plural_and_stem_forms_and_case_are_supported():
    assert stem("dogs") == stem("dog") and stem("running") == stem("runs") and stem("Balls") == stem("ball")
    assert unsupported_words("Dogs running with balls", REFS) == []


def test_content_words_missing_from_every_reference_are_reported_once_in_order():
    assert unsupported_words("a black dog runs on the beach near a black car", REFS) == ["black", "beach", "car"]


def test_function_words_never_count():
    assert {"a", "the", "of", "is", "on", "with", "his"} <= FUNCTION_WORDS
    assert unsupported_words("his dog is in the sand of a dog", REFS) == []   # his, in, of: function words
    assert unsupported_words("", REFS) == []


def test_reference_matches_are_blues_clipped_ngram_matches():
    matches = reference_matches("a dog runs on the beach", "A dog runs along the beach .")
    assert matches == [("a", 3), ("dog", 3), ("runs", 3), ("on", 0), ("the", 2), ("beach", 2)]
    # clipping: the reference has one "dog", so only the first caption "dog" matches as a unigram
    assert reference_matches("dog dog", "a dog") == [("dog", 1), ("dog", 0)]
    assert reference_matches("a cat", "") == [("a", 0), ("cat", 0)]


def test_share_and_most_frequent_unsupported_words_link_to_their_images():
    per_image = {"1.jpg": ["beach", "car"], "2.jpg": ["beach"], "3.jpg": []}
    assert unsupported_share(per_image) == pytest.approx(2 / 3)
    top = top_unsupported(per_image)
    assert list(top["word"]) == ["beach", "car"] and list(top["captions"]) == [2, 1]
    assert top.iloc[0]["images"] == ["1.jpg", "2.jpg"]
    assert unsupported_share({}) == 0.0 and top_unsupported({}).empty


def test_browser_table_gets_a_sortable_unsupported_column(tiny_flickr):
    items = load_dataset(tiny_flickr).split("dev")
    captions = {it.image: it.captions[0] for it in items}
    captions[items[0].image] = "a purple triangle on a white wall"
    table = with_unsupported(browse_table(items, captions, None))
    assert table.loc[0, "unsupported"] == "purple, triangle" and table.loc[0, "unsupported_count"] == 2
    assert (table["unsupported_count"].iloc[1:] == 0).all()
    assert unsupported_by_image(items, captions)[items[0].image] == ["purple", "triangle"]


def test_length_histogram_shares_sum_to_one():
    hist = length_histogram(["a dog", "a dog runs"], ["a dog", "a b c d"])
    assert list(hist["length"]) == [2, 3, 4]
    assert hist["captions"].sum() == pytest.approx(1) and hist["references"].sum() == pytest.approx(1)
    assert list(hist["references"]) == [0.5, 0.0, 0.5]


def test_word_usage_ranks_over_and_under_produced_words():
    captions = ["a man in a red shirt"] * 10
    references = ["a man in a blue shirt", "a person wearing a shirt"] * 10
    usage = word_usage(captions, references)
    assert usage.iloc[0]["word"] == "red" and usage.iloc[-1]["word"] in {"blue", "person", "wearing"}
    row = usage.set_index("word").loc["man"]
    assert row["caption_rate"] == 100 and row["reference_rate"] == 50
    over, under = over_under_produced(usage, min_count=5)
    assert over.iloc[0]["word"] == "red" and set(under["word"]) >= {"blue", "person", "wearing"}
    assert "red" not in set(under["word"]) and isinstance(over, pd.DataFrame)


def test_vocabulary_comparison_counts_distinct_words():
    vocab = vocabulary_comparison(["a dog", "a cat"], ["a dog runs"] * 5)
    assert vocab == {"caption_vocabulary": 3, "reference_vocabulary": 3, "shared": 2,
                     "frequent_reference_words_never_used": 1}
