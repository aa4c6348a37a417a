"""ui.sidebar: the decoding controls come from one table whose ranges hold every valid setting it shows."""
import dataclasses

from core.decoding import DecodingConfig
from ui.sidebar import DECODING_CONTROLS, Control, WordsControl


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
        # not widget defaults: samples and seed are set apart; diversity_penalty is 0 (off) until groups > 1
        if name in ("samples", "seed", "diversity_penalty", "bad_words"):
            continue
        value = getattr(defaults, name)
        assert control.low <= value <= control.high and control.clamp(value) == value, name


def test_every_hugging_face_knob_has_a_control():
    assert {"top_p", "repetition_penalty", "min_length", "num_beam_groups", "diversity_penalty",
            "bad_words"} <= set(DECODING_CONTROLS)
    assert all(DECODING_CONTROLS[name].help for name in ("top_p", "repetition_penalty", "min_length",
                                                         "num_beam_groups", "diversity_penalty", "bad_words"))
    assert DECODING_CONTROLS["diversity_penalty"].low > 0      # shown only with groups, where 0 is refused


def test_words_control_parses_and_shows_words():
    words = WordsControl("k", "Bad words")
    assert words.parse(" dog, ball  red,,") == ("dog", "ball", "red") and words.parse("") == ()
    assert words.clamp(("ball", "dog")) == "ball, dog"
    assert DecodingConfig(bad_words=words.parse("Dog, ball dog")).bad_words == ("ball", "dog")
