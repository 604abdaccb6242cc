"""Adapters for the two diffusers U-Nets: `UNet2DModel` (DDPM/DDIM, LDM) and `UNet2DConditionModel` (SD family)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from diffusers import UNet2DConditionModel, UNet2DModel
from diffusers.models.attention_processor import Attention
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from torch import nn

from slimdiff.models.base import Adapter, Block, Layer, SkippedLayer, count_params, per_model


class _UNetAdapter(Adapter):
    """What both U-Nets share: down blocks → mid block → up blocks, with skip connections."""

    def blocks(self) -> list[Block]:
        model = self.model
        # Every down block pushes one skip tensor per resnet (+1 for its downsampler); conv_in pushes the first.
        skips: list[str] = ["conv_in"]
        blocks: list[Block] = []
        previous = "conv_in"
        for i, down in enumerate(model.down_blocks):
            name = f"down_blocks.{i}"
            blocks.append(Block(name, "down", (previous,)))
            skips += [name] * (len(down.resnets) + (1 if down.downsamplers else 0))
            previous = name
        if model.mid_block is not None:
            blocks.append(Block("mid_block", "mid", (previous,)))
            previous = "mid_block"
        for j, up in enumerate(model.up_blocks):
            consumed = [skips.pop() for _ in up.resnets]
            sources = tuple(dict.fromkeys([previous, *consumed]))
            name = f"up_blocks.{j}"
            blocks.append(Block(name, "up", sources))
            previous = name
        return blocks

    def layers(self) -> list[Layer]:
        layers: list[Layer] = []
        hidden = self._up_hidden_channels()
        for name, module in self.model.named_modules():
            if isinstance(module, ResnetBlock2D):
                # An up-block resnet reads [hidden state, skip]: it is removable with its skip when the hidden
                # part already has the output's channels.
                kept = hidden.get(name, module.conv1.in_channels)
                if kept != module.conv2.out_channels:
                    reason = f"changes channels ({kept} → {module.conv2.out_channels})"
                    if name in hidden:
                        reason += f" besides its {module.conv1.in_channels - kept}-channel skip input"
                elif module.up or module.down:
                    reason = "changes resolution"
                else:
                    reason = ""
                layers.append(Layer(name, "resnet", count_params(module), not reason, reason))
            elif isinstance(module, (Attention, Transformer2DModel)) and self._is_block_layer(name):
                layers.append(Layer(name, "attention", count_params(module), True))
        return layers

    def _up_hidden_channels(self) -> dict[str, int]:
        """Channels of the hidden-state part of each up-block resnet's input (the rest is a concatenated skip)."""
        model = self.model

        def after(resnet: nn.Module, channels: int) -> int:
            return resnet.conv2.out_channels if isinstance(resnet, ResnetBlock2D) else channels  # a stand-in keeps

        channels = model.conv_in.out_channels
        for down in model.down_blocks:
            for resnet in down.resnets:
                channels = after(resnet, channels)
        for resnet in model.mid_block.resnets if model.mid_block is not None else []:
            channels = after(resnet, channels)
        hidden: dict[str, int] = {}
        for j, up in enumerate(model.up_blocks):
            for k, resnet in enumerate(up.resnets):
                hidden[f"up_blocks.{j}.resnets.{k}"] = channels
                channels = after(resnet, channels)
        return hidden

    def fix_after_surgery(self, heads: Mapping[nn.Module, int] | None = None) -> None:
        super().fix_after_surgery(heads)
        for name, channels in self._up_hidden_channels().items():  # channel surgery narrows the hidden state too
            stand_in = self.model.get_submodule(name)
            if isinstance(stand_in, SkippedLayer) and stand_in.keep_channels is not None:
                stand_in.keep_channels = channels

    def stand_in(self, name: str) -> SkippedLayer:
        hidden = self._up_hidden_channels()
        return SkippedLayer(returns_tuple=self.layer_returns_tuple(name), keep_channels=hidden.get(name))

    @staticmethod
    def _is_block_layer(name: str) -> bool:
        # `…blocks.i.attentions.k`, not attention modules nested deeper inside a Transformer2DModel.
        parts = name.split(".")
        return len(parts) >= 2 and parts[-2] == "attentions"

    def layer_returns_tuple(self, name: str) -> bool:
        return isinstance(self.model.get_submodule(name), Transformer2DModel)

    def output_modules(self) -> list[nn.Module]:
        return [self.model.conv_out]


