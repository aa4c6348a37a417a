"""The checkpoint shipped in checkpoints/ loads, agrees with its metadata, captions, and scores as its card says."""
import json
import os
from pathlib import Path

import pytest

from core.captioner import Captioner
from core.checkpoint import default_checkpoint_path, read_metadata
from core.decoding import DecodingConfig

from conftest import REPO, draw_shape

CARD = REPO / "checkpoints" / "captionscope-lite2.eval.json"


@pytest.fixture(scope="module")
def bundled():
    return Captioner.from_checkpoint(default_checkpoint_path(), device="cpu")


def test_metadata_matches_weights(bundled):
    meta = read_metadata(default_checkpoint_path())
    cfg = meta.model_config
    assert cfg["vocab_size"] == len(bundled.vocab) == bundled.model.embedding.num_embeddings
    assert cfg["encoder_dim"] == bundled.encoder.spec.feature_dim
    assert meta.encoder["name"] == "efficientnet_lite2"
    assert bundled.encoder_weights_match, "encoder weights differ from those it was trained on"
    assert default_checkpoint_path().stat().st_size < 50 * 2**20


def test_captions_generated_images(bundled, tmp_path):
    for i, (colour, shape) in enumerate([("red", "circle"), ("blue", "square"), ("green", "circle")]):
        path = tmp_path / f"{i}.png"
        draw_shape(colour, shape, size=300).save(path)
        result = bundled.caption(path, DecodingConfig(beam_size=3))
        assert 2 <= len(result.words[0]) <= 20
        assert all(w in bundled.vocab.stoi for w in result.words[0])


def test_dev_subset_scores_as_the_model_card_says(bundled):
    data_dir = os.environ.get("FLICKR8K_DIR")
    if not data_dir or not Path(data_dir).is_dir():
        pytest.skip("set FLICKR8K_DIR to a Flickr8K folder to run the 50-image regression check")
    from core.corpus import caption_split, score_split
    from core.data import load_dataset

    card = json.loads(CARD.read_text())["dev_subset"]
    items = load_dataset(data_dir).split("dev")[: card["images"]]
    predictions = caption_split(bundled, items, DecodingConfig(beam_size=card["beam"]), features_dir=None).captions
    scores = score_split(predictions, items, metrics=("BLEU-4",))
    assert abs(100 * scores.corpus["BLEU-4"] - 100 * card["BLEU-4"]) <= 0.5
