"""Helpers shared by the tests: family names, reference configs, pipeline components."""

from __future__ import annotations

from pathlib import Path

from diffusers import AutoencoderKL

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
