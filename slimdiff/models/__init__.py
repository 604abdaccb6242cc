"""Model families, their adapters, and the tiny configs used by the demo and the tests."""

from __future__ import annotations

import copy
from contextlib import nullcontext
from typing import Any

from accelerate import init_empty_weights
from diffusers import DiTTransformer2DModel, UNet2DConditionModel, UNet2DModel
from torch import nn

from slimdiff.errors import SlimdiffError
from slimdiff.models.base import Adapter, Block, ChannelGroup, Layer, SkippedLayer
from slimdiff.models.dit import DiTAdapter
from slimdiff.models.unet import SDUNetAdapter, UNetAdapter

__all__ = [
    "ADAPTERS",
    "Adapter",
    "Block",
    "ChannelGroup",
    "Layer",
    "SkippedLayer",
    "TINY_CONFIGS",
    "adapter_for",
    "build",
    "build_tiny",
    "config_of",
]

#: diffusers class name → (class, adapter).
ADAPTERS: dict[str, tuple[type[nn.Module], type[Adapter]]] = {
    "UNet2DModel": (UNet2DModel, UNetAdapter),
    "UNet2DConditionModel": (UNet2DConditionModel, SDUNetAdapter),
    "DiTTransformer2DModel": (DiTTransformer2DModel, DiTAdapter),
}

#: Small members of each family: fast enough to train on digits on two CPU cores, and to test every engine on.
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "tiny-unet": {
        "_class_name": "UNet2DModel",
        "sample_size": 16,
        "in_channels": 1,
        "out_channels": 1,
        "block_out_channels": [32, 64, 64],
        "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "attention_head_dim": 16,
    },
    "tiny-sd": {
        "_class_name": "UNet2DConditionModel",
        "sample_size": 16,
        "in_channels": 1,
        "out_channels": 1,
        "block_out_channels": [32, 64],
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "cross_attention_dim": 32,
        "attention_head_dim": 4,
    },
    "tiny-dit": {
        "_class_name": "DiTTransformer2DModel",
        "sample_size": 16,
        "in_channels": 1,
        "out_channels": 1,
        "patch_size": 2,
        "num_layers": 4,
        "num_attention_heads": 4,
        "attention_head_dim": 16,
        "num_embeds_ada_norm": 1000,
        "norm_type": "ada_norm_zero",
        "norm_elementwise_affine": False,
    },
}


def model_class(config: dict[str, Any]) -> tuple[type[nn.Module], type[Adapter]]:
    """The diffusers class and adapter named by a config's `_class_name`."""
    name = config.get("_class_name")
    if name not in ADAPTERS:
        valid = ", ".join(ADAPTERS)
        raise SlimdiffError(f"unsupported model family '{name}' (config _class_name); supported: {valid}")
    return ADAPTERS[name]


def build(config: dict[str, Any], *, empty: bool = False) -> nn.Module:
    """Instantiate a diffusers model from its config; `empty=True` puts parameters on the meta device.

    Buffers stay real on an empty build (sin/cos position tables are derived, never saved), so a model built empty
    and then given its weights is complete.
    """
    cls, _ = model_class(config)
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    try:
        with init_empty_weights() if empty else nullcontext():
            return cls.from_config(config)
    except (TypeError, ValueError, KeyError, AssertionError) as error:
        raise SlimdiffError(f"cannot build {cls.__name__} from this config: {error}") from error


def config_of(model: nn.Module) -> dict[str, Any]:
    """The full diffusers config of a model instance, `_class_name` included."""
    return {"_class_name": type(model).__name__, **dict(model.config)}


def build_tiny(name: str, **overrides: Any) -> nn.Module:
    """A freshly initialised tiny model of one family (`tiny-unet`, `tiny-sd` or `tiny-dit`)."""
    if name not in TINY_CONFIGS:
        raise SlimdiffError(f"unknown tiny model '{name}'; valid: {', '.join(TINY_CONFIGS)}")
    config = copy.deepcopy(TINY_CONFIGS[name])
    config.update(overrides)
    return build(config)


def adapter_for(model: nn.Module, forward_module: nn.Module | None = None) -> Adapter:
    """The adapter for a diffusers model instance; calls may go through a wrapper of it (`forward_module`).

    A module that computes like a diffusers model without being one (OFA's elastic model) names the class it
    stands for in `diffusers_class` and exposes its `config`.
    """
    name = getattr(model, "diffusers_class", None) or type(model).__name__
    if name not in ADAPTERS:
        raise SlimdiffError(f"unsupported model class {name}; supported: {', '.join(ADAPTERS)}")
    return ADAPTERS[name][1](model, forward_module)
