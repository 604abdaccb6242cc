"""What a denoiser costs: parameters and multiply-accumulates per call.

MACs are counted with `torch.utils.flop_counter` (MACs = FLOPs / 2) on the meta device: no arithmetic runs, the
weights are never touched, and scaled-dot-product attention decomposes into batched matmuls that the counter
sees (PyTorch's fused CPU attention kernel has no FLOP formula, so counting on real CPU tensors would miss it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from torch.utils.flop_counter import FlopCounterMode

from slimdiff.models import adapter_for

#: aten ops that make up attention's QK^T and AV products (and fused kernels, should one be dispatched).
ATTENTION_OPS = {
    "aten.bmm",
    "aten.baddbmm",
    "aten._scaled_dot_product_efficient_attention",
    "aten._scaled_dot_product_flash_attention",
    "aten._scaled_dot_product_cudnn_attention",
}


@dataclass(frozen=True)
class MacCount:
    """MACs of one denoiser call. `attention` is the part spent in attention matmuls (QK^T, AV)."""

    total: int
    attention: int

    @property
    def without_attention(self) -> int:
        """Conv + linear MACs only — the convention most papers report."""
        return self.total - self.attention


def count_params(model: nn.Module) -> int:
    """Number of parameters (shared tensors counted once)."""
    return sum(p.numel() for p in model.parameters())


def _to_meta(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return torch.empty_like(value, device="meta")
    return value


def count_macs(model: nn.Module, inputs: dict[str, Any] | None = None, *, batch_size: int = 1) -> MacCount:
    """MACs of `model(**inputs)` (default: the adapter's example inputs at batch `batch_size`), on the meta device."""
    if inputs is None:
        inputs = adapter_for(model).example_inputs(batch_size, device="meta")
    tensors = {name: _to_meta(t) for name, t in [*model.named_parameters(), *model.named_buffers()]}
    meta_inputs = {key: _to_meta(value) for key, value in inputs.items()}
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        functional_call(model, tensors, args=(), kwargs=meta_inputs, strict=False)
    per_op = {str(op): flops for op, flops in counter.get_flop_counts()["Global"].items()}
    total = sum(per_op.values())
    attention = sum(flops for op, flops in per_op.items() if op in ATTENTION_OPS)
    return MacCount(total=total // 2, attention=attention // 2)
