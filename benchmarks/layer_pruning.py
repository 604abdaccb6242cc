"""LAPTOP-Diff layer pruning vs its baselines on a digits teacher, at one params budget and equal fine-tune steps.

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/layer_pruning.py --teacher runs/demo/teacher \
        --work runs/bench-layers --out benchmarks/results/layer_pruning_seed0.json --seed 0

Rows are `criterion/kd[@target]` (`@m0.7`: a MACs target): the teacher is pruned by the `layers` engine to
`--target-params` (or the row's target) with each criterion (output-loss with `--additivity-sets` random sets
measured), evaluated right after pruning (FID/KID, `--n` samples, DDIM at `--before-steps`), fine-tuned
`--finetune-steps` steps with the denoising loss + output KD + feature KD on every block output (`kd`: normalized =
LAPTOP-Diff, plain = BK-SDM, none = no feature term), and evaluated again at DDIM `--steps` (the teacher and the
`--curve-rows` at every `--curve-steps` count). Latency of one denoiser call at batch 1 and 64 is measured
interleaved with the teacher's, and for the `--curve-rows` that of a whole 13-step sampling run at batch 64. Each
row is written to the JSON as soon as it is done, and a rerun skips the rows already there.

`--sd-reference CONFIG` adds the SD-1.5 architecture (random weights, latent 16×16, CPU): candidate count,
scoring time, and params after removing layers for 50 % of params, against BK-SDM's published U-Nets.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from slimdiff.engines import Calibration
from slimdiff.engines.layers import LayerPruningConfig, compress
from slimdiff.export import load, read_provenance
from slimdiff.io import atomic_write_json, read_json
from slimdiff.jobs.compression import compress_model
from slimdiff.jobs.evaluation import EvalSettings, evaluate_model
from slimdiff.jobs.training import finetune_model
from slimdiff.metrics.cost import count_macs, denoiser_latency, sampling_latency
from slimdiff.models import adapter_for, build
from slimdiff.models.base import count_params
from slimdiff.report import markdown_table
from slimdiff.settings import KDConfig, TrainConfig
from slimdiff.training.diffusion import DEFAULT_SCHEDULE

ROWS = (
    "output-loss/normalized",
    "handcrafted/normalized",
    "task-loss/normalized",
    "magnitude/normalized",
    "random/normalized",
    "output-loss/plain",
    "output-loss/none",
    "handcrafted-mid/normalized",
)
#: BK-SDM's published U-Nets (from SD-v1.4's 0.86 B; Kim et al., BK-SDM, arXiv 2305.15798).
BK_SDM = {"base": 0.58e9, "small": 0.49e9, "tiny": 0.33e9}


def quality(model_dir: Path, steps: list[int], n: int) -> dict[str, dict[str, float]]:
    """FID and KID (digits features) of `n` samples at each DDIM step count."""
    out: dict[str, dict[str, float]] = {"fid": {}, "kid": {}}
    for count in steps:
        report = evaluate_model(model_dir, EvalSettings(n=n, steps=count, metrics=("fid", "kid")), progress=False)
        out["fid"][str(count)] = report["metrics"]["fid"]["value"]
        out["kid"][str(count)] = report["metrics"]["kid_mean"]["value"]
    return out


def latencies(teacher: torch.nn.Module, student: torch.nn.Module) -> dict[str, float]:
    """Median ms of one denoiser call at batch 1 and 64, teacher and student interleaved (same CPU load)."""
    out = {}
    for batch in (1, 64):
        repeats = 20 if batch == 1 else 5
        out[f"teacher_b{batch}_ms"] = denoiser_latency(teacher, batch_size=batch, repeats=repeats).median_ms
        out[f"b{batch}_ms"] = denoiser_latency(student, batch_size=batch, repeats=repeats).median_ms
        out[f"speedup_b{batch}"] = out[f"teacher_b{batch}_ms"] / out[f"b{batch}_ms"]
    return out


def sampling_latencies(teacher: torch.nn.Module, student: torch.nn.Module, steps: int) -> dict[str, float]:
    """Median ms of a whole `steps`-step DDIM sampling run at batch 64, teacher and student interleaved."""
    timed = {
        name: sampling_latency(adapter_for(model), steps=steps, batch_size=64, repeats=2).median_ms
        for name, model in (("teacher", teacher), ("student", student))
    }
    return {
        f"sampling_ddim{steps}_b64_ms": timed["student"],
        f"teacher_sampling_ddim{steps}_b64_ms": timed["teacher"],
        f"sampling_speedup_ddim{steps}_b64": timed["teacher"] / timed["student"],
    }


def feature_term_stats(log_path: Path) -> dict[str, Any]:
    """Mean of each logged feature-KD term over the run, and the largest/smallest ratio (the imbalance)."""
    records = [json.loads(line) for line in log_path.read_text().splitlines()]
    terms = [r["feat_kd_terms"] for r in records if "feat_kd_terms" in r]
    if not terms:
        return {}
    means = {name: statistics.mean(t[name] for t in terms) for name in terms[0]}
    return {"feat_kd_terms_mean": means, "max_over_min": max(means.values()) / max(min(means.values()), 1e-30)}


def run_row(args: argparse.Namespace, row: str, teacher_steps: int) -> dict[str, Any]:
    pruning, kd_mode = row.split("/")
    kd_mode, _, budget = kd_mode.partition("@")
    criterion = pruning
    unit = "macs" if budget.startswith("m") else "params"  # `@m0.7`: a MACs budget
    target = float(budget.removeprefix("m")) if budget else args.target_params
    pruning += f"@{'m' if unit == 'macs' else ''}{target}"
    start = time.perf_counter()
    pruned_dir = args.work / pruning / "pruned"
    if not (pruned_dir / "slimdiff.json").is_file():
        sets = args.additivity_sets if criterion == "output-loss" else 0
        config = LayerPruningConfig(
            criterion=criterion, check_additivity=sets, seed=args.seed, **{f"target_{unit}": target}
        )
        compress_model("layers", args.teacher, "digits", pruned_dir, config)
    record = read_provenance(pruned_dir).history[-1]
    before_path = args.work / pruning / "before.json"
    if not before_path.is_file():
        atomic_write_json(before_path, quality(pruned_dir, args.before_steps, args.n))
    tuned = args.work / pruning / f"finetuned-{kd_mode}"
    kd = KDConfig(
        mode="plain" if kd_mode == "plain" else "normalized",
        output_weight=1.0,
        feature_weight=0.0 if kd_mode == "none" else args.kd_feature_weight,
    )
    finetune_start = time.perf_counter()
    train = TrainConfig(
        steps=args.finetune_steps,
        batch_size=64,
        lr=args.lr,
        warmup_steps=min(20, args.finetune_steps),
        ema_decay=0.995,
        checkpoint_every=args.finetune_steps,
        seed=args.seed,
    )
    finetune_model(pruned_dir, "digits", tuned, train, teacher_dir=args.teacher, kd=kd, progress=False)
    finetune_seconds = time.perf_counter() - finetune_start
    steps = args.curve_steps if row in args.curve_rows else args.steps
    after = quality(tuned, steps, args.n)
    teacher_model, student = load(args.teacher).eval(), load(tuned).eval()
    macs_ratio = count_macs(student).total / count_macs(teacher_model).total
    return {
        "row": row,
        "criterion": criterion,
        "kd": kd_mode,
        f"target_{unit}": target,
        "removed": record["removed"],
        "params_fraction": record["achieved"]["params"],
        "macs_fraction": macs_ratio,
        "within_tolerance": record["within_tolerance"],
        "measured_l_out": record["measured_l_out"],
        "predicted_l_out": record.get("predicted_l_out"),
        "additivity": {k: v for k, v in record.get("additivity", {}).items() if k in ("sets", "pearson", "spearman")},
        "before": json.loads(before_path.read_text()),
        "after": after,
        **latencies(teacher_model, student),
        "finetune_steps": args.finetune_steps,
        "finetune_fraction_of_teacher": args.finetune_steps / teacher_steps,
        "finetune_seconds": round(finetune_seconds, 1),
        "prune_seconds": record["seconds"],
        "scoring_seconds": record["scoring_seconds"],
        **feature_term_stats(tuned / "log.jsonl"),
        "seconds": round(time.perf_counter() - start, 1),
    }


def sd_reference(config_path: Path, seed: int) -> dict[str, Any]:
    """SD-1.5's U-Net with random weights at a 16×16 latent: scoring cost and params after layer removal."""
    config = json.loads(config_path.read_text()) | {"sample_size": 16}
    torch.manual_seed(seed)
    model = build(config).eval()
    adapter = adapter_for(model)
    generator = torch.Generator().manual_seed(seed)
    latents = [(torch.randn(4, 16, 16, generator=generator), i % 10) for i in range(8)]
    prompts = torch.randn(10, 77, adapter.cross_attention_dim, generator=generator)
    data = Calibration(latents, lambda labels: prompts[labels], DEFAULT_SCHEDULE)
    total = count_params(model)
    out: dict[str, Any] = {
        "what": "SD-1.5 U-Net config, random weights, latent 16×16, 2 calibration triples, CPU",
        "params": total,
        "macs_16x16": count_macs(model).total,
        "bk_sdm_published_params": BK_SDM,
    }
    for criterion in ("output-loss", "handcrafted", "handcrafted-mid"):
        layer_config = LayerPruningConfig(target_params=0.5, criterion=criterion, calibration_size=2, batch_size=2)
        result = compress(adapter, layer_config, data, log=lambda m: print(m, file=sys.stderr, flush=True))
        out[criterion] = {
            "candidates": len(result.record["candidates"]),
            "removed": len(result.record["removed"]),
            "params": count_params(result.model),
            "params_fraction": result.achieved["params"],
            "macs_fraction_16x16": result.achieved["macs"],
            "scoring_seconds": result.record["scoring_seconds"],
            "seconds": round(result.seconds, 1),
        }
        print(json.dumps({criterion: out[criterion]}), flush=True)
        del result
    return out


