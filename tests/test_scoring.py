"""Scoring typed captions: teacher forcing reproduces the decoder, unknown words are named, bad text is
refused with one clear line (and the CLI's --score / --prefix)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from conftest import run_cli
from core.decoding import DecodingConfig
from core.errors import ConfigError
from core.scoring import MAX_CHARACTERS, MAX_WORDS, prepare_caption, score_caption


@pytest.fixture(scope="module")
def captioner(tiny_checkpoint):
    from core.captioner import Captioner
    return Captioner.from_checkpoint(tiny_checkpoint, device="cpu")


@pytest.fixture(scope="module")
def image_path(tiny_flickr):
    return sorted((tiny_flickr / "images").glob("*.jpg"))[2]


@pytest.mark.parametrize("penalty", [1.0, 1.5])
@pytest.mark.parametrize("beam", [1, 3])
def test_scoring_the_models_own_caption_gives_its_logprobs_token_by_token(captioner, image_path, beam, penalty):
    feats = captioner.features(image_path)[0]
    hyp = captioner.decode(feats[None], DecodingConfig(beam_size=beam, repetition_penalty=penalty))[0][0]
    words = captioner.words(hyp)
    scored = score_caption(captioner, feats, " ".join(words), DecodingConfig(repetition_penalty=penalty))
    if penalty != 1.0:   # the penalty reshapes the distribution: scoring without it would not give these back
        plain = score_caption(captioner, feats, " ".join(words))
        assert np.abs(plain.logprobs - np.asarray(hyp.token_logprobs)).max() > 1e-3
    assert scored.words == captioner.words(hyp) + ["<end>"] and not scored.oov
    np.testing.assert_allclose(scored.logprobs, hyp.token_logprobs, atol=1e-5)
    np.testing.assert_allclose(scored.attention, hyp.attention, atol=1e-5)
    np.testing.assert_allclose(scored.betas, hyp.betas, atol=1e-5)
    assert scored.logprob == pytest.approx(hyp.logprob, abs=1e-4)       # <end> counted, as the decoder does


def test_a_wrong_caption_scores_lower_and_its_unlikely_words_are_flagged(captioner, image_path):
    feats = captioner.features(image_path)[0]
    hyp = captioner.decode(feats[None], DecodingConfig(beam_size=1))[0][0]
    words = captioner.words(hyp)
    colours = [c for c in ("red", "green", "blue", "yellow") if c != words[1]]
    wrong = score_caption(captioner, feats, " ".join([words[0], colours[0]] + words[2:]))
    assert wrong.logprob < hyp.logprob
    assert wrong.unlikely(threshold=float(np.exp(hyp.token_logprobs[1])) / 2) == [1]


def test_unknown_words_are_named_and_scored_as_unk(captioner, image_path):
    feats = captioner.features(image_path)[0]
    scored = score_caption(captioner, feats, "a zebra square on a white wall")
    assert scored.oov == [(1, "zebra")] and scored.token_ids[1] == captioner.vocab.unk_id
    assert np.isfinite(scored.logprobs).all() and scored.words[1] == "zebra"
    with pytest.raises(ConfigError, match="not in the model's vocabulary: zebra"):
        prepare_caption("a zebra", captioner.vocab, allow_oov=False)


@pytest.mark.parametrize("text, message", [
    ("", "has no words to score (it is empty)"),
    ("   \n\t", "has no words"),
    ("!!! ??? ...", "only punctuation"),
    ("🐶🐱🎉", "only punctuation, symbols or emoji"),
    ("<b></b><br/>", "has no words"),
    ("zebra giraffe okapi", "none of the words of the caption are in the model's vocabulary: giraffe, okapi, zebra"),
    ("a " * (MAX_WORDS + 1), f"has {MAX_WORDS + 1} words; the limit is {MAX_WORDS}"),
    ("a" * (MAX_CHARACTERS + 1), "characters long; the limit is"),
])
def test_bad_captions_are_refused_by_name(captioner, text, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("?", r"\?")):
        prepare_caption(text, captioner.vocab)


def test_html_emoji_and_punctuation_are_cleaned_and_reported(captioner):
    prepared = prepare_caption("<b>A red</b> square!! 🐶 on a &quot;white&quot; wall", captioner.vocab)
    assert prepared.words == ["a", "red", "square", "on", "a", "white", "wall"] and not prepared.oov
    assert "HTML tags removed" in prepared.notes
    assert any("🐶" in n for n in prepared.notes)


@pytest.mark.parametrize("knobs", [[], ["--repetition-penalty", "1.5"]], ids=["plain", "repetition-penalty"])
def test_cli_score_gives_back_the_decoded_logprob(tiny_checkpoint, image_path, knobs):
    decoded = run_cli("core.caption", str(image_path), "--checkpoint", str(tiny_checkpoint), "--beam", "3", "--json",
                      *knobs)
    assert decoded.returncode == 0, decoded.stderr
    best = json.loads(decoded.stdout)["hypotheses"][0]
    scored = run_cli("core.caption", str(image_path), "--checkpoint", str(tiny_checkpoint), "--beam", "3",
                     "--score", best["caption"], "--json", *knobs)
    assert scored.returncode == 0, scored.stderr
    out = json.loads(scored.stdout)
    assert out["logprob"] == pytest.approx(best["logprob"], abs=1e-4)
    assert out["token_logprobs"] == pytest.approx(best["token_logprobs"], abs=1e-4)
    assert len(out["attention"]) == len(out["betas"]) == len(out["words"]) == len(best["token_logprobs"])
    assert out["best"]["caption"] == best["caption"] and out["oov"] == []
    words = best["caption"].split()
    forced = run_cli("core.caption", str(image_path), "--checkpoint", str(tiny_checkpoint), "--beam", "3",
                     "--prefix", " ".join(words[:2]), "--json", *knobs)
    assert forced.returncode == 0, forced.stderr
    continued = json.loads(forced.stdout)
    assert continued["caption"] == best["caption"] and continued["prefix"] == " ".join(words[:2])
    assert continued["hypotheses"][0]["logprob"] == pytest.approx(best["logprob"], abs=1e-4)


def test_cli_bad_text_is_one_line_exit_2(tiny_checkpoint, image_path):
    for args in (["--score", "🐶"], ["--prefix", "zebra"], ["--score", ""]):
        result = run_cli("core.caption", str(image_path), "--checkpoint", str(tiny_checkpoint), *args)
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
        assert "caption" in result.stderr or "prefix" in result.stderr


def test_cli_prefix_applies_the_decoding_knobs(tiny_checkpoint, image_path):
    """--prefix continues with the knobs on: min_length counts the typed words, a bad word in the prefix is
    refused by name (one line, no traceback), and a banned word never appears in the continuation."""
    plain = json.loads(run_cli("core.caption", str(image_path), "--checkpoint", str(tiny_checkpoint), "--json").stdout)
    words = plain["caption"].split()
    long = run_cli("core.caption", str(image_path), "--checkpoint", str(tiny_checkpoint), "--prefix", words[0],
                   "--min-length", str(len(words) + 4), "--max-length", "20", "--json")
    assert long.returncode == 0, long.stderr
    hyp = json.loads(long.stdout)["hypotheses"][0]
    assert not hyp["finished"] or hyp["length"] >= len(words) + 4
    refused = run_cli("core.caption", str(image_path), "--checkpoint", str(tiny_checkpoint), "--prefix",
                      " ".join(words[:2]), "--bad-words", words[1])
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert f"'{words[1]}', which bad_words bans" in refused.stderr
    banned = run_cli("core.caption", str(image_path), "--checkpoint", str(tiny_checkpoint), "--prefix", words[0],
                     "--bad-words", words[2], "--json")
    assert banned.returncode == 0, banned.stderr
    assert words[2] not in json.loads(banned.stdout)["caption"].split()[1:]
