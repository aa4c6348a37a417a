"""`python -m core.caption` on the whole bad-image corpus, as a user runs it (a subprocess).

Every good file gets a caption line, every bad one exactly one `error: <file>: <reason>` line on stderr
(never a traceback), and the exit code says whether anything failed (1) or the run could not start (2).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from bad_images import make_image_corpus
from conftest import run_cli

def caption_cli(*args: str):
    return run_cli("core.caption", *args)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, tuple[Path, str]]:
    folder = tmp_path_factory.mktemp("bad_images")
    cases = make_image_corpus(folder, include_huge=True)
    # the EXIF-6 photo turned upright by hand, saved losslessly: must get the same caption
    with Image.open(cases["exif_orientation_6"][0]) as raw:
        raw.load()
        assert raw.size == (200, 100)                      # stored sideways
        raw.transpose(Image.Transpose.ROTATE_270).save(folder / "exif6_by_hand.png")
    cases["exif6_by_hand"] = (folder / "exif6_by_hand.png", "ok")
    cases["missing_file"] = (folder / "does_not_exist.jpg", "error")
    return cases


def test_whole_corpus_captions_or_one_line_errors(corpus, tiny_checkpoint):
    paths = [str(p) for p, _ in corpus.values()]
    result = caption_cli("--checkpoint", str(tiny_checkpoint), "--beam", "2", *paths)
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    assert result.returncode == 1, result.stderr[-3000:]

    captions = dict(line.split("\t", 1) for line in result.stdout.splitlines())
    ok = {str(p) for p, outcome in corpus.values() if outcome == "ok"}
    bad = {str(p) for p, outcome in corpus.values() if outcome == "error"}
    assert set(captions) == ok
    assert all(c.strip() for c in captions.values())

    errors = result.stderr.splitlines()
    assert len(errors) == len(bad), result.stderr        # one line per bad file, nothing else on stderr
    named = {}
    for line in errors:
        assert line.startswith("error: "), line
        path = next(p for p in bad if line.startswith(f"error: {p}: "))
        named[path] = line[len(f"error: {path}: "):]
        assert named[path].strip()
    assert set(named) == bad
    assert "over the 20 MB limit" in named[str(corpus["oversized_file"][0])]
    assert "not found" in named[str(corpus["missing_file"][0])]
    assert "decompression bomb" in named[str(corpus["bomb_png"][0])]
    # the EXIF-rotated photo is captioned as the upright picture it shows
    assert captions[str(corpus["exif_orientation_6"][0])] == captions[str(corpus["exif6_by_hand"][0])]


def test_json_output_parses_and_names_failures(corpus, tiny_checkpoint):
    picked = ["rgb_jpeg", "animated_gif", "huge_jpeg_10000", "html_as_jpg", "truncated_png", "one_pixel_png"]
    paths = [str(corpus[c][0]) for c in picked]
    result = caption_cli("--checkpoint", str(tiny_checkpoint), "--json", "--beam", "3", "--nbest", "2", *paths)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["image"] for r in rows] == paths
    for case, row in zip(picked, rows):
        if corpus[case][1] == "ok":
            assert row["caption"] and len(row["hypotheses"]) == 2
            assert row["caption"] == row["hypotheses"][0]["caption"]
            assert row["hypotheses"][0]["score"] >= row["hypotheses"][1]["score"]
            for h in row["hypotheses"]:
                assert len(h["token_logprobs"]) == len(h["caption"].split()) + int(h["finished"])
        else:
            assert row["error"].startswith(f"{row['image']}: ") and "\n" not in row["error"]


def test_bad_checkpoint_and_arguments_exit_2(tmp_path, corpus):
    image = str(corpus["rgb_jpeg"][0])
    pickle_file = tmp_path / "model.safetensors"
    pickle_file.write_bytes(b"\x80\x04\x95 a pickle, not a checkpoint")
    result = caption_cli("--checkpoint", str(pickle_file), image)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
    assert "model.safetensors" in result.stderr and "pickle" in result.stderr

    from core.caption import main       # the other refusals take the same path; no need for more processes
    assert main(["--checkpoint", str(tmp_path / "absent.safetensors"), image]) == 2
    assert main(["--checkpoint", str(pickle_file), "--beam", "0", image]) == 2
    with pytest.raises(SystemExit) as exit_info:                  # argparse: unknown option
        main(["--no-such-option", image])
    assert exit_info.value.code == 2


def test_exif_rotated_image_is_encoded_and_shown_upright(corpus, tiny_checkpoint):
    """The display image (what the heatmap is drawn on) and the features both come from the upright image."""
    from core.captioner import Captioner

    torch.set_num_threads(1)
    captioner = Captioner.from_checkpoint(tiny_checkpoint)
    feats, shown, _, _ = captioner.features(corpus["exif_orientation_6"][0])
    assert shown.size == (100, 200)                                # portrait, as the camera meant it
    assert shown.getpixel((50, 20))[0] > 200 and shown.getpixel((50, 180))[2] > 200     # red on top
    with Image.open(corpus["exif_orientation_6"][0]) as raw:
        by_hand = raw.convert("RGB").transpose(Image.Transpose.ROTATE_270)
    assert torch.equal(feats, captioner.encode([by_hand])[0])
    with Image.open(corpus["exif_orientation_6"][0]) as raw:
        sideways = captioner.encode([raw.convert("RGB")])[0]
    assert not torch.equal(feats, sideways)                        # the check can tell the two apart


def test_decoding_knobs_on_the_tiny_model(tiny_checkpoint, tiny_flickr, capsys):
    """The Hugging Face knobs as flags: bad words never appear, min_length holds, diverse beams are
    returned, and contradictory or unknown settings are one error line naming the setting (exit 2)."""
    from core.caption import main
    image = str(next((tiny_flickr / "images").glob("*_red_square.jpg")))

    def run(*flags: str) -> list[dict]:
        assert main(["--checkpoint", str(tiny_checkpoint), "--json", image, *flags]) == 0
        return [json.loads(line) for line in capsys.readouterr().out.splitlines()]

    [plain] = run("--beam", "3")
    assert plain["caption"] == "a red square on a white wall"
    [banned] = run("--beam", "3", "--nbest", "3", "--bad-words", "Red", "wall")
    assert all(not {"red", "wall"} & set(h["caption"].split()) for h in banned["hypotheses"])
    [long] = run("--beam", "3", "--min-length", "10")
    assert len(long["hypotheses"][0]["token_logprobs"]) >= 10 and len(long["caption"].split()) >= 9
    [diverse] = run("--beam", "4", "--num-beam-groups", "2", "--diversity-penalty", "1.0", "--nbest", "4")
    assert len(diverse["hypotheses"]) == 4 and diverse["caption"] == plain["caption"]
    [sampled] = run("--sample", "--top-p", "0.01", "--seed", "3", "--repetition-penalty", "1.2")
    assert sampled["caption"] == plain["caption"]            # a tiny nucleus is the top word: greedy

    for flags, named in ((["--bad-words", "zebra", "wall"], "'zebra'"),
                         (["--beam", "3", "--num-beam-groups", "2", "--diversity-penalty", "1"], "num_beam_groups"),
                         (["--beam", "4", "--diversity-penalty", "1"], "diversity_penalty"),
                         (["--min-length", "30"], "min_length"), (["--sample", "--top-p", "0"], "top_p"),
                         (["--repetition-penalty", "0"], "repetition_penalty")):
        assert main(["--checkpoint", str(tiny_checkpoint), image, *flags]) == 2, flags
        captured = capsys.readouterr()
        assert captured.err.startswith("error: ") and captured.err.count("\n") == 1 and named in captured.err
        assert not captured.out


def test_the_checkpoints_stored_decoding_is_the_default(tiny_checkpoint, tiny_flickr, tmp_path, capsys):
    """A checkpoint whose stored defaults say max_length 3 captions short without flags; --max-length wins."""
    from core.caption import main
    from core.checkpoint import load_checkpoint, save_checkpoint
    ckpt = load_checkpoint(tiny_checkpoint)
    short = save_checkpoint(tmp_path / "short.safetensors", ckpt.model, ckpt.vocab, encoder=ckpt.encoder,
                            training=ckpt.training, decoding={**ckpt.decoding, "beam_size": 2, "max_length": 3})
    image = str(next((tiny_flickr / "images").glob("*_red_square.jpg")))

    def caption(*flags: str) -> dict:
        assert main(["--checkpoint", str(short), "--json", image, *flags]) == 0
        return json.loads(capsys.readouterr().out)

    stored = caption("--nbest", "2")
    assert len(stored["hypotheses"]) == 2 and all(len(h["token_logprobs"]) <= 3 for h in stored["hypotheses"])
    assert caption("--max-length", "20")["caption"] == "a red square on a white wall"
    # a stored knob is a default too: min_length 20 keeps <end> out of the first 19 tokens
    knobbed = save_checkpoint(tmp_path / "knobbed.safetensors", ckpt.model, ckpt.vocab, encoder=ckpt.encoder,
                              training=ckpt.training, decoding={**ckpt.decoding, "beam_size": 1, "min_length": 20,
                                                                "max_length": 25})
    assert main(["--checkpoint", str(knobbed), "--json", image]) == 0
    assert len(json.loads(capsys.readouterr().out)["hypotheses"][0]["token_logprobs"]) >= 20
    assert main(["--checkpoint", str(knobbed), "--json", image, "--min-length", "0"]) == 0
    assert json.loads(capsys.readouterr().out)["caption"] == "a red square on a white wall"
