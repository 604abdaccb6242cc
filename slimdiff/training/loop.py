"""The one training loop: teacher training, fine-tuning and distillation, on one CPU or many GPUs (accelerate).

Read it top to bottom: `train()` sets up, resumes if asked, then runs `steps` optimizer steps of the denoising
loss (+ KD terms when a teacher is given), checkpointing atomically every `checkpoint_every` steps.

Determinism: the data order, noise, timesteps and label dropout of step `s` are drawn from generators seeded by
`(seed, s, micro-batch, rank)`, so nothing about them needs saving; a resumed run replays exactly the same stream
and, on CPU, ends with bit-identical weights to an uninterrupted one.
"""

from __future__ import annotations

import json
import resource
import shutil
import sys
import time
from collections.abc import Callable, Mapping
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from slimdiff.data import ImageDataset, check_fits
from slimdiff.devices import half_dtype
from slimdiff.errors import SlimdiffError
from slimdiff.export import SPEC_NAME
from slimdiff.io import (
    atomic_dir,
    atomic_write_bytes,
    atomic_write_json,
    load_optimizer_tensors,
    optimizer_tensors,
    read_json,
)
from slimdiff.models import Adapter, adapter_for
from slimdiff.settings import KDConfig, TrainConfig
from slimdiff.training.conditioning import Conditioning, default_conditioning
from slimdiff.training.diffusion import DEFAULT_SCHEDULE, make_scheduler, task_loss, training_target
from slimdiff.training.distill import (
    KeptChannels,
    at_kept_channels,
    capture,
    default_feature_pairs,
    feature_kd_terms,
    output_kd_loss,
)

CHECKPOINTS = "checkpoints"
LOG_NAME = "log.jsonl"
#: The loss terms a log record carries (each weighted as it enters the loss), as messages name them.
LOSS_TERMS = {"task": "task", "out_kd": "output KD", "feat_kd": "feature KD"}


@dataclass
class TrainResult:
    """What a run produced."""

    model: nn.Module
    steps: int
    final_loss: float
    seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)

    def describe_loss(self) -> str:
        """The last step's loss and the weighted terms it sums, e.g. `0.0412 (task 0.0380 + output KD 0.0032)`."""
        last = self.history[-1] if self.history else {}
        terms = " + ".join(f"{name} {last[key]:.4f}" for key, name in LOSS_TERMS.items() if key in last)
        return f"{self.final_loss:.4f}" + (f" ({terms})" if terms else "")


def stream_seed(*parts: int) -> int:
    """A 32-bit seed derived from integer parts (seed, step, …): independent streams that need no saved state."""
    return int(np.random.SeedSequence([p & 0xFFFFFFFF for p in parts]).generate_state(1)[0])


@lru_cache(maxsize=4)
def _epoch_order(n_items: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n_items, generator=torch.Generator().manual_seed(stream_seed(seed, epoch)))


