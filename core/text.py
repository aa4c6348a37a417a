"""Caption text: tokenizer and Vocabulary.

The tokenizer is deliberately simple and data-free: nltk's `RegexpTokenizer` needs no nltk download
(unlike `word_tokenize`, which needs punkt), so training, evaluation and the dashboard tokenise captions
identically on any machine. Punctuation is dropped: Flickr8K captions end in " ." inconsistently, and a
model that learns to emit "." only adds noise to the metrics.

The Vocabulary maps tokens to ids with four fixed specials at ids 0..3 (`<pad> <start> <end> <unk>`), so
a checkpoint's vocab can be checked against the model's embedding table without guessing.
"""
from __future__ import annotations

import json
import unicodedata
import functools
from collections import Counter
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Iterable, Sequence

from core.errors import DataError
from core.io_utils import atomic_write_json

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIALS = (PAD, START, END, UNK)
PAD_ID, START_ID, END_ID, UNK_ID = 0, 1, 2, 3
# Tokens a caption may never contain: decoding, SCST sampling and token scoring all remove them from the
# distribution (<unk> too: a caption that says "<unk>" tells the user nothing).
NEVER_GENERATED_IDS = (PAD_ID, START_ID, UNK_ID)

VOCAB_FORMAT = "captionscope-vocab"
VOCAB_FORMAT_VERSION = 1

# Words are runs of letters/digits (any script), optionally with apostrophe parts ("dog's").
# `[^\W_]` is "a word character but not underscore", so "x_y" -> "x", "y" and no token is punctuation.
_WORD_PATTERN = r"[^\W_]+(?:'[^\W_]+)*"
_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'", "`": "'"})


@functools.lru_cache(maxsize=1)
def _tokenizer():
    """nltk's RegexpTokenizer, imported on first use: importing nltk takes ~0.3-2 s, which a dashboard that
    only decodes (vocabulary from the checkpoint) never needs to pay at start-up."""
    from nltk.tokenize import RegexpTokenizer
    return RegexpTokenizer(_WORD_PATTERN)


def tokenize(caption: str) -> list[str]:
    """Lower-cased word tokens of `caption`, punctuation dropped; never raises on any str ("" -> [])."""
    # NFKC before and after lower(): each can undo the other's normal form ("𝓐" -> "A"; "İ" -> "i̇").
    text = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", caption).lower()).translate(_APOSTROPHES)
    return _tokenizer().tokenize(text)


@dataclass
class Vocabulary:
    """Token <-> id mapping. `itos[:4]` are always the specials, so PAD=0, START=1, END=2, UNK=3."""

    itos: list[str]
    min_count: int = 1

    pad_id = PAD_ID
    start_id = START_ID
    end_id = END_ID
    unk_id = UNK_ID

    def __post_init__(self) -> None:
        self.itos = list(self.itos)
        _validate_itos(self.itos, source="Vocabulary")
        if isinstance(self.min_count, bool) or not isinstance(self.min_count, int) or self.min_count < 1:
            raise DataError(f"Vocabulary: min_count must be an integer >= 1, got {self.min_count!r}")

    @cached_property
    def stoi(self) -> dict[str, int]:
        return {token: index for index, token in enumerate(self.itos)}

    @classmethod
    def build(cls, tokenized_captions: Iterable[list[str]], min_count: int = 5) -> "Vocabulary":
        """Keep tokens seen >= min_count times; order by descending count, then alphabetically (deterministic)."""
        counts = Counter(token for tokens in tokenized_captions for token in tokens)
        words = [t for t, c in counts.items() if c >= min_count and t and t not in SPECIALS]
        words.sort(key=lambda t: (-counts[t], t))
        return cls(itos=list(SPECIALS) + words, min_count=min_count)

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, tokens: list[str], max_length: int | None = None) -> list[int]:
        """[START] + word ids (unknown -> UNK) + [END]. `max_length` caps the number of *words*
        (START/END are always added, so the result has at most max_length + 2 ids)."""
        if max_length is not None:
            if max_length < 0:
                raise DataError(f"encode: max_length must be >= 0, got {max_length}")
            tokens = tokens[:max_length]
        stoi = self.stoi
        return [START_ID] + [stoi.get(t, UNK_ID) for t in tokens] + [END_ID]

    def decode_tokens(self, ids: Sequence[int]) -> list[str]:
        """Tokens up to the first END, skipping START and PAD (UNK stays visible as "<unk>")."""
        tokens = []
        size = len(self.itos)
        for raw in ids:
            index = int(raw)
            if index == END_ID:
                break
            if index in (START_ID, PAD_ID):
                continue
            if not 0 <= index < size:
                raise DataError(f"decode: token id {index} is out of range for a vocabulary of {size}")
            tokens.append(self.itos[index])
        return tokens

    def decode(self, ids: Sequence[int]) -> str:
        return " ".join(self.decode_tokens(ids))

    def to_dict(self) -> dict[str, Any]:
        return {"format": VOCAB_FORMAT, "format_version": VOCAB_FORMAT_VERSION,
                "min_count": self.min_count, "itos": list(self.itos)}

    @classmethod
    def from_dict(cls, d: Any, source: str = "vocabulary") -> "Vocabulary":
        """Inverse of `to_dict`; DataError (naming `source`) if the dict is not a valid vocabulary."""
        if not isinstance(d, dict):
            raise DataError(f"{source}: expected a JSON object, got {type(d).__name__}")
        if d.get("format", VOCAB_FORMAT) != VOCAB_FORMAT:
            raise DataError(f"{source}: format is {d.get('format')!r}, expected {VOCAB_FORMAT!r}")
        version = d.get("format_version", VOCAB_FORMAT_VERSION)
        if version != VOCAB_FORMAT_VERSION:
            raise DataError(f"{source}: unsupported format_version {version!r} (expected {VOCAB_FORMAT_VERSION})")
        if "itos" not in d:
            raise DataError(f"{source}: missing key 'itos'")
        itos = d["itos"]
        _validate_itos(itos, source)
        min_count = d.get("min_count", 1)
        if isinstance(min_count, bool) or not isinstance(min_count, int) or min_count < 1:
            raise DataError(f"{source}: min_count must be an integer >= 1, got {min_count!r}")
        return cls(itos=list(itos), min_count=min_count)

    def save(self, path: str | Path) -> Path:
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "Vocabulary":
        path = Path(path)
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise DataError(f"{path}: vocabulary file not found") from None
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
        return cls.from_dict(d, source=str(path))


def _validate_itos(itos: Any, source: str) -> None:
    if not isinstance(itos, list):
        raise DataError(f"{source}: 'itos' must be a list of strings, got {type(itos).__name__}")
    for index, token in enumerate(itos):
        if not isinstance(token, str) or not token:
            raise DataError(f"{source}: itos[{index}] must be a non-empty string, got {token!r}")
    if tuple(itos[:4]) != SPECIALS:
        raise DataError(f"{source}: itos must start with {list(SPECIALS)}, got {itos[:4]}")
    seen: set[str] = set()
    for index, token in enumerate(itos):
        if token in seen:
            raise DataError(f"{source}: duplicate token {token!r} at itos[{index}]")
        seen.add(token)
