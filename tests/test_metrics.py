"""core.metrics against pycocoevalcap driven the way coco-caption's COCOEvalCap drives it, plus edge cases.

The reference values are computed here, independently, by calling pycocoevalcap directly (two PTBTokenizer
calls, then each scorer's compute_score) -- nothing is hard-coded.
"""
import random

import pytest

from core import metrics
from core.errors import ConfigError, DataError
from core.metrics import (JAVA_MISSING_NOTE, METRIC_NAMES, format_scores, java_available, score_captions,
                          simple_tokenize)

needs_java = pytest.mark.skipif(not java_available(), reason="needs Java (PTBTokenizer / METEOR)")
NO_METEOR = [m for m in METRIC_NAMES if m != "METEOR"]

REFERENCES = {
    "1000_dog.jpg": ["A brown dog is running through the grass.", "A dog runs across a green field.",
                     "The brown dog sprints on the lawn.", "A puppy running in a grassy park.",
                     "Brown dog running outside on grass."],
    "1001_kids.jpg": ["Two children play on the beach.", "Two kids are playing in the sand by the sea.",
                      "A boy and a girl build a sandcastle.", "Children playing at the beach.",
                      "Two young kids dig in the sand \U0001F3D6"],
    "1002_bike.jpg": ["A man rides a bike down a dirt trail.", "A cyclist on a mountain bike in the woods.",
                      "A person riding a bicycle on a forest path.", "A man on a bike goes downhill.",
                      "Mountain biker riding through trees."],
    "1003_climb.jpg": ['A man in a red shirt is "climbing" a rock wall.', "A climber scales a steep cliff.",
                       "Someone rock climbing with a rope.", "A man climbs up the rocks.",
                       "A rock climber (in red) hanging on the wall."],
    "1004_snow.jpg": ["A skier jumps off a snowy hill.", "A person skiing down a mountain.",
                      "Skier in the air over the snow.", "A man on skis makes a jump.",
                      "Someone is skiing in fresh snow."],
    "1005_city.jpg": ["People walk down a busy city street.", "A crowd of people crossing the road.",
                      "Pedestrians on a crowded sidewalk at night.", "Many people in the street of a city.",
                      "A busy street with people and shops."],
}
PREDICTIONS = {
    "1000_dog.jpg": "A brown dog is running on the grass.",
    "1001_kids.jpg": "Two kids playing on the beach",
    "1002_bike.jpg": "A man riding a bike through the woods.",
    "1003_climb.jpg": "A man is climbing a rock.",
    "1004_snow.jpg": "A dog jumps into the water.",
    "1005_city.jpg": "",
}


