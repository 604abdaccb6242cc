"""Engines compose: channels 50 % MACs (+ fine-tune) × a skip table, and latency budgets, per teacher.

    OMP_NUM_THREADS=1 python benchmarks/compose.py --teachers runs/demo/teacher runs/external-teacher \
        --work runs/compose --out benchmarks/results/compose.json
    # quick: --n 64 --finetune-steps 5 --skip-iterations 3 --latency-skip-iterations 3 --curve 4 8
    # one part: --parts latency   (or quality); each part's results replace only that part's in --out

`quality` — on each teacher: `channels` (diff-pruning, 50 % MACs), fine-tuned as the demo's recipe does
(`--finetune-fraction` of the teacher's training steps, lr 5e-4, output KD 10 from the teacher), then a `skip`
table (dip-go, layer units) learned on the fine-tuned model for DDIM with `--table-steps` steps keeping
`--table-macs` of its sampling MACs. Reported, against the teacher's own DDIM step curve (`--curve`):
- sampling MACs of the composed model (one image) vs the teacher's DDIM-`--ref-steps`, and the ratio (target ≥ 6×);
- FID/KID (`--n` samples, seed 0, both digits networks, `diff_pruning.Curve`) of the composed model vs the teacher
  with DDIM at equal sampling MACs (the step counts either side of the equal point: target at or below), and of
  the fine-tuned channels model alone with DDIM at equal sampling MACs (does the table beat fewer steps?);
- wall time of one whole sampling run at batch `--batch` (interleaved rounds, median): the speed-up over the
  teacher's DDIM-`--ref-steps` vs the MACs ratio (target ≥ 0.9 × it).

`latency` — on each teacher, each of channels (diff-pruning), layers (output-loss) and skip (dip-go, layer units,
DDIM `--table-steps`) with `--target-latency` = `--latency-fraction` × the teacher's latency (one denoiser call at
batch `--batch`; skip: a whole sampling run), measured here first. Reported: the engine's record (target,
achieved and teacher ms, trials, device, how measured) and, as an independent check, the saved product re-loaded
and re-timed, and whether each lands within 5 % of the target.

Every product is saved under `--work/<teacher>/…`; a rerun reuses what is there (delete a folder to redo it).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from diff_pruning import Curve, teacher_train_steps  # a sibling script: run as python benchmarks/compose.py

from slimdiff.engines import budgets, get_engine
from slimdiff.errors import SlimdiffError
from slimdiff.export import load, read_provenance
from slimdiff.io import atomic_write_json, read_json
from slimdiff.jobs.compression import compress_model
from slimdiff.jobs.info import model_info
from slimdiff.jobs.training import finetune_model
from slimdiff.metrics.cost import count_macs, device_description, sampling_latency
from slimdiff.models import adapter_for
from slimdiff.settings import KDConfig, TrainConfig


def label(teacher: Path) -> str:
    """A teacher's name in the results and the work folder: its last two path parts."""
    return "-".join(teacher.resolve().parts[-2:])


def compressed(engine: str, source: Path, out: Path, **values: Any) -> dict[str, Any]:
    """Run `engine` on `source` into `out` (unless it is there) and return its provenance entry."""
    if not (out / "slimdiff.json").is_file():
        compress_model(engine, source, "digits", out, get_engine(engine).make_config(**values), log=print)
    return read_provenance(out).history[-1]


