"""Property tests for core.metrics: any strings are scored without crashing, values stay in range, and a
caption identical to its references gets BLEU-1 = 1. Uses the pure-python tokenizer and no METEOR (no JVM)."""
import math

from hypothesis import given, settings
from hypothesis import strategies as st

from core.metrics import METRIC_NAMES, PTB_PUNCTUATIONS, score_captions, simple_tokenize

NO_METEOR = [m for m in METRIC_NAMES if m != "METEOR"]
FAST = settings(max_examples=50, deadline=None)

image_ids = st.text(min_size=1, max_size=8)
any_text = st.text(max_size=40) | st.sampled_from(["", " ", "\n", "|||", "a\r\nb", "...", "\u2028", "🐶"])
corpora = st.dictionaries(image_ids, st.tuples(any_text, st.lists(any_text, min_size=1, max_size=5)),
                          min_size=1, max_size=6)
words = st.lists(st.from_regex(r"[a-z]{1,8}", fullmatch=True), min_size=1, max_size=12)


@FAST
@given(corpora)
def test_any_strings_score_without_crashing_and_in_range(corpus):
    preds = {k: p for k, (p, _) in corpus.items()}
    refs = {k: r for k, (_, r) in corpus.items()}
    scores = score_captions(preds, refs, metrics=NO_METEOR, tokenizer="simple")
    assert list(scores.corpus) == NO_METEOR
    assert set(scores.per_image) == set(preds)
    for values in [scores.corpus, *scores.per_image.values()]:
        assert list(values) == NO_METEOR
        assert all(math.isfinite(v) for v in values.values())
        for name in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L"):
            assert 0.0 <= values[name] <= 1.0 + 1e-12, (name, values[name])
        assert values["CIDEr-D"] >= 0.0


@FAST
@given(st.lists(st.tuples(words, st.integers(1, 5)), min_size=1, max_size=4))
def test_caption_identical_to_all_references_gets_bleu1_of_one(images):
    preds = {f"img{i}": " ".join(w) for i, (w, _) in enumerate(images)}
    refs = {f"img{i}": [" ".join(w)] * n for i, (w, n) in enumerate(images)}
    scores = score_captions(preds, refs, metrics=NO_METEOR, tokenizer="simple")
    assert math.isclose(scores.corpus["BLEU-1"], 1.0, abs_tol=1e-6)
    assert math.isclose(scores.corpus["ROUGE-L"], 1.0, abs_tol=1e-12)
    for i, (w, _) in enumerate(images):
        values = scores.per_image[f"img{i}"]
        assert math.isclose(values["BLEU-1"], 1.0, abs_tol=1e-6)
        if len(w) >= 4:
            assert math.isclose(values["BLEU-4"], 1.0, abs_tol=1e-6)


@FAST
@given(st.text(max_size=80))
def test_simple_tokenize_gives_one_clean_line(text):
    tokens = simple_tokenize(text)
    assert tokens == tokens.strip() and "  " not in tokens
    assert len(tokens.splitlines()) <= 1
    assert not any(t in PTB_PUNCTUATIONS for t in tokens.split())
    assert simple_tokenize(tokens) == tokens   # already-tokenised text is a fixed point
