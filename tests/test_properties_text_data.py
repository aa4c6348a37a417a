"""Property tests: text functions never crash on any string; parsers either load or raise DataError."""
import json
import tempfile
from pathlib import Path

from hypothesis import example, given, settings
from hypothesis import strategies as st

from core.data import (load_dataset, parse_kaggle_text, parse_karpathy_text, parse_split_text,
                       parse_token_text)
from core.errors import DataError
from core.text import SPECIALS, Vocabulary, tokenize

VOCAB = Vocabulary.build([tokenize("a dog runs on the grass . two dogs play")], min_count=1)

# Fragments that make some random lines valid, so both the accept and the reject paths get exercised.
FRAGMENTS = st.sampled_from(["a.jpg", "b.jpg", "x.jpg.1", "#", "#0", "#12", "\t", " ", ",", '"', "\r",
                             "image,caption", "dog", "\u00e9", "\x00", "\\", "/", "{", "}", "[", "]", ":"])
LINE = st.one_of(st.text(max_size=30), st.lists(FRAGMENTS | st.text(max_size=3), max_size=8).map("".join))
LINES = st.lists(LINE, max_size=8).map("\n".join)
NAME = st.sampled_from(["a.jpg", "x.jpg.1", "b c.jpg"]) | st.text(max_size=5)
CAPTION = st.sampled_from(["A dog .", '"quoted, comma"', ""]) | st.text(max_size=10)
TOKEN_LINE = st.builds("{}#{}{}{}".format, NAME, st.integers(0, 9).map(str) | st.text(max_size=2),
                       st.sampled_from(["\t", " ", "", "\t\t"]), CAPTION)
KAGGLE_ROW = st.builds("{},{}".format, NAME, CAPTION)


@given(st.text())
@example("\U0001d4d0 \u0130 a\u2019b x_y")  # math-script A, dotted capital I: lower()/NFKC interplay
def test_tokenize_never_crashes_and_yields_clean_tokens(text):
    tokens = tokenize(text)
    assert all(t and not any(ch.isspace() for ch in t) and t not in SPECIALS for t in tokens)
    assert tokenize(" ".join(tokens)) == tokens  # idempotent: references and hypotheses tokenise alike


@given(st.text(), st.one_of(st.none(), st.integers(0, 10)))
def test_encode_decode_never_crash_and_round_trip(text, max_length):
    tokens = tokenize(text)
    ids = VOCAB.encode(tokens, max_length=max_length)
    kept = tokens if max_length is None else tokens[:max_length]
    assert len(ids) == len(kept) + 2 and ids[0] == VOCAB.start_id and ids[-1] == VOCAB.end_id
    expected = [t if t in VOCAB.stoi else "<unk>" for t in kept]
    assert VOCAB.decode_tokens(ids) == expected
    assert VOCAB.decode(ids) == " ".join(expected)


@given(st.lists(st.lists(st.text(max_size=6), max_size=6), max_size=6), st.integers(1, 3))
def test_vocab_build_and_dict_round_trip(captions, min_count):
    vocab = Vocabulary.build(captions, min_count=min_count)
    assert vocab.itos[:4] == list(SPECIALS) and len(set(vocab.itos)) == len(vocab.itos)
    assert Vocabulary.from_dict(json.loads(json.dumps(vocab.to_dict()))) == vocab


def _loads_or_data_error(parse, *args):
    try:
        return parse(*args)
    except DataError:
        return None


def _check_captions(captions):
    """What a successful parse promises: non-empty stripped captions under whitespace-free image names."""
    for image, texts in (captions or {}).items():
        assert image and len(image.split()) == 1
        assert texts and all(t and t == t.strip() for t in texts)


@settings(max_examples=150)
@given(st.lists(TOKEN_LINE | LINE, max_size=6).map("\n".join), st.lists(KAGGLE_ROW | LINE, max_size=6).map("\n".join))
def test_structured_random_lines_load_or_raise_data_error(token_text, kaggle_text):
    _check_captions(_loads_or_data_error(parse_token_text, token_text, "Flickr8k.token.txt"))
    _check_captions(_loads_or_data_error(parse_kaggle_text, "image,caption\n" + kaggle_text, "captions.txt"))


@settings(max_examples=150)
@given(LINES)
def test_text_parsers_load_or_raise_data_error(text):
    _loads_or_data_error(parse_token_text, text, "Flickr8k.token.txt")
    _loads_or_data_error(parse_split_text, text, "Flickr_8k.trainImages.txt")
    _loads_or_data_error(parse_kaggle_text, text, "captions.txt")
    _loads_or_data_error(parse_kaggle_text, "image,caption\n" + text, "captions.txt")
    _loads_or_data_error(parse_karpathy_text, text, "dataset_flickr8k.json")


JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5)
                           | st.sampled_from(["train", "val", "restval", "test", "a.jpg", "../x", "raw"]),
                           lambda children: st.lists(children, max_size=3)
                           | st.dictionaries(st.sampled_from(["images", "filename", "filepath", "split",
                                                              "sentences", "raw", "tokens"]), children, max_size=4),
                           max_leaves=12)


@settings(max_examples=150)
@given(JSON_VALUES)
def test_karpathy_parser_on_random_json(value):
    _loads_or_data_error(parse_karpathy_text, json.dumps(value), "dataset_flickr8k.json")
    _loads_or_data_error(parse_karpathy_text, json.dumps({"images": [value]}), "dataset_flickr8k.json")


@settings(max_examples=25, deadline=None)
@given(st.sampled_from(["Flickr8k.token.txt", "captions.txt", "dataset_coco.json"]), st.binary(max_size=60), LINES)
def test_load_dataset_on_random_files_loads_or_raises_data_error(file_name, raw_bytes, text):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "images").mkdir()
        (root / "images" / "a.jpg").write_bytes(b"not checked here")
        (root / file_name).write_bytes(raw_bytes + text.encode("utf-8", "surrogatepass"))
        (root / "Flickr_8k.trainImages.txt").write_text("a.jpg\n")
        try:
            ds = load_dataset(root)
        except DataError:
            return
        assert ds.source_format in ("official", "kaggle", "karpathy")
