"""Inspect a model directory without reading its weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from slimdiff.export import load_architecture, read_artifact, read_provenance, read_spec
from slimdiff.metrics.cost import count_macs, count_params, macs_by_module
from slimdiff.models import adapter_for


def model_info(model_dir: str | Path) -> dict[str, Any]:
    """Family, size and structure of a model directory, without reading its weights."""
    model = load_architecture(model_dir)
    adapter = adapter_for(model)
    provenance = read_provenance(model_dir)
    macs = count_macs(model)
    blocks = adapter.blocks()
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
    if "skip_table" in (read_spec(model_dir) or {}).get("artifacts", []):
        from slimdiff.engines.skip import SkipTable, sampling_summary

        report |= sampling_summary(model, SkipTable.from_json(read_artifact(model_dir, "skip_table")))
    return report
