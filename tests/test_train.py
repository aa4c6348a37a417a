import json

import torch

from core.captioner import Captioner
from core.checkpoint import load_checkpoint
from core.decoding import DecodingConfig
from core.features import open_features
from core.train import main

from conftest import TINY_MODEL, tiny_pairs


def test_tiny_model_memorises_its_captions(tiny_run, tiny_features):
    ckpt = load_checkpoint(tiny_run / "best.safetensors")
    store = open_features(tiny_features, "efficientnet_lite2", "dev")
    from core.decoding import generate
    nbest = generate(ckpt.model, store.get(list(range(len(store)))), DecodingConfig(beam_size=3))
    got = {name: ckpt.vocab.decode(h[0].token_ids) for name, h in zip(store.images, nbest)}
    assert got == dict(tiny_pairs())


def test_log_has_one_line_per_epoch_and_loss_falls(tiny_run):
    lines = [json.loads(l) for l in (tiny_run / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == list(range(len(lines))) and len(lines) >= 5
    assert lines[-1]["train_loss"] < 0.5 * lines[0]["train_loss"]
    assert {"train_loss", "dev_bleu4", "dev_cider_d", "lr", "epoch_time_s"} <= set(lines[0])
    best = max(lines, key=lambda r: r["dev_bleu4"])
    meta = load_checkpoint(tiny_run / "best.safetensors").training
    assert meta["dev"]["BLEU-4"] == best["dev_bleu4"]


def test_resume_after_interruption_ends_at_same_weights(tiny_flickr, tiny_features, tmp_path):
    args = ["--data", str(tiny_flickr), "--features", str(tiny_features), "--batch-size", "8", "--lr", "3e-3",
            "--min-count", "1", "--eval-beam", "1", "--seed", "3", "--patience", "99", *TINY_MODEL]
    assert main([*args, "--out", str(tmp_path / "straight"), "--epochs", "4"]) == 0
    assert main([*args, "--out", str(tmp_path / "resumed"), "--epochs", "2"]) == 0     # "killed" after 2
    assert main([*args, "--out", str(tmp_path / "resumed"), "--epochs", "4", "--resume"]) == 0
    a = load_checkpoint(tmp_path / "straight" / "last.safetensors").model.state_dict()
    b = load_checkpoint(tmp_path / "resumed" / "last.safetensors").model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    epochs = [json.loads(l)["epoch"] for l in (tmp_path / "resumed" / "log.jsonl").read_text().splitlines()]
    assert epochs == [0, 1, 2, 3]


def test_bad_arguments_exit_non_zero(tiny_flickr, tmp_path, capsys):
    assert main(["--data", str(tiny_flickr), "--features", str(tmp_path / "none"), "--out", str(tmp_path)]) == 2
    assert "no finished feature cache" in capsys.readouterr().err
    assert main(["--data", str(tiny_flickr), "--encoder", "vgg", "--out", str(tmp_path)]) == 2


def test_fine_tuning_the_last_encoder_block(tiny_flickr, tmp_path):
    from core.encoders import build_encoder

    out = tmp_path / "ft"
    assert main(["--data", str(tiny_flickr), "--out", str(out), "--epochs", "2", "--batch-size", "8",
                 "--min-count", "1", "--eval-beam", "1", "--fine-tune-blocks", "1", "--encoder-lr", "1e-3",
                 *TINY_MODEL]) == 0
    ckpt = load_checkpoint(out / "last.safetensors")
    assert ckpt.encoder["fine_tuned"] and ckpt.encoder_state
    original = build_encoder("efficientnet_lite2").backbone.state_dict()
    changed = [k for k in ckpt.encoder_state if not torch.equal(ckpt.encoder_state[k], original[k])]
    assert changed and all(k.startswith(("conv_head", "bn2")) for k in changed)   # only the last block moved
    captioner = Captioner.from_checkpoint(out / "last.safetensors", device="cpu")
    assert torch.equal(captioner.encoder.backbone.conv_head.weight, ckpt.encoder_state["conv_head.weight"])
    assert captioner.caption(next((tiny_flickr / "images").glob("*.jpg")), DecodingConfig()).hypotheses


def test_fine_tuning_the_encoder_tail_from_its_activation_cache(tiny_flickr, tmp_path):
    """At 128 px (a 4x4 grid), train the last two encoder stages from `--tail-stages 2` activations: only
    those stages change, the checkpoint stores just them and its grid, and every consumer (the captioner
    from images, the corpus path from the cache, SCST) sees the same fine-tuned encoder."""
    from core.corpus import caption_split
    from core.data import load_dataset
    from core.encoders import build_encoder
    from core.features import main as features_main
    from core.scst import main as scst_main

    feats, out = tmp_path / "features", tmp_path / "ft"
    torch.manual_seed(0)
    assert features_main(["--data", str(tiny_flickr), "--encoder-weights", "none", "--image-size", "128",
                          "--tail-stages", "2", "--out", str(feats), "--workers", "0"]) == 0
    assert main(["--data", str(tiny_flickr), "--features", str(feats), "--out", str(out), "--epochs", "2",
                 "--batch-size", "8", "--min-count", "1", "--eval-beam", "1", "--image-size", "128",
                 "--fine-tune-blocks", "2", "--encoder-weights", "none", "--encoder-lr", "1e-3", *TINY_MODEL]) == 0
    ckpt = load_checkpoint(out / "last.safetensors")
    assert ckpt.encoder["tail_stages"] == 2 and ckpt.encoder["grid"] == 4 and ckpt.model.config.num_regions == 16
    assert ckpt.encoder_state and all(k.startswith(("blocks.6.", "conv_head.", "bn2.")) for k in ckpt.encoder_state)
    torch.manual_seed(0)
    original = build_encoder("efficientnet_lite2", "none", 128).backbone.state_dict()
    assert any(not torch.equal(v, original[k]) for k, v in ckpt.encoder_state.items())   # the tail was trained

    torch.manual_seed(0)   # the same random trunk as the cache was made with
    captioner = Captioner.from_checkpoint(out / "last.safetensors", encoder_weights="none", device="cpu")
    items = load_dataset(tiny_flickr).split("dev")
    image = captioner.caption(items[0].path, DecodingConfig(beam_size=2))
    assert image.hypotheses[0].attention.shape[1] == 16
    from_files = caption_split(captioner, items, DecodingConfig(beam_size=2), features_dir=None)
    from_cache = caption_split(captioner, items, DecodingConfig(beam_size=2), features_dir=feats)
    assert [from_files.captions[it.image]["caption"] for it in items] == [from_cache.captions[it.image]["caption"] for it in items]
    assert scst_main(["--init", str(out / "last.safetensors"), "--data", str(tiny_flickr), "--features", str(feats),
                      "--out", str(tmp_path / "scst"), "--max-steps", "2", "--batch-size", "4", "--samples", "2",
                      "--eval-beam", "1", "--bleu-weight", "0.5"]) == 0
    after = load_checkpoint(tmp_path / "scst" / "last.safetensors")
    assert after.encoder == ckpt.encoder and after.encoder_state.keys() == ckpt.encoder_state.keys()
