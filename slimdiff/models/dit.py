"""Adapter for `DiTTransformer2DModel` (class-conditional DiT)."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import DiTTransformer2DModel
from torch import nn

from slimdiff.models.base import Adapter, Block, Layer, count_params


class DiTAdapter(Adapter):
    """A DiT: patch embedding → N transformer blocks (each a residual layer and a skippable block) → unpatchify.

    Class labels index `num_embeds_ada_norm` classes; the label `num_embeds_ada_norm` itself is the null class used
    for classifier-free guidance (diffusers' `DiTPipeline` hard-codes 1000 for it, so pipeline-compatible models
    keep `num_embeds_ada_norm=1000`).
    """

    family = "dit"
    cond_kind = "class"
    builtin_label_dropout = 0.1  # diffusers' DiT label embedder drops labels itself in training mode
    block_channel_dim = -1
    model: DiTTransformer2DModel

    @property
    def num_classes(self) -> int:
        return self.model.config.num_embeds_ada_norm

    @property
    def null_class(self) -> int:
        return self.model.config.num_embeds_ada_norm

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        self.check_cond(cond, x_t.shape[0])
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        out = self.forward_module(x_t, timestep=t, class_labels=cond, return_dict=False)[0]
        return out[:, : self.in_channels]  # drop learned-variance channels

    def example_inputs(self, batch_size: int = 1, device: torch.device | str | None = None) -> dict[str, Any]:
        size = self.sample_size
        return {
            "hidden_states": torch.randn(batch_size, self.in_channels, size, size, device=device),
            "timestep": torch.full((batch_size,), 10, dtype=torch.long, device=device),
            "class_labels": torch.zeros(batch_size, dtype=torch.long, device=device),
        }

    def blocks(self) -> list[Block]:
        names = [f"transformer_blocks.{i}" for i in range(len(self.model.transformer_blocks))]
        return [Block(name, "transformer", (prev,)) for prev, name in zip(["pos_embed", *names], names)]

    def layers(self) -> list[Layer]:
        # The output layer reads the conditioning from block 0's embedder, so block 0 must stay.
        reason = "its timestep/label embedder also conditions the output layer"
        return [
            Layer(f"transformer_blocks.{i}", "transformer", count_params(block), i > 0, "" if i > 0 else reason)
            for i, block in enumerate(self.model.transformer_blocks)
        ]

    def layer_returns_tuple(self, name: str) -> bool:
        return False

    def output_modules(self) -> list[nn.Module]:
        return [self.model.proj_out_2]

    def chunked_outputs(self) -> dict[nn.Module, int]:
        # torch-pruning roots the residual-stream group at proj_out_1, whose output is (shift, scale) for norm_out.
        return {self.model.proj_out_1: 2}

    def channel_buffers(self) -> dict[str, str]:
        # The sin/cos position table is added to the patch embedding: it has the residual stream's width.
        return {"pos_embed.pos_embed": "pos_embed.proj"}
