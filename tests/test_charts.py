import json

import numpy as np
import pandas as pd

from ui.charts import word_line_spec


def frame() -> pd.DataFrame:
    return pd.DataFrame({"word": ["1. a", "2. dog", "3. <end>"], "entropy (bits)": np.array([1.5, np.nan, 0.25]),
                         "β": np.array([0.2, 0.9, 0.5], dtype=np.float32)})


def test_a_word_chart_is_plain_json_in_the_caption_order_with_the_selected_word_marked():
    spec = word_line_spec(frame(), "entropy (bits)", selected_word="2. dog", tooltip=["word", "entropy (bits)"],
                          zero=True, reference_y=6.64)
    json.dumps(spec, allow_nan=False)                 # numpy scalars and NaN would not serialise
    rule, line, uniform = spec["layer"]
    assert rule["data"]["values"] == [{"word": "2. dog"}]
    assert [r["word"] for r in line["data"]["values"]] == ["1. a", "2. dog", "3. <end>"]
    assert [r["entropy (bits)"] for r in line["data"]["values"]] == [1.5, None, 0.25]   # a gap, not a zero
    # caption order, named on every layer (not alphabetical, and not the selected word first)
    assert all(layer["encoding"]["x"]["sort"] == ["1. a", "2. dog", "3. <end>"] for layer in (rule, line))
    assert uniform["data"]["values"] == [{"y": 6.64}] and uniform["mark"]["strokeDash"] == [4, 4]


def test_without_a_reference_the_chart_has_two_layers_and_the_given_scale():
    spec = word_line_spec(frame(), "β", selected_word="1. a", tooltip=["word", "β"], color="#16a34a",
                          y_domain=(0, 1))
    assert len(spec["layer"]) == 2
    line = spec["layer"][1]
    assert line["mark"]["color"] == "#16a34a" and line["encoding"]["y"]["scale"] == {"domain": [0, 1]}
    assert abs(line["data"]["values"][1]["β"] - 0.9) < 1e-6 and isinstance(line["data"]["values"][1]["β"], float)
