import io

import pytest
import torch

from core.captioner import Captioner
from core.decoding import DecodingConfig
from core.errors import ImageError

from conftest import draw_shape, tiny_pairs


@pytest.fixture(scope="module")
def captioner(tiny_checkpoint):
    return Captioner.from_checkpoint(tiny_checkpoint, device="cpu")


def jpeg_bytes(colour, shape) -> bytes:
    buffer = io.BytesIO()
    draw_shape(colour, shape).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def test_captions_an_image_from_bytes_path_and_file(captioner, tiny_flickr):
    expected = dict(tiny_pairs())
    name = "1004_blue_square.jpg"
    from_path = captioner.caption(tiny_flickr / "images" / name, DecodingConfig(beam_size=3))
    with open(tiny_flickr / "images" / name, "rb") as f:
        from_file = captioner.caption(f, DecodingConfig(beam_size=3), name=name)
    assert from_path.caption == from_file.caption == expected[name]
    assert from_path.hypotheses[0].attention.shape[1] == captioner.grid ** 2


def test_features_are_cached_by_content(captioner):
    data = jpeg_bytes("red", "circle")
    first = captioner.caption(data, DecodingConfig(beam_size=2), name="a.jpg")
    again = captioner.caption(data, DecodingConfig(beam_size=5, num_return_sequences=3), name="b.jpg")
    assert not first.from_cache and again.from_cache and len(again.hypotheses) == 3
    other = captioner.caption(jpeg_bytes("green", "circle"), DecodingConfig(), name="c.jpg")
    assert not other.from_cache and other.caption != first.caption


def test_bad_images_become_failures_and_the_rest_go_on(captioner):
    results = captioner.caption_many([b"", b"<html></html>", jpeg_bytes("yellow", "square")], DecodingConfig(),
                                     names=["empty.jpg", "page.jpg", "ok.jpg"])
    assert [type(r).__name__ for r in results] == ["CaptionFailure", "CaptionFailure", "CaptionResult"]
    assert "empty.jpg" in results[0].error and "page.jpg" in results[1].error
    with pytest.raises(ImageError):
        captioner.caption(b"not an image", DecodingConfig(), name="x.jpg")


def test_corpus_path_equals_single_image_path(captioner, tiny_flickr):
    from core.corpus import caption_split
    from core.data import load_dataset

    items = load_dataset(tiny_flickr).split("dev")
    batched = caption_split(captioner, items, DecodingConfig(beam_size=3), features_dir=None, batch_size=3).captions
    single = {it.image: captioner.caption(it.path, DecodingConfig(beam_size=3)).caption for it in items}
    assert {k: v["caption"] for k, v in batched.items()} == single


def test_encoding_many_images_equals_encoding_each_alone(captioner):
    """encode() runs a device-sized batch at a time (4 on a CPU): 9 images come back complete, in order, each
    with the features it gets alone."""
    images = [draw_shape(colour, shape) for colour in ("red", "green", "blue")
              for shape in ("circle", "square", "triangle")]
    together = captioner.encode(images)
    alone = torch.cat([captioner.encode([im]) for im in images])
    assert together.shape[0] == len(images)
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-4)
