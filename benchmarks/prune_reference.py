"""Prune the real CIFAR-10 DDPM, SD-1.5 U-Net and DiT-XL/2 architectures (random weights, no fine-tuning).

    python benchmarks/prune_reference.py --out benchmarks/results/prune_reference.json

Records params and MACs (incl. attention matmuls, batch 1) before and after, and how long the pruning step took.
CIFAR-10 goes through the full budget search to 50 % MACs; SD-1.5 (860 M params) and DiT-XL/2 (675 M) are pruned
once at a uniform ratio of 0.3 — each search trial copies the whole model, which the 24 GiB of a 2-core CPU
machine cannot afford many times over in reasonable time.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from slimdiff.data import load_data
from slimdiff.diffusion import DEFAULT_SCHEDULE
from slimdiff.engines import Calibration
from slimdiff.engines.channels import ChannelPruningConfig, compress, prune_copy, verify_slices
from slimdiff.io import atomic_write_json, read_json
from slimdiff.metrics.cost import count_macs, count_params
from slimdiff.models import adapter_for, build

REFERENCE = Path(__file__).resolve().parents[1] / "reference"
#: Models pruned once at a uniform ratio (too big for the budget search on this machine) → their reference config.
UNIFORM = {"sd-1.5-unet": "sd-1.5.unet.json", "dit-xl-2-256": "dit-xl-2-256.transformer.json"}


def cifar_row(reference: Path) -> dict:
    """The CIFAR-10 DDPM through the full budget search to 50 % MACs."""
    cifar = build(read_json(reference / "ddpm-cifar10-32.unet.json")).eval()
    before = {"params": count_params(cifar), "macs": count_macs(cifar).total}
    data = load_data("digits", size=32, channels=3)
    start = time.perf_counter()
    config = ChannelPruningConfig(importance="magnitude", target_macs=0.5)
    result = compress(adapter_for(cifar), config, Calibration(data, lambda labels: None, DEFAULT_SCHEDULE))
    return {
        "model": "ddpm-cifar10-32",
        "importance": "magnitude",
        "target_macs": 0.5,
        "before": before,
        "after": result.pruned,
        "achieved": result.achieved,
        "ratio": result.ratio,
        "seconds": round(time.perf_counter() - start, 1),
    }


def uniform_row(name: str, reference: Path, ratio: float = 0.3) -> dict:
    """One big model pruned once at a uniform ratio."""
    model = build(read_json(reference / UNIFORM[name])).eval()
    before = {"params": count_params(model), "macs": count_macs(model).total}
    start = time.perf_counter()
    pruned = prune_copy(model, ratio, "magnitude")
    seconds = time.perf_counter() - start
    verify_slices(model, pruned)
    return {
        "model": name,
        "importance": "magnitude",
        "ratio": ratio,
        "before": before,
        "after": {"params": pruned.params, "macs": pruned.macs},
        "achieved": {"params": pruned.params / before["params"], "macs": pruned.macs / before["macs"]},
        "seconds": round(seconds, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", type=Path, default=REFERENCE)
    parser.add_argument(
        "--models", nargs="+", default=["ddpm-cifar10-32", *UNIFORM], choices=["ddpm-cifar10-32", *UNIFORM]
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/prune_reference.json"))
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    for name in args.models:
        rows.append(cifar_row(args.reference) if name == "ddpm-cifar10-32" else uniform_row(name, args.reference))
        print(json.dumps(rows[-1]), flush=True)
    atomic_write_json(args.out, {"what": "random-weight reference architectures, pruning step only", "rows": rows})


if __name__ == "__main__":
    main()
