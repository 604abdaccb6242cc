"""diffusers' cache hooks as baselines beside skip tables, at equal sampling MACs, on a digits teacher.

    OMP_NUM_THREADS=1 python benchmarks/cache_hooks.py --teacher runs/dit-teacher --ref 12 --n 500 \
        --out benchmarks/results/cache_hooks_dit.json
    python benchmarks/skipping.py --stage report --report <skipping.py's JSON> <this JSON>   # one table

For each hook in `--hooks` (slimdiff.engines.cache_baselines.HOOKS): on this model it refuses (the reason is
recorded), or, for each fraction in `--fractions` of the sampling MACs of the reference sampler `--ref` (DDIM
steps, or SAMPLER-STEPS: dpm-20), its knob is tuned on
`--tune-n` samples (`cache_baselines.tune`, `--trials` runs) and the tuned hook's FID/KID (and class agreement)
is measured on `--n` samples from seed 0 — the MACs it ran counted over those samples — beside the same sampler with
round(fraction × steps) steps (`benchmarks/skipping.py`'s sampler rows: same noises, features and reference).
A hook whose counted MACs stay at 1.0 cached nothing; a hook that cannot get down to a fraction gets one row at
its cheapest setting found and none for lower fractions. Rows are appended as they finish; a rerun skips them.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch
from skipping import Bench, Ref, parse_ref, ref_prefix

from slimdiff.engines import cache_baselines as cb


def hook_rows(bench: Bench, hook: str, ref: Ref, fractions: list[float], args: argparse.Namespace) -> None:
    model = bench.teacher
    scheduler, steps = ref
    reason = cb.refusal(model, hook)
    if reason is not None:
        if not bench.done(f"{hook}-refused"):
            bench.add({"key": f"{hook}-refused", "kind": "hook", "hook": hook, "refused": reason})
        return
    tune_run = lambda: bench.samples(model, scheduler, steps, args.tune_n)  # noqa: E731
    for fraction in fractions:
        key = f"{ref_prefix(ref)}-{hook}-{fraction}"
        if bench.done(key):
            continue
        start = time.perf_counter()
        with torch.no_grad():
            tuned = cb.tune(model, hook, fraction, steps=steps, run=tune_run, trials=args.trials)
        row: dict[str, Any] = {
            "key": key,
            "kind": "hook",
            "hook": hook,
            "ref_scheduler": scheduler,
            "ref_steps": steps,
            "fraction": fraction,
            "knob": cb.hook_kind(hook).knob,
            "value": tuned.value,
            "tuned_fraction": tuned.fraction,
            "reached": tuned.reached,
            "trials": tuned.trials,
            "tune_seconds": round(time.perf_counter() - start, 1),
        }
        with cb.attached(model, hook, tuned.value, steps=steps, calibrate=tune_run) as hooked:
            row |= bench.quality(model, scheduler, steps)
            row["kept_sampling_macs"] = hooked.meter.fraction
        row["sampling_macs"] = round(row["kept_sampling_macs"] * bench.per_call * steps)
        bench.add(row)
        if row["kept_sampling_macs"] >= 1.0 or not tuned.reached:
            return  # it caches nothing here, or its cheapest setting is above this fraction: lower ones are too


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", type=str, required=True)
    parser.add_argument("--ref", default="12", help="reference sampler: DDIM steps (the teacher's N*) or dpm-20")
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--tune-n", type=int, default=16, help="samples per tuning run")
    parser.add_argument("--trials", type=int, default=6, help="tuning runs per hook and fraction")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.5, 0.33, 0.25, 0.2])
    parser.add_argument("--hooks", nargs="+", choices=list(cb.HOOKS), default=list(cb.HOOKS))
    parser.add_argument("--guidance-scale", type=float, default=3.0)
    parser.add_argument("--out", type=str, default="benchmarks/results/cache_hooks.json")
    args = parser.parse_args()
    args.teacher, args.out, args.wall_repeats = Path(args.teacher), Path(args.out), 1
    bench = Bench(args)
    ref = parse_ref(args.ref)
    bench.sampler_row(*ref)
    for fraction in args.fractions:
        bench.sampler_row(ref[0], max(1, round(fraction * ref[1])))
    for hook in args.hooks:
        hook_rows(bench, hook, ref, args.fractions, args)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
