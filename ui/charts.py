"""Per-word line charts as plain Vega-Lite specs (`st.vega_lite_chart`).

The Attention page redraws its two per-word charts on every word click. Built with Altair, each cost ~50 ms
a rerun (most of it Altair's schema validation in `to_dict`); the same spec written as a dict costs well
under a millisecond and draws the same chart.
"""
from __future__ import annotations

import json
from typing import Sequence

import pandas as pd


def _records(frame: pd.DataFrame) -> list[dict]:
    """JSON-ready rows, by pandas' own JSON writer (numpy numbers as plain ones, NaN as null: a gap)."""
    return json.loads(frame.to_json(orient="records", double_precision=15))


def word_line_spec(data: pd.DataFrame, y: str, *, selected_word: str, tooltip: Sequence[str],
                   color: str | None = None, y_domain: tuple[float, float] | None = None,
                   zero: bool = False, reference_y: float | None = None) -> dict:
    """A line with points of `data[y]` over `data["word"]` (in the frame's order), a grey rule at the
    selected word and, when `reference_y` is given, a red dashed horizontal rule there."""
    # the caption's order, named: with "sort": None the layers' union puts the selected word first
    x = {"field": "word", "type": "nominal", "sort": [str(w) for w in data["word"]], "title": None,
         "axis": {"labelAngle": -45, "labelOverlap": False}}
    scale: dict = {"zero": zero}
    if y_domain is not None:
        scale = {"domain": list(y_domain)}
    mark: dict = {"type": "line", "point": True}
    if color is not None:
        mark["color"] = color
    layers = [
        {"data": {"values": [{"word": selected_word}]}, "mark": {"type": "rule", "color": "#94a3b8"},
         "encoding": {"x": x}},
        {"data": {"values": _records(data[list(dict.fromkeys(["word", y, *tooltip]))])},
         "mark": mark,
         "encoding": {"x": x, "y": {"field": y, "type": "quantitative", "title": y, "scale": scale},
                      "tooltip": [{"field": f, "type": "nominal" if f == "word" else "quantitative"}
                                  for f in tooltip]}},
    ]
    if reference_y is not None:
        layers.append({"data": {"values": [{"y": float(reference_y)}]},
                       "mark": {"type": "rule", "strokeDash": [4, 4], "color": "#ef4444"},
                       "encoding": {"y": {"field": "y", "type": "quantitative", "title": y}}})
    return {"layer": layers}
