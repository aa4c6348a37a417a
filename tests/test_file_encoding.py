"""core.file_encoding: the batched, overlapped file-encoding path equals the captioner's own encoder."""
from __future__ import annotations

import io

import torch
from PIL import Image

from core.captioner import Captioner
from core.data import load_dataset
from core.file_encoding import encode_files


def test_features_match_the_single_image_path_in_input_order(tiny_checkpoint, tiny_flickr):
    captioner = Captioner.from_checkpoint(tiny_checkpoint)
    paths = [it.path for it in load_dataset(tiny_flickr).split("dev")][:7]     # 7: a padded last batch of 4
    batches = list(encode_files(captioner.encoder, paths, with_images=True))
    assert [len(b.indices) for b in batches] == [4, 3]
    assert [i for b in batches for i in b.indices] == list(range(7))
    feats = torch.cat([b.features for b in batches])
    single = torch.stack([captioner.features(p)[0] for p in paths])
    assert feats.shape == single.shape
    torch.testing.assert_close(feats, single.float(), atol=1e-4, rtol=1e-4)
    assert all(im.mode == "RGB" for b in batches for im in b.images)


def test_bad_inputs_are_one_line_failures_and_the_others_go_on(tiny_checkpoint, tiny_flickr, tmp_path):
    captioner = Captioner.from_checkpoint(tiny_checkpoint)
    good = next(iter(load_dataset(tiny_flickr).split("dev"))).path
    buffer = io.BytesIO()
    Image.new("RGB", (30, 20), (10, 200, 30)).save(buffer, format="PNG")
    sources = [b"<html>not an image</html>", good, tmp_path / "missing.jpg", buffer.getvalue()]
    batches = list(encode_files(captioner.encoder, sources, names=["page.jpg", "good.jpg", "missing.jpg", "g.png"]))
    failures = {i: e for b in batches for i, e in b.failures.items()}
    assert sorted(failures) == [0, 2]
    assert failures[0].startswith("page.jpg: ") and failures[2] == "missing.jpg: file not found"
    assert [i for b in batches for i in b.indices] == [1, 3]


def test_caption_many_batched_equals_one_by_one(tiny_checkpoint, tiny_flickr):
    from core.decoding import DecodingConfig

    captioner = Captioner.from_checkpoint(tiny_checkpoint)
    paths = [it.path for it in load_dataset(tiny_flickr).split("dev")]
    config = DecodingConfig(beam_size=3, num_return_sequences=2)
    many = captioner.caption_many(paths, config, decode_batch=3)
    one = [captioner.caption(p, config) for p in paths]
    assert [r.words for r in many] == [r.words for r in one]
    assert all(abs(a.hypotheses[0].logprob - b.hypotheses[0].logprob) < 1e-3 for a, b in zip(many, one))