class UNetAdapter(_UNetAdapter):
    """`UNet2DModel`: unconditional, or class-conditional when the config sets `num_class_embeds`."""

    family = "unet"
    model: UNet2DModel

    def __init__(self, model: UNet2DModel, forward_module: nn.Module | None = None) -> None:
        super().__init__(model, forward_module)
        self.cond_kind = "class" if model.config.num_class_embeds else "none"

    @property
    def num_classes(self) -> int | None:
        return self.model.config.num_class_embeds

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        self.check_cond(cond, x_t.shape[0])
        out = self.forward_module(x_t, t, class_labels=cond, return_dict=False)[0]
        return out[:, : self.in_channels]

    def example_inputs(self, batch_size: int = 1, device: torch.device | str | None = None) -> dict[str, Any]:
        size = self.sample_size
        inputs: dict[str, Any] = {
            "sample": torch.randn(batch_size, self.in_channels, size, size, device=device),
            "timestep": torch.full((batch_size,), 10, dtype=torch.long, device=device),
        }
        if self.cond_kind == "class":
            inputs["class_labels"] = torch.zeros(batch_size, dtype=torch.long, device=device)
        return inputs


#: SDXL's micro-conditioning: original (h, w), crop (top, left), target (h, w).
TIME_IDS = 6


def added_rows(pooled_dim: int, width: int) -> int:
    """Token rows an SDXL condition needs beyond the prompt's to carry the pooled embedding and the time ids."""
    return math.ceil((pooled_dim + TIME_IDS) / width)


def pack_added_cond(hidden: torch.Tensor, text_embeds: torch.Tensor, time_ids: torch.Tensor) -> torch.Tensor:
    """SDXL's three inputs as one condition tensor `(batch, tokens + rows, width)`: the prompt embeddings, then rows
    holding the pooled `text_embeds` first and the `time_ids` last (zeros between), so that code handling one
    condition tensor (batch slices, guidance's concatenation, dropout) carries all three."""
    batch, _, width = hidden.shape
    rows = added_rows(text_embeds.shape[1], width)
    extra = hidden.new_zeros(batch, rows * width)
    extra[:, : text_embeds.shape[1]] = text_embeds.to(extra.dtype)
    extra[:, -TIME_IDS:] = time_ids.to(extra.dtype)
    return torch.cat([hidden, extra.view(batch, rows, width)], dim=1)


def with_time_ids(cond: torch.Tensor, time_ids: torch.Tensor) -> torch.Tensor:
    """A packed SDXL condition with its `time_ids` replaced (per item: its own size and crop)."""
    flat = cond.clone()
    flat[:, -1, -TIME_IDS:] = time_ids.to(cond.dtype)
    return flat


class SDUNetAdapter(_UNetAdapter):
    """`UNet2DConditionModel`: cross-attention on prompt embeddings `(batch, tokens, cross_attention_dim)`.

    An SDXL U-Net (`addition_embed_type="text_time"`) also takes the pooled prompt embedding and the time ids as
    `added_cond_kwargs`; its condition is one packed tensor (`pack_added_cond`) that the adapter unpacks.
    """

    family = "sd-unet"
    cond_kind = "text"
    model: UNet2DConditionModel

    #: Token count used for example inputs; 77 is CLIP's context length (SD 1.x/2.x).
    text_tokens = 77

    @property
    def cross_attention_dim(self) -> int:
        return per_model(self.model.config.cross_attention_dim)

    @property
    def pooled_dim(self) -> int | None:
        """Width of the pooled text embedding an SDXL U-Net adds to its time embedding (None for SD 1.x/2.x)."""
        config = self.model.config
        if config.addition_embed_type != "text_time":
            return None
        return config.projection_class_embeddings_input_dim - TIME_IDS * config.addition_time_embed_dim

    def _unpack(self, cond: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        pooled = self.pooled_dim
        if pooled is None:
            return cond, None
        rows = added_rows(pooled, cond.shape[-1])
        extra = cond[:, -rows:].flatten(1)
        return cond[:, :-rows], {"text_embeds": extra[:, :pooled], "time_ids": extra[:, -TIME_IDS:]}

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        self.check_cond(cond, x_t.shape[0])
        hidden, added = self._unpack(cond)
        out = self.forward_module(x_t, t, encoder_hidden_states=hidden, added_cond_kwargs=added, return_dict=False)[0]
        return out[:, : self.in_channels]

    def example_inputs(self, batch_size: int = 1, device: torch.device | str | None = None) -> dict[str, Any]:
        size = self.sample_size
        inputs = {
            "sample": torch.randn(batch_size, self.in_channels, size, size, device=device),
            "timestep": torch.full((batch_size,), 10, dtype=torch.long, device=device),
            "encoder_hidden_states": torch.randn(batch_size, self.text_tokens, self.cross_attention_dim, device=device),
        }
        if self.pooled_dim is not None:
            inputs["added_cond_kwargs"] = {
                "text_embeds": torch.randn(batch_size, self.pooled_dim, device=device),
                "time_ids": torch.full((batch_size, TIME_IDS), float(size * 8), device=device),
            }
        return inputs
