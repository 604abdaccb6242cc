"""Sample a seeded grid of images from a model directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimdiff.diffusion import make_scheduler, sample
from slimdiff.engines import check_sampler
from slimdiff.export import load, load_scheduler_config
from slimdiff.jobs.conditioning import decoder_for, sampling_inputs
from slimdiff.models import adapter_for
from slimdiff.report import save_grid


def sample_model(
    model_dir: str | Path,
    out: str | Path,
    *,
    n: int = 64,
    steps: int = 50,
    scheduler: str = "ddim",
    seed: int = 0,
    batch_size: int = 64,
    guidance_scale: float = 1.0,
    labels: list[int] | None = None,
    prompts: list[str] | None = None,
    progress: bool = True,
    artifacts: bool = True,
) -> torch.Tensor:
    """Sample `n` images from a model directory and write a PNG grid to `out`; returns the images.

    A model whose artifacts declare a sampling plan (a skip table) is refused before sampling unless `scheduler`
    with `steps` is the sampler the plan was made for; `artifacts=False` samples the bare denoiser.
    """
    model = load(model_dir, artifacts=artifacts)
    refuse_other_sampler(model, scheduler, steps, load_scheduler_config(model_dir))
    adapter = adapter_for(model)
    inputs = sampling_inputs(model_dir, adapter, n, labels=labels, prompts=prompts)
    images = sample(
        adapter,
        n=n,
        steps=steps,
        scheduler=scheduler,
        schedule=load_scheduler_config(model_dir),
        cond=inputs.cond,
        guidance_scale=guidance_scale,
        uncond_embedding=inputs.uncond_embedding,
        seed=seed,
        batch_size=batch_size,
        decode=decoder_for(model_dir),
        progress=progress,
    )
    scale = max(1, 128 // images.shape[-1])
    save_grid(images, out, scale=scale)
    return images


def refuse_other_sampler(model: nn.Module, scheduler: str, steps: int, schedule: dict[str, Any] | None) -> None:
    """Before any sampling: refuse `scheduler` (ddpm, ddim, dpm) with `steps` over the model's `schedule` when the
    model's sampling plan was made for another sampler."""
    sched = make_scheduler(scheduler, schedule)
    sched.set_timesteps(steps)
    check_sampler(model, sched)
