"""Prune the real CIFAR-10 DDPM, SD-1.5 U-Net and DiT-XL/2 architectures to 50 % MACs (random weights, no fine-tuning).

    OMP_NUM_THREADS=1 python benchmarks/prune_reference.py --out benchmarks/results/prune_reference.json

Every model goes through the channels engine's full budget search (`compress`, target 50 % of the MACs incl.
attention matmuls, tolerance 2 %): the trials prune weightless (meta-device) copies, the real model is pruned once.
Importance is `magnitude` (L1 of the weights): the weights are random, and Diff-Pruning's Taylor sweep on SD-1.5
(dozens of backward passes through 860 M parameters) would dominate the wall time on a CPU without changing what
this measures — the search and the surgery. Records params and MACs before and after, the wall time and the CPU
time of the pruning step (with one thread, the CPU time is what an otherwise idle machine would take).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from slimdiff.data import load_data
from slimdiff.engines import Calibration
from slimdiff.engines.channels import ChannelPruningConfig, compress
from slimdiff.io import atomic_write_json, read_json
from slimdiff.metrics.cost import count_macs
from slimdiff.models import adapter_for, build
from slimdiff.models.base import count_params
from slimdiff.training.diffusion import DEFAULT_SCHEDULE

REFERENCE = Path(__file__).resolve().parents[1] / "reference"
#: Benchmark name → reference config.
MODELS = {
    "ddpm-cifar10-32": "ddpm-cifar10-32.unet.json",
    "sd-1.5-unet": "sd-1.5.unet.json",
    "dit-xl-2-256": "dit-xl-2-256.transformer.json",
}


def prune_row(name: str, reference: Path, target: float) -> dict:
    """One reference architecture (random weights) through the budget search to `target` of its MACs."""
    model = build(read_json(reference / MODELS[name])).eval()
    before = {"params": count_params(model), "macs": count_macs(model).total}
    adapter = adapter_for(model)
    # magnitude importance reads no data; the engine's contract still hands it a calibration set
    data = Calibration(load_data("digits", size=16), lambda labels: None, DEFAULT_SCHEDULE)
    config = ChannelPruningConfig(importance="magnitude", target_macs=target)
    start, cpu_start = time.perf_counter(), time.process_time()
    result = compress(adapter, config, data, log=lambda line: print(f"  {name}: {line}", flush=True))
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    return {
        "model": name,
        "importance": "magnitude",
        "target_macs": target,
        "before": before,
        "after": result.pruned,
        "achieved": result.achieved,
        "within_tolerance": abs(result.achieved["macs"] - target) <= config.tolerance * target,
        "ratio": result.ratio,
        "seconds": round(seconds, 1),
        "cpu_seconds": round(cpu_seconds, 1),  # on a shared machine the wall time includes other jobs' turns
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", type=Path, default=REFERENCE)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--target-macs", type=float, default=0.5)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/prune_reference.json"))
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    for name in args.models:
        rows.append(prune_row(name, args.reference, args.target_macs))
        print(json.dumps(rows[-1]), flush=True)
        atomic_write_json(
            args.out,
            {
                "what": "random-weight reference architectures through the budget search (weightless trials)",
                "threads": torch.get_num_threads(),
                "rows": rows,
            },
        )


if __name__ == "__main__":
    main()
