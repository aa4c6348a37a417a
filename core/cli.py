"""What the `python -m core.X` CLIs share: a config dataclass's fields as command-line flags.

Every field becomes `--field-name` with the field's type and default. A boolean field takes an optional
value: `--keep-dropout` alone means true, `--deep-output false` turns a default-true field off (yes/no,
true/false, on/off and 1/0 are understood; anything else is an argparse error naming the flag).

`add_decoding_knobs` gives `core.caption` and `core.evaluate` the same flags for the Hugging Face decoding
knobs of `core.decoding.DecodingConfig`, named as in `generate` (`--top-p` for top_p, ...).
`add_beam_arguments` gives `core.caption` and `core.report` the beam flags; the ones a user leaves out come
from the checkpoint's stored decoding defaults (tuned on dev), as in the dashboard.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import MISSING, fields
from typing import Any, Iterable

from core.decoding import DecodingConfig

_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_config_arguments(parser: argparse.ArgumentParser, config_class: type, *, skip: Iterable[str] = (),
                         required: Iterable[str] = ()) -> list[str]:
    """Add one flag per field of `config_class` (except `skip`); returns the field names added."""
    skip, required = set(skip), set(required)
    added = []
    for f in fields(config_class):
        if f.name in skip:
            continue
        flag = f"--{f.name.replace('_', '-')}"
        default: Any = f.default if f.default is not MISSING else None
        if isinstance(default, bool):
            parser.add_argument(flag, type=parse_bool, nargs="?", const=True, default=default, metavar="BOOL")
        else:
            parser.add_argument(flag, type=type(default), default=default, required=f.name in required)
        added.append(f.name)
    return added


KNOB_FIELDS = ("top_p", "repetition_penalty", "min_length", "num_beam_groups", "diversity_penalty", "bad_words")


def add_decoding_knobs(parser: argparse.ArgumentParser, *, sampling: bool = True) -> None:
    """--top-p (when the CLI samples), --repetition-penalty, --min-length, --num-beam-groups,
    --diversity-penalty and --bad-words; `decoding_knobs(args)` reads back the ones given as DecodingConfig
    fields. A knob not given keeps the checkpoint's stored setting (the values below are the library's)."""
    knobs = parser.add_argument_group("decoding knobs (Hugging Face generate's names; default: the checkpoint's)")
    if sampling:
        knobs.add_argument("--top-p", type=float, default=None, help="nucleus sampling: 1 = off")
    knobs.add_argument("--repetition-penalty", type=float, default=None,
                       help="> 1 discourages words already generated (1 = off)")
    knobs.add_argument("--min-length", type=int, default=None, help="no <end> before this many tokens (incl. <end>)")
    knobs.add_argument("--num-beam-groups", type=int, default=None, help="diverse beam search: groups of beams")
    knobs.add_argument("--diversity-penalty", type=float, default=None,
                       help="diverse beam search: penalty for a word an earlier group picked at this step")
    knobs.add_argument("--bad-words", nargs="+", default=None, metavar="WORD", help="words no caption may contain")


def decoding_knobs(args: argparse.Namespace) -> dict:
    """The knobs `add_decoding_knobs` added that the user gave, as DecodingConfig keyword arguments."""
    return {name: getattr(args, name) for name in KNOB_FIELDS if getattr(args, name, None) is not None}


def stored_knobs(stored: DecodingConfig) -> dict:
    """A checkpoint's stored knob settings (what a CLI keeps for the knobs not given)."""
    return {name: getattr(stored, name) for name in KNOB_FIELDS if name != "top_p" or stored.do_sample}


_BEAM_FLAGS = {"beam": "beam_size", "length_penalty": "length_penalty", "max_length": "max_length",
               "no_repeat_ngram": "no_repeat_ngram_size"}


def add_beam_arguments(parser: argparse.ArgumentParser, *, nbest_default: int) -> None:
    """--beam, --nbest, --length-penalty, --max-length and --no-repeat-ngram; `beam_decoding` fills the
    ones not given from the checkpoint's defaults."""
    parser.add_argument("--beam", type=int, default=None, help="beam width (default: the checkpoint's)")
    parser.add_argument("--nbest", type=int, default=nbest_default, help="hypotheses per image")
    parser.add_argument("--length-penalty", type=float, default=None, help="default: the checkpoint's")
    parser.add_argument("--max-length", type=int, default=None, help="default: the checkpoint's")
    parser.add_argument("--no-repeat-ngram", type=int, default=None, help="default: the checkpoint's")


def beam_decoding(args: argparse.Namespace, base: DecodingConfig, *, nbest_within_beam: bool = False,
                  **fields: Any) -> DecodingConfig:
    """`base` (a checkpoint's default decoding) with the beam flags the user gave and `fields`.

    --nbest N asks for N hypotheses: without --beam the width grows to N; with `nbest_within_beam` a
    list of up to N is shown instead, so N never widens the search.
    """
    given = {field: getattr(args, flag) for flag, field in _BEAM_FLAGS.items() if getattr(args, flag) is not None}
    width = given.get("beam_size", base.beam_size)
    nbest = min(args.nbest, width) if nbest_within_beam else args.nbest
    if "beam_size" not in given:
        given["beam_size"] = max(width, nbest)
    return dataclasses.replace(base, num_return_sequences=nbest, **given, **fields)
