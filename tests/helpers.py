"""Helpers shared by the tests: family names, reference configs, pipeline components."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline

from slimdiff.cli import main
from slimdiff.text import TextEncoder

#: The public reference configs shipped with the project (reference/README.md).
REFERENCE = Path(__file__).resolve().parents[1] / "reference"
FAMILIES = ["tiny-unet", "tiny-sd", "tiny-dit"]


def tiny_vae(latent_channels: int) -> AutoencoderKL:
    """A one-level AutoencoderKL (8× fewer parameters than anything real) for pipeline tests."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(16,),
        norm_num_groups=8,
        latent_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
    ).eval()


def reference_config(name: str) -> Path:
    """Path of a reference config in the project's reference/ folder (fails loudly if it is missing)."""
    path = REFERENCE / name
    assert path.is_file(), f"reference config missing: {path}"
    return path


def run_cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, *args: object) -> tuple[int, str, str]:
    """Run `slimdiff ARGS` in-process; its exit code, stdout and stderr."""
    monkeypatch.setattr(sys, "argv", ["slimdiff", *map(str, args)])
    try:
        main()
        code = 0
    except SystemExit as exit_:
        code = exit_.code or 0
    out, err = capsys.readouterr()
    return code, out, err


def tiny_sd_pipeline(
    unet: torch.nn.Module, encoder: TextEncoder, scheduler: DDIMScheduler | None = None
) -> StableDiffusionPipeline:
    """A StableDiffusionPipeline around `unet` with a tiny VAE (of the U-Net's latent channels) and `encoder`."""
    return StableDiffusionPipeline(
        vae=tiny_vae(unet.config.in_channels),
        text_encoder=encoder.text_model,
        tokenizer=encoder.tokenizer,
        unet=unet,
        scheduler=scheduler or DDIMScheduler(clip_sample=False),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def ddim_error_gain(sched: DDIMScheduler) -> float:
    """How much an error of 1 in every ε the DDIM run uses can move its final x, at most: the sum over steps of the
    step's ε coefficient times the x coefficients of the steps after it (x_prev = a·x + b·ε)."""
    alphas, timesteps = sched.alphas_cumprod, sched.timesteps.tolist()
    gain = 0.0
    for k, t in enumerate(timesteps):
        prev = alphas[timesteps[k + 1]] if k + 1 < len(timesteps) else sched.final_alpha_cumprod
        a = (prev / alphas[t]).sqrt()
        b = ((1 - prev).sqrt() - (prev * (1 - alphas[t]) / alphas[t]).sqrt()).abs()
        gain = gain * float(a) + float(b)
    return gain
