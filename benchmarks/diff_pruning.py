"""Diff-Pruning side by side with the official procedure; quality read as a curve over DDIM step counts.

    python benchmarks/diff_pruning.py --teacher runs/external-teacher --rows official diff-pruning \
        --match-official --work runs/bench-dp-external --out benchmarks/results/diff_pruning_external.json

Rows (`--rows`):
- `official`: Fang et al.'s procedure as published (VainF/Diff-Pruning `ddpm_prune.py`, then a plain fine-tune),
  written here with torch-pruning and plain diffusers only: one batch of 128 training images and one noise tensor;
  the loss at t = 0, 1, 2, … back-propagated without zeroing gradients until L_t < thr · max L;
  `tp.importance.TaylorImportance(multivariable=False)`; one uniform ratio (`--official-ratio`) by torch-pruning's
  `MetaPruner` with conv_out ignored and every attention's head count kept (head dimensions shrink); the
  Upsample2D/Downsample2D `channels` updated as the official script does. Then `--finetune-steps` steps of plain
  AdamW (lr 2e-4, constant, no warm-up, grad-clip 1.0, batch 64, ε-MSE), and the raw (non-EMA) weights are read.
- `official-global`: the same importance, but torch-pruning ranks channels across all groups at once
  (`global_pruning=True`, non-uniform widths), its ratio bisected to `--target-macs`.
- `diff-pruning`, `taylor`, `magnitude`, `random`: slimdiff's `channels` engine to `--target-macs` (with
  `--match-official`: the official row's achieved MACs), fine-tuned by slimdiff's trainer with the flags given;
  with `-global` (e.g. `diff-pruning-global`) the engine's `widths="global"` (channels ranked across layers).
- `scratch`: the diff-pruning row's architecture re-initialised, trained by slimdiff's trainer with the same flags.

`--official-finetune slimdiff` fine-tunes the official rows with slimdiff's trainer and flags instead (to compare
the pruning alone). Every model — the teacher included — is read from `--n` samples (sampling seed 0) at DDIM
`--curve` step counts (which include the teacher's best of them), by both digits feature networks (FID, KID). The
teacher is also read at the step counts at which it costs what each pruned model costs (its "free alternative").
Curves are cached in `<work>/curves.json`, so reruns and concurrent runs sharing `--work` reuse the teacher's.
"""

from __future__ import annotations

import argparse
import copy
import fcntl
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torch_pruning as tp
from diffusers import DDPMScheduler, UNet2DModel
from diffusers.models.attention_processor import Attention
from diffusers.models.resnet import Downsample2D, Upsample2D

from slimdiff.data import load_data
from slimdiff.engines.channels import ChannelPruningConfig
from slimdiff.export import load, load_scheduler_config, read_provenance, save
from slimdiff.io import atomic_write_json, read_json
from slimdiff.jobs.compression import compress_model
from slimdiff.jobs.training import finetune_model
from slimdiff.metrics.cost import count_macs
from slimdiff.metrics.features import DIGITS_FEATURES, feature_extractor
from slimdiff.metrics.quality import compute_quality, reference_features
from slimdiff.models import adapter_for
from slimdiff.models.base import count_params
from slimdiff.settings import KDConfig, TrainConfig
from slimdiff.training.diffusion import sample

OFFICIAL = ("official", "official-global")


# --- the official procedure, with torch-pruning and plain diffusers ----------------------------------------------


def digits_train_images() -> torch.Tensor:
    train = load_data("digits", size=16, split="train")
    return torch.stack([image for image, _ in train])


def official_gradients(model: UNet2DModel, scheduler: DDPMScheduler, *, batch: int, thr: float, seed: int) -> int:
    """Accumulate Σ_t ∂L_t/∂w on one batch and one noise, t = 0, 1, … until L_t < thr·max L; returns the last t."""
    images = digits_train_images()
    generator = torch.Generator().manual_seed(seed)
    clean = images[torch.randperm(len(images), generator=generator)[:batch]]
    noise = torch.randn(clean.shape, generator=generator)
    model.zero_grad()
    model.eval()
    loss_max = 0.0
    for t in range(scheduler.config.num_train_timesteps):
        timesteps = torch.full((len(clean),), t, dtype=torch.long)
        loss = F.mse_loss(model(scheduler.add_noise(clean, noise, timesteps), timesteps).sample, noise)
        loss.backward()
        loss_max = max(loss_max, loss.item())
        if loss.item() < loss_max * thr:
            break
    return t


