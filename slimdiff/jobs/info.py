"""Inspect a model directory without loading its weights (they are streamed once, to refuse NaN or Inf)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from slimdiff.artifacts import full_compute, sampling_plan
from slimdiff.export import check_finite, load_architecture, read_provenance
from slimdiff.metrics.cost import count_macs, macs_by_module, sampling_macs
from slimdiff.models import adapter_for
from slimdiff.models.base import count_params


def model_info(model_dir: str | Path) -> dict[str, Any]:
    """Family, size and structure of a model directory, without loading its weights; with the sampling MACs and
    sampler of the sampling plan its artifacts declare, if any. Weights holding NaN or Inf are refused, as by every
    command (`export.check_finite` streams them one tensor at a time)."""
    model = load_architecture(model_dir)
    check_finite(model_dir)
    adapter = adapter_for(model)
    provenance = read_provenance(model_dir)
    blocks = adapter.blocks()
    with full_compute(model):
        macs = count_macs(model)
        block_macs = macs_by_module(model, [block.name for block in blocks])
    report = {
        "path": str(model_dir),
        "family": adapter.family,
        "class": type(model).__name__,
        "sample_size": adapter.sample_size,
        "in_channels": adapter.in_channels,
        "conditioning": adapter.cond_kind,
        "params": count_params(model),
        "macs": macs.total,
        "macs_no_attn": macs.without_attention,
        "macs_counts": "per denoiser call, batch 1, at sample_size"
        + (f", {adapter.text_tokens} text tokens" if adapter.cond_kind == "text" else ""),
        "blocks": [
            {"name": b.name, "kind": b.kind, "inputs": list(b.inputs), "macs": block_macs[b.name]} for b in blocks
        ],
        "layers": [
            {"name": layer.name, "kind": layer.kind, "params": layer.params, "removable": layer.removable}
            | ({"reason": layer.reason} if layer.reason else {})
            for layer in adapter.layers()
        ],
        "chain": [provenance.source or "?", *provenance.chain()],
        "provenance": vars(provenance),
    }
    plan = sampling_plan(model)
    if plan is not None:
        run = sampling_macs(macs, plan.steps, guidance=False, computed_fraction_per_step=plan.computed)
        report |= {
            "sampling_macs": run.total,
            "sampling_macs_full": macs.total * plan.steps,
            "sampling_macs_fraction": sum(plan.computed) / plan.steps,
            "sampler": plan.sampler(),
            **plan.details,
            "sampling_macs_counts": "one image, one denoiser call per step (×2 with classifier-free guidance)",
        }
    return report
