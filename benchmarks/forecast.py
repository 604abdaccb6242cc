"""Forecasting skipped units (Taylor order 1, 2) vs reusing them (order 0) vs fewer steps, at equal sampling MACs.

    OMP_NUM_THREADS=2 python benchmarks/forecast.py --teacher runs/demo/teacher --steps 20 --n 500 \
        --out benchmarks/results/forecast_tiny_unet.json

For each fraction in `--fractions` of the sampling MACs of DDIM-`--steps`: DDIM and DPM-Solver++ with
round(fraction × steps) steps, and the uniform step-reuse (block) and DeepCache (layer; U-Nets only) tables made by
`slimdiff.apply_skip` at that fraction with each forecast order in `--orders` — FID/KID (and class agreement) of
`--n` samples from seed 0 (`benchmarks/skipping.py`'s noises, features and reference). Rows are appended as they
finish; a rerun skips them.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

from skipping import Bench

import slimdiff
from slimdiff.engines import skip
from slimdiff.errors import SlimdiffError

TABLES = (("step-reuse", "block"), ("deepcache", "layer"))


def table_rows(bench: Bench, steps: int, fraction: float, orders: list[int]) -> None:
    for method, granularity in TABLES:
        if method == "deepcache" and bench.adapter.family == "dit":
            continue
        for order in orders:
            key = f"ddim{steps}-{method}-{granularity}-order{order}-{fraction}"
            if bench.done(key):
                continue
            model = copy.deepcopy(bench.teacher)
            config = bench.skip_config(
                method=method, granularity=granularity, steps=steps, target_macs=fraction, forecast_order=order
            )
            row = {"key": key, "kind": "table", "ref_steps": steps, "fraction": fraction, "method": method}
            row |= {"granularity": granularity, "forecast_order": order}
            try:
                table = slimdiff.apply_skip(model, config, bench.schedule)
            except SlimdiffError as error:
                bench.add(row | {"infeasible": str(error)})
                continue
            start = time.perf_counter()
            row |= bench.quality(model, "ddim", steps)
            kept = skip.kept_fraction(table, skip.unit_costs(model, table.units))
            bench.add(row | {"kept_sampling_macs": kept, "eval_seconds": round(time.perf_counter() - start, 1)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/forecast.json"))
    parser.add_argument("--steps", type=int, default=20, help="the reference DDIM step count")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.5, 0.25])
    parser.add_argument("--orders", type=int, nargs="+", default=list(skip.FORECAST_ORDERS))
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--guidance-scale", type=float, default=3.0)
    parser.set_defaults(wall_repeats=1)
    args = parser.parse_args()
    bench = Bench(args)
    bench.sampler_row("ddim", args.steps)
    for fraction in args.fractions:
        fewer = max(1, round(fraction * args.steps))
        bench.sampler_row("ddim", fewer)
        bench.sampler_row("dpm", fewer)
        table_rows(bench, args.steps, fraction, args.orders)


if __name__ == "__main__":
    main()
