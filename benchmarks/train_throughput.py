"""Training throughput of the tiny teachers on this machine: optimizer steps per second at batch 64.

python benchmarks/train_throughput.py --out benchmarks/results/train_throughput.json
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from pathlib import Path

import torch

from slimdiff.jobs.training import train_model
from slimdiff.models import build_tiny
from slimdiff.settings import TrainConfig


def measure(name: str, steps: int, batch_size: int) -> dict[str, float | int | str]:
    """Time `steps` steps after 3 warm-up steps (fresh model, digits 16², no checkpoint in the timed window)."""
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as out:
        warm = TrainConfig(steps=3, batch_size=batch_size, checkpoint_every=10_000)
        train_model(build_tiny(name), "digits", Path(out) / "warm", warm, source=name, progress=False)
        config = TrainConfig(steps=steps, batch_size=batch_size, checkpoint_every=10_000)
        result = train_model(build_tiny(name), "digits", Path(out) / "timed", config, source=name, progress=False)
        seconds = result.seconds
    return {
        "model": name,
        "batch_size": batch_size,
        "steps": steps,
        "seconds": round(seconds, 2),
        "steps_per_s": round(steps / seconds, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/train_throughput.json"))
    args = parser.parse_args()
    rows = [measure(name, args.steps, args.batch_size) for name in ("tiny-unet", "tiny-sd", "tiny-dit")]
    result = {
        "what": "optimizer steps/s of `slimdiff train` (one checkpoint at the end included), digits 16²",
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
