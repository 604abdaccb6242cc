"""Diff-Pruning vs baselines on the digits teacher, at ~50 % MACs and the same fine-tune budget for every row.

    python benchmarks/diff_pruning.py --seeds 0 1 2 --kd-output-weight 10 --work runs/bench-diff-pruning-kd \
        --out benchmarks/results/diff_pruning_kd.json

Rows: diff-pruning (thr 0.05), taylor, magnitude, random, and the same small architecture trained from scratch.
Every row is evaluated right after pruning (FID), then fine-tuned (or trained) for `--finetune-steps` steps
(default 225 = 15 % of the teacher's 1500) — with the plain denoising loss, or with `--kd-output-weight w` also
regressing the teacher's prediction (w · MSE(ε_student, ε_teacher)) — and evaluated with FID/KID (digits-v1
features, `--n` samples, 20 DDIM steps) and measured CPU latency (batch 64).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import statistics
import time
from pathlib import Path

import torch

from slimdiff.distill import KDConfig
from slimdiff.engines.channels import ChannelPruningConfig
from slimdiff.export import load, read_provenance, save
from slimdiff.io import atomic_write_json
from slimdiff.jobs.compression import compress_model
from slimdiff.jobs.evaluation import EvalSettings, evaluate_model
from slimdiff.jobs.training import finetune_model
from slimdiff.train import TrainConfig

IMPORTANCES = ("diff-pruning", "taylor", "magnitude", "random")


def reinitialised(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """The same architecture with fresh default initialisation (the 'scratch' baseline)."""
    scratch = copy.deepcopy(model)
    torch.manual_seed(seed)
    for module in scratch.modules():
        if hasattr(module, "reset_parameters") and module is not scratch:
            module.reset_parameters()
    return scratch


def summarise(rows: list[dict], teacher_fid: float) -> dict[str, dict]:
    """Mean and spread of the FID per row kind, before and after fine-tuning."""
    summary = {}
    for importance in dict.fromkeys(r["importance"] for r in rows):
        fids = [r["fid"] for r in rows if r["importance"] == importance]
        before = [r["fid_before_finetune"] for r in rows if r["importance"] == importance and r["fid_before_finetune"]]
        summary[importance] = {
            "seeds": len(fids),
            "fid_mean": statistics.mean(fids),
            "fid_std": statistics.stdev(fids) if len(fids) > 1 else None,
            "fid_vs_teacher": statistics.mean(fids) / teacher_fid,
            "fid_before_finetune_mean": statistics.mean(before) if before else None,
        }
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", type=Path, default=Path("runs/demo/teacher"))
    parser.add_argument("--work", type=Path, default=Path("runs/bench-diff-pruning"))
    parser.add_argument("--target-macs", type=float, default=0.5)
    parser.add_argument("--finetune-steps", type=int, default=225)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--rows", nargs="+", default=[*IMPORTANCES, "scratch"], help="importances, and/or scratch")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--kd-output-weight", type=float, default=0.0, help="> 0: also regress the teacher's outputs")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/diff_pruning.json"))
    args = parser.parse_args()
    settings = EvalSettings(n=args.n, steps=20, metrics=("fid", "kid", "macs", "latency"), batch_size=64)
    finetune = TrainConfig(
        steps=args.finetune_steps,
        batch_size=64,
        lr=args.lr,
        warmup_steps=20,
        ema_decay=0.995,
        checkpoint_every=args.finetune_steps,
    )
    fid_only = dataclasses.replace(settings, metrics=("fid",))
    distillation = (
        {"teacher_dir": args.teacher, "kd": KDConfig(output_weight=args.kd_output_weight, feature_weight=0.0)}
        if args.kd_output_weight > 0
        else {}
    )
    teacher_steps = read_provenance(args.teacher).history[-1]["steps"]
    teacher = evaluate_model(args.teacher, settings, progress=False)
    result = {
        "what": f"digits teacher pruned to {args.target_macs:.0%} MACs, fine-tuned {args.finetune_steps} steps "
        f"({args.finetune_steps / teacher_steps:.0%} of the teacher's {teacher_steps}), lr {args.lr}, "
        f"output KD weight {args.kd_output_weight}, FID/KID over {args.n} samples (20 DDIM steps, digits-v1 "
        "features), latency of one denoiser call at batch 64 on CPU",
        "teacher": {k: v["value"] for k, v in teacher["metrics"].items()} | {"params": teacher["params"]},
    }
    rows = []
    for seed in args.seeds:
        for importance in args.rows:
            start = time.perf_counter()
            work = args.work / f"{importance}-seed{seed}"
            pruned_dir = work / "pruned"
            if importance == "scratch":
                template = load(args.work / f"diff-pruning-seed{seed}" / "pruned")
                save(reinitialised(template, seed), pruned_dir)
                pruned = None
            else:
                config = ChannelPruningConfig(importance=importance, target_macs=args.target_macs, seed=seed)
                pruned = compress_model("channels", args.teacher, "digits", pruned_dir, config)
            before = None if pruned is None else evaluate_model(pruned_dir, fid_only, progress=False)
            tuned = work / "finetuned"
            finetune_model(
                pruned_dir,
                "digits",
                tuned,
                TrainConfig(**{**vars(finetune), "seed": seed}),
                progress=False,
                **distillation,
            )
            report = evaluate_model(tuned, settings, progress=False)
            metrics = {k: v["value"] for k, v in report["metrics"].items()}
            rows.append(
                {
                    "importance": importance,
                    "seed": seed,
                    "macs_fraction": metrics["macs"] / teacher["metrics"]["macs"]["value"],
                    "params_fraction": report["params"] / teacher["params"],
                    "fid_before_finetune": before["metrics"]["fid"]["value"] if before else None,
                    "fid": metrics["fid"],
                    "kid_mean": metrics["kid_mean"],
                    "latency_ms": metrics["latency_ms"],
                    "speedup": teacher["metrics"]["latency_ms"]["value"] / metrics["latency_ms"],
                    "prune_seconds": round(pruned.seconds, 1) if pruned else None,
                    "seconds": round(time.perf_counter() - start, 1),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
            result["rows"], result["summary"] = rows, summarise(rows, teacher["metrics"]["fid"]["value"])
            atomic_write_json(args.out, result)  # after every row: a stopped run keeps what it measured
    print(json.dumps(result["summary"], indent=2))


if __name__ == "__main__":
    main()