def coco_eval_reference(predictions, references):
    """What COCOEvalCap.evaluate does, minus SPICE: tokenise gts and res separately, run each scorer."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    ids = list(predictions)
    gts = PTBTokenizer().tokenize({i: [{"caption": c} for c in references[i]] for i in ids})
    res = PTBTokenizer().tokenize({i: [{"caption": predictions[i]}] for i in ids})
    corpus, per_image = {}, {i: {} for i in ids}
    bleu, bleus = Bleu(4).compute_score(gts, res, verbose=0)
    meteor = Meteor()
    try:
        met, mets = meteor.compute_score(gts, res)
    finally:
        meteor.meteor_p.kill()
        meteor.meteor_p.wait()
    rouge, rouges = Rouge().compute_score(gts, res)
    cider, ciders = Cider().compute_score(gts, res)
    results = [(f"BLEU-{n + 1}", bleu[n], bleus[n]) for n in range(4)]
    results += [("METEOR", met, mets), ("ROUGE-L", rouge, rouges), ("CIDEr-D", cider, ciders)]
    for name, value, values in results:
        corpus[name] = value
        for i, v in zip(ids, values):
            per_image[i][name] = v
    return corpus, per_image


@needs_java
def test_matches_coco_caption_evaluation_exactly():
    expected_corpus, expected_per_image = coco_eval_reference(PREDICTIONS, REFERENCES)
    scores = score_captions(PREDICTIONS, REFERENCES)
    assert list(scores.corpus) == list(METRIC_NAMES)
    assert scores.corpus == pytest.approx(expected_corpus, rel=1e-12, abs=1e-15)
    assert set(scores.per_image) == set(PREDICTIONS)
    for image, expected in expected_per_image.items():
        assert scores.per_image[image] == pytest.approx(expected, rel=1e-12, abs=1e-15), image
    assert scores.notes == []
    # PTB really was used: it drops the emoji, which the pure-python tokenizer keeps
    simple = score_captions(PREDICTIONS, REFERENCES, metrics=NO_METEOR, tokenizer="simple")
    assert simple.corpus["CIDEr-D"] != pytest.approx(scores.corpus["CIDEr-D"], rel=1e-9)
    # corpus BLEU is pooled n-gram statistics, not the mean of the per-image values
    mean_bleu4 = sum(v["BLEU-4"] for v in scores.per_image.values()) / len(PREDICTIONS)
    assert scores.corpus["BLEU-4"] != pytest.approx(mean_bleu4)
    # the empty prediction scores zero everywhere, the good one is far from zero
    assert all(v == pytest.approx(0.0, abs=1e-6) for v in scores.per_image["1005_city.jpg"].values())
    assert scores.per_image["1000_dog.jpg"]["CIDEr-D"] > 1.0


@needs_java
def test_simple_tokenizer_matches_ptb_on_ordinary_captions():
    captions = ["A dog's running, in the park.", "Don't stop -- ok... t-shirt 3.5 & $5 50% #1 a/b",
                'A man in a red shirt is "climbing" a rock wall.', "Two kids play; one is jumping!",
                "o'clock they're we've I'd you'll", "The girl\u2019s mother isn't happy.", "tab\there  ",
                "U.S.A. flag, 10,000 people at 3:30 pm e.g. here", "", "A black-and-white dog: fast?",
                "A dog (brown) [x] {y} cannot slide down a slip 'n' slide", "Mr. Smith at no. 5, park a."]
    tokenized = metrics._ptb_tokenize({i: [c] for i, c in enumerate(captions)})
    for i, caption in enumerate(captions):
        assert simple_tokenize(caption) == tokenized[i][0], caption


def test_identical_caption_gets_perfect_bleu_and_rouge():
    caption = "a brown dog is running through the green grass"
    refs = {"a": [caption] * 5, "b": ["a cat sleeps on a red sofa"] * 5, "c": ["two men play chess"] * 5}
    preds = {"a": caption, "b": "a cat sleeps on a red sofa", "c": "two men play chess"}
    scores = score_captions(preds, refs, metrics=NO_METEOR, tokenizer="simple")
    for name in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L"):
        assert scores.corpus[name] == pytest.approx(1.0, abs=1e-6), name
        assert scores.per_image["a"][name] == pytest.approx(1.0, abs=1e-6), name
    assert scores.per_image["a"]["CIDEr-D"] > 5.0


@needs_java
def test_wrong_caption_scores_lower_and_odd_strings_do_not_break_meteor(monkeypatch):
    refs = ["a black dog jumps over a log", "a dog leaping over a fallen tree", "the black dog jumps a log",
            "a dog jumping in the woods", "black dog jumping over wood"]
    rng = random.Random(0)
    odd = ["", "   ", "line\nbreak\r\nand\u2028more", "a ||| b |||| c", "|||", "emoji \U0001F436 ok",
           "日本語のキャプション", "\x00\x07 nul", "\ud800 lone surrogate", "tab\tdog\x0bvt\x0cff\x85nel"]
    odd += ["".join(chr(rng.randrange(1, 0x2FFFF)) for _ in range(rng.randrange(1, 30))) for _ in range(10)]
    preds = {"close": "a black dog jumps over a log in the woods",
             "wrong": "two women sit at a table drinking tea"}
    references = {"close": refs, "wrong": refs}
    for n, text in enumerate(odd):
        preds[f"odd{n}"] = text
        references[f"odd{n}"] = [text, "a dog", odd[-1 - n]]
    made = []
    real_make = metrics._make_meteor
    monkeypatch.setattr(metrics, "_make_meteor", lambda: made.append(real_make()) or made[-1])
    scores = score_captions(preds, references)
    assert "METEOR" in scores.corpus, scores.notes
    for name in METRIC_NAMES:
        assert scores.per_image["close"][name] > scores.per_image["wrong"][name], name
    assert set(scores.per_image) == set(preds)
    assert all(len(v) == len(METRIC_NAMES) for v in scores.per_image.values())
    assert len(made) == 1 and made[0].meteor_p.poll() is not None   # the java subprocess was shut down


@needs_java
def test_stuck_meteor_is_killed_and_skipped_with_a_note(monkeypatch):
    # the jar needs seconds to load its paraphrase table, so a 0.3 s watchdog always fires mid-request
    monkeypatch.setattr(metrics, "METEOR_TIMEOUT_BASE_S", 0.3)
    monkeypatch.setattr(metrics, "METEOR_TIMEOUT_PER_IMAGE_S", 0.0)
    scores = score_captions(PREDICTIONS, REFERENCES, tokenizer="simple")
    assert "METEOR" not in scores.corpus
    assert any(n.startswith("METEOR skipped: the METEOR subprocess failed") for n in scores.notes), scores.notes
    assert set(scores.corpus) == set(NO_METEOR)


def test_missing_java_still_scores_bleu_rouge_cider_with_notes(monkeypatch):
    monkeypatch.setattr(metrics, "java_available", lambda: False)
    scores = score_captions(PREDICTIONS, REFERENCES)   # defaults: all metrics, tokenizer="ptb"
    assert list(scores.corpus) == NO_METEOR
    assert JAVA_MISSING_NOTE in scores.notes
    assert any("fallback tokenizer" in n for n in scores.notes)
    assert all("METEOR" not in v for v in scores.per_image.values())
    simple = score_captions(PREDICTIONS, REFERENCES, metrics=NO_METEOR, tokenizer="simple")
    assert scores.corpus == simple.corpus and scores.per_image == simple.per_image
    assert 0.0 < scores.corpus["BLEU-1"] < 1.0 and scores.corpus["CIDEr-D"] > 0.0


def test_metric_subset_ids_as_str_and_unscored_reference_note():
    preds = {1: "a dog runs", 2: "a cat"}
    refs = {1: ["a dog runs fast", "the dog runs"], 2: ["a cat sits", "one cat"], 3: ["unused"]}
    scores = score_captions(preds, refs, metrics=["CIDEr-D", "BLEU-2"], tokenizer="simple")
    assert list(scores.corpus) == ["BLEU-2", "CIDEr-D"]
    assert set(scores.per_image) == {"1", "2"}
    assert list(scores.per_image["1"]) == ["BLEU-2", "CIDEr-D"]
    assert any("1 image(s) with references but no prediction" in n for n in scores.notes)


def test_degenerate_corpora_do_not_crash():
    empty_refs = score_captions({"a": "a dog", "b": ""}, {"a": ["", "..."], "b": ["!"]},
                                metrics=NO_METEOR, tokenizer="simple")
    assert empty_refs.corpus["CIDEr-D"] == 0.0
    assert any("no reference caption has any word" in n for n in empty_refs.notes)
    single = score_captions({"a": "a dog runs"}, {"a": ["a dog runs"]}, metrics=NO_METEOR, tokenizer="simple")
    assert single.corpus["CIDEr-D"] == 0.0 and any("single image" in n for n in single.notes)


def test_bad_input_raises_clear_errors():
    with pytest.raises(DataError, match="'b.jpg'.*no reference"):
        score_captions({"a.jpg": "x", "b.jpg": "y"}, {"a.jpg": ["x"]}, tokenizer="simple")
    with pytest.raises(DataError, match="'a.jpg'.*no reference"):
        score_captions({"a.jpg": "x"}, {"a.jpg": []}, tokenizer="simple")
    with pytest.raises(DataError, match="single string"):
        score_captions({"a.jpg": "x"}, {"a.jpg": "x y"}, tokenizer="simple")
    with pytest.raises(DataError, match="'a.jpg'.*NoneType"):
        score_captions({"a.jpg": None}, {"a.jpg": ["x"]}, tokenizer="simple")
    with pytest.raises(DataError, match="non-string"):
        score_captions({"a.jpg": "x"}, {"a.jpg": ["x", 3]}, tokenizer="simple")
    with pytest.raises(DataError, match="no predictions"):
        score_captions({}, {"a.jpg": ["x"]}, tokenizer="simple")
    with pytest.raises(DataError, match="appears twice"):
        score_captions({1: "x", "1": "y"}, {"1": ["x"]}, tokenizer="simple")
    with pytest.raises(ConfigError, match="BLEU-5"):
        score_captions({"a": "x"}, {"a": ["x"]}, metrics=["BLEU-5"], tokenizer="simple")
    with pytest.raises(ConfigError, match="tokenizer"):
        score_captions({"a": "x"}, {"a": ["x"]}, tokenizer="nltk")


def test_format_scores_is_one_readable_line():
    line = format_scores({"BLEU-4": 0.2345, "METEOR": 0.21, "CIDEr-D": 0.5432, "ROUGE-L": 0.5})
    assert line == "BLEU-4 23.4 | METEOR 21.0 | ROUGE-L 50.0 | CIDEr-D 0.543"
    assert "\n" not in line
    assert format_scores({}) == "(no scores)"


def test_java_available_is_a_cached_bool():
    assert isinstance(java_available(), bool)
    assert java_available() is java_available()
