"""OFA-Diffusion vs dedicated Diff-Pruning runs: one shared run for K sizes against K prune + fine-tune runs.

    OMP_NUM_THREADS=1 python benchmarks/ofa.py --teacher runs/demo/teacher --steps 200 --n 500 \\
        --work runs/bench-ofa --out benchmarks/results/ofa.json

Rows, at the sizes `--sizes` (fractions of the teacher's MACs), every one trained with the same settings (batch 64,
AdamW, cosine, EMA, output KD from the teacher with weight `--kd`):

- `ofa-<sampling>`: `slimdiff compress ofa` — one shared run of N = `--steps` optimizer steps, then each size
  extracted (no per-size fine-tune);
- `dedicated`: Diff-Pruning (the channels engine, thr 0.05) to each size, then an N-step fine-tune each (K·N steps);
- `equal-cost`: the same, N/K fine-tune steps each (the OFA run's total);
- the teacher at every DDIM step count, so each size can be read against the free alternative (the teacher with
  fewer steps at equal sampling MACs).

FID/KID use `--n` samples (digits-v1 features) at each of `--eval-steps` DDIM steps. Training cost is reported as
optimizer steps and as Σ over steps of batch × the trained network's forward MACs (backward ≈ 2× that and the KD
teacher's forward are the same per step for every row, so they are left out). The JSON is rewritten after every
evaluation, and a rerun with the same `--out` skips what is there (training runs resume from their checkpoints).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, get_args

import torch

from slimdiff.engines.base import Calibration
from slimdiff.engines.channels import ChannelPruningConfig
from slimdiff.engines.ofa import ImportanceNorm, OFAConfig, compress, extract_all
from slimdiff.export import load, read_provenance, save
from slimdiff.io import atomic_write_json
from slimdiff.jobs.compression import compress_model
from slimdiff.jobs.conditioning import training_data
from slimdiff.jobs.evaluation import EvalSettings, evaluate_model
from slimdiff.jobs.training import finetune_model
from slimdiff.metrics.cost import count_macs
from slimdiff.models import adapter_for
from slimdiff.settings import KDConfig, TrainConfig
from slimdiff.training.diffusion import DEFAULT_SCHEDULE


class Bench:
    """The results file: one entry per evaluation and per training run, written after each."""

    def __init__(self, path: Path, header: dict[str, Any]) -> None:
        self.path = path
        self.data = json.loads(path.read_text()) if path.is_file() else {"evals": {}, "runs": {}}
        self.data.update(header)

    def save(self) -> None:
        atomic_write_json(self.path, self.data)

    def evaluate(self, key: str, model_dir: Path, steps: int, n: int) -> dict[str, float]:
        entry_key = f"{key}@{steps}"
        if entry_key not in self.data["evals"]:
            start = time.perf_counter()
            settings = EvalSettings(n=n, steps=steps, metrics=("fid", "kid"), batch_size=100)
            report = evaluate_model(model_dir, settings, progress=False)
            metrics = {k: v["value"] for k, v in report["metrics"].items()}
            self.data["evals"][entry_key] = {
                "row": key,
                "ddim_steps": steps,
                "fid": metrics["fid"],
                "kid": metrics["kid_mean"],
                "seconds": round(time.perf_counter() - start, 1),
            }
            print(json.dumps({entry_key: self.data["evals"][entry_key]}), flush=True)
            self.save()
        return self.data["evals"][entry_key]


def train_settings(args: argparse.Namespace, steps: int) -> TrainConfig:
    return TrainConfig(
        steps=steps,
        batch_size=64,
        lr=args.lr,
        warmup_steps=min(20, steps),
        ema_decay=0.995,
        checkpoint_every=max(steps // 4, 1),
        seed=args.seed,
    )


def ofa_row(
    args: argparse.Namespace, bench: Bench, sampling: str, teacher_macs: int, allocation: str = "importance"
) -> tuple[str, dict[float, Path]]:
    """One shared run; returns its row name and size → product dir."""
    norm = args.importance_norm if allocation == "importance" else "none"
    key = f"ofa-{sampling}" + ("" if allocation == "importance" else f"-{allocation}-alloc")
    key += "" if norm == "none" else f"-{norm}-norm"  # the first results' rows: raw importance ('none')
    work = args.work / key
    names = {size: work / f"macs-{size:g}" for size in args.sizes}
    if key not in bench.data["runs"]:
        start = time.perf_counter()
        config = OFAConfig(
            sizes=tuple(args.sizes),
            steps=args.steps,
            sampling=sampling,
            allocation=allocation,
            importance_norm=norm,
            importance_samples=64,
            batch_size=64,
            lr=args.lr,
            warmup=min(20, args.steps),
            ema_decay=0.995,
            teacher_kd=args.kd,
            checkpoint_every=max(args.steps // 4, 1),
            seed=args.seed,
        )
        result = compress_model("ofa", args.teacher, "digits", work, config, resume=True, progress=False)
        per_size = {}
        for size, path in names.items():
            entry = read_provenance(path).history[-1]
            per_size[f"{size:g}"] = {
                "macs_fraction": entry["achieved"]["macs"],
                "params_fraction": entry["achieved"]["params"],
                "steps_trained": entry["steps_trained"],
                "keep_ratio": entry["keep_ratio"],
            }
        bench.data["runs"][key] = {
            "optimizer_steps": args.steps,
            "train_macs": sum(64 * v["steps_trained"] * v["macs_fraction"] * teacher_macs for v in per_size.values()),
            "sizes": per_size,
            "engine_seconds": round(result.seconds, 1),
            "seconds": round(time.perf_counter() - start, 1),
        }
        print(json.dumps({key: bench.data["runs"][key]}), flush=True)
        bench.save()
    return key, names


def dedicated_row(args: argparse.Namespace, bench: Bench, key: str, size: float, steps: int, teacher_macs: int) -> Path:
    """Diff-Pruning to one size, then a `steps`-step fine-tune; returns the fine-tuned dir."""
    tuned = args.work / "dedicated" / f"macs-{size:g}" / f"finetuned-{steps}"
    run_key = f"{key}-{size:g}"
    if run_key not in bench.data["runs"]:
        start = time.perf_counter()
        pruned = diff_pruned(args, size)
        kd = KDConfig(output_weight=args.kd, feature_weight=0.0) if args.kd > 0 else None
        finetune_model(
            pruned,
            "digits",
            tuned,
            train_settings(args, steps),
            progress=False,
            resume=True,
            **({"teacher_dir": args.teacher, "kd": kd} if kd else {}),
        )
        fraction = count_macs(load(tuned)).total / teacher_macs
        bench.data["runs"][run_key] = {
            "optimizer_steps": steps,
            "train_macs": 64 * steps * fraction * teacher_macs,
            "macs_fraction": fraction,
            "seconds": round(time.perf_counter() - start, 1),
        }
        print(json.dumps({run_key: bench.data["runs"][run_key]}), flush=True)
        bench.save()
    return tuned


def table(data: dict[str, Any], sizes: list[float], eval_steps: list[int]) -> str:
    """The Markdown table of one results file: FID (KID) per row and size at each DDIM step count, and the cost."""
    evals, runs = data["evals"], data["runs"]

    def cell(key: str, steps: int) -> str:
        entry = evals.get(f"{key}@{steps}")
        return f"{entry['fid']:.2f} ({entry['kid']:.3f})" if entry else "—"

    head = " | ".join(f"FID (KID) DDIM {k}" for k in eval_steps)
    lines = [f"| row | size | MACs | {head} | train steps | train MACs (×10¹²) |", "|---" * (5 + len(eval_steps)) + "|"]
    rows = ("ofa-reweighted", "ofa-uniform", "ofa-sandwich", "ofa-reweighted-uniform-alloc", "dedicated", "equal-cost")
    norms = [f"init-ofa-{norm}-norm" for norm in get_args(ImportanceNorm) if norm != "none"]
    rows = (*rows, *(f"{row}-{norm}-norm" for row in rows[:4] for norm in get_args(ImportanceNorm) if norm != "none"))
    for row in (*rows, "init-ofa", *norms, "init-ofa-uniform-alloc", "init-diff-pruning"):
        for size in sizes:
            key = f"{row}-{size:g}"
            if not any(f"{key}@{k}" in evals for k in eval_steps):
                continue
            if row.startswith("init"):
                macs, steps, cost_text = "—", "0 (untrained)", "—"
            elif row.startswith("ofa"):
                run = runs[row]["sizes"][f"{size:g}"]
                macs, steps = f"{run['macs_fraction']:.3f}", f"{run['steps_trained']} of {runs[row]['optimizer_steps']}"
                cost_text = f"{runs[row]['train_macs'] / 1e12:.2f} (whole run)"
            else:
                run = runs[key]
                macs, steps = f"{run['macs_fraction']:.3f}", str(run["optimizer_steps"])
                cost_text = f"{run['train_macs'] / 1e12:.2f}"
            cells = " | ".join(cell(key, k) for k in eval_steps)
            lines.append(f"| {row} | {size:g} | {macs} | {cells} | {steps} | {cost_text} |")
    for size in [1.0, *sizes]:
        cells = " | ".join(cell("teacher", max(round(size * k), 1)) for k in eval_steps)
        steps = "/".join(str(max(round(size * k), 1)) for k in eval_steps)
        lines.append(f"| teacher at DDIM {steps} (= {size:g} × the sampling MACs) | 1 | 1.000 | {cells} | — | — |")
    return "\n".join(lines)


def diff_pruned(args: argparse.Namespace, size: float) -> Path:
    """Diff-Pruning (the channels engine, its default thr) of the teacher to `size` of its MACs, untrained."""
    pruned = args.work / "dedicated" / f"macs-{size:g}" / "pruned"
    if not (pruned / "slimdiff.json").is_file():
        config = ChannelPruningConfig(importance="diff-pruning", target_macs=size, seed=args.seed)
        compress_model("channels", args.teacher, "digits", pruned, config, progress=False)
    return pruned


def untrained_ofa(args: argparse.Namespace, bench: Bench, allocation: str, norm: str) -> dict[float, Path]:
    """OFA's sizes extracted straight from the teacher's weights (the engine and `finish`, no shared run); the
    channels each group keeps go to the results file and are printed."""
    key = init_key(allocation, norm)
    work = args.work / key
    paths = {size: work / f"macs-{size:g}" for size in args.sizes}
    if all((path / "slimdiff.json").is_file() for path in paths.values()) and key in bench.data["runs"]:
        return paths
    model = load(args.teacher)
    adapter = adapter_for(model)
    if adapter.cond_kind != "none":
        raise SystemExit("the 'init' row supports unconditional teachers only")
    data = Calibration(training_data(adapter, "digits", args.seed), lambda labels: None, DEFAULT_SCHEDULE)
    config = OFAConfig(
        sizes=tuple(args.sizes), allocation=allocation, importance_norm=norm, importance_samples=64, seed=args.seed
    )
    result = compress(adapter, config, data)
    for name, product in extract_all(result.model).items():
        save(product.model, work / name, scheduler_config=dict(DEFAULT_SCHEDULE))
    subnets = result.record["subnets"]
    bench.data["runs"][key] = {
        f"{s['size']:g}": {"keep_ratio": s["keep_ratio"], "group_widths": s["group_widths"]} for s in subnets.values()
    }
    bench.save()
    print(f"{key}: channels kept / width per group at sizes {', '.join(f'{s:g}' for s in sorted(args.sizes))}")
    for root, (_, width) in next(iter(subnets.values()))["group_widths"].items():
        kept = " ".join(f"{s['group_widths'][root][0]:4d}" for s in subnets.values())
        print(f"  {root:45s} {kept} / {width}")
    return paths


def init_key(allocation: str, norm: str) -> str:
    """The untrained row's name: `init-ofa` is the paper's raw importance (the first results' allocation)."""
    if allocation == "uniform":
        return "init-ofa-uniform-alloc"
    return "init-ofa" if norm == "none" else f"init-ofa-{norm}-norm"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", type=Path, default=Path("runs/demo/teacher"))
    parser.add_argument("--work", type=Path, default=Path("runs/bench-ofa"))
    parser.add_argument("--sizes", type=float, nargs="+", default=[0.3, 0.5, 0.75])
    parser.add_argument("--steps", type=int, default=200, help="N: the shared run's optimizer steps")
    parser.add_argument("--n", type=int, default=500, help="samples per FID/KID")
    parser.add_argument("--eval-steps", type=int, nargs="+", default=[13, 50], help="DDIM steps of each evaluation")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--kd", type=float, default=10.0, help="output-KD weight for every row (0 = off)")
    parser.add_argument("--rows", nargs="+", default=["teacher", "ofa", "dedicated", "equal-cost", "teacher-equal"])
    parser.add_argument(
        "--samplings", nargs="+", default=["uniform", "sandwich"], help="ablation rows (with 'ablation')"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--norms",
        nargs="+",
        default=["none", "kind"],
        choices=get_args(ImportanceNorm),
        help="'init' row: importance norms",
    )
    parser.add_argument(
        "--importance-norm",
        default=OFAConfig.importance_norm,
        choices=get_args(ImportanceNorm),
        help="the shared runs' importance norm (the first results used 'none')",
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/ofa.json"))
    parser.add_argument(
        "--table", nargs="*", type=Path, metavar="MORE_JSON", help="only print the table of --out (and these files)"
    )
    args = parser.parse_args()
    if args.table is not None:
        merged: dict[str, Any] = {"evals": {}, "runs": {}}
        for path in (args.out, *args.table):
            data = json.loads(path.read_text())
            merged["evals"].update(data["evals"])
            merged["runs"].update(data["runs"])
        print(table(merged, sorted(args.sizes), args.eval_steps))
        return
    torch.set_num_threads(1)
    sizes = sorted(args.sizes)
    teacher_macs = count_macs(load(args.teacher)).total
    bench = Bench(
        args.out,
        {
            "what": f"digits teacher {args.teacher}, sizes {sizes} of its MACs; N = {args.steps} shared steps; "
            f"batch 64, lr {args.lr}, output KD weight {args.kd}; FID/KID over {args.n} samples (digits-v1 "
            f"features) at DDIM {args.eval_steps}; 1 CPU thread",
            "teacher_macs": teacher_macs,
            "teacher_history": read_provenance(args.teacher).history,
        },
    )
    equal_steps = max(args.steps // len(sizes), 1)
    for row in args.rows:
        if row == "teacher":
            for steps in args.eval_steps:
                bench.evaluate("teacher", args.teacher, steps, args.n)
        elif row == "ofa":
            key, paths = ofa_row(args, bench, "reweighted", teacher_macs)
            for size, path in paths.items():
                for steps in args.eval_steps:
                    bench.evaluate(f"{key}-{size:g}", path, steps, args.n)
        elif row in ("dedicated", "equal-cost"):
            for size in sizes:
                steps = args.steps if row == "dedicated" else equal_steps
                path = dedicated_row(args, bench, row, size, steps, teacher_macs)
                for eval_steps in args.eval_steps:
                    bench.evaluate(f"{row}-{size:g}", path, eval_steps, args.n)
        elif row == "teacher-equal":  # the teacher with fewer steps, at each size's sampling MACs
            for size in sizes:
                for steps in args.eval_steps:
                    bench.evaluate("teacher", args.teacher, max(round(size * steps), 1), args.n)
        elif row == "uniform-alloc":  # the allocation ablation: every group keeps the same ratio P
            key, paths = ofa_row(args, bench, "reweighted", teacher_macs, "uniform")
            for size, path in paths.items():
                for steps in args.eval_steps:
                    bench.evaluate(f"{key}-{size:g}", path, steps, args.n)
        elif row == "init":  # before any training: OFA's extracted sizes and the Diff-Pruning models
            variants = [("importance", norm) for norm in args.norms] + [("uniform", "none")]
            models = {init_key(*variant): untrained_ofa(args, bench, *variant) for variant in variants}
            for size in sizes:  # smallest size first: it shows the allocations' differences most
                for key, paths in models.items():
                    bench.evaluate(f"{key}-{size:g}", paths[size], args.eval_steps[0], args.n)
                bench.evaluate(f"init-diff-pruning-{size:g}", diff_pruned(args, size), args.eval_steps[0], args.n)
        elif row == "ablation":
            for sampling in ("reweighted", *args.samplings):  # reweighted: the same sizes at the same step count
                key, paths = ofa_row(args, bench, sampling, teacher_macs)
                for size in (sizes[0], sizes[-1]):
                    bench.evaluate(f"{key}-{size:g}", paths[size], args.eval_steps[0], args.n)
        else:
            raise SystemExit(f"unknown row '{row}'")


if __name__ == "__main__":
    main()
