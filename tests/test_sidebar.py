"""ui.sidebar: the decoding controls come from one table whose ranges hold every valid setting it shows."""
import dataclasses

from core.decoding import DecodingConfig
from ui.sidebar import DECODING_CONTROLS, Control


def test_clamp_keeps_the_type_and_the_range():
    beam = Control("k", "Beam width", 1, 10, 1)
    assert [beam.clamp(v) for v in (0, 3, 99)] == [1, 3, 10] and isinstance(beam.clamp(3.0), int)
    temperature = Control("t", "Temperature", 0.1, 2.0, 0.05)
    assert temperature.clamp(5) == 2.0 and isinstance(temperature.clamp(1), float)


def test_every_control_is_a_decoding_field_and_its_defaults_are_in_range():
    fields = {f.name for f in dataclasses.fields(DecodingConfig)} | {"samples"}
    assert set(DECODING_CONTROLS) <= fields
    assert len({c.key for c in DECODING_CONTROLS.values()}) == len(DECODING_CONTROLS)   # one widget key each
    defaults = DecodingConfig()
    for name, control in DECODING_CONTROLS.items():
        if name in ("samples", "seed"):
            continue
        value = getattr(defaults, name)
        assert control.low <= value <= control.high and control.clamp(value) == value, name