# --- the quality part --------------------------------------------------------------------------------------------
def interleaved_wall(runs: dict[str, tuple[torch.nn.Module, int]], batch: int, rounds: int) -> dict[str, Any]:
    """Median wall time of one whole DDIM sampling run at `batch` per model, in interleaved rounds (same load)."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for round_ in range(rounds + 1):  # round 0 warms up
        for name, (model, steps) in runs.items():
            stats = sampling_latency(adapter_for(model), steps=steps, batch_size=batch, warmup=0, repeats=1)
            if round_:
                times[name].append(stats.median_ms)
    return {
        name: {"steps": runs[name][1], "median_ms": round(statistics.median(v), 1), "ms": [round(t, 1) for t in v]}
        for name, v in times.items()
    }


def quality_part(args: argparse.Namespace, teacher: Path, curve: Curve) -> dict[str, Any]:
    work = args.work / label(teacher)
    start = time.perf_counter()
    channels_dir, tuned_dir, composed_dir = work / "channels", work / "channels-ft", work / "channels-ft-skip"
    channels_entry = compressed(
        "channels", teacher, channels_dir, importance="diff-pruning", target_macs=0.5, thr=0.05, seed=args.seed
    )
    steps = args.finetune_steps or round(args.finetune_fraction * teacher_train_steps(teacher))
    if not (tuned_dir / "slimdiff.json").is_file():
        config = TrainConfig(
            steps=steps,
            batch_size=64,
            lr=5e-4,
            warmup_steps=min(20, steps),
            ema_decay=0.995,
            checkpoint_every=steps,
            seed=args.seed,
        )
        kd = KDConfig(output_weight=10.0, feature_weight=0.0)
        finetune_model(channels_dir, "digits", tuned_dir, config, teacher_dir=teacher, kd=kd, progress=False)
    skip_entry = compressed(
        "skip",
        tuned_dir,
        composed_dir,
        method="dip-go",
        granularity="layer",
        target_macs=args.table_macs,
        steps=args.table_steps,
        scheduler="ddim",
        iterations=args.skip_iterations,
        seed=args.seed,
    )
    teacher_model, composed = load(teacher, artifacts=False), load(composed_dir)
    per_call = count_macs(teacher_model).total
    summary = model_info(composed_dir)  # the sampling MACs of its skip table's plan
    reference_macs = args.ref_steps * per_call
    ratio = reference_macs / summary["sampling_macs"]
    equal = summary["sampling_macs"] / per_call  # teacher DDIM steps at the composed model's sampling MACs
    either_side = sorted({max(1, math.floor(equal)), math.ceil(equal)})
    tuned_per_call = count_macs(load(tuned_dir)).total
    tuned_equal = max(1, round(summary["sampling_macs"] / tuned_per_call))
    teacher_curve = curve.read(teacher, sorted(set(args.curve) | set(either_side) | {args.ref_steps}))
    composed_fid = curve.read(composed_dir, [args.table_steps])[str(args.table_steps)]
    tuned_fid = curve.read(tuned_dir, sorted({tuned_equal, args.table_steps, args.ref_steps}))
    wall = interleaved_wall(
        {"teacher": (teacher_model, args.ref_steps), "composed": (composed, args.table_steps)}, args.batch, args.rounds
    )
    speedup = wall["teacher"]["median_ms"] / wall["composed"]["median_ms"]
    networks = list(composed_fid)
    at_or_below = {
        net: {str(s): composed_fid[net]["fid"] <= teacher_curve[str(s)][net]["fid"] for s in either_side}
        for net in networks
    }
    return {
        "channels": {"achieved": channels_entry["achieved"], "ratio": channels_entry["ratio"]},
        "finetune_steps": steps,
        "skip": {"achieved": skip_entry["achieved"], "how": skip_entry["how"], "effective": skip_entry["effective"]},
        "sampling_macs": {
            "composed": summary["sampling_macs"],
            "teacher_ddim_ref": reference_macs,
            "ref_steps": args.ref_steps,
            "ratio": round(ratio, 3),
            "target_ratio_met (>= 6)": ratio >= 6,
            "teacher_steps_at_equal_macs": round(equal, 2),
        },
        "fid": {
            "composed": composed_fid,
            "teacher_curve": teacher_curve,
            "teacher_at_equal_macs_steps": either_side,
            "composed_at_or_below_teacher_at_equal_macs": at_or_below,
            "channels_ft_alone": {"curve": tuned_fid, "steps_at_equal_macs": tuned_equal},
            "n": args.n,
            "sampling": "DDIM, seed 0, digits train split as reference",
        },
        "wall": {
            "batch": args.batch,
            "rounds": args.rounds,
            "device": device_description("cpu"),
            **wall,
            "speedup": round(speedup, 3),
            "speedup_over_macs_ratio": round(speedup / ratio, 3),
            "target_met (>= 0.9)": speedup >= 0.9 * ratio,
        },
        "seconds": round(time.perf_counter() - start, 1),
    }


# --- the latency-budget part -------------------------------------------------------------------------------------
def retime(engine: str, model_dir: Path, args: argparse.Namespace) -> float:
    """The saved product, re-loaded (with its skip table) and timed the way its engine timed it."""
    model = load(model_dir)
    if engine == "skip":
        stats = budgets.time_sampling(
            adapter_for(model), args.batch, steps=args.table_steps, scheduler="ddim", guidance_scale=1.0
        )
    else:
        stats = budgets.time_denoiser(model, args.batch)
    return stats.median_ms


def latency_part(args: argparse.Namespace, teacher: Path) -> dict[str, Any]:
    work = args.work / label(teacher) / "latency"
    teacher_model = load(teacher, artifacts=False)
    call = budgets.time_denoiser(teacher_model, args.batch).median_ms
    run = budgets.time_sampling(
        adapter_for(teacher_model), args.batch, steps=args.table_steps, scheduler="ddim", guidance_scale=1.0
    ).median_ms
    engines = {
        "channels": ({"importance": "diff-pruning", "thr": 0.05}, call),
        "layers": ({"criterion": "output-loss"}, call),
        "skip": (
            {
                "method": "dip-go",
                "granularity": "layer",
                "steps": args.table_steps,
                "scheduler": "ddim",
                "iterations": args.latency_skip_iterations,
            },
            run,
        ),
    }
    rows: dict[str, Any] = {"teacher_ms_here": {"denoiser_call": round(call, 2), "sampling_run": round(run, 2)}}
    for engine, (values, base) in engines.items():
        out = work / engine
        target = round(args.latency_fraction * base, 1)
        start = time.perf_counter()
        try:
            entry = compressed(
                engine, teacher, out, target_latency_ms=target, latency_batch=args.batch, seed=args.seed, **values
            )
        except SlimdiffError as error:
            rows[engine] = {"target_ms": target, "error": str(error)}
            print(json.dumps({engine: rows[engine]}), flush=True)
            continue
        record = entry["latency"]
        again = retime(engine, out, args)
        rows[engine] = {
            "target_ms": target,
            "what": "whole sampling run" if engine == "skip" else "one denoiser call",
            "achieved_ms": record["achieved_ms"],
            "engine_teacher_ms": record["teacher_ms"],
            "within_5pct": record["within_tolerance"],
            "retimed_ms": round(again, 2),
            "retimed_within_5pct": abs(again - target) <= 0.05 * target,
            "achieved": entry["achieved"],
            "trials": record["trials"],
            "measured": record["measured"],
            "device": record["device"],
            "seconds": round(time.perf_counter() - start, 1),
        }
        print(json.dumps({engine: rows[engine]}), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teachers", type=Path, nargs="+", default=[Path("runs/demo/teacher")])
    parser.add_argument("--work", type=Path, default=Path("runs/compose"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/compose.json"))
    parser.add_argument("--parts", nargs="+", choices=("quality", "latency"), default=["quality", "latency"])
    parser.add_argument("--n", type=int, default=500, help="samples per FID")
    parser.add_argument("--curve", type=int, nargs="+", default=[4, 6, 8, 10, 13, 25, 50], help="teacher DDIM steps")
    parser.add_argument("--ref-steps", type=int, default=50, help="the teacher's reference sampler: DDIM steps")
    parser.add_argument("--finetune-fraction", type=float, default=0.15, help="of the teacher's training steps")
    parser.add_argument("--finetune-steps", type=int, default=0, help="instead of --finetune-fraction")
    parser.add_argument("--table-steps", type=int, default=25, help="DDIM steps the skip tables are made for")
    parser.add_argument(
        "--table-macs", type=float, default=2 / 3, help="of the pruned model's sampling MACs (0.5·2/3·25 = 50/6)"
    )
    parser.add_argument("--skip-iterations", type=int, default=200, help="dip-go search, quality part")
    parser.add_argument("--latency-skip-iterations", type=int, default=100, help="dip-go search, latency part")
    parser.add_argument("--latency-fraction", type=float, default=0.5, help="of the teacher's latency")
    parser.add_argument("--batch", type=int, default=64, help="batch of every latency and wall time")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved wall-time rounds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results: dict[str, Any] = read_json(args.out, "compose results") if args.out.is_file() else {}
    results.setdefault("teachers", {})
    results.setdefault("settings", {})
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    settings["teachers"] = [str(t) for t in args.teachers]
    curve = Curve(args.n, args.work / "curves.json") if "quality" in args.parts else None
    for teacher in args.teachers:
        entry = results["teachers"].setdefault(label(teacher), {"dir": str(teacher)})
        for part in args.parts:
            print(f"== {label(teacher)}: {part}", flush=True)
            entry[part] = quality_part(args, teacher, curve) if part == "quality" else latency_part(args, teacher)
            results["settings"][part] = settings
            atomic_write_json(args.out, results)  # after every part: a stopped run keeps what it measured
    print(json.dumps(results, indent=1)[:4000])


if __name__ == "__main__":
    main()
