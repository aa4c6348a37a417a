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
