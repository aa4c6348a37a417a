"""The bundled recipe with `--encoder densenet201` (random weights here: ImageNet weights are not reachable)."""
import torch

from core.captioner import Captioner
from core.checkpoint import load_checkpoint
from core.decoding import DecodingConfig
from core.features import main as features_main, open_features
from core.train import main as train_main

from conftest import TINY_MODEL


def test_densenet201_features_train_and_caption(tiny_flickr, tmp_path):
    feats, run = tmp_path / "features", tmp_path / "run"
    torch.manual_seed(0)
    assert features_main(["--data", str(tiny_flickr), "--encoder", "densenet201", "--encoder-weights", "none",
                          "--out", str(feats), "--workers", "0", "--batch-size", "4"]) == 0
    store = open_features(feats, "densenet201", "train")
    assert store.array.shape == (8, 49, 1920)
    assert train_main(["--data", str(tiny_flickr), "--features", str(feats), "--encoder", "densenet201",
                       "--out", str(run), "--epochs", "2", "--batch-size", "8", "--min-count", "1",
                       "--eval-beam", "1", *TINY_MODEL]) == 0
    ckpt = load_checkpoint(run / "best.safetensors")
    assert ckpt.encoder["name"] == "densenet201" and ckpt.config.encoder_dim == 1920
    captioner = Captioner.from_checkpoint(run / "best.safetensors", encoder_weights="none", device="cpu")
    result = captioner.caption(next((tiny_flickr / "images").glob("*.jpg")), DecodingConfig(beam_size=2))
    assert result.hypotheses and result.hypotheses[0].attention.shape[1] == 49


def test_densenet201_fine_tunes_its_last_dense_block_from_cached_activations(tiny_flickr, tmp_path):
    """The fine-tuning recipe with DenseNet201: `--tail-stages 1` caches what enters dense block 4, training
    changes only that block (+ norm5), and a caption from the image files equals one from the cache."""
    from core.corpus import caption_split
    from core.data import load_dataset
    from core.encoders import build_encoder

    feats, run = tmp_path / "features", tmp_path / "run"
    torch.manual_seed(0)
    assert features_main(["--data", str(tiny_flickr), "--encoder", "densenet201", "--encoder-weights", "none",
                          "--image-size", "128", "--tail-stages", "1", "--out", str(feats), "--workers", "0"]) == 0
    assert train_main(["--data", str(tiny_flickr), "--features", str(feats), "--encoder", "densenet201",
                       "--image-size", "128", "--fine-tune-blocks", "1", "--encoder-weights", "none",
                       "--encoder-lr", "1e-3", "--out", str(run), "--epochs", "1", "--batch-size", "8",
                       "--min-count", "1", "--eval-beam", "1", *TINY_MODEL]) == 0
    ckpt = load_checkpoint(run / "last.safetensors")
    assert ckpt.encoder["tail_stages"] == 1 and ckpt.encoder["grid"] == 4
    assert ckpt.encoder_state and all(k.startswith(("features.denseblock4.", "features.norm5."))
                                      for k in ckpt.encoder_state)
    torch.manual_seed(0)
    original = build_encoder("densenet201", "none", 128).backbone.state_dict()
    assert any(not torch.equal(v.float(), original[k].float()) for k, v in ckpt.encoder_state.items())

    torch.manual_seed(0)       # the same random trunk as the cache was made with
    captioner = Captioner.from_checkpoint(run / "last.safetensors", encoder_weights="none", device="cpu")
    items = load_dataset(tiny_flickr).split("dev")
    from_files = caption_split(captioner, items, DecodingConfig(beam_size=2), features_dir=None)
    from_cache = caption_split(captioner, items, DecodingConfig(beam_size=2), features_dir=feats)
    assert (from_files.source, from_cache.source) == ("images", "features")
    assert from_files.captions.keys() == from_cache.captions.keys()
    assert [c["caption"] for c in from_files.captions.values()] == [c["caption"] for c in from_cache.captions.values()]
