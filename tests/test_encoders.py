import random

import pytest
import torch
from PIL import Image

from core.encoders import ENCODERS, build_encoder, lite2_package_weights, map_lite2_state_dict
from core.errors import ConfigError


@pytest.mark.parametrize("name", list(ENCODERS))
def test_random_weight_encoders_give_7x7_maps(name):
    encoder = build_encoder(name, "none").eval()
    pixels = torch.stack([encoder.preprocess(Image.new("RGB", (320, 200), c)) for c in ("red", "blue")])
    assert pixels.shape == (2, 3, 224, 224) and pixels.dtype == torch.uint8   # resized, not cropped
    with torch.inference_mode():
        feats = encoder(pixels)
    assert feats.shape == (2, 49, ENCODERS[name].feature_dim)
    assert not torch.allclose(feats[0], feats[1])


def test_lite2_package_weights_load_strictly_and_classify():
    encoder = build_encoder("efficientnet_lite2")
    assert encoder.weights_sha256 and len(encoder.weights_sha256) == 64
    # an ImageNet model must tell a flat orange image from a flat blue one with different top classes
    x = torch.stack([encoder.preprocess(Image.new("RGB", (224, 224), c)) for c in ((255, 140, 0), (0, 0, 255))])
    with torch.inference_mode():
        logits = encoder.backbone((x.float() / 255 - encoder.mean) / encoder.std)
    assert logits.shape == (2, 1000) and logits[0].argmax() != logits[1].argmax()


def test_lite2_mapping_is_by_name_not_order():
    import timm

    source = torch.load(lite2_package_weights(), map_location="cpu", weights_only=True)
    model = timm.create_model("tf_efficientnet_lite2", pretrained=False)
    in_order = map_lite2_state_dict(source, model)
    keys = list(source)
    random.Random(0).shuffle(keys)
    shuffled = map_lite2_state_dict({k: source[k] for k in keys}, model)
    assert set(in_order) == set(model.state_dict())
    assert all(torch.equal(in_order[k], shuffled[k]) for k in in_order)
    model.load_state_dict(shuffled, strict=True)


def test_lite2_rejects_unknown_keys(tmp_path):
    import timm

    model = timm.create_model("tf_efficientnet_lite2", pretrained=False)
    with pytest.raises(ConfigError, match="unexpected"):
        map_lite2_state_dict({"_mystery.weight": torch.zeros(1)}, model)


def test_local_weight_file_round_trip_and_errors(tmp_path):
    encoder = build_encoder("densenet201", "none")
    path = tmp_path / "densenet.pth"
    torch.save(encoder.backbone.state_dict(), path)
    again = build_encoder("densenet201", path)
    assert again.weights_sha256 and torch.equal(again.backbone.features.conv0.weight, encoder.backbone.features.conv0.weight)
    with pytest.raises(ConfigError, match="not found"):
        build_encoder("densenet201", tmp_path / "missing.pth")
    torch.save({"conv.weight": torch.zeros(3)}, tmp_path / "wrong.pth")
    with pytest.raises(ConfigError, match="does not fit"):
        build_encoder("densenet201", tmp_path / "wrong.pth")
    with pytest.raises(ConfigError, match="unknown encoder"):
        build_encoder("resnet9000")


def test_fine_tuning_unfreezes_only_the_last_blocks():
    encoder = build_encoder("efficientnet_lite2", "none")
    assert not any(p.requires_grad for p in encoder.parameters())
    encoder.set_trainable_blocks(1)
    trainable = {n for n, p in encoder.backbone.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("conv_head", "bn2")) for n in trainable)


