"""Helpers shared by the tests: family names, reference configs, pipeline components."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
from PIL import Image

from slimdiff.cli import main
from slimdiff.text import TextEncoder

#: The docs page whose "Add an engine" section shows the toy engine the tests register.
ARCHITECTURE = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"
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


def register_docs_toy_engine() -> None:
    """Run the toy engine of docs/architecture.md ("Add an engine") exactly as shown, as a module of its own: it
    registers the engine `toy` (the caller restores the registry)."""
    import re
    import types

    section = ARCHITECTURE.read_text().split("## Add an engine", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    module = types.ModuleType("toy_engine")
    sys.modules[module.__name__] = module
    exec(compile(code, str(ARCHITECTURE), "exec"), module.__dict__)


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


def cache_repo(cache: Path, repo: str, folder: Path, *, revision: str = "main", commit: str = "0" * 40) -> Path:
    """Lay out `folder` as `repo` in a Hugging Face cache as huggingface_hub writes it: content-addressed
    `blobs/`, `snapshots/<commit>/` of relative symlinks to them, and `refs/<revision>` naming the commit."""
    import hashlib
    import os
    import shutil

    root = cache / f"models--{repo.replace('/', '--')}"
    snapshot = root / "snapshots" / commit
    for path in sorted(folder.rglob("*")):
        if not path.is_file():
            continue
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        blob = root / "blobs" / digest
        blob.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, blob)
        link = snapshot / path.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / revision).write_text(commit)
    return snapshot


# ----------------------------------------------------------------------------------------------------------------
# tiny latent pipelines (random weights) and captioned data, saved as a user would have them
# ----------------------------------------------------------------------------------------------------------------
#: Latent side of the tiny pipelines; their VAE halves the resolution once, so images are 16 px.
LATENT_SIZE = 8
CAPTIONS = ("a photo of a red cat", "a drawing of the digit 3", "a photo of a red cat", "an image of a blue sky")


def latent_vae() -> AutoencoderKL:
    """A two-level AutoencoderKL (4-channel latents at half the resolution) with a non-default scaling factor."""
    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16),
        norm_num_groups=8,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        scaling_factor=0.5,
    ).eval()


def _unet(**overrides: object) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    config = {
        "sample_size": LATENT_SIZE,
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": (16, 32),
        "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "cross_attention_dim": 32,
        "attention_head_dim": 4,
    }
    return UNet2DConditionModel(**(config | overrides))


def sd21_pipeline(path: Path) -> Path:
    """An SD-2.1-like pipeline folder: v-prediction, linear projections, one CLIP text encoder."""
    from slimdiff.text import make_tiny_clip_text

    encoder = make_tiny_clip_text(path / "_clip", hidden_size=32)
    StableDiffusionPipeline(
        vae=latent_vae(),
        text_encoder=encoder.text_model,
        tokenizer=encoder.tokenizer,
        unet=_unet(use_linear_projection=True),
        scheduler=DDIMScheduler(
            prediction_type="v_prediction", clip_sample=False, set_alpha_to_one=False, steps_offset=1
        ),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    ).save_pretrained(path / "pipe")
    return path / "pipe"


def sdxl_pipeline(path: Path) -> Path:
    """An SDXL-like pipeline folder: two text encoders (the second with a projection), `text_time` conditioning."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from slimdiff.text import make_tiny_clip_text

    encoder = make_tiny_clip_text(path / "_clip", hidden_size=32)
    torch.manual_seed(1)
    second = CLIPTextModelWithProjection(
        CLIPTextConfig(**{**encoder.text_model.config.to_dict(), "projection_dim": 16})
    )
    unet = _unet(
        cross_attention_dim=64,
        addition_embed_type="text_time",
        addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=16 + 6 * 4,
        use_linear_projection=True,
    )
    StableDiffusionXLPipeline(
        vae=latent_vae(),
        text_encoder=encoder.text_model,
        text_encoder_2=second,
        tokenizer=encoder.tokenizer,
        tokenizer_2=encoder.tokenizer,
        unet=unet,
        scheduler=EulerDiscreteScheduler(),
    ).save_pretrained(path / "pipe")
    return path / "pipe"


def dit_pipeline(path: Path) -> Path:
    """A latent DiT pipeline folder with learned sigma (`out_channels = 2 × in_channels`)."""
    from diffusers import DiTPipeline, DiTTransformer2DModel, DPMSolverMultistepScheduler

    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(
        sample_size=LATENT_SIZE,
        in_channels=4,
        out_channels=8,
        patch_size=2,
        num_layers=2,
        num_attention_heads=2,
        attention_head_dim=8,
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_zero",
        norm_elementwise_affine=False,
    )
    DiTPipeline(transformer=transformer, vae=latent_vae(), scheduler=DPMSolverMultistepScheduler()).save_pretrained(
        path / "pipe"
    )
    return path / "pipe"


def odd_images() -> list[Image.Image]:
    """Four images of odd sizes and modes (RGB, L, RGBA, P)."""
    rng = np.random.default_rng(0)
    shapes = [(23, 17), (16, 40), (31, 31), (19, 50)]
    modes = ["RGB", "L", "RGBA", "P"]
    images = []
    for (h, w), mode in zip(shapes, modes, strict=True):
        array = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        images.append(Image.fromarray(array).convert(mode))
    return images


def captioned_folder(path: Path, fmt: str = "jsonl", column: str = "text") -> Path:
    """An `imagefolder` with `metadata.jsonl` (or `.csv`): the odd images, captioned with `CAPTIONS`."""
    path.mkdir(parents=True)
    rows = []
    for i, image in enumerate(odd_images()):
        (path / "images").mkdir(exist_ok=True)
        image.save(path / "images" / f"{i}.png")
        rows.append({"file_name": f"images/{i}.png", column: CAPTIONS[i]})
    if fmt == "jsonl":
        (path / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    else:
        with (path / "metadata.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return path


def class_folders(path: Path) -> Path:
    """Two class subfolders of the odd images (for class-conditional models)."""
    for i, image in enumerate(odd_images()):
        folder = path / ("cat" if i % 2 else "dog")
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{i}.png")
    return path


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
