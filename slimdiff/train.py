"""The one training loop: teacher training, fine-tuning and distillation, on one CPU or many GPUs (accelerate).

Read it top to bottom: `train()` sets up, resumes if asked, then runs `steps` optimizer steps of the denoising
loss (+ KD terms when a teacher is given), checkpointing atomically every `checkpoint_every` steps.

Determinism: the data order, noise, timesteps and label dropout of step `s` are drawn from generators seeded by
`(seed, s, micro-batch, rank)`, so nothing about them needs saving; a resumed run replays exactly the same stream
and, on CPU, ends with bit-identical weights to an uninterrupted one.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from slimdiff.data import ImageDataset, check_fits
from slimdiff.diffusion import DEFAULT_SCHEDULE, make_scheduler, training_target
from slimdiff.distill import KDConfig, capture, default_feature_pairs, feature_kd_loss, output_kd_loss
from slimdiff.errors import SlimdiffError
from slimdiff.io import atomic_dir, atomic_write_json, read_json
from slimdiff.models import Adapter, adapter_for

CHECKPOINTS = "checkpoints"
LOG_NAME = "log.jsonl"


@dataclass
class TrainConfig:
    """Settings of one training run. `batch_size` is the global batch (split across processes)."""

    steps: int
    batch_size: int = 64
    lr: float = 2e-4
    lr_schedule: Literal["constant", "cosine", "linear"] = "cosine"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    grad_accumulation: int = 1
    ema_decay: float = 0.999
    label_dropout: float = 0.1
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    seed: int = 0
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = "auto"
    log_every: int = 10

    def validate(self) -> None:
        checks = {
            "steps": self.steps >= 1,
            "batch_size": self.batch_size >= 1,
            "lr": self.lr > 0,
            "lr_schedule": self.lr_schedule in ("constant", "cosine", "linear"),
            "warmup_steps": 0 <= self.warmup_steps <= self.steps,
            "grad_clip": self.grad_clip >= 0,
            "grad_accumulation": self.grad_accumulation >= 1,
            "ema_decay": 0 <= self.ema_decay < 1,
            "label_dropout": 0 <= self.label_dropout < 1,
            "checkpoint_every": self.checkpoint_every >= 1,
            "keep_checkpoints": self.keep_checkpoints >= 1,
            "mixed_precision": self.mixed_precision in ("auto", "no", "fp16", "bf16"),
            "log_every": self.log_every >= 1,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise SlimdiffError(f"invalid training setting {bad[0]}={getattr(self, bad[0])!r}")

    def fingerprint(self) -> dict[str, Any]:
        """Settings a resumed run must share with the run it continues (`steps` may grow)."""
        return {k: v for k, v in asdict(self).items() if k not in ("steps", "checkpoint_every", "keep_checkpoints")}


@dataclass
class Conditioning:
    """How dataset labels become the model's condition: class labels, or per-class prompt embeddings."""

    kind: Literal["none", "class", "text"]
    null_class: int | None = None
    prompt_table: torch.Tensor | None = None  # (num_classes, tokens, dim)
    empty_prompt: torch.Tensor | None = None  # (1, tokens, dim)

    def __call__(self, labels: torch.Tensor, drop: torch.Tensor) -> torch.Tensor | None:
        """Conditions for a batch; where `drop` is true the condition is replaced by the null one."""
        if self.kind == "none":
            return None
        if self.kind == "class":
            return labels if self.null_class is None else torch.where(drop, self.null_class, labels)
        cond = self.prompt_table[labels]
        if self.empty_prompt is not None:
            cond = torch.where(drop[:, None, None], self.empty_prompt.expand_as(cond), cond)
        return cond


