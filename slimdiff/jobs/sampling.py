"""Sample a seeded grid of images from a model directory."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimdiff.artifacts import check_sampler
from slimdiff.data import load_prompts
from slimdiff.export import load, load_scheduler_config
from slimdiff.io import check_output_file
from slimdiff.jobs.conditioning import SamplingInputs, decoder_for, sampling_inputs
from slimdiff.metrics.cost import PeakMemory, measure_peak_memory
from slimdiff.models import Adapter, adapter_for
from slimdiff.report import save_grid
from slimdiff.settings import SampleConfig, SamplingSettings
from slimdiff.training.diffusion import make_scheduler, sample


@dataclass(frozen=True)
class Samples:
    """What a sampling run drew, and the peak memory it took beyond the weights (`metrics.cost.PeakMemory`)."""

    images: torch.Tensor
    memory: PeakMemory


def sample_model(
    model_dir: str | Path,
    out: str | Path,
    config: SampleConfig | None = None,
    *,
    overwrite: bool = False,
    progress: bool = True,
) -> Samples:
    """Sample `config.n` images from a model directory on `config.device` in `config.dtype` and write a PNG grid to
    `out`; returns the images and the run's peak memory. An existing `out` is refused unless `overwrite`.

    A model whose artifacts declare a sampling plan (a skip table) is refused before sampling unless the sampler
    asked for is the one the plan was made for; `config.artifacts=False` samples the bare denoiser.
    """
    config = config or SampleConfig()
    config.validate()
    check_output_file(out, overwrite=overwrite)
    device, dtype = config.torch_device(), config.torch_dtype()
    model = load(model_dir, device=device, dtype=dtype, artifacts=config.artifacts)
    schedule = load_scheduler_config(model_dir)
    refuse_other_sampler(model, config.scheduler, config.steps, schedule)
    adapter = adapter_for(model)
    prompts = load_prompts(config.prompts) if config.prompts else None
    labels = list(config.labels) if config.labels else None
    inputs = sampling_inputs(model_dir, adapter, config.n, labels=labels, prompts=prompts)
    decode = decoder_for(model_dir, device=device, dtype=dtype)
    with measure_peak_memory(device) as memory, torch.inference_mode():
        images = draw(adapter, config, inputs, schedule=schedule, decode=decode, progress=progress)
    scale = max(1, 128 // images.shape[-1])
    save_grid(images, out, scale=scale)
    return Samples(images, memory)


def draw(
    adapter: Adapter,
    settings: SamplingSettings,
    inputs: SamplingInputs,
    *,
    schedule: dict[str, Any] | None,
    decode: Callable[[torch.Tensor], torch.Tensor] | None,
    progress: bool,
) -> torch.Tensor:
    """`settings.n` seeded samples as the settings ask (sampler, steps, guidance, batch), on `inputs`' conditions,
    decoded by `decode` for latent models: the one sampling call of `sample` and `eval`."""
    return sample(
        adapter,
        n=settings.n,
        steps=settings.steps,
        scheduler=settings.scheduler,
        schedule=schedule,
        cond=inputs.cond,
        guidance_scale=settings.guidance_scale,
        uncond_embedding=inputs.uncond_embedding,
        seed=settings.seed,
        batch_size=settings.batch_size,
        decode=decode,
        progress=progress,
    )


def refuse_other_sampler(model: nn.Module, scheduler: str, steps: int, schedule: dict[str, Any] | None) -> None:
    """Before any sampling: refuse `scheduler` (ddpm, ddim, dpm, euler) with `steps` over the model's `schedule`
    when the model's sampling plan was made for another sampler."""
    sched = make_scheduler(scheduler, schedule)
    sched.set_timesteps(steps)
    check_sampler(model, sched)
