"""What a model directory is conditioned on: its text encoder and VAE, and the conditions for sampling and training."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from diffusers import AutoencoderKL

from slimdiff.data import DataConfig, ImageDataset, class_prompts, is_captioned, load_data
from slimdiff.data.cache import default_cache_root, embed_prompts, encode_images
from slimdiff.data.sources import METADATA_FILES
from slimdiff.engines.base import Log, no_log
from slimdiff.errors import SlimdiffError
from slimdiff.export import read_spec, resolve_model_dir
from slimdiff.io import read_json
from slimdiff.models import Adapter
from slimdiff.text import (
    TEXT_ENCODER_DIR,
    TOKENIZER_DIR,
    SDXLTextEncoders,
    TextEncoder,
    load_text_encoders,
    make_tiny_clip_text,
)
from slimdiff.training.conditioning import Conditioning, default_conditioning, text_conditioning

#: The VAE subfolder of a diffusers pipeline.
VAE_DIR = "vae"


def pipeline_dir(model_dir: str | Path) -> Path | None:
    """The pipeline folder a latent model's VAE and text encoders live in: the folder given (a pipeline with a
    `unet/` or `transformer/`), or the pipeline recorded when the model was made from one; None otherwise."""
    resolved = resolve_model_dir(model_dir)
    if resolved != Path(model_dir) and (resolved.parent / VAE_DIR).is_dir() or VAE_DIR in _pipeline_index(resolved):
        return resolved.parent
    recorded = (read_spec(model_dir) or {}).get("conditioning", {}).get("pipeline")
    if recorded is None:
        return None
    if not Path(recorded).is_dir():
        raise SlimdiffError(f"{model_dir} was made from the pipeline {recorded}, which is gone; its VAE is needed")
    return Path(recorded)


def _pipeline_index(denoiser_dir: Path) -> dict[str, Any]:
    """The `model_index.json` of the pipeline a denoiser folder sits in (empty when it sits in none)."""
    index = denoiser_dir.parent / "model_index.json"
    return read_json(index, "pipeline index") if index.is_file() else {}


def load_vae(model_dir: str | Path) -> tuple[AutoencoderKL, Path] | None:
    """The VAE of a latent model and its folder (None for pixel-space models)."""
    pipeline = pipeline_dir(model_dir)
    if pipeline is None:
        return None
    vae_dir = pipeline / VAE_DIR
    if not (vae_dir / "config.json").is_file():
        raise SlimdiffError(
            f"the pipeline {pipeline} has no {VAE_DIR}/ with a config.json; a latent model needs its VAE"
        )
    if not any(vae_dir.glob("*.safetensors")):
        raise SlimdiffError(f"{vae_dir} has no .safetensors weights (pickled weights are never loaded)")
    vae = AutoencoderKL.from_pretrained(vae_dir, use_safetensors=True, local_files_only=True)
    return vae.eval().requires_grad_(False), vae_dir


def vae_scale(vae: AutoencoderKL) -> int:
    """How many pixels one latent covers along each side (8 for Stable Diffusion)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def decoder_for(
    model_dir: str | Path, *, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """Latents → images for latent models (the frozen VAE beside the denoiser, on `device`, in `dtype` when given),
    None for pixel-space models."""
    loaded = load_vae(model_dir)
    if loaded is None:
        return None
    vae = loaded[0].to(device, dtype)
    factor, shift = vae.config.scaling_factor, getattr(vae.config, "shift_factor", None) or 0.0

    def decode(latents: torch.Tensor) -> torch.Tensor:  # differentiable in the latents (a skip search needs it)
        return vae.decode(latents.to(vae.dtype) / factor + shift).sample

    return decode


def load_text_encoder(model_dir: str | Path, adapter: Adapter) -> TextEncoder | SDXLTextEncoders:
    """The text encoder(s) of a text-conditioned model: in the model dir, beside it, or in its pipeline."""
    resolved = resolve_model_dir(model_dir)
    pipeline = pipeline_dir(model_dir)
    for root in (resolved, resolved.parent, pipeline):
        if root is not None and (root / TEXT_ENCODER_DIR).is_dir():
            loaded = load_vae(model_dir)
            resolution = adapter.sample_size * (vae_scale(loaded[0]) if loaded else 1)
            return load_text_encoders(root, dict(adapter.model.config), resolution)
    raise SlimdiffError(
        f"{model_dir} is text-conditioned but has no {TOKENIZER_DIR}/ and {TEXT_ENCODER_DIR}/ beside it; "
        "put the pipeline's text encoder there"
    )


@dataclass
class SamplingInputs:
    """Conditions for `n` samples and the matching guidance inputs."""

    cond: torch.Tensor | None
    uncond_embedding: torch.Tensor | None
    description: list[str]


def sampling_inputs(
    model_dir: str | Path,
    adapter: Adapter,
    n: int,
    *,
    labels: list[int] | None = None,
    prompts: list[str] | None = None,
) -> SamplingInputs:
    """Conditions for sampling: given labels/prompts, else the classes or prompts recorded with the model."""
    recorded = (read_spec(model_dir) or {}).get("conditioning", {})
    if adapter.cond_kind == "none":
        if labels or prompts:
            raise SlimdiffError("this model is unconditional; drop --labels/--prompts")
        return SamplingInputs(None, None, [])
    if adapter.cond_kind == "class":
        if prompts:
            raise SlimdiffError("this model is class-conditional; pass --labels, not --prompts")
        if not labels:
            count = len(recorded.get("classes", [])) or adapter.num_classes
            labels = list(range(count))
        bad = [label for label in labels if not 0 <= label < adapter.num_classes]
        if bad:
            raise SlimdiffError(f"labels {bad} out of range; valid: 0..{adapter.num_classes - 1}")
        chosen = [labels[i % len(labels)] for i in range(n)]
        return SamplingInputs(torch.tensor(chosen), None, [str(c) for c in chosen])
    if labels:
        raise SlimdiffError("this model is text-conditioned; pass --prompts, not --labels")
    prompts = prompts or recorded.get("prompts")
    if not prompts:
        raise SlimdiffError("this text-conditioned model records no prompts; pass a prompts file")
    encoder = load_text_encoder(model_dir, adapter)
    chosen = [prompts[i % len(prompts)] for i in range(n)]
    return SamplingInputs(encoder.encode(chosen), encoder.uncond(), chosen)


#: How many captions of captioned data are recorded with a model (the prompts `slimdiff sample` uses by default).
RECORDED_CAPTIONS = 16


def training_conditioning(
    adapter: Adapter,
    dataset: ImageDataset,
    out_dir: Path,
    source_dir: Path | None,
    seed: int,
    data: DataConfig,
    log: Log = no_log,
) -> tuple[Conditioning, dict[str, Any]]:
    """Training conditioning and what to record with the model (class names, or prompts + where the text encoder
    is: saved into `out_dir`, or the pipeline folder of a latent model)."""
    if adapter.cond_kind == "none":
        return default_conditioning(adapter), {}
    pipeline = pipeline_dir(source_dir) if source_dir is not None else None
    recorded: dict[str, Any] = {"pipeline": str(pipeline.resolve())} if pipeline is not None else {}
    if adapter.cond_kind == "class":
        if dataset.captions is not None:
            raise SlimdiffError(
                f"{data.data} is captioned, but this model is class-conditional: give class subfolders instead"
            )
        if len(dataset.classes) > adapter.num_classes:
            raise SlimdiffError(f"the data has {len(dataset.classes)} classes but the model only {adapter.num_classes}")
        return default_conditioning(adapter), recorded | {"classes": dataset.classes}
    if source_dir is not None:
        encoder = load_text_encoder(source_dir, adapter)
    else:
        encoder = make_tiny_clip_text(out_dir, hidden_size=adapter.cross_attention_dim, seed=seed)
    if encoder.hidden_size != adapter.cross_attention_dim:
        raise SlimdiffError(
            f"text encoder width {encoder.hidden_size} ≠ the U-Net's cross_attention_dim {adapter.cross_attention_dim}"
        )
    if pipeline is None:
        encoder.save(out_dir)
    rows = time_ids = None
    if dataset.captions is not None:
        prompts = list(dict.fromkeys(dataset.captions))
        row_of = {prompt: row for row, prompt in enumerate(prompts)}
        rows = torch.tensor([row_of[caption] for caption in dataset.captions])
        recorded["prompts"] = prompts[:RECORDED_CAPTIONS]
    else:
        prompts = class_prompts(dataset.classes)
        recorded |= {"classes": dataset.classes, "prompts": prompts}
    if adapter.pooled_dim is not None and dataset.crops is not None:  # SDXL: each image's size and crop
        target = torch.full((len(dataset), 2), float(encoder.resolution))
        time_ids = torch.cat([dataset.crops.float(), target], dim=1)
    table = embed_prompts(encoder, prompts, cache_root(data), log=log)
    return text_conditioning(table, encoder.uncond(), rows, time_ids), recorded


def cache_root(data: DataConfig) -> Path:
    """Where the data's encoded latents and embeddings are cached (`--cache-dir`, or by default see
    `default_cache_root`)."""
    return Path(data.cache_dir).expanduser() if data.cache_dir else default_cache_root(data.data)


def training_data(
    adapter: Adapter,
    data: str | DataConfig,
    seed: int,
    model_dir: str | Path | None = None,
    *,
    purpose: Literal["train", "calibrate"] = "train",
    log: Log = no_log,
) -> ImageDataset:
    """The training split of `data` for the model: images at its size and channels, or — for a latent model (one in
    or from a pipeline with a VAE) — their latents, encoded by the pipeline's VAE at its pixel resolution and cached
    (random crops and flips for `purpose="train"` per the data settings, centered for calibration)."""
    config = DataConfig.of(data)
    loaded = load_vae(model_dir) if model_dir is not None else None
    crop, flip = config.crop(purpose), config.flip(purpose)
    if loaded is None:
        return load_data(
            config,
            size=adapter.sample_size,
            channels=adapter.in_channels,
            split="train",
            seed=seed,
            crop=crop,
            flip=flip,
        )
    vae, vae_dir = loaded
    if vae.config.latent_channels != adapter.in_channels:
        raise SlimdiffError(
            f"the VAE in {vae_dir} makes {vae.config.latent_channels}-channel latents, but the denoiser reads "
            f"{adapter.in_channels} channels"
        )
    if adapter.cond_kind == "text" and config.data != "digits" and not is_captioned(config):
        raise SlimdiffError(
            f"{config.data} has no captions for this text-conditioned pipeline: put a "
            f"{' or '.join(METADATA_FILES)} (file_name + {config.caption_column}) in it, or give a 🤗 datasets folder"
        )
    resolution = adapter.sample_size * vae_scale(vae)
    images = load_data(config, size=resolution, channels=3, split="train", seed=seed, crop=crop, flip=flip)
    if torch.cuda.is_available():
        vae.to("cuda")
    return encode_images(images, vae, vae_dir, cache_root(config), log=log)