@dataclass
class TrainResult:
    """What a run produced."""

    model: nn.Module
    steps: int
    final_loss: float
    seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)


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
    optim_state = optimizer.state_dict()
    tensors = {
        f"{index}.{key}": value.detach().cpu().contiguous()
        for index, state in optim_state["state"].items()
        for key, value in state.items()
    }
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
                "optimizer_param_groups": optim_state["param_groups"],
                "lr_scheduler": lr_scheduler.state_dict(),
                "ema": ema_state,
                **meta,
            },
        )
    for old in _checkpoint_dirs(out_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def _load_checkpoint(
    path: Path, model: nn.Module, ema: EMAModel, optimizer: torch.optim.Optimizer, lr_scheduler: Any
) -> dict[str, Any]:
    state = read_json(path / "state.json", "checkpoint state")
    model.load_state_dict(load_file(path / "model.safetensors"))
    shadow = load_file(path / "ema.safetensors")
    ema.load_state_dict({**state["ema"], "shadow_params": [shadow[str(i)] for i in range(len(shadow))]})
    flat = load_file(path / "optimizer.safetensors")
    per_param: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in flat.items():
        index, name = key.split(".", 1)
        per_param.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": per_param, "param_groups": state["optimizer_param_groups"]})
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    return state


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
    resume: bool = False,
    progress: bool = True,
    on_step: Callable[[int, dict[str, Any]], None] | None = None,
    before_step: Callable[[int], None] | None = None,
) -> TrainResult:
    """Train `model` in place for `config.steps` optimizer steps; returns it with its EMA weights loaded.

    Checkpoints go to `out_dir/checkpoints/`, metrics to `out_dir/log.jsonl`. With `resume=True` the run continues
    from the latest checkpoint (or starts fresh when there is none). `before_step(step)` runs before every
    optimizer step (e.g. an elastic model drawing the subnet of that step); `on_step(step, record)` after each
    logged one.
    """
    config.validate()
    out_dir = Path(out_dir)
    adapter = adapter_for(model)
    check_fits(data, sample_size=adapter.sample_size, in_channels=adapter.in_channels)
    conditioning = conditioning or default_conditioning(adapter)
    if conditioning.kind != adapter.cond_kind:
        raise SlimdiffError(f"conditioning '{conditioning.kind}' does not fit a {adapter.cond_kind}-conditioned model")
    schedule = schedule or DEFAULT_SCHEDULE
    noise_scheduler = make_scheduler("ddpm", schedule)
    num_timesteps = noise_scheduler.config.num_train_timesteps

    mixed = config.mixed_precision
    cuda = torch.cuda.is_available()
    # cpu=True on CPU-only machines lets `accelerate launch`/torchrun start gloo processes (MULTI_CPU).
    accelerator = Accelerator(cpu=not cuda, mixed_precision=("bf16" if cuda else "no") if mixed == "auto" else mixed)
    world, rank = accelerator.num_processes, accelerator.process_index
    if config.batch_size % world:
        raise SlimdiffError(f"batch_size {config.batch_size} is not divisible by the {world} processes")
    local_batch = config.batch_size // world
    if accelerator.is_main_process:
        _preflight(out_dir, model, config)
    accelerator.wait_for_everyone()

    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    lr_scheduler = get_scheduler(
        config.lr_schedule, optimizer, num_warmup_steps=config.warmup_steps, num_training_steps=config.steps
    )
    ema = EMAModel(model.parameters(), decay=config.ema_decay, use_ema_warmup=True)
    meta = {"config": config.fingerprint(), "data": data.source, "world": world}

    start = 0
    checkpoints = _checkpoint_dirs(out_dir) if resume else []
    if checkpoints:
        state = _load_checkpoint(checkpoints[-1], model, ema, optimizer, lr_scheduler)
        for key in ("config", "data", "world"):
            if state.get(key) != meta[key]:
                raise SlimdiffError(
                    f"cannot resume from {checkpoints[-1]}: its {key} {state.get(key)} differs from this run's "
                    f"{meta[key]}; use a new output directory or the same settings"
                )
        start = state["step"]
        if start > config.steps:
            raise SlimdiffError(f"checkpoint is at step {start}, beyond the requested {config.steps} steps")

    device = accelerator.device
    model, optimizer = accelerator.prepare(model, optimizer)
    bare = accelerator.unwrap_model(model)
    ema.to(device)
    if conditioning.prompt_table is not None:
        conditioning.prompt_table = conditioning.prompt_table.to(device)
        if conditioning.empty_prompt is not None:
            conditioning.empty_prompt = conditioning.empty_prompt.to(device)

    feature_pairs: tuple[tuple[str, str], ...] = ()
    teacher_adapter = None
    if teacher is not None:
        kd = kd or KDConfig()
        teacher = teacher.to(device).eval().requires_grad_(False)
        teacher_adapter = adapter_for(teacher)
        if kd.feature_weight > 0:
            feature_pairs = kd.features or default_feature_pairs(adapter_for(bare), teacher_adapter)
            if not feature_pairs:
                raise SlimdiffError(
                    "no student/teacher block outputs share a shape, so feature KD has nothing to match; set the "
                    "feature-KD weight to 0 (output KD still works) or pass feature pairs"
                )
    student = adapter_for(bare, forward_module=model)  # calls go through DDP so gradients synchronise

    log_path = out_dir / LOG_NAME
    history: list[dict[str, Any]] = []
    bar = tqdm(
        total=config.steps, initial=start, desc="training", disable=not (progress and accelerator.is_main_process)
    )
    started, last_loss, window_start, window_steps = time.perf_counter(), float("nan"), time.perf_counter(), 0
    with (
        capture(bare, [s for s, _ in feature_pairs]) as student_features,
        capture(teacher if teacher is not None else bare, [t for _, t in feature_pairs]) as teacher_features,
    ):
        for step in range(start, config.steps):
            if before_step is not None:
                before_step(step)
            terms_sum: dict[str, float] = {}
            # Randomness inside the model (dropout, DiT's label dropout) uses the global RNG: seed it per step.
            torch.manual_seed(stream_seed(config.seed, step, rank, 2))
            for micro in range(config.grad_accumulation):
                generator = torch.Generator().manual_seed(stream_seed(config.seed, step, micro, rank, 1))
                first = (step * config.grad_accumulation + micro) * config.batch_size + rank * local_batch
                indices = batch_indices(len(data), local_batch, config.seed, first)
                items = [data[i] for i in indices]
                x0 = torch.stack([image for image, _ in items]).to(device)
                labels = torch.tensor([label for _, label in items], device=device)
                noise = torch.randn(x0.shape, generator=generator).to(device)
                t = torch.randint(0, num_timesteps, (x0.shape[0],), generator=generator).to(device)
                drop = (torch.rand(x0.shape[0], generator=generator) < config.label_dropout).to(device)
                cond = conditioning(labels, drop)
                x_t = noise_scheduler.add_noise(x0, noise, t)
                target = training_target(noise_scheduler, x0, noise, t)
                sync = micro == config.grad_accumulation - 1
                with accelerator.no_sync(model) if not sync else nullcontext(), accelerator.autocast():
                    pred = student(x_t, t, cond)
                    terms = {"task": F.mse_loss(pred.float(), target.float())}
                    if teacher_adapter is not None:
                        with torch.no_grad():
                            teacher_pred = teacher_adapter(x_t, t, cond)
                        if kd.output_weight > 0:
                            terms["out_kd"] = kd.output_weight * output_kd_loss(pred, teacher_pred)
                        if feature_pairs:
                            terms["feat_kd"] = kd.feature_weight * feature_kd_loss(
                                student_features.take(), teacher_features.take(), kd.mode
                            )
                    loss = sum(terms.values())
                _stop_if_diverged(accelerator, bool(torch.isfinite(loss)), "loss", step + 1, out_dir)
                accelerator.backward(loss / config.grad_accumulation)
                for key, value in terms.items():
                    terms_sum[key] = terms_sum.get(key, 0.0) + value.item() / config.grad_accumulation
            if config.grad_clip > 0:
                accelerator.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            ema.step(bare.parameters())

            done = step + 1
            last_loss = sum(terms_sum.values())
            window_steps += 1
            bar.update(1)
            if done % config.log_every == 0 or done == config.steps:
                now = time.perf_counter()
                record = {
                    "step": done,
                    "loss": last_loss,
                    **terms_sum,
                    "lr": lr_scheduler.get_last_lr()[0],
                    "steps_per_s": window_steps / max(now - window_start, 1e-9),
                }
                window_start, window_steps = now, 0
                history.append(record)
                bar.set_postfix(loss=f"{last_loss:.4f}", it_s=f"{record['steps_per_s']:.2f}")
                if accelerator.is_main_process:
                    with log_path.open("a") as log:
                        log.write(json.dumps(record) + "\n")
                if on_step is not None:
                    on_step(done, record)
            if done % config.checkpoint_every == 0 or done == config.steps:
                finite = all(bool(torch.isfinite(p).all()) for p in bare.parameters())
                _stop_if_diverged(accelerator, finite, "a parameter", done, out_dir)  # never checkpoint NaNs
                if accelerator.is_main_process:
                    _save_checkpoint(
                        out_dir,
                        done,
                        bare,
                        ema,
                        optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer,
                        lr_scheduler,
                        meta,
                        config.keep_checkpoints,
                    )
                accelerator.wait_for_everyone()
    bar.close()
    ema.copy_to(bare.parameters())
    bare.eval()
    return TrainResult(bare.cpu(), config.steps, last_loss, time.perf_counter() - started, history)


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


def default_conditioning(adapter: Adapter) -> Conditioning:
    """Class labels (with the model's null class for dropout) or nothing; text models need `text_conditioning`.

    Models that drop labels themselves in training mode (DiT) get no second dropout.
    """
    if adapter.cond_kind == "text":
        raise SlimdiffError("a text-conditioned model needs prompt embeddings: build them with text_conditioning()")
    null = adapter.null_class if adapter.builtin_label_dropout == 0 else None
    return Conditioning(kind=adapter.cond_kind, null_class=null)


def text_conditioning(prompt_embeddings: torch.Tensor, empty_prompt: torch.Tensor | None) -> Conditioning:
    """Per-class prompt embeddings `(num_classes, tokens, dim)`, and the empty prompt's for label dropout."""
    return Conditioning(kind="text", prompt_table=prompt_embeddings, empty_prompt=empty_prompt)
