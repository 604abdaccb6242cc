"""`torch.compile` of a teacher and of the teacher with a skip table attached: graph breaks and wall time.

    slimdiff compress skip TEACHER --data digits --out TABLE --steps 12 --scheduler ddim --target-macs 0.5 \
        --method step-reuse --granularity block
    OMP_NUM_THREADS=2 python benchmarks/compile_skip.py --teacher TEACHER --table TABLE --steps 12 --batch 64 \
        --out benchmarks/results/compile_skip_dit.json

For each model (the bare teacher, the teacher with TABLE's skip table compiled whole, and the same with only the
table's units compiled — `slimdiff.compile_units`, the hooks eager): one whole DDIM sampling run of `--steps` steps
at batch `--batch` (classifier-free guidance `--guidance-scale`: one doubled-batch call per step), eager and
under `torch.compile` (default backend: inductor; on CPU it needs a C compiler). Graph breaks and graphs compiled are
dynamo's counters over the first compiled runs (the warm-up, which compiles, and the timed ones) and over one
run after them (a frame past dynamo's recompile limit runs eager and counts nothing there). Wall: median of
`--repeats` runs after one warm-up.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
import torch._dynamo
from torch._dynamo.utils import counters

from slimdiff.engines.skip import compile_units
from slimdiff.export import load, load_scheduler_config
from slimdiff.io import atomic_write_json
from slimdiff.metrics.cost import sampling_latency
from slimdiff.models import adapter_for


def measure(model: torch.nn.Module, args: argparse.Namespace, *, regional: bool = False) -> dict[str, Any]:
    """Eager and compiled wall time of one sampling run, and the compiled run's graph breaks: the whole model
    compiled, or (`regional`) only the skip table's units, its hooks eager (`slimdiff.compile_units`)."""
    adapter = adapter_for(model)
    cond = torch.zeros(args.batch, dtype=torch.long) if adapter.cond_kind == "class" else None

    def wall(compiled_adapter: Any, warmup: int = 1, repeats: int = args.repeats) -> float:
        stats = sampling_latency(
            compiled_adapter,
            steps=args.steps,
            batch_size=args.batch,
            schedule=load_scheduler_config(args.teacher),
            cond=cond,
            guidance_scale=args.guidance_scale,
            warmup=warmup,
            repeats=repeats,
        )
        return stats.median_ms / 1000

    row: dict[str, Any] = {"eager_seconds": wall(adapter)}
    torch._dynamo.reset()
    counters.clear()
    if regional:
        compile_units(model)
        compiled = adapter_for(model)
    else:
        compiled = adapter_for(model, torch.compile(model))
    start = time.perf_counter()
    try:
        row["compiled_seconds"] = wall(compiled)
    except Exception as error:  # noqa: BLE001 — the benchmark records why compiling failed here
        row["compile_error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
        return row
    row["compile_and_time_seconds"] = round(time.perf_counter() - start, 1)
    row["first_runs"] = {  # the warm-up run (which compiles) and the timed runs
        "graph_breaks": sum(counters["graph_break"].values()),
        "graph_break_reasons": sorted(counters["graph_break"])[:5],
        "graphs_compiled": counters["stats"].get("unique_graphs", 0),
    }
    counters.clear()
    with torch.inference_mode():
        wall(compiled, warmup=0, repeats=1)
    row["graph_breaks_per_run"] = sum(counters["graph_break"].values())
    row["graph_break_reasons"] = sorted(counters["graph_break"])[:10]
    row["recompiles_per_run"] = counters["stats"].get("unique_graphs", 0)
    torch._dynamo.reset()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", type=Path, required=True)
    parser.add_argument("--table", type=Path, required=True, help="a model directory with a skip table")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--guidance-scale", type=float, default=3.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/compile_skip.json"))
    args = parser.parse_args()
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    results |= {"torch": torch.__version__, "threads": torch.get_num_threads(), "steps": args.steps}
    results["batch"] = args.batch
    rows = (
        ("teacher", args.teacher, False),
        ("step-reuse table", args.table, False),
        ("step-reuse table, units compiled", args.table, True),
    )
    for name, path, regional in rows:
        if name in results:
            continue  # a rerun measures what is missing
        results[name] = measure(load(path, artifacts=name != "teacher").eval(), args, regional=regional)
        print(name, results[name], flush=True)
        atomic_write_json(args.out, results)


if __name__ == "__main__":
    main()
