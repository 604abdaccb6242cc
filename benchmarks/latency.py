"""Wall-clock latency of several models measured interleaved, so that every model sees the same machine load.

    python benchmarks/latency.py runs/demo/teacher runs/bench-diff-pruning/*-seed0/finetuned \
        --threads 1 2 --batch-sizes 1 64 --out benchmarks/results/latency.json

For each thread count and batch size: `--rounds` rounds; in each round every model is timed for `--repeats` calls
(after warm-up), in turn. Reported: the median over all timed calls, p10/p90, MACs, and the speed-up over the first
model next to its MACs ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from slimdiff.export import load
from slimdiff.io import atomic_write_json
from slimdiff.metrics.cost import count_macs
from slimdiff.models import adapter_for


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", type=Path, nargs="+", help="the first one is the baseline")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/latency.json"))
    args = parser.parse_args()
    models = {str(path): load(path) for path in args.models}
    macs = {name: count_macs(model).total for name, model in models.items()}
    baseline = str(args.models[0])
    results = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for batch in args.batch_sizes:
            inputs = {name: adapter_for(m).example_inputs(batch) for name, m in models.items()}
            times: dict[str, list[float]] = {name: [] for name in models}
            with torch.inference_mode():
                for name, model in models.items():  # warm-up
                    for _ in range(3):
                        model(**inputs[name])
                for _ in range(args.rounds):
                    for name, model in models.items():
                        for _ in range(args.repeats):
                            start = time.perf_counter()
                            model(**inputs[name])
                            times[name].append((time.perf_counter() - start) * 1000)
            base = statistics.median(times[baseline])
            for name, values in times.items():
                values.sort()
                median = statistics.median(values)
                results.append(
                    {
                        "model": name,
                        "threads": threads,
                        "batch_size": batch,
                        "median_ms": round(median, 2),
                        "p10_ms": round(values[len(values) // 10], 2),
                        "p90_ms": round(values[(9 * len(values)) // 10], 2),
                        "macs": macs[name],
                        "macs_ratio": round(macs[baseline] / macs[name], 3),
                        "speedup": round(base / median, 3),
                    }
                )
                print(json.dumps(results[-1]), flush=True)
    atomic_write_json(args.out, {"what": "one denoiser call, interleaved rounds, CPU", "rows": results})


if __name__ == "__main__":
    main()
