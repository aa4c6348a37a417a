"""Tokenizer and Vocabulary: specials, min-count, encode/decode, JSON round trip and validation."""
import json

import pytest

from core.errors import DataError
from core.text import END, PAD, SPECIALS, START, UNK, Vocabulary, tokenize


def test_tokenize_lowercases_and_drops_punctuation():
    assert tokenize("A black dog, running .") == ["a", "black", "dog", "running"]
    assert tokenize("The dog's ball!") == ["the", "dog's", "ball"]
    assert tokenize("tri-colored") == ["tri", "colored"]
    assert tokenize("It\u2019s 3 dogs") == ["it's", "3", "dogs"]


def test_tokenize_edge_cases():
    assert tokenize("") == []
    assert tokenize(" .,;!? ... ") == []
    assert tokenize("<start> x_y") == ["start", "x", "y"]  # never produces a special token


def test_build_orders_by_count_then_alphabetically_and_applies_min_count():
    captions = [["b", "a", "c"], ["a", "b", "d"], ["a", "c", "e"], ["b"]]
    vocab = Vocabulary.build(captions, min_count=2)
    # counts: a=3, b=3, c=2, d=1, e=1
    assert vocab.itos == list(SPECIALS) + ["a", "b", "c"]
    assert vocab.min_count == 2
    assert len(vocab) == 7
    assert Vocabulary.build(captions, min_count=1).itos[4:] == ["a", "b", "c", "d", "e"]


def test_build_ignores_special_tokens_in_input():
    vocab = Vocabulary.build([["<unk>", "dog", "<pad>"]], min_count=1)
    assert vocab.itos == list(SPECIALS) + ["dog"]


def test_special_ids_are_fixed():
    vocab = Vocabulary.build([["dog"]], min_count=1)
    assert (vocab.pad_id, vocab.start_id, vocab.end_id, vocab.unk_id) == (0, 1, 2, 3)
    assert [vocab.stoi[t] for t in (PAD, START, END, UNK)] == [0, 1, 2, 3]


def test_encode_maps_unknown_words_and_adds_start_end():
    vocab = Vocabulary.build([["a", "dog", "runs"]], min_count=1)
    ids = vocab.encode(["a", "cat", "runs"])
    assert ids[0] == vocab.start_id and ids[-1] == vocab.end_id
    assert ids[1:-1] == [vocab.stoi["a"], vocab.unk_id, vocab.stoi["runs"]]
    assert vocab.decode(ids) == "a <unk> runs"


def test_encode_max_length_truncates_words_but_keeps_start_end():
    vocab = Vocabulary.build([["a", "b", "c", "d"]], min_count=1)
    ids = vocab.encode(["a", "b", "c", "d"], max_length=2)
    assert ids == [1, vocab.stoi["a"], vocab.stoi["b"], 2]
    assert vocab.encode(["a"], max_length=0) == [1, 2]
    with pytest.raises(DataError):
        vocab.encode(["a"], max_length=-1)


def test_decode_stops_at_end_and_skips_start_and_pad():
    vocab = Vocabulary.build([["a", "dog"]], min_count=1)
    a, dog = vocab.stoi["a"], vocab.stoi["dog"]
    assert vocab.decode([1, a, 0, dog, 2, a, a]) == "a dog"
    assert vocab.decode_tokens([a, dog]) == ["a", "dog"]
    assert vocab.decode([]) == ""
    with pytest.raises(DataError, match="out of range"):
        vocab.decode([1, len(vocab)])


def test_save_load_round_trip_is_exact(tmp_path):
    vocab = Vocabulary.build([["zebra", "a", "a", "ünïcode", "dog's"]], min_count=1)
    path = vocab.save(tmp_path / "sub" / "vocab.json")
    loaded = Vocabulary.load(path)
    assert loaded == vocab
    assert loaded.itos == vocab.itos and loaded.min_count == vocab.min_count
    assert loaded.stoi == vocab.stoi
    assert Vocabulary.from_dict(json.loads(json.dumps(vocab.to_dict()))) == vocab


@pytest.mark.parametrize("itos, message", [
    (["<pad>", "<start>", "<end>"], "must start with"),
    (["<start>", "<pad>", "<end>", "<unk>", "a"], "must start with"),
    (list(SPECIALS) + ["a", "b", "a"], "duplicate token 'a' at itos\\[6\\]"),
    (list(SPECIALS) + ["a", 5], "itos\\[5\\] must be a non-empty string"),
    (list(SPECIALS) + [""], "itos\\[4\\]"),
    ("abc", "must be a list"),
])
def test_from_dict_rejects_invalid_itos(itos, message):
    with pytest.raises(DataError, match=message):
        Vocabulary.from_dict({"itos": itos, "min_count": 1})


def test_from_dict_rejects_other_problems():
    with pytest.raises(DataError, match="missing key 'itos'"):
        Vocabulary.from_dict({"min_count": 1})
    with pytest.raises(DataError, match="expected a JSON object"):
        Vocabulary.from_dict([1, 2])
    with pytest.raises(DataError, match="min_count"):
        Vocabulary.from_dict({"itos": list(SPECIALS), "min_count": 0})
    with pytest.raises(DataError, match="format_version"):
        Vocabulary.from_dict({"itos": list(SPECIALS), "format_version": 99})


def test_load_reports_bad_files(tmp_path):
    with pytest.raises(DataError, match="not found"):
        Vocabulary.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"itos": [\n  "<pad>",\n  oops]}')
    with pytest.raises(DataError, match=r"bad\.json:3: invalid JSON"):
        Vocabulary.load(bad)
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"itos": ["a"]}))
    with pytest.raises(DataError, match=r"wrong\.json: itos must start with"):
        Vocabulary.load(wrong)
