"""core.cli: a config dataclass's fields as flags, the same way for every CLI."""
import argparse
from dataclasses import dataclass

import pytest

from core.cli import add_config_arguments, parse_bool


@dataclass
class Example:
    name: str = ""
    steps: int = 3
    rate: float = 0.5
    on_by_default: bool = True
    off_by_default: bool = False
    internal: int = 0


def parse(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser()
    added = add_config_arguments(parser, Example, skip=["internal"], required=["name"])
    assert added == ["name", "steps", "rate", "on_by_default", "off_by_default"]
    return vars(parser.parse_args(argv))


def test_fields_become_typed_flags_with_their_defaults():
    assert parse(["--name", "x"]) == {"name": "x", "steps": 3, "rate": 0.5, "on_by_default": True,
                                      "off_by_default": False}
    assert parse(["--name", "x", "--steps", "7", "--rate", "1e-3"])["steps"] == 7


@pytest.mark.parametrize("argv, expected", [
    (["--off-by-default"], (True, True)), (["--on-by-default", "false"], (False, False)),
    (["--on-by-default", "no", "--off-by-default", "YES"], (False, True)), (["--off-by-default", "0"], (True, False)),
])
def test_boolean_flags_take_an_optional_value(argv, expected):
    args = parse(["--name", "x", *argv])
    assert (args["on_by_default"], args["off_by_default"]) == expected


def test_bad_values_and_missing_required_flags_are_argparse_errors(capsys):
    for argv in (["--name", "x", "--on-by-default", "maybe"], ["--name", "x", "--steps", "many"], [],
                 ["--name", "x", "--internal", "1"]):
        with pytest.raises(SystemExit):
            parse(argv)
    assert "--on-by-default" in capsys.readouterr().err      # argparse names the flag
    with pytest.raises(argparse.ArgumentTypeError, match="maybe"):
        parse_bool("maybe")


def test_train_and_scst_clis_keep_their_flags():
    from core import scst, train
    cfg, model_overrides, resume = train.parse_args(["--data", "d", "--deep-output", "false", "--resume"])
    assert cfg.data == "d" and model_overrides["deep_output"] is False and resume
    cfg, resume = scst.parse_args(["--init", "i.safetensors", "--data", "d", "--keep-dropout"])
    assert cfg.keep_dropout is True and not resume
    with pytest.raises(Exception, match="precision"):      # the config validates itself
        train.parse_args(["--data", "d", "--precision", "fp8"])


def beam_args(argv: list[str], nbest_default: int = 1) -> argparse.Namespace:
    from core.cli import add_beam_arguments
    parser = argparse.ArgumentParser()
    add_beam_arguments(parser, nbest_default=nbest_default)
    return parser.parse_args(argv)


def test_beam_flags_not_given_come_from_the_checkpoint_defaults():
    from core.cli import beam_decoding
    from core.decoding import DecodingConfig
    stored = DecodingConfig(beam_size=4, length_penalty=0.7, max_length=18, no_repeat_ngram_size=3)
    assert beam_decoding(beam_args([]), stored) == stored
    given = beam_decoding(beam_args(["--beam", "2", "--length-penalty", "0", "--max-length", "9"]), stored)
    assert (given.beam_size, given.length_penalty, given.max_length, given.no_repeat_ngram_size) == (2, 0.0, 9, 3)
    assert beam_decoding(beam_args(["--nbest", "6"]), stored).beam_size == 6       # the width grows to --nbest
    listed = beam_decoding(beam_args([], nbest_default=5), stored, nbest_within_beam=True)
    assert (listed.beam_size, listed.num_return_sequences) == (4, 4)             # a report lists at most k
    assert beam_decoding(beam_args([]), stored, do_sample=True, seed=1).mode == "sample"
    with pytest.raises(Exception, match="beam_size"):
        beam_decoding(beam_args(["--beam", "0"]), stored)
