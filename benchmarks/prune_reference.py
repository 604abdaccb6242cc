"""Prune the real CIFAR-10 DDPM, SD-1.5 U-Net and DiT-XL/2 architectures to 50 % MACs (random weights, no fine-tuning).

    OMP_NUM_THREADS=1 python benchmarks/prune_reference.py --out benchmarks/results/prune_reference.json
    python benchmarks/prune_reference.py --models sd-1.5-unet --importance diff-pruning --calibration 4 \
        --batch-size 1 --stride 500

Every model goes through the channels engine's full budget search (`compress`, target 50 % of the MACs incl.
attention matmuls, tolerance 2 %): the trials prune weightless (meta-device) copies, the real model is pruned once.
`magnitude` importance (the default here) reads no data and times the search and the surgery. `diff-pruning` and
`taylor` add the gradient sweep: the calibration batch is seeded random inputs of the model's own shape (latents
for SD-1.5 and DiT-XL/2, random 77-token text embeddings for SD-1.5, random class labels for DiT-XL/2; the weights
are random, so real images would tell it nothing more) under the model's own training noise schedule, and
`--batch-size` sets the images per forward/backward pass. Records params and MACs before and after, the timesteps
scored, the wall and CPU time of the pruning step and the process's peak memory. Rows are merged into `--out` by
(model, importance), so one row can be re-measured alone.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch

from slimdiff.data import ImageDataset
from slimdiff.engines import Calibration
from slimdiff.engines.channels import ChannelPruningConfig, compress
from slimdiff.io import atomic_write_json, read_json
from slimdiff.metrics.cost import count_macs
from slimdiff.models import Adapter, adapter_for, build
from slimdiff.models.base import count_params
from slimdiff.training.diffusion import DEFAULT_SCHEDULE

REFERENCE = Path(__file__).resolve().parents[1] / "reference"
#: Benchmark name → reference config and the model's training noise schedule (its scheduler config).
MODELS = {
    "ddpm-cifar10-32": ("ddpm-cifar10-32.unet.json", DEFAULT_SCHEDULE),
    "sd-1.5-unet": (
        "sd-1.5.unet.json",
        {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"},
    ),
    "dit-xl-2-256": ("dit-xl-2-256.transformer.json", DEFAULT_SCHEDULE),
}
#: The channels engine's settings this benchmark sets (argparse destinations named as the config's fields).
SETTINGS = ("importance", "target_macs", "calibration_size", "batch_size", "timestep_stride")
#: Tokens of a text model's random prompt embeddings (CLIP's context length).
TOKENS = 77


def random_calibration(adapter: Adapter, size: int, schedule: dict) -> Calibration:
    """`size` seeded random inputs of the model's own shape, and conditions to match (the weights are random)."""
    generator = torch.Generator().manual_seed(0)
    shape = (size, adapter.in_channels, adapter.sample_size, adapter.sample_size)
    dataset = ImageDataset(
        source="random",
        classes=[],
        size=shape[-1],
        channels=shape[1],
        labels=list(range(size)),
        images=torch.randn(shape, generator=generator),
    )
    if adapter.cond_kind == "text":
        prompts = torch.randn(size, TOKENS, adapter.cross_attention_dim, generator=generator)
        return Calibration(dataset, lambda labels: prompts[labels], schedule)
    if adapter.cond_kind == "class":
        classes = torch.randint(0, adapter.num_classes, (size,), generator=generator)
        return Calibration(dataset, lambda labels: classes[labels], schedule)
    return Calibration(dataset, lambda labels: None, schedule)


def prune_row(name: str, reference: Path, config: ChannelPruningConfig) -> dict:
    """One reference architecture (random weights) through the budget search to `config`'s target."""
    file, schedule = MODELS[name]
    model = build(read_json(reference / file)).eval()
    before = {"params": count_params(model), "macs": count_macs(model).total}
    adapter = adapter_for(model)
    data = random_calibration(adapter, config.calibration_size, schedule)
    start, cpu_start = time.perf_counter(), time.process_time()
    result = compress(adapter, config, data, log=lambda line: print(f"  {name}: {line}", flush=True))
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    row = {
        "model": name,
        "importance": config.importance,
        "target_macs": config.target_macs,
        "before": before,
        "after": result.pruned,
        "achieved": result.achieved,
        "within_tolerance": abs(result.achieved["macs"] - config.target_macs) <= config.tolerance * config.target_macs,
        "ratio": result.ratio,
        "seconds": round(seconds, 1),
        "cpu_seconds": round(cpu_seconds, 1),  # on a shared machine the wall time includes other jobs' turns
        "threads": torch.get_num_threads(),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 1),
    }
    if config.importance in ("diff-pruning", "taylor"):
        row |= {
            "timesteps_scored": result.scored_timesteps,
            "calibration_size": config.calibration_size,
            "batch_size": config.batch_size,
            "input_shape": list(data.dataset[0][0].shape),
        }
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", type=Path, default=REFERENCE)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--target-macs", type=float, default=0.5)
    parser.add_argument("--importance", default="magnitude", choices=["diff-pruning", "taylor", "magnitude"])
    parser.add_argument("--calibration", dest="calibration_size", type=int, default=4, help="Calibration inputs.")
    parser.add_argument("--batch-size", type=int, default=1, help="Inputs per forward/backward pass.")
    parser.add_argument("--stride", dest="timestep_stride", type=int, default=500, help="Diff-Pruning's t stride.")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/prune_reference.json"))
    args = parser.parse_args()
    torch.manual_seed(0)
    config = ChannelPruningConfig(**{name: getattr(args, name) for name in SETTINGS})
    rows = read_json(args.out)["rows"] if args.out.is_file() else []
    for name in args.models:
        row = prune_row(name, args.reference, config)
        print(json.dumps(row), flush=True)
        rows = [r for r in rows if (r["model"], r["importance"]) != (name, args.importance)] + [row]
        atomic_write_json(
            args.out, {"what": "random-weight reference architectures through the budget search", "rows": rows}
        )


if __name__ == "__main__":
    main()