def official_prune(model: UNet2DModel, ratio: float, *, global_pruning: bool) -> UNet2DModel:
    """torch-pruning's MetaPruner at `ratio` on a copy of `model` (whose .grad holds the accumulated gradients)."""
    pruned = copy.deepcopy(model)
    for original, copied in zip(model.parameters(), pruned.parameters(), strict=True):
        copied.grad = None if original.grad is None else original.grad.clone()
    heads = {proj: m.heads for m in pruned.modules() if isinstance(m, Attention) for proj in (m.to_q, m.to_k, m.to_v)}
    example = {"sample": torch.randn(1, pruned.config.in_channels, 16, 16), "timestep": torch.ones(1).long()}
    pruner = tp.pruner.MetaPruner(
        pruned,
        example,
        importance=tp.importance.TaylorImportance(multivariable=False),
        pruning_ratio=ratio,
        global_pruning=global_pruning,
        ignored_layers=[pruned.conv_out],
        num_heads=heads,
        prune_head_dims=True,
        prune_num_heads=False,
    )
    for group in pruner.step(interactive=True):
        group.prune()
    for m in pruned.modules():
        if isinstance(m, (Upsample2D, Downsample2D)):
            m.channels = m.conv.in_channels
    pruned.zero_grad(set_to_none=True)
    return pruned.eval()


