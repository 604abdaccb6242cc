"""Re-derive the sizes diffusers modules cache in plain attributes, after their weights were resized.

Channel pruning (torch-pruning) resizes Conv/Linear/Norm weights and their own size fields, but not the fields
diffusers keeps on its composite modules: `Attention.heads`/`scale`/`inner_dim`, `Upsample2D.channels`,
`ResnetBlock2D.in_channels`, `Transformer2DModel.in_channels`, … Left stale, a model either fails an assert or —
worse — silently computes with a wrong attention scale. This module is the single place that fixes them.
"""

from __future__ import annotations

from collections.abc import Mapping

from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.attention_processor import Attention
from diffusers.models.downsampling import Downsample2D
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.transformers.dit_transformer_2d import DiTTransformer2DModel
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from diffusers.models.upsampling import Upsample2D
from torch import nn

from slimdiff.errors import SlimdiffError


def fix_attention(attn: Attention, heads: int | None = None) -> None:
    """Update an `Attention` after its projections changed width.

    `heads` is the new head count when whole heads were pruned; by default the head count is kept and the head
    dimension shrinks.
    """
    heads = heads or attn.heads
    inner_dim = attn.to_q.out_features
    if inner_dim % heads:
        raise SlimdiffError(f"attention width {inner_dim} is not divisible by its {heads} heads")
    attn.query_dim = attn.to_q.in_features
    attn.inner_dim = inner_dim
    if attn.to_k is not None:
        attn.inner_kv_dim = attn.to_k.out_features
        attn.cross_attention_dim = attn.to_k.in_features
    if attn.to_out is not None:
        attn.out_dim = attn.to_out[0].out_features
    attn.heads = heads
    attn.sliceable_head_dim = heads
    attn.scale = (inner_dim // heads) ** -0.5 if attn.scale_qk else 1.0


def _check_group_norm(name: str, norm: nn.GroupNorm) -> None:
    channels = norm.weight.shape[0] if norm.affine else norm.num_channels
    norm.num_channels = channels
    if channels % norm.num_groups:
        raise SlimdiffError(
            f"GroupNorm '{name}' has {channels} channels, not divisible by its {norm.num_groups} groups; "
            "prune in multiples of the group size"
        )


def fix_after_surgery(model: nn.Module, heads: Mapping[nn.Module, int] | None = None) -> None:
    """Fix every cached size in `model` from its current weights. `heads` maps Attention modules to new counts."""
    heads = heads or {}
    for name, module in model.named_modules():
        if isinstance(module, Attention):
            fix_attention(module, heads.get(module))
        elif isinstance(module, nn.GroupNorm):
            _check_group_norm(name, module)
        elif isinstance(module, ResnetBlock2D):
            module.in_channels = module.conv1.in_channels
            module.out_channels = module.conv2.out_channels
            for sampler in (module.upsample, module.downsample):
                if sampler is not None and getattr(sampler, "conv", None) is None:
                    sampler.channels = sampler.out_channels = module.in_channels
        elif isinstance(module, (Upsample2D, Downsample2D)) and getattr(module, "conv", None) is not None:
            conv = module.conv
            module.channels, module.out_channels = conv.in_channels, conv.out_channels
        elif isinstance(module, BasicTransformerBlock):
            module.dim = module.attn1.to_q.in_features
        elif isinstance(module, DiTTransformer2DModel):
            module.inner_dim = module.pos_embed.proj.out_channels
        elif isinstance(module, Transformer2DModel):
            proj_in = module.proj_in
            module.in_channels = proj_in.in_channels if isinstance(proj_in, nn.Conv2d) else proj_in.in_features
            module.inner_dim = proj_in.out_channels if isinstance(proj_in, nn.Conv2d) else proj_in.out_features
            proj_out = module.proj_out
            module.out_channels = proj_out.out_channels if isinstance(proj_out, nn.Conv2d) else proj_out.out_features
