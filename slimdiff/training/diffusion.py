"""Noise schedules, the training objective, and sampling — all through diffusers schedulers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.training_utils import compute_snr
from tqdm.auto import tqdm

from slimdiff.errors import SlimdiffError
from slimdiff.models import Adapter

SAMPLERS: dict[str, type[SchedulerMixin]] = {
    "ddpm": DDPMScheduler,
    "ddim": DDIMScheduler,
    "dpm": DPMSolverMultistepScheduler,
    "euler": EulerDiscreteScheduler,
}

#: The training noise schedule used when a model directory carries none: DDPM's linear betas, epsilon prediction.
DEFAULT_SCHEDULE: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_schedule": "linear",
    "beta_start": 1e-4,
    "beta_end": 0.02,
    "prediction_type": "epsilon",
    "clip_sample": True,
}


def make_scheduler(name: str, schedule: dict[str, Any] | None = None) -> SchedulerMixin:
    """A sampler (`ddpm`, `ddim`, `dpm` or `euler`) over the model's training noise schedule."""
    if name not in SAMPLERS:
        raise SlimdiffError(f"unknown scheduler '{name}'; valid: {', '.join(SAMPLERS)}")
    config = {k: v for k, v in (schedule or DEFAULT_SCHEDULE).items() if not k.startswith("_")}
    return SAMPLERS[name].from_config(config)


def training_target(scheduler: SchedulerMixin, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the denoiser should predict at `t`, per the schedule's `prediction_type`: the noise (epsilon), the
    velocity (v_prediction) or the clean sample (sample)."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(x0, noise, t)
    if kind == "sample":
        return x0
    raise SlimdiffError(f"prediction_type '{kind}' is not supported for training; valid: epsilon, v_prediction, sample")


def task_loss(
    pred: torch.Tensor, target: torch.Tensor, t: torch.Tensor, scheduler: SchedulerMixin, snr_gamma: float | None
) -> torch.Tensor:
    """The denoising loss: MSE to the target, or with `snr_gamma` the min-SNR-γ weighted MSE (Hang et al. 2023)
    — each sample weighted by min(SNR(t), γ) / SNR(t) for ε-prediction (/ (SNR(t) + 1) for v, / 1 for x0), which
    stops the low-noise timesteps from dominating."""
    if snr_gamma is None:
        return F.mse_loss(pred.float(), target.float())
    snr = compute_snr(scheduler, t).float()
    clipped = torch.clamp(snr, max=snr_gamma)
    kind = scheduler.config.prediction_type
    weight = clipped if kind == "sample" else clipped / (snr + 1 if kind == "v_prediction" else snr)
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").flatten(1).mean(1)
    return (weight * per_sample).mean()


def guided(
    adapter: Adapter,
    x: torch.Tensor,
    t: torch.Tensor,
    cond: torch.Tensor | None,
    null_cond: torch.Tensor | None,
    guidance_scale: float,
) -> torch.Tensor:
    """One denoiser evaluation, with classifier-free guidance when `guidance_scale != 1`."""
    if guidance_scale == 1.0 or null_cond is None:
        return adapter(x, t, cond)
    both = adapter(torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, null_cond]))
    conditional, unconditional = both.chunk(2)
    return unconditional + guidance_scale * (conditional - unconditional)


def null_condition(adapter: Adapter, cond: torch.Tensor, uncond_embedding: torch.Tensor | None) -> torch.Tensor:
    """The 'no condition' input for guidance: the null class, or the empty prompt's embedding."""
    if adapter.cond_kind == "class":
        if adapter.null_class is None:
            raise SlimdiffError("this model has no null class, so classifier-free guidance is unavailable; use 1.0")
        return torch.full_like(cond, adapter.null_class)
    if uncond_embedding is None:
        raise SlimdiffError("guidance on a text model needs the empty prompt's embedding (uncond_embedding)")
    return uncond_embedding.expand_as(cond)


def _placed(cond: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A condition on the model's device; prompt embeddings also in its dtype (class labels stay integers)."""
    return cond.to(device, dtype) if cond.is_floating_point() else cond.to(device)


@torch.no_grad()
def sample(
    adapter: Adapter,
    *,
    n: int,
    steps: int,
    scheduler: str = "ddim",
    schedule: dict[str, Any] | None = None,
    cond: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
    uncond_embedding: torch.Tensor | None = None,
    seed: int = 0,
    batch_size: int = 64,
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """Draw `n` samples in batches; returns images in [-1, 1] (decoded by `decode` for latent models).

    `cond` holds one condition per sample (class labels `(n,)` or prompt embeddings `(n, tokens, dim)`). The
    initial noise for all `n` samples comes from one generator seeded with `seed`, so a sample does not depend on
    which batch it lands in.
    """
    if n < 1 or steps < 1 or batch_size < 1:
        raise SlimdiffError(f"n, steps and batch_size must be ≥ 1 (got n={n}, steps={steps}, batch={batch_size})")
    if cond is not None and cond.shape[0] != n:
        raise SlimdiffError(f"got {cond.shape[0]} conditions for {n} samples")
    adapter.check_cond(None if cond is None else cond[:1], 1)
    device = next(adapter.model.parameters()).device
    dtype = next(adapter.model.parameters()).dtype
    sched = make_scheduler(scheduler, schedule)
    sched.set_timesteps(steps, device=device)
    generator = torch.Generator().manual_seed(seed)
    size = adapter.sample_size
    noise = torch.randn(n, adapter.in_channels, size, size, generator=generator)
    null = null_condition(adapter, cond, uncond_embedding) if cond is not None and guidance_scale != 1.0 else None

    images = []
    bar = tqdm(
        total=n * steps,
        desc=f"sampling {n} images × {steps} {scheduler} steps",
        disable=not progress,
        unit="image-step",
    )
    for start in range(0, n, batch_size):
        x = noise[start : start + batch_size].to(device, dtype) * sched.init_noise_sigma
        c = None if cond is None else _placed(cond[start : start + batch_size], device, dtype)
        c_null = None if null is None else _placed(null[start : start + batch_size], device, dtype)
        sched.set_timesteps(steps, device=device)  # multistep solvers keep per-trajectory state
        for t in sched.timesteps:
            t_batch = t.expand(x.shape[0]).to(device)
            eps = guided(adapter, sched.scale_model_input(x, t), t_batch, c, c_null, guidance_scale)
            x = sched.step(eps, t, x, generator=generator).prev_sample
            bar.update(x.shape[0])
        images.append((decode(x) if decode is not None else x).float().cpu())
    bar.close()
    return torch.cat(images).clamp(-1, 1)