def batch_indices(n_items: int, batch: int, seed: int, first: int) -> list[int]:
    """Items `first … first+batch-1` of the endless stream of per-epoch shuffles of `range(n_items)`."""
    return [int(_epoch_order(n_items, seed, k // n_items)[k % n_items]) for k in range(first, first + batch)]


def _preflight(out_dir: Path, model: nn.Module, config: TrainConfig) -> None:
    """Fail before training, not after hours, when the output can't be written."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / ".write-probe"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as error:
        raise SlimdiffError(f"output directory {out_dir} is not writable: {error.strerror}") from None
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    # model + EMA + two Adam moments per checkpoint, kept `keep+1` at once while the newest is written, + export.
    needed = param_bytes * (4 * (config.keep_checkpoints + 1) + 1) + (64 << 20)
    free = shutil.disk_usage(out_dir).free
    if free < needed:
        raise SlimdiffError(
            f"too little disk in {out_dir}: {free / 2**30:.2f} GiB free, checkpoints need about "
            f"{needed / 2**30:.2f} GiB (lower keep_checkpoints or free space)"
        )


# ----------------------------------------------------------------------------------------------------------------
# checkpoints: safetensors + JSON only
# ----------------------------------------------------------------------------------------------------------------
def _checkpoint_dirs(out_dir: Path) -> list[Path]:
    root = out_dir / CHECKPOINTS
    return sorted(root.glob("step-*"), key=lambda p: int(p.name.split("-")[1])) if root.is_dir() else []


def _save_checkpoint(
    out_dir: Path,
    step: int,
    model: nn.Module,
    ema: EMAModel,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: Any,
    meta: dict[str, Any],
    keep: int,
) -> None:
    tensors, param_groups = optimizer_tensors(optimizer)
    ema_state = ema.state_dict()
    shadow = ema_state.pop("shadow_params")
    with atomic_dir(out_dir / CHECKPOINTS / f"step-{step:08d}") as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, tmp / "model.safetensors")
        save_file({str(i): p.detach().cpu().contiguous() for i, p in enumerate(shadow)}, tmp / "ema.safetensors")
        save_file(tensors, tmp / "optimizer.safetensors")
        atomic_write_json(
            tmp / "state.json",
            {
                "step": step,
                "optimizer_param_groups": param_groups,
                "lr_scheduler": lr_scheduler.state_dict(),
                "ema": ema_state,
                **meta,
            },
        )
    for old in _checkpoint_dirs(out_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def _load_checkpoint(
    path: Path,
    state: dict[str, Any],
    model: nn.Module,
    ema: EMAModel,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: Any,
) -> None:
    """Load the tensors of the checkpoint at `path` (whose `state.json` holds `state`) into the run's objects."""
    model.load_state_dict(load_file(path / "model.safetensors"))
    shadow = load_file(path / "ema.safetensors")
    ema.load_state_dict({**state["ema"], "shadow_params": [shadow[str(i)] for i in range(len(shadow))]})
    load_optimizer_tensors(optimizer, load_file(path / "optimizer.safetensors"), state["optimizer_param_groups"])
    lr_scheduler.load_state_dict(state["lr_scheduler"])


# ----------------------------------------------------------------------------------------------------------------
# the loop
# ----------------------------------------------------------------------------------------------------------------
def train(
    model: nn.Module,
    data: ImageDataset,
    out_dir: str | Path,
    config: TrainConfig,
    *,
    conditioning: Conditioning | None = None,
    schedule: dict[str, Any] | None = None,
    teacher: nn.Module | None = None,
    kd: KDConfig | None = None,
    kept_channels: Mapping[str, KeptChannels] | None = None,
    resume: bool = False,
    progress: bool = True,
    on_step: Callable[[int, dict[str, Any]], None] | None = None,
    before_step: Callable[[int], None] | None = None,
) -> TrainResult:
    """Train `model` in place for `config.steps` optimizer steps; returns it with its EMA weights loaded.

    Checkpoints go to `out_dir/checkpoints/`, metrics to `out_dir/log.jsonl` (with the peak memory of the logged
    steps: `memory_record`). With `resume=True` the run continues
    from the latest checkpoint (or starts fresh when there is none). `before_step(step)` runs before every
    optimizer step (e.g. an elastic model drawing the subnet of that step); `on_step(step, record)` after each
    logged one. `kept_channels` (by block) are the teacher channels a channel-pruned student's block outputs kept:
    feature KD compares those blocks with the teacher's outputs taken at them.
    """
    run = _setup(model, data, Path(out_dir), config, conditioning, schedule, teacher, kd, kept_channels or {})
    start = _resume(run) if resume else 0
    _prepare(run)
    bar = tqdm(total=config.steps, initial=start, desc="training", disable=not (progress and run.is_main))
    history: list[dict[str, Any]] = []
    started, last_loss = time.perf_counter(), float("nan")
    window = (time.perf_counter(), 0)  # (start time, steps) of the current logging window
    with ExitStack() as hooks:
        student_features = hooks.enter_context(capture(run.bare, [s for s, _ in run.feature_pairs]))
        teacher_features = hooks.enter_context(
            capture(run.teacher if run.teacher is not None else run.bare, [t for _, t in run.feature_pairs])
        )
        for step in range(start, config.steps):
            if before_step is not None:
                before_step(step)
            terms, pair_terms = _optimizer_step(run, step, student_features, teacher_features)
            done, last_loss = step + 1, sum(terms.values())
            window = (window[0], window[1] + 1)
            bar.update(1)
            if done % config.log_every == 0 or done == config.steps:
                now = time.perf_counter()
                record = {
                    "step": done,
                    "loss": last_loss,
                    **terms,
                    **({"feat_kd_terms": pair_terms} if pair_terms else {}),
                    "lr": run.lr_scheduler.get_last_lr()[0],
                    "steps_per_s": window[1] / max(now - window[0], 1e-9),
                    **memory_record(run.accelerator.device),
                }
                window = (now, 0)
                history.append(record)
                bar.set_postfix(loss=f"{last_loss:.4f}", it_s=f"{record['steps_per_s']:.2f}")
                run.log(record)
                if on_step is not None:
                    on_step(done, record)
            if done % config.checkpoint_every == 0 or done == config.steps:
                _checkpoint(run, done)
    bar.close()
    if config.gradient_checkpointing:
        run.bare.disable_gradient_checkpointing()
    run.ema.copy_to(run.bare.parameters())
    run.bare.eval()
    return TrainResult(run.bare.cpu(), config.steps, last_loss, time.perf_counter() - started, history)


@dataclass
class _Run:
    """Everything one training run holds: settings, the prepared model and optimizer state, the KD set-up."""

    config: TrainConfig
    data: ImageDataset
    out_dir: Path
    accelerator: Accelerator
    model: nn.Module  # as prepared by accelerate (DDP on several processes)
    bare: nn.Module  # the model itself
    student: Adapter  # calls go through `model`, so gradients synchronise
    optimizer: Any
    lr_scheduler: Any
    ema: EMAModel
    noise_scheduler: Any
    conditioning: Conditioning
    local_batch: int
    meta: dict[str, Any]
    teacher: nn.Module | None = None
    teacher_adapter: Adapter | None = None
    teacher_dtype: torch.dtype = torch.float32
    kd: KDConfig | None = None
    feature_pairs: tuple[tuple[str, str], ...] = ()
    kept_channels: Mapping[str, KeptChannels] = field(default_factory=dict)

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    def log(self, record: dict[str, Any]) -> None:
        if self.is_main:
            with (self.out_dir / LOG_NAME).open("a") as log:
                log.write(json.dumps(record) + "\n")


def _setup(
    model: nn.Module,
    data: ImageDataset,
    out_dir: Path,
    config: TrainConfig,
    conditioning: Conditioning | None,
    schedule: dict[str, Any] | None,
    teacher: nn.Module | None,
    kd: KDConfig | None,
    kept_channels: Mapping[str, KeptChannels],
) -> _Run:
    """Check the inputs, build accelerator, optimizer, schedule and EMA, and pair the KD features."""
    config.validate()
    adapter = adapter_for(model)
    check_fits(data, sample_size=adapter.sample_size, in_channels=adapter.in_channels)
    conditioning = conditioning or default_conditioning(adapter)
    if conditioning.kind != adapter.cond_kind:
        raise SlimdiffError(f"conditioning '{conditioning.kind}' does not fit a {adapter.cond_kind}-conditioned model")
    noise_scheduler = make_scheduler("ddpm", schedule or DEFAULT_SCHEDULE)

    mixed = config.mixed_precision
    cuda = torch.cuda.is_available()
    # cpu=True on CPU-only machines lets `accelerate launch`/torchrun start gloo processes (MULTI_CPU).
    accelerator = Accelerator(cpu=not cuda, mixed_precision=("bf16" if cuda else "no") if mixed == "auto" else mixed)
    world = accelerator.num_processes
    if config.batch_size % world:
        raise SlimdiffError(f"batch_size {config.batch_size} is not divisible by the {world} processes")
    if accelerator.is_main_process:
        _preflight(out_dir, model, config)
    accelerator.wait_for_everyone()

    model.train()
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    lr_scheduler = get_scheduler(
        config.lr_schedule,
        optimizer,
        num_warmup_steps=min(config.warmup_steps, config.steps),
        num_training_steps=config.steps,
    )
    ema = EMAModel(model.parameters(), decay=config.ema_decay, use_ema_warmup=True)
    run = _Run(
        config=config,
        data=data,
        out_dir=out_dir,
        accelerator=accelerator,
        model=model,
        bare=model,
        student=adapter,
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        ema=ema,
        noise_scheduler=noise_scheduler,
        conditioning=conditioning,
        local_batch=config.batch_size // world,
        meta={"config": config.fingerprint(), "data": data.source, "world": world, "steps": config.steps},
        kept_channels=kept_channels,
    )
    if teacher is not None:
        run.kd = kd or KDConfig()
        run.teacher_dtype = half_dtype(accelerator.device)
        run.teacher = teacher.to(accelerator.device).eval().requires_grad_(False)
        if run.teacher_dtype != torch.float32:
            run.teacher.to(run.teacher_dtype)
        run.teacher_adapter = adapter_for(run.teacher)
        if run.kd.feature_weight > 0:
            run.feature_pairs = run.kd.features or default_feature_pairs(adapter, run.teacher_adapter, kept_channels)
            if not run.feature_pairs:
                raise SlimdiffError(
                    "no student/teacher block outputs share a shape, even at the student's kept channels, so "
                    "feature KD has nothing to match; set the feature-KD weight to 0 (output KD still works) or "
                    "pass feature pairs"
                )
    return run


def _resume(run: _Run) -> int:
    """Load the latest checkpoint (if any) into the run, refusing one made with other settings; its step.

    Only the schedule's length may differ: the LR schedule is then the new run's (the run is continued as if it
    had been started with the new `steps`; steps already taken keep the LR they had), and the log records the
    step it changed at. The log keeps the records up to the checkpoint's step, so it reads as one run.
    """
    checkpoints = _checkpoint_dirs(run.out_dir)
    if not checkpoints:
        if (run.out_dir / SPEC_NAME).is_file():
            raise SlimdiffError(
                f"cannot resume in {run.out_dir}: it holds a saved model but no training checkpoint; use "
                "--overwrite to replace it, or a new --out"
            )
        _truncate_log(run, 0)
        return 0
    latest = checkpoints[-1]
    state = read_json(latest / "state.json", "checkpoint state")
    _refuse_other_settings(latest, state, run.meta)
    start = state["step"]
    if start > run.config.steps:
        raise SlimdiffError(f"checkpoint is at step {start}, beyond the requested {run.config.steps} steps")
    _load_checkpoint(latest, state, run.bare, run.ema, run.optimizer, run.lr_scheduler)
    _truncate_log(run, start)
    before = state.get("steps")
    if before == run.config.steps:
        run.log({"event": "resumed", "step": start})
        return start
    scheduler = run.lr_scheduler  # built for the new length; the checkpoint restored its position and LRs
    lrs = [base * factor(scheduler.last_epoch) for base, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(run.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs
    run.log({"event": "resumed", "step": start, "steps_changed": {"from": before, "to": run.config.steps}})
    return start


def _refuse_other_settings(checkpoint: Path, state: dict[str, Any], meta: dict[str, Any]) -> None:
    """Name the one setting (the first that differs) in which a checkpoint's run differs from this one."""
    recorded = {**state.get("config", {}), "data": state.get("data"), "world": state.get("world")}
    wanted = {**meta["config"], "data": meta["data"], "world": meta["world"]}
    for key in dict.fromkeys([*wanted, *recorded]):
        if recorded.get(key) != wanted.get(key):
            name = "number of processes" if key == "world" else key
            raise SlimdiffError(
                f"cannot resume from {checkpoint}: its {name} was {recorded.get(key)!r}, this run's is "
                f"{wanted.get(key)!r} (only the number of steps may change); use the same settings, --overwrite, "
                "or a new --out"
            )


def _truncate_log(run: _Run, step: int) -> None:
    """Drop the log records after `step` (what an interrupted run logged past its last checkpoint)."""
    path = run.out_dir / LOG_NAME
    if not run.is_main or not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
    if kept != lines:
        atomic_write_bytes(path, "".join(kept).encode())


def _prepare(run: _Run) -> None:
    """Hand model and optimizer to accelerate and move everything to its device."""
    device = run.accelerator.device
    run.model, run.optimizer = run.accelerator.prepare(run.model, run.optimizer)
    run.bare = run.accelerator.unwrap_model(run.model)
    run.student = adapter_for(run.bare, forward_module=run.model)
    run.ema.to(device)
    run.conditioning = run.conditioning.to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # the first logged window's peak starts here


def _optimizer_step(
    run: _Run, step: int, student_features: Any, teacher_features: Any
) -> tuple[dict[str, float], dict[str, float]]:
    """One optimizer step (all micro-batches); returns the mean of each loss term, and of each (unweighted)
    feature-KD term by student module, so that their imbalance shows in the log."""
    config, accelerator, device = run.config, run.accelerator, run.accelerator.device
    num_timesteps = run.noise_scheduler.config.num_train_timesteps
    terms_sum: dict[str, float] = {}
    pair_terms: dict[str, float] = {}
    # Randomness inside the model (dropout, DiT's label dropout) uses the global RNG: seed it per step.
    torch.manual_seed(stream_seed(config.seed, step, run.rank, 2))
    for micro in range(config.grad_accumulation):
        generator = torch.Generator().manual_seed(stream_seed(config.seed, step, micro, run.rank, 1))
        first = (step * config.grad_accumulation + micro) * config.batch_size + run.rank * run.local_batch
        items = [run.data[i] for i in batch_indices(len(run.data), run.local_batch, config.seed, first)]
        x0 = torch.stack([image for image, _ in items]).to(device)
        labels = torch.tensor([label for _, label in items], device=device)
        noise = torch.randn(x0.shape, generator=generator).to(device)
        t = torch.randint(0, num_timesteps, (x0.shape[0],), generator=generator).to(device)
        drop = (torch.rand(x0.shape[0], generator=generator) < config.label_dropout).to(device)
        cond = run.conditioning(labels, drop)
        x_t = run.noise_scheduler.add_noise(x0, noise, t)
        target = training_target(run.noise_scheduler, x0, noise, t)
        sync = micro == config.grad_accumulation - 1
        with accelerator.no_sync(run.model) if not sync else nullcontext(), accelerator.autocast():
            pred = run.student(x_t, t, cond)
            terms = {"task": task_loss(pred, target, t, run.noise_scheduler, config.snr_gamma)}
            if run.teacher_adapter is not None:
                with torch.no_grad():
                    teacher_pred = run.teacher_adapter(
                        x_t.to(run.teacher_dtype), t, _in_dtype(cond, run.teacher_dtype)
                    ).to(pred.dtype)
                if run.kd.output_weight > 0:
                    terms["out_kd"] = run.kd.output_weight * output_kd_loss(pred, teacher_pred)
                if run.feature_pairs:
                    learnt = student_features.take()
                    taught = at_kept_channels(
                        teacher_features.take(),
                        [t for _, t in run.feature_pairs],
                        run.kept_channels,
                        run.student.block_channel_dim,
                    )
                    taught = [f.to(s.dtype) for s, f in zip(learnt, taught, strict=True)]
                    per_pair = feature_kd_terms(learnt, taught, run.kd.mode)
                    terms["feat_kd"] = run.kd.feature_weight * torch.stack(per_pair).sum()
                    for (name, _), term in zip(run.feature_pairs, per_pair, strict=True):
                        pair_terms[name] = pair_terms.get(name, 0.0) + term.item() / config.grad_accumulation
            loss = sum(terms.values())
        _stop_if_diverged(accelerator, bool(torch.isfinite(loss)), "loss", step + 1, run.out_dir)
        with student_features.paused():  # checkpointed blocks recompute in the backward: not a forward's features
            accelerator.backward(loss / config.grad_accumulation)
        for key, value in terms.items():
            terms_sum[key] = terms_sum.get(key, 0.0) + value.item() / config.grad_accumulation
    if config.grad_clip > 0:
        accelerator.clip_grad_norm_(run.model.parameters(), config.grad_clip)
    run.optimizer.step()
    run.lr_scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.ema.step(run.bare.parameters())
    return terms_sum, pair_terms


def _in_dtype(cond: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A condition for a model held in `dtype`: prompt embeddings cast, class labels (integers) as they are."""
    return cond.to(dtype) if cond is not None and cond.is_floating_point() else cond


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Turn on the model's own gradient checkpointing (diffusers' `enable_gradient_checkpointing`: each resnet and
    transformer block recomputed in the backward); a model without it is refused in one line."""
    try:
        model.enable_gradient_checkpointing()
    except (AttributeError, ValueError):  # not a diffusers model, or one without checkpointing
        raise SlimdiffError(
            f"{type(model).__name__} does not support gradient checkpointing; train it without --gradient-checkpointing"
        ) from None


def memory_record(device: torch.device) -> dict[str, Any]:
    """The peak memory a log record carries. On CUDA: the peak tensor memory allocated since the last record
    (`torch.cuda.max_memory_allocated`, weights and optimizer state included; the peak is reset). Elsewhere: the
    process's peak resident set size so far (`getrusage`'s `ru_maxrss`: tensors, Python, libraries, data)."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        return {"peak_memory_bytes": peak, "peak_memory_counts": "CUDA tensor memory allocated since the last record"}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return {"peak_memory_bytes": rss, "peak_memory_counts": "process peak resident set size (ru_maxrss)"}


def _checkpoint(run: _Run, done: int) -> None:
    """Write a checkpoint of step `done` atomically (never one with NaN/inf parameters)."""
    finite = all(bool(torch.isfinite(p).all()) for p in run.bare.parameters())
    _stop_if_diverged(run.accelerator, finite, "a parameter", done, run.out_dir)
    if run.is_main:
        optimizer = run.optimizer.optimizer if hasattr(run.optimizer, "optimizer") else run.optimizer
        _save_checkpoint(
            run.out_dir, done, run.bare, run.ema, optimizer, run.lr_scheduler, run.meta, run.config.keep_checkpoints
        )
    run.accelerator.wait_for_everyone()


def _stop_if_diverged(accelerator: Accelerator, finite: bool, what: str, step: int, out_dir: Path) -> None:
    """Stop every process together when any of them sees a NaN/inf `what`, naming the last good checkpoint."""
    bad = torch.tensor([0.0 if finite else 1.0], device=accelerator.device)
    if accelerator.num_processes > 1:
        bad = accelerator.reduce(bad, reduction="sum")
    if bad.item() > 0:
        kept = _checkpoint_dirs(out_dir)
        where = f"the last good checkpoint is {kept[-1]}" if kept else "no checkpoint was written yet"
        raise SlimdiffError(
            f"{what} became NaN/inf at step {step}; training stopped and {where} (lower the learning rate, or "
            "check the data)"
        )