def official_finetune(model: UNet2DModel, scheduler: DDPMScheduler, *, steps: int, seed: int) -> UNet2DModel:
    """Plain fine-tune: AdamW lr 2e-4 (constant, no warm-up), grad-clip 1.0, batch 64, ε-MSE; raw weights."""
    images = digits_train_images()
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-4)
    model.train()
    for _ in range(steps):
        clean = images[torch.randint(0, len(images), (64,), generator=generator)]
        noise = torch.randn(clean.shape, generator=generator)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (64,), generator=generator)
        loss = F.mse_loss(model(scheduler.add_noise(clean, noise, t), t).sample, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    return model.eval()


def official_row(args: argparse.Namespace, kind: str, seed: int, pruned_dir: Path) -> dict[str, Any]:
    """Prune the teacher the official way (uniform ratio, or global ranking searched to the target) and save it."""
    teacher = load(args.teacher)
    scheduler = DDPMScheduler.from_config(load_scheduler_config(args.teacher))
    last_t = official_gradients(teacher, scheduler, batch=128, thr=args.thr, seed=seed)
    base = count_macs(teacher).total
    if kind == "official":
        ratio, pruned = args.official_ratio, official_prune(teacher, args.official_ratio, global_pruning=False)
    else:
        lo, hi, best = 0.0, 0.9, None
        for _ in range(12):
            mid = (lo + hi) / 2
            candidate = official_prune(teacher, mid, global_pruning=True)
            fraction = count_macs(candidate).total / base
            if best is None or abs(fraction - args.target_macs) < abs(best[1] - args.target_macs):
                best = (candidate, fraction, mid)
            lo, hi = (mid, hi) if fraction > args.target_macs else (lo, mid)
            if abs(fraction - args.target_macs) < 0.005:
                break
        pruned, _, ratio = best
    save(pruned, pruned_dir, scheduler_config=load_scheduler_config(args.teacher))
    return {"ratio": ratio, "last_timestep": last_t}


# --- reading quality as a curve -----------------------------------------------------------------------------------


class Curve:
    """FID/KID of `n` samples at DDIM step counts by both digits networks, cached in `cache_path`.

    The cache is keyed by model dir, n and steps, and merged under a file lock, so concurrent runs sharing a work
    folder compute each model's curve (the teacher's above all) once.
    """

    def __init__(self, n: int, cache_path: Path) -> None:
        self.n, self.cache_path = n, cache_path
        train = load_data("digits", size=16, split="train")
        self.networks = {f: feature_extractor(f) for f in DIGITS_FEATURES}
        self.real = {f: reference_features(train, net, split="train") for f, net in self.networks.items()}

    def _cached(self) -> dict[str, Any]:
        return read_json(self.cache_path, "curve cache") if self.cache_path.is_file() else {}

    def read(self, model_dir: Path, steps: list[int]) -> dict[str, dict[str, dict[str, float]]]:
        def key(count: int) -> str:
            return f"{Path(model_dir).resolve()}|n{self.n}|s{count}"

        adapter = None
        for count in sorted(set(steps)):
            if key(count) in self._cached():
                continue
            adapter = adapter or adapter_for(load(model_dir))
            images = sample(
                adapter,
                n=self.n,
                steps=count,
                schedule=load_scheduler_config(model_dir),
                seed=0,
                batch_size=250,
                progress=False,
            )
            value = {}
            for f, net in self.networks.items():
                q = compute_quality(images, self.real[f], net, metrics=("fid", "kid"), kid_subset_size=min(500, self.n))
                value[f] = {"fid": q["fid"], "kid": q["kid_mean"]}
            self.cache_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.cache_path.with_suffix(".lock"), "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                atomic_write_json(self.cache_path, self._cached() | {key(count): value})
        cached = self._cached()
        return {str(c): cached[key(c)] for c in steps}


def teacher_train_steps(teacher: Path) -> int:
    """Steps the teacher was trained for: slimdiff's provenance, or the external script's training.json."""
    history = read_provenance(teacher).history
    if history:
        return history[-1]["steps"]
    trained = read_json(teacher / "training.json", "training record")["args"]
    return trained.get("stop_after") or trained["steps"]


def summarise(rows: list[dict], teacher_curve: dict, steps: list[int]) -> dict[str, Any]:
    """Per row kind and step count: mean FID by each network, its ratio to the teacher's at the same steps."""
    summary: dict[str, Any] = {}
    for kind in dict.fromkeys(r["row"] for r in rows):
        chosen = [r for r in rows if r["row"] == kind]
        entry: dict[str, Any] = {"seeds": [r["seed"] for r in chosen], "macs_fraction": chosen[0]["macs_fraction"]}
        for f in DIGITS_FEATURES:
            for s in map(str, steps):
                fids = [r["curve"][s][f]["fid"] for r in chosen]
                entry[f"{f}@{s}"] = {
                    "mean": statistics.mean(fids),
                    "std": statistics.stdev(fids) if len(fids) > 1 else None,
                    "x_teacher": statistics.mean(fids) / teacher_curve[s][f]["fid"],
                }
        summary[kind] = entry
    if "official" in summary:
        for entry in summary.values():
            entry["le_official_everywhere"] = all(
                entry[k]["mean"] <= summary["official"][k]["mean"] for k in entry if "@" in k
            )
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", type=Path, default=Path("runs/demo/teacher"))
    parser.add_argument("--work", type=Path, default=Path("runs/bench-diff-pruning"))
    parser.add_argument("--rows", nargs="*", default=["official", "diff-pruning"], help="none: the teacher only")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--target-macs", type=float, default=0.5)
    parser.add_argument("--match-official", action="store_true", help="slimdiff rows at the official row's MACs")
    parser.add_argument("--official-ratio", type=float, default=0.25)
    parser.add_argument("--official-finetune", choices=("plain", "slimdiff"), default="plain")
    parser.add_argument("--thr", type=float, default=0.05)
    parser.add_argument("--finetune-fraction", type=float, default=0.15, help="of the teacher's training steps")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--warmup-steps", type=int, default=20)
    parser.add_argument("--ema-decay", type=float, default=0.995)
    parser.add_argument("--kd-output-weight", type=float, default=10.0, help="0: the plain denoising loss")
    parser.add_argument("--kd-feature-weight", type=float, default=0.0, help="normalized KD at the kept channels")
    parser.add_argument("--snr-gamma", type=float, default=None, help="min-SNR-γ weighting of the task loss")
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--curve", type=int, nargs="+", default=[6, 13, 25, 50], help="DDIM step counts")
    parser.add_argument("--curves", type=Path, help="curve cache to share between runs (default <work>/curves.json)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tag", default="", help="suffix of the work folders (one per fine-tune setting)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/diff_pruning.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    curve = Curve(args.n, args.curves or args.work / "curves.json")
    trained = teacher_train_steps(args.teacher)
    args.finetune_steps = round(args.finetune_fraction * trained)
    teacher_macs = count_macs(load(args.teacher)).total

    steps = sorted(set(args.curve))
    result: dict[str, Any] = {
        "what": f"{args.teacher} pruned, fine-tuned {args.finetune_steps} steps ({args.finetune_fraction:.0%} of "
        f"its {trained}); FID/KID of {args.n} samples (DDIM, seed 0) against the digits train split by both "
        "digits networks, at each step count",
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "teacher": {"macs": teacher_macs},
    }
    finetune = TrainConfig(
        steps=args.finetune_steps,
        batch_size=64,
        lr=args.lr,
        warmup_steps=min(args.warmup_steps, args.finetune_steps),
        ema_decay=args.ema_decay,
        checkpoint_every=args.finetune_steps,
        snr_gamma=args.snr_gamma,
    )
    kd = KDConfig(output_weight=args.kd_output_weight, feature_weight=args.kd_feature_weight)
    distillation = {"teacher_dir": args.teacher, "kd": kd} if kd.output_weight + kd.feature_weight > 0 else {}
    rows: list[dict[str, Any]] = []
    for seed in args.seeds:
        for kind in args.rows:
            start = time.perf_counter()
            work = args.work / f"{kind}-seed{seed}"
            pruned_dir, tuned = work / "pruned", work / f"finetuned{args.tag}"
            record: dict[str, Any] = {}
            if kind in OFFICIAL:
                if not (pruned_dir / "slimdiff.json").is_file():
                    record = official_row(args, kind, seed, pruned_dir)
                    atomic_write_json(work / "official.json", record)
                record = read_json(work / "official.json", "official record")
            elif kind == "scratch":
                template = load(args.work / f"diff-pruning-seed{seed}" / "pruned")
                scratch = copy.deepcopy(template)
                torch.manual_seed(seed)
                for module in scratch.modules():
                    if hasattr(module, "reset_parameters") and module is not scratch:
                        module.reset_parameters()
                save(scratch, pruned_dir, scheduler_config=load_scheduler_config(args.teacher))
            elif not (pruned_dir / "slimdiff.json").is_file():
                importance = kind.removesuffix("-global")
                official = args.work / f"official-seed{seed}" / "pruned"
                if args.match_official and not (official / "slimdiff.json").is_file():
                    raise SystemExit("--match-official: run the official row first (put it first in --rows)")
                target = count_macs(load(official)).total / teacher_macs if args.match_official else args.target_macs
                config = ChannelPruningConfig(
                    importance=importance,
                    target_macs=target,
                    widths="global" if kind != importance else "uniform",
                    seed=seed,
                )
                pruned = compress_model("channels", args.teacher, "digits", pruned_dir, config)
                record = {"target_macs": target, "summary": pruned.summary, "seconds": pruned.seconds}
            if not (tuned / "slimdiff.json").is_file():
                if kind in OFFICIAL and args.official_finetune == "plain":
                    scheduler = DDPMScheduler.from_config(load_scheduler_config(args.teacher))
                    model = official_finetune(load(pruned_dir), scheduler, steps=args.finetune_steps, seed=seed)
                    save(model, tuned, scheduler_config=load_scheduler_config(args.teacher))
                else:
                    config = TrainConfig(**{**vars(finetune), "seed": seed})
                    finetune_model(pruned_dir, "digits", tuned, config, progress=False, **distillation)
            model = load(tuned)
            fraction = count_macs(model).total / teacher_macs
            equal_cost = {str(s): max(1, round(fraction * s)) for s in steps}  # teacher steps at the same sampling MACs
            rows.append(
                {
                    "row": kind,
                    "seed": seed,
                    "finetune": "plain (official)"
                    if kind in OFFICIAL and args.official_finetune == "plain"
                    else f"slimdiff lr {args.lr} warm-up {args.warmup_steps} EMA {args.ema_decay} "
                    f"KD {args.kd_output_weight} feature KD {args.kd_feature_weight} min-SNR {args.snr_gamma}",
                    "macs_fraction": fraction,
                    "params_fraction": count_params(model) / count_params(load(args.teacher)),
                    "record": record,
                    "curve": curve.read(tuned, steps),
                    "equal_cost_steps": equal_cost,
                    "seconds": round(time.perf_counter() - start, 1),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
            result["rows"] = rows
            atomic_write_json(args.out, result)  # after every row: a stopped run keeps what it measured
    teacher_curve = curve.read(args.teacher, steps)
    result["teacher"] |= {
        "curve": teacher_curve,
        "best_steps": int(min(teacher_curve, key=lambda s: teacher_curve[s]["digits-ms"]["fid"])),
    }
    for row in rows:
        row["teacher_at_equal_sampling_macs"] = {
            s: {"steps": k, **curve.read(args.teacher, [k])[str(k)]} for s, k in row["equal_cost_steps"].items()
        }
    result["summary"] = summarise(rows, teacher_curve, steps)
    atomic_write_json(args.out, result)
    print(json.dumps(result["summary"], indent=2))


if __name__ == "__main__":
    main()
