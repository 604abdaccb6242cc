"""Sample a seeded grid of images from a model directory."""

from __future__ import annotations

from pathlib import Path

import torch

from slimdiff.diffusion import sample
from slimdiff.export import load, load_scheduler_config
from slimdiff.io import check_output_file
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
    overwrite: bool = False,
    progress: bool = True,
) -> torch.Tensor:
    """Sample `n` images from a model directory and write a PNG grid to `out`; returns the images. An existing `out`
    is refused unless `overwrite`."""
    check_output_file(out, overwrite=overwrite)
    model = load(model_dir)
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
