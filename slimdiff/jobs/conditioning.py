"""What a model directory is conditioned on: its text encoder and VAE, and the conditions for sampling and training."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL

from slimdiff.data import ImageDataset, class_prompts, load_data
from slimdiff.errors import SlimdiffError
from slimdiff.export import read_spec, resolve_model_dir
from slimdiff.models import Adapter
from slimdiff.text import TEXT_ENCODER_DIR, TOKENIZER_DIR, TextEncoder, make_tiny_clip_text
from slimdiff.train import Conditioning, default_conditioning, text_conditioning


def load_text_encoder(model_dir: str | Path) -> TextEncoder:
    """The text encoder saved with a text-conditioned model: in the model dir, or beside it in a pipeline folder."""
    resolved = resolve_model_dir(model_dir)
    for root in (resolved, resolved.parent):
        if (root / TEXT_ENCODER_DIR).is_dir():
            return TextEncoder.from_dir(root)
    raise SlimdiffError(
        f"{model_dir} is text-conditioned but has no {TOKENIZER_DIR}/ and {TEXT_ENCODER_DIR}/ beside it; "
        "put the pipeline's text encoder there"
    )


def _load_vae(model_dir: str | Path) -> AutoencoderKL | None:
    """The VAE of a latent model given as a pipeline folder (None for pixel-space models)."""
    resolved = resolve_model_dir(model_dir)
    vae_dir = resolved.parent / "vae" if resolved != Path(model_dir) else None
    if vae_dir is None or not (vae_dir / "config.json").is_file():
        return None
    if not any(vae_dir.glob("*.safetensors")):
        raise SlimdiffError(f"{vae_dir} has no .safetensors weights (pickled weights are never loaded)")
    return (
        AutoencoderKL.from_pretrained(vae_dir, use_safetensors=True, local_files_only=True).eval().requires_grad_(False)
    )


def decoder_for(model_dir: str | Path) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """Latents → images for latent models (the frozen VAE beside the denoiser), None for pixel-space models."""
    vae = _load_vae(model_dir)
    if vae is None:
        return None
    factor = vae.config.scaling_factor

    def decode(latents: torch.Tensor) -> torch.Tensor:  # differentiable in the latents (a skip search needs it)
        return vae.decode(latents.to(vae.dtype) / factor).sample

    return decode


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
    encoder = load_text_encoder(model_dir)
    chosen = [prompts[i % len(prompts)] for i in range(n)]
    return SamplingInputs(encoder.encode(chosen), encoder.encode([""]), chosen)


def training_conditioning(
    adapter: Adapter, classes: list[str], out_dir: Path, source_dir: Path | None, seed: int
) -> tuple[Conditioning, dict[str, Any]]:
    """Training conditioning and what to record with the model (class names, or prompts + text encoder)."""
    if adapter.cond_kind == "none":
        return default_conditioning(adapter), {}
    if adapter.cond_kind == "class":
        if len(classes) > adapter.num_classes:
            raise SlimdiffError(f"the data has {len(classes)} classes but the model only {adapter.num_classes}")
        return default_conditioning(adapter), {"classes": classes}
    if source_dir is not None:
        encoder = load_text_encoder(source_dir)
    else:
        encoder = make_tiny_clip_text(out_dir, hidden_size=adapter.cross_attention_dim, seed=seed)
    if encoder.hidden_size != adapter.cross_attention_dim:
        raise SlimdiffError(
            f"text encoder width {encoder.hidden_size} ≠ the U-Net's cross_attention_dim {adapter.cross_attention_dim}"
        )
    encoder.save(out_dir)
    prompts = class_prompts(classes)
    cond = text_conditioning(encoder.encode(prompts), encoder.encode([""]))
    return cond, {"classes": classes, "prompts": prompts}


def training_data(adapter: Adapter, data: str, seed: int) -> ImageDataset:
    """The training split of `data` at the model's size and channels."""
    return load_data(data, size=adapter.sample_size, channels=adapter.in_channels, split="train", seed=seed)