def test_compiled_inference_equals_eager_and_falls_back(monkeypatch):
    monkeypatch.setenv("CAPTIONSCOPE_COMPILE", "1")
    encoder = build_encoder("efficientnet_lite2", "none").eval()
    pixels = torch.randint(0, 256, (2, 3, 224, 224), dtype=torch.uint8)
    with torch.inference_mode():
        eager = encoder(pixels)
        compiled = encoder.inference_forward()
        assert compiled is encoder.inference_forward() and compiled is not encoder   # built once
        assert torch.allclose(compiled(pixels), eager, atol=1e-4, rtol=1e-4)

    def broken_compile(module, **kw):
        def fails(x):
            raise RuntimeError("no C++ compiler")
        return fails
    monkeypatch.setattr(torch, "compile", broken_compile)
    fresh = build_encoder("efficientnet_lite2", "none").eval()
    fresh.load_state_dict(encoder.state_dict())
    with torch.inference_mode(), pytest.warns(UserWarning, match="no C.. compiler"):
        assert torch.equal(fresh.inference_forward()(pixels), eager)
    monkeypatch.setenv("CAPTIONSCOPE_COMPILE", "0")
    assert build_encoder("efficientnet_lite2", "none").inference_forward().__class__.__name__ == "Encoder"


@pytest.mark.parametrize("size,grid", [(224, 7), (260, 9), (320, 10), (128, 4)])
def test_grid_follows_the_input_size(size, grid):
    from core.encoders import encoder_spec, feature_key, grid_for
    assert grid_for(size) == grid and encoder_spec("efficientnet_lite2", size).num_regions == grid * grid
    assert feature_key("efficientnet_lite2", 224) == "efficientnet_lite2"   # the caches made before sizes existed
    assert feature_key("efficientnet_lite2", size, 2) == (
        "efficientnet_lite2-tail2" if size == 224 else f"efficientnet_lite2@{size}-tail2")


@pytest.mark.parametrize("size", [63, 1025, 224.0, "320"])
def test_bad_image_sizes_are_refused_by_name(size):
    with pytest.raises(ConfigError, match="image size"):
        build_encoder("efficientnet_lite2", "none", size)


@pytest.mark.parametrize("name", list(ENCODERS))
def test_trunk_then_tail_equals_the_whole_encoder(name):
    """The split that fine-tuning from cached activations relies on: trunk(n) then tail(n) == forward."""
    torch.manual_seed(0)
    encoder = build_encoder(name, "none", 128).eval()
    pixels = torch.randint(0, 256, (2, 3, 128, 128), dtype=torch.uint8)
    with torch.inference_mode():
        whole = encoder(pixels)
        assert whole.shape == (2, 16, ENCODERS[name].feature_dim)
        for n in (1, 2):
            assert torch.allclose(encoder.tail(encoder.trunk(pixels, n), n), whole, atol=1e-4)
    with pytest.raises(ConfigError, match="tail stages"):
        encoder.trunk(pixels, len(encoder.stages) + 1)


def test_encoder_state_loads_whole_or_exact_tail_and_names_mismatches():
    torch.manual_seed(0)
    source, target = build_encoder("efficientnet_lite2", "none"), build_encoder("efficientnet_lite2", "none")
    tail = {k: v + 1 for k, v in source.tail_state_dict(2).items()}
    assert tail and all(k.startswith(("blocks.6.", "conv_head.", "bn2.")) for k in tail)
    before = target.backbone.conv_stem.weight.clone()
    target.load_encoder_state(tail, 2)
    assert torch.equal(target.backbone.conv_head.weight, tail["conv_head.weight"])
    assert torch.equal(target.backbone.conv_stem.weight, before)          # the trunk is untouched
    with pytest.raises(ConfigError, match="missing"):
        target.load_encoder_state(tail, 3)                                  # blocks.5 absent
    with pytest.raises(ConfigError, match="unexpected"):
        target.load_encoder_state({**tail, "conv_stem.weight": before}, 2)
    with pytest.raises(ConfigError, match="shape"):
        target.load_encoder_state({**tail, "conv_head.weight": torch.zeros(3, 3)}, 2)
    target.load_encoder_state(source.backbone.state_dict(), 0)             # a whole backbone also loads
    assert torch.equal(target.backbone.conv_stem.weight, source.backbone.conv_stem.weight)
