"""The memory arithmetic of a fine-tune with a teacher for the SD-1.5 and SDXL U-Nets (docs/gpu.md).

Counted, not measured: every model is built on the meta device (no weights, no compute), parameters are counted
with `slimdiff.models.base.count_params`, and activations are the bytes autograd saves for the backward pass of
one training forward (`torch.autograd.graph.saved_tensors_hooks`; each tensor counted once, parameters not
counted), at bf16 — without gradient checkpointing, and with diffusers' own checkpointing, where the saved bytes are
what lives outside the checkpointed regions plus their inputs plus the largest region recomputed in the backward.
Attention is counted as a fused (flash / memory-efficient) kernel saves it — q, k, v, the output and the fp32
log-sum-exp — as a GPU runs it in bf16; `--math-attention` counts the unfused path instead, which also keeps the
L×L attention probabilities (what the meta device, and a CPU, would save).

    PYTHONPATH=. python benchmarks/gpu_memory.py [--math-attention] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from slimdiff.models import build
from slimdiff.models.base import count_params

REFERENCE = Path(__file__).resolve().parents[1] / "reference"
#: The frozen encoders beside each U-Net (their published configs).
CLIP_L = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
CLIP_BIGG = CLIPTextConfig(
    hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20, projection_dim=1280
)
VAE = {"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "latent_channels": 4}
VAE_BLOCKS = {"down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4}

GIB = 2**30


class FusedAttention(torch.autograd.Function):
    """Stands in for `scaled_dot_product_attention` when counting: saves what a fused GPU kernel saves."""

    @staticmethod
    def forward(ctx: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        out = query.new_empty(*query.shape[:-1], value.shape[-1])
        ctx.save_for_backward(query, key, value, out, query.new_empty(query.shape[:-1], dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:
        query, key, value, _, _ = ctx.saved_tensors
        return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)


def _fused_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
    return FusedAttention.apply(query, key, value)


class SavedBytes:
    """Bytes of the distinct non-parameter tensors autograd saves for backward while it is the innermost hook."""

    def __init__(self, parameters: set[int]) -> None:
        self.parameters, self.seen, self.bytes = parameters, set[int](), 0

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        base = tensor if tensor._base is None else tensor._base
        if id(base) not in self.parameters and id(base) not in self.seen:
            self.seen.add(id(base))
            self.bytes += base.numel() * base.element_size()
        return tensor

    def __enter__(self) -> SavedBytes:
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda tensor: tensor)
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.hooks.__exit__(*exc)


def _inputs(config: dict[str, Any], batch: int, dtype: torch.dtype) -> dict[str, Any]:
    """One training batch at the U-Net's native latent size and 77 text tokens (SDXL: its pooled text and time ids)."""
    size = config["sample_size"]
    inputs: dict[str, Any] = {
        "sample": torch.empty(batch, config["in_channels"], size, size, device="meta", dtype=dtype),
        "timestep": torch.zeros(batch, dtype=torch.long, device="meta"),
        "encoder_hidden_states": torch.empty(batch, 77, config["cross_attention_dim"], device="meta", dtype=dtype),
    }
    if config.get("addition_embed_type") == "text_time":
        inputs["added_cond_kwargs"] = {
            "text_embeds": torch.empty(batch, 1280, device="meta", dtype=dtype),
            "time_ids": torch.empty(batch, 6, device="meta", dtype=dtype),
        }
    return inputs


def activation_bytes(model: nn.Module, inputs: dict[str, Any], *, checkpointing: bool, math_attention: bool) -> int:
    """Bytes saved for backward by one forward of `model` (meta device) — with checkpointing, at its peak."""
    parameters = {id(p) for p in model.parameters()}
    regions = {"inputs": 0, "largest": 0}

    def checkpoint(module: nn.Module, *args: Any) -> Any:
        with SavedBytes(parameters) as inside:  # what the backward recomputes for this region
            module(*args)
        regions["largest"] = max(regions["largest"], inside.bytes)
        regions["inputs"] += sum(a.numel() * a.element_size() for a in args if isinstance(a, torch.Tensor))
        return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False)

    if checkpointing:
        model.enable_gradient_checkpointing(gradient_checkpointing_func=checkpoint)
    model.train()
    sdpa = torch.nn.functional.scaled_dot_product_attention
    if not math_attention:
        torch.nn.functional.scaled_dot_product_attention = _fused_sdpa
    try:
        with SavedBytes(parameters) as outside:
            model(**inputs)
    finally:
        torch.nn.functional.scaled_dot_product_attention = sdpa
    if checkpointing:
        model.disable_gradient_checkpointing()
        return outside.bytes + regions["inputs"] + regions["largest"]
    return outside.bytes


def _frozen_params(text_configs: list[CLIPTextConfig]) -> dict[str, int]:
    with torch.device("meta"):
        vae = AutoencoderKL(**VAE, **VAE_BLOCKS)
        encoders = [
            (CLIPTextModelWithProjection if c.projection_dim == 1280 else CLIPTextModel)(c) for c in text_configs
        ]
    return {"vae": count_params(vae), "text_encoders": sum(count_params(e) for e in encoders)}


def arithmetic(
    name: str, config: dict[str, Any], text_configs: list[CLIPTextConfig], batches: list[int], math_attention: bool
) -> dict:
    """Params of the U-Net and its frozen encoders, and activations (with / without checkpointing) at each batch."""
    model = build(config, empty=True).to("meta", torch.bfloat16)
    params = count_params(model)
    rows = []
    for batch in batches:
        inputs = _inputs(config, batch, torch.bfloat16)
        plain, checkpointed = (
            activation_bytes(model, inputs, checkpointing=flag, math_attention=math_attention) / GIB
            for flag in (False, True)
        )
        rows.append({"batch": batch, "activations_gib": plain, "activations_checkpointed_gib": checkpointed})
    return {"model": name, "unet_params": params, **_frozen_params(text_configs), "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="Write the numbers here too.")
    parser.add_argument("--math-attention", action="store_true", help="Count unfused attention (L×L saved).")
    args = parser.parse_args()
    sd15, sdxl = (
        json.loads((REFERENCE / name).read_text()) for name in ("sd-1.5.unet.json", "sdxl-base-1.0.unet.json")
    )
    batches = [1, 8, 32]
    results = [
        arithmetic("SD-1.5 (64² latents, 512² images)", sd15, [CLIP_L], batches, args.math_attention),
        arithmetic("SDXL (128² latents, 1024² images)", sdxl, [CLIP_L, CLIP_BIGG], batches, args.math_attention),
    ]
    for result in results:
        print(
            f"{result['model']}: U-Net {result['unet_params']:,} params, VAE {result['vae']:,}, "
            f"text encoders {result['text_encoders']:,}"
        )
        for row in result["rows"]:
            print(
                f"  batch {row['batch']:>2}: activations {row['activations_gib']:7.2f} GiB, "
                f"with checkpointing {row['activations_checkpointed_gib']:6.2f} GiB"
            )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
