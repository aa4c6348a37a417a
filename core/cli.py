"""What the `python -m core.X` CLIs share: a config dataclass's fields as command-line flags.

Every field becomes `--field-name` with the field's type and default. A boolean field takes an optional
value: `--keep-dropout` alone means true, `--deep-output false` turns a default-true field off (yes/no,
true/false, on/off and 1/0 are understood; anything else is an argparse error naming the flag).
"""
from __future__ import annotations

import argparse
from dataclasses import MISSING, fields
from typing import Any, Iterable

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
