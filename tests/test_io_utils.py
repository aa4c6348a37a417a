"""User-supplied names made safe to show (atomic writes are covered by test_interrupts.py)."""
from __future__ import annotations

import pytest

from core.io_utils import printable_name


@pytest.mark.parametrize("raw,shown", [
    ("photo\u202egpj.exe", "photogpj.exe"),          # right-to-left override: would show "photoexe.jpg"
    ("a\u2066b\u2069c\u200b\u200dd\ufeff", "abcd"),  # isolates, zero-width space / joiner, BOM
    ("tab\there\nand\r\nthere\u2028", "tab here and there"),
    ("bell\x07\x1b[31mred", "bell[31mred"),          # terminal escapes lose their ESC
    ("café 猫.jpg", "café 猫.jpg"),                   # ordinary Unicode stays
])
def test_printable_name_drops_hidden_characters(raw, shown):
    assert printable_name(raw) == shown


def test_printable_name_is_bounded():
    long = "a" * 5000 + "Z"
    shown = printable_name(long)
    assert len(shown) == 120 and "…" in shown and shown.endswith("Z")
    assert printable_name("\u202e\u200b") == ""