def seed_table(paths: list[Path]) -> str:
    """Markdown: every row's FID after fine-tuning at each step count, mean ± std over the result files (seeds)."""
    runs = [read_json(path, "benchmark results") for path in paths]
    teacher = runs[0]["teacher"]
    steps = sorted({s for run in runs for r in run["rows"] for s in r["after"]["fid"]}, key=int)
    table = [{"row": "teacher", "seeds": "", "params": 1.0, "MACs": 1.0, "before (13)": None}]
    table[0] |= {f"FID @{s}": f"{teacher['fid'][s]:.3f}" if s in teacher["fid"] else "" for s in steps}
    for name in dict.fromkeys(r["row"] for run in runs for r in run["rows"]):
        rows = [r for run in runs for r in run["rows"] if r["row"] == name]
        entry: dict[str, Any] = {
            "row": name,
            "seeds": len(rows),
            "params": rows[0]["params_fraction"],
            "MACs": rows[0]["macs_fraction"],
            "before (13)": statistics.mean(r["before"]["fid"]["13"] for r in rows),
        }
        for s in steps:
            fids = [r["after"]["fid"][s] for r in rows if s in r["after"]["fid"]]
            spread = f" ± {statistics.stdev(fids):.3f}" if len(fids) > 1 else ""
            entry[f"FID @{s}"] = f"{statistics.mean(fids):.3f}{spread}" if fids else ""
        table.append(entry)
    return markdown_table(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", type=Path, default=Path("runs/demo/teacher"))
    parser.add_argument("--work", type=Path, default=Path("runs/bench-layers"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/layer_pruning_seed0.json"))
    parser.add_argument("--target-params", type=float, default=0.6)
    parser.add_argument("--rows", nargs="+", default=list(ROWS), help="criterion/kd[@target params] rows, in order")
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--steps", type=int, nargs="+", default=[13], help="DDIM steps of every row's final FID")
    parser.add_argument("--before-steps", type=int, nargs="+", default=[13])
    parser.add_argument("--curve-steps", type=int, nargs="+", default=[6, 13, 50])
    parser.add_argument("--curve-rows", nargs="*", default=["output-loss/normalized", "handcrafted/normalized"])
    parser.add_argument("--finetune-steps", type=int, default=225)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--kd-feature-weight", type=float, default=1.0)
    parser.add_argument("--additivity-sets", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0, help="calibration set, random criterion, fine-tune")
    parser.add_argument("--teacher-steps", type=int, default=None, help="when the teacher records none")
    parser.add_argument("--sd-reference", type=Path, default=None, help="also run the SD-1.5 reference config")
    parser.add_argument("--skip-rows", action="store_true", help="only the SD-1.5 reference part")
    parser.add_argument("--table", type=Path, nargs="+", help="print the seeds table of these result files, and exit")
    args = parser.parse_args()
    if args.table:
        print(seed_table(args.table))
        return
    torch.set_num_threads(1)
    result: dict[str, Any] = read_json(args.out, "benchmark results") if args.out.is_file() else {}
    result["command"] = "OMP_NUM_THREADS=1 PYTHONPATH=. python " + " ".join(sys.argv)
    if not args.skip_rows:
        history = read_provenance(args.teacher).history
        teacher_steps = args.teacher_steps or (history[-1]["steps"] if history else None)
        if teacher_steps is None:
            parser.error(f"{args.teacher} records no training steps: pass --teacher-steps")
        if "teacher" not in result:
            teacher = load(args.teacher)
            result["teacher"] = {
                "dir": str(args.teacher),
                "steps": teacher_steps,
                "params": count_params(teacher),
                "macs": count_macs(teacher).total,
                "fid": {},
                "kid": {},
            }
        missing = [count for count in args.curve_steps if str(count) not in result["teacher"]["fid"]]
        if missing:  # the free alternative: the teacher with fewer steps
            extra = quality(args.teacher, missing, args.n)
            for metric in ("fid", "kid"):
                result["teacher"][metric] = dict(
                    sorted({**result["teacher"][metric], **extra[metric]}.items(), key=lambda kv: int(kv[0]))
                )
            atomic_write_json(args.out, result)
        result["what"] = (
            f"{args.teacher} pruned to {args.target_params:.0%} params by the layers engine, fine-tuned "
            f"{args.finetune_steps} steps ({args.finetune_steps / teacher_steps:.0%} of the teacher's {teacher_steps}) "
            f"at batch 64, lr {args.lr}, output KD 1 + feature KD {args.kd_feature_weight}; FID/KID over {args.n} "
            "samples (digits-v1 features), DDIM; latency of one denoiser call on CPU, 1 thread"
        )
        rows = {r["row"]: r for r in result.get("rows", [])}
        for row in args.rows:
            if row in rows:
                continue
            rows[row] = run_row(args, row, teacher_steps)
            print(json.dumps(rows[row]), flush=True)
            result["rows"] = list(rows.values())
            atomic_write_json(args.out, result)  # after every row: a stopped run keeps what it measured
        teacher_model = load(args.teacher).eval()
        for row in args.curve_rows:
            if row in rows and "sampling_speedup_ddim13_b64" not in rows[row]:
                pruned_as = (
                    rows[row]["row"].split("/")[0]
                    + "@"
                    + (rows[row]["row"].partition("@")[2] or f"{args.target_params}")
                )
                student = load(args.work / pruned_as / f"finetuned-{rows[row]['kd']}").eval()
                rows[row].update(sampling_latencies(teacher_model, student, 13))
                result["rows"] = list(rows.values())
                atomic_write_json(args.out, result)
    if args.sd_reference is not None:
        result["sd_reference"] = sd_reference(args.sd_reference, args.seed)
        atomic_write_json(args.out, result)


if __name__ == "__main__":
    main()
