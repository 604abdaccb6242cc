"""The jobs behind the CLI and recipes: inspect a model, train or fine-tune one, sample from one.

Each job takes plain arguments (paths, numbers), does its work through the library modules, and returns a result;
printing and argument parsing stay in `cli.py`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL
from torch import nn

from slimdiff.data import class_prompts, load_data
from slimdiff.diffusion import DEFAULT_SCHEDULE, sample
from slimdiff.distill import KDConfig
from slimdiff.engines.channels import ChannelPruningConfig, ChannelPruningResult
from slimdiff.engines.channels import compress as compress_model_channels
from slimdiff.errors import SlimdiffError
from slimdiff.export import (
    Provenance,
    load,
    load_architecture,
    load_scheduler_config,
    read_provenance,
    read_spec,
    resolve_model_dir,
    save,
)
from slimdiff.io import atomic_write_json, read_json
from slimdiff.metrics.cost import count_macs, count_params, denoiser_latency, sampling_latency, sampling_macs
from slimdiff.metrics.features import FeatureExtractor, digits_feature_extractor, inception_feature_extractor
from slimdiff.metrics.quality import clip_score, compute_quality, reference_features
from slimdiff.models import TINY_CONFIGS, Adapter, adapter_for, build, build_tiny
from slimdiff.recipe import CompressStep, EvalOptions, EvalStep, FinetuneStep, Recipe, SampleStep, TrainStep
from slimdiff.report import markdown_table, save_grid, write_compare_report
from slimdiff.text import TEXT_ENCODER_DIR, TOKENIZER_DIR, TextEncoder, make_tiny_clip_text
from slimdiff.train import Conditioning, TrainConfig, TrainResult, default_conditioning, text_conditioning, train


# ----------------------------------------------------------------------------------------------------------------
# info
# ----------------------------------------------------------------------------------------------------------------
def model_info(model_dir: str | Path) -> dict[str, Any]:
    """Family, size and structure of a model directory, without reading its weights."""
    model = load_architecture(model_dir)
    adapter = adapter_for(model)
    macs = count_macs(model)
    return {
        "path": str(model_dir),
        "family": adapter.family,
        "class": type(model).__name__,
        "sample_size": adapter.sample_size,
        "in_channels": adapter.in_channels,
        "conditioning": adapter.cond_kind,
        "params": count_params(model),
        "macs": macs.total,
        "macs_no_attn": macs.without_attention,
        "macs_counts": "per denoiser call, batch 1, at sample_size"
        + (f", {adapter.text_tokens} text tokens" if adapter.cond_kind == "text" else ""),
        "blocks": [{"name": b.name, "kind": b.kind, "inputs": list(b.inputs)} for b in adapter.blocks()],
        "layers": [
            {"name": layer.name, "kind": layer.kind, "params": layer.params, "removable": layer.removable}
            | ({"reason": layer.reason} if layer.reason else {})
            for layer in adapter.layers()
        ],
        "provenance": vars(read_provenance(model_dir)),
    }


# ----------------------------------------------------------------------------------------------------------------
# conditioning: what a model directory is conditioned on
# ----------------------------------------------------------------------------------------------------------------
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
    return AutoencoderKL.from_pretrained(vae_dir, use_safetensors=True, local_files_only=True).eval()


def _decoder(model_dir: str | Path) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """Latents → images for latent models (VAE beside the denoiser), None for pixel-space models."""
    vae = _load_vae(model_dir)
    if vae is None:
        return None
    factor = vae.config.scaling_factor

    def decode(latents: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
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
) -> torch.Tensor:
    """Sample `n` images from a model directory and write a PNG grid to `out`; returns the images."""
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
        decode=_decoder(model_dir),
        progress=progress,
    )
    scale = max(1, 128 // images.shape[-1])
    save_grid(images, out, scale=scale)
    return images


# ----------------------------------------------------------------------------------------------------------------
# evaluation and comparison
# ----------------------------------------------------------------------------------------------------------------
EVAL_METRICS = ("fid", "kid", "is", "pr", "clip", "macs", "latency")


@dataclass
class EvalSettings:
    """How a model is evaluated; every reported metric carries these settings."""

    data: str = "digits"
    metrics: tuple[str, ...] = ("fid", "kid", "macs", "latency")
    n: int = 1000
    steps: int = 50
    scheduler: str = "ddim"
    seed: int = 0
    batch_size: int = 64
    guidance_scale: float = 1.0
    feature: str = "digits"  # or the path of the FID Inception TorchScript file
    clip_dir: str | None = None
    device: str = "cpu"

    def validate(self) -> None:
        unknown = [m for m in self.metrics if m not in EVAL_METRICS]
        if unknown or not self.metrics:
            raise SlimdiffError(
                f"unknown metric {unknown[0] if unknown else '(none)'}; valid: {', '.join(EVAL_METRICS)}"
            )
        if self.n < 1 or self.steps < 1 or self.batch_size < 1:
            raise SlimdiffError("n, steps and batch_size must be ≥ 1")


def _extractor(feature: str) -> FeatureExtractor:
    return digits_feature_extractor() if feature == "digits" else inception_feature_extractor(feature)


def evaluate_model(
    model_dir: str | Path, settings: EvalSettings, *, grid: str | Path | None = None, progress: bool = True
) -> dict[str, Any]:
    """Measure a model: quality of `n` seeded samples against the data's training split, MACs, latency."""
    settings.validate()
    model = load(model_dir, device=settings.device)
    adapter = adapter_for(model)
    quality = [m for m in settings.metrics if m in ("fid", "kid", "is", "pr")]
    common = {
        "n": settings.n,
        "steps": settings.steps,
        "scheduler": settings.scheduler,
        "seed": settings.seed,
        "batch_size": settings.batch_size,
        "guidance_scale": settings.guidance_scale,
        "device": settings.device,
    }
    report: dict[str, Any] = {
        "model": str(model_dir),
        "family": adapter.family,
        "params": count_params(model),
        "metrics": {},
    }
    images = None
    inputs = None
    if quality or "clip" in settings.metrics or grid is not None:
        inputs = sampling_inputs(model_dir, adapter, settings.n)
        images = sample(
            adapter,
            n=settings.n,
            steps=settings.steps,
            scheduler=settings.scheduler,
            schedule=load_scheduler_config(model_dir),
            cond=inputs.cond,
            guidance_scale=settings.guidance_scale,
            uncond_embedding=inputs.uncond_embedding,
            seed=settings.seed,
            batch_size=settings.batch_size,
            decode=_decoder(model_dir),
            progress=progress,
        )
        if grid is not None:
            save_grid(images[:64], grid, scale=max(1, 128 // images.shape[-1]))
    if quality:
        extractor = _extractor(settings.feature)
        reference = load_data(settings.data, size=images.shape[-1], channels=images.shape[1], split="train")
        real = reference_features(reference, extractor, split="train")
        values = compute_quality(images, real, extractor, metrics=quality, seed=settings.seed)
        setting = common | {"extractor": extractor.name, "reference": f"{settings.data} train split ({len(real)})"}
        for key, value in values.items():
            report["metrics"][key] = {"value": value} | setting
    if "clip" in settings.metrics:
        if adapter.cond_kind != "text" or settings.clip_dir is None:
            raise SlimdiffError("the clip metric needs a text-conditioned model and --clip-dir (a local CLIP folder)")
        value = clip_score(images, inputs.description, settings.clip_dir)
        report["metrics"]["clip"] = {"value": value, "clip_dir": settings.clip_dir} | common
    if "macs" in settings.metrics:
        per_call = count_macs(model)
        guided = settings.guidance_scale != 1.0 and adapter.cond_kind != "none"
        run = sampling_macs(per_call, settings.steps, guidance=guided)
        counts = "per denoiser call, batch 1"
        report["metrics"]["macs"] = {"value": per_call.total, "counts": counts + ", attention matmuls included"}
        report["metrics"]["macs_no_attn"] = {"value": per_call.without_attention, "counts": counts}
        steps = f"one image, {settings.steps} {settings.scheduler} steps" + (
            ", guided (2 calls a step)" if guided else ""
        )
        report["metrics"]["sampling_macs"] = {"value": run.total, "counts": steps}
    if "latency" in settings.metrics:
        call = denoiser_latency(model, batch_size=settings.batch_size, device=settings.device)
        run = sampling_latency(
            adapter,
            steps=settings.steps,
            batch_size=settings.batch_size,
            scheduler=settings.scheduler,
            device=settings.device,
            guidance_scale=settings.guidance_scale,
        )
        threads = {"threads": torch.get_num_threads()} if settings.device == "cpu" else {}
        report["metrics"]["latency_ms"] = {
            "value": call.median_ms,
            "p10": call.p10_ms,
            "p90": call.p90_ms,
            "counts": f"one denoiser call at batch {settings.batch_size}",
            "repeats": call.repeats,
            "device": settings.device,
        } | threads
        report["metrics"]["sampling_latency_ms"] = {
            "value": run.median_ms,
            "p10": run.p10_ms,
            "p90": run.p90_ms,
            "counts": f"{settings.steps}-step sampling run at batch {settings.batch_size}",
            "repeats": run.repeats,
            "device": settings.device,
        } | threads
    return report


def eval_table(report: dict[str, Any]) -> str:
    """A Markdown table of one evaluation report: metric, value, and the settings it was measured with."""
    rows = [
        {
            "metric": key,
            "value": entry["value"],
            "settings": ", ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in entry.items() if k != "value"
            ),
        }
        for key, entry in report["metrics"].items()
    ]
    return markdown_table(rows)


def compare_models(
    model_dirs: list[str | Path], out_dir: str | Path, settings: EvalSettings, *, progress: bool = True
) -> Path:
    """Evaluate each model with the same settings and write one HTML report (table, plots, sample grids)."""
    if not model_dirs:
        raise SlimdiffError("compare needs at least one model directory")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, grids = [], {}
    quality_key = next((m for m in ("fid", "kid_mean", "is_mean", "clip") if m.split("_")[0] in settings.metrics), None)
    for index, model_dir in enumerate(model_dirs):
        name = f"{index}:{Path(model_dir).name}"
        grid = out_dir / f"samples-{index}.png"
        report = evaluate_model(model_dir, settings, grid=grid, progress=progress)
        atomic_write_json(out_dir / f"eval-{index}.json", report)
        rows.append({"model": name, "params": report["params"]} | {k: v["value"] for k, v in report["metrics"].items()})
        grids[name] = grid
    return write_compare_report(rows, out_dir, quality_key=quality_key or "params", grids=grids)


# ----------------------------------------------------------------------------------------------------------------
# training and fine-tuning
# ----------------------------------------------------------------------------------------------------------------
def new_model(spec: str) -> nn.Module:
    """A fresh model from a tiny-config name (`tiny-unet`, `tiny-sd`, `tiny-dit`) or a config JSON file."""
    if spec in TINY_CONFIGS:
        return build_tiny(spec)
    path = Path(spec)
    if not path.is_file():
        raise SlimdiffError(f"--model must be one of {', '.join(TINY_CONFIGS)} or a config.json file; got '{spec}'")
    return build(read_json(path, "model config"))


def _conditioning_for(
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


def _data_for(adapter: Adapter, data: str, seed: int):
    return load_data(data, size=adapter.sample_size, channels=adapter.in_channels, split="train", seed=seed)


def train_model(
    model: nn.Module,
    data: str,
    out_dir: str | Path,
    config: TrainConfig,
    *,
    source: str,
    source_dir: str | Path | None = None,
    teacher_dir: str | Path | None = None,
    kd: KDConfig | None = None,
    resume: bool = False,
    progress: bool = True,
) -> TrainResult:
    """Train (or fine-tune) `model` on `data` and save the EMA weights to `out_dir` in the export format."""
    out_dir = Path(out_dir)
    adapter = adapter_for(model)
    dataset = _data_for(adapter, data, config.seed)
    source_path = Path(source_dir) if source_dir is not None else None
    conditioning, recorded = _conditioning_for(adapter, dataset.classes, out_dir, source_path, config.seed)
    schedule = (load_scheduler_config(source_path) if source_path else None) or DEFAULT_SCHEDULE
    teacher = load(teacher_dir) if teacher_dir is not None else None
    result = train(
        model,
        dataset,
        out_dir,
        config,
        conditioning=conditioning,
        schedule=schedule,
        teacher=teacher,
        kd=kd,
        resume=resume,
        progress=progress,
    )
    provenance = read_provenance(source_path) if source_path else Provenance(source=source)
    provenance.history.append(
        {
            "job": "finetune" if source_path else "train",
            "data": data,
            "steps": config.steps,
            "batch_size": config.batch_size,
            "seconds": round(result.seconds, 1),
            "final_loss": result.final_loss,
        }
        | ({"teacher": str(teacher_dir), "kd": vars(kd or KDConfig())} if teacher_dir else {})
    )
    save(result.model, out_dir, provenance=provenance, scheduler_config=dict(schedule), conditioning=recorded)
    return result


def finetune_model(
    model_dir: str | Path, data: str, out_dir: str | Path, config: TrainConfig, **kwargs: Any
) -> TrainResult:
    """Continue training a saved (typically compressed) model."""
    model = load(model_dir)
    if Path(out_dir).resolve() == Path(model_dir).resolve():
        raise SlimdiffError("--out must differ from the model directory (the source is never overwritten)")
    return train_model(model, data, out_dir, config, source=str(model_dir), source_dir=model_dir, **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# compression engines
# ----------------------------------------------------------------------------------------------------------------
def compress_channels(
    model_dir: str | Path,
    data: str,
    out_dir: str | Path,
    config: ChannelPruningConfig,
    *,
    log: Callable[[str], None] = lambda message: None,
) -> ChannelPruningResult:
    """Diff-Pruning (or a baseline importance) of a saved model to a MACs/params budget; saves the pruned model."""
    out_dir = Path(out_dir)
    if out_dir.resolve() == Path(model_dir).resolve():
        raise SlimdiffError("--out must differ from the model directory (the source is never overwritten)")
    model = load(model_dir)
    adapter = adapter_for(model)
    dataset = _data_for(adapter, data, config.seed)
    conditioning, recorded = _conditioning_for(adapter, dataset.classes, out_dir, Path(model_dir), config.seed)
    schedule = load_scheduler_config(model_dir) or DEFAULT_SCHEDULE

    def cond_for(labels: torch.Tensor) -> torch.Tensor | None:
        return conditioning(labels, torch.zeros_like(labels, dtype=torch.bool))

    result = compress_model_channels(adapter, config, dataset, cond_for=cond_for, schedule=schedule, log=log)
    provenance = read_provenance(model_dir)
    provenance.engine = "channels"
    provenance.budget = {config.unit: config.target}
    provenance.metrics.update({"macs_fraction": result.achieved["macs"], "params_fraction": result.achieved["params"]})
    provenance.history.append(
        {
            "job": "compress channels",
            "source": str(model_dir),
            "importance": config.importance,
            "thr": config.thr,
            "timesteps_scored": len(result.scored_timesteps),
            "attention": config.attention,
            "ratio": result.ratio,
            "target": {config.unit: config.target},
            "achieved": result.achieved,
            "macs": result.pruned["macs"],
            "params": result.pruned["params"],
            "seconds": round(result.seconds, 1),
        }
    )
    save(result.model, out_dir, provenance=provenance, scheduler_config=dict(schedule), conditioning=recorded)
    return result


# ----------------------------------------------------------------------------------------------------------------
# recipes
# ----------------------------------------------------------------------------------------------------------------
def run_recipe(recipe: Recipe, *, progress: bool = True) -> list[dict[str, Any]]:
    """Run every step of a recipe in order; returns one summary per step."""
    out = Path(recipe.out)
    current: str = recipe.model
    summaries: list[dict[str, Any]] = []
    for step in recipe.steps:  # refuse a bad teacher before any step has run
        if isinstance(step, FinetuneStep):
            _recipe_teacher(recipe, step.finetune.teacher)
    for index, step in enumerate(recipe.steps):
        kind = next(f.name for f in dataclasses.fields(step))
        step_dir = out / f"{index:02d}-{kind}"
        if isinstance(step, TrainStep):
            result = train_model(
                new_model(current), recipe.data, step_dir, step.train, source=current, resume=True, progress=progress
            )
            current = str(step_dir)
            summaries.append({"step": kind, "out": current, "final_loss": result.final_loss})
        elif isinstance(step, FinetuneStep):
            options = step.finetune
            kd = KDConfig(options.kd, options.kd_output_weight, options.kd_feature_weight) if options.teacher else None
            teacher = _recipe_teacher(recipe, options.teacher)
            train_config = TrainConfig(**{f.name: getattr(options, f.name) for f in dataclasses.fields(TrainConfig)})
            result = finetune_model(
                _model_dir(current),
                recipe.data,
                step_dir,
                train_config,
                teacher_dir=teacher,
                kd=kd,
                resume=True,
                progress=progress,
            )
            current = str(step_dir)
            summaries.append({"step": kind, "out": current, "final_loss": result.final_loss})
        elif isinstance(step, CompressStep):
            options = step.compress
            config = ChannelPruningConfig(
                **{f.name: getattr(options, f.name) for f in dataclasses.fields(ChannelPruningConfig)}
            )
            result = compress_channels(_model_dir(current), recipe.data, step_dir, config)
            current = str(step_dir)
            summaries.append({"step": kind, "out": current, "achieved": result.achieved, "seconds": result.seconds})
        elif isinstance(step, EvalStep):
            options = step.eval
            settings = eval_settings(options, recipe.data)
            report = evaluate_model(_model_dir(current), settings, grid=step_dir / "samples.png", progress=progress)
            atomic_write_json(step_dir / "eval.json", report)
            summaries.append(
                {
                    "step": kind,
                    "out": str(step_dir / "eval.json"),
                    "metrics": {k: v["value"] for k, v in report["metrics"].items()},
                }
            )
        elif isinstance(step, SampleStep):
            grid = step_dir / "samples.png"
            options = step.sample
            sample_model(
                _model_dir(current),
                grid,
                n=options.n,
                steps=options.steps,
                scheduler=options.scheduler,
                seed=options.seed,
                batch_size=options.batch_size,
                guidance_scale=options.guidance_scale,
                progress=progress,
            )
            summaries.append({"step": kind, "out": str(grid)})
    return summaries


def eval_settings(options: EvalOptions, data: str) -> EvalSettings:
    """The evaluation settings a recipe's eval step asks for."""
    return EvalSettings(
        data=data, **{k: v for k, v in vars(options).items() if k != "metrics"}, metrics=tuple(options.metrics)
    )


def _recipe_teacher(recipe: Recipe, teacher: str | None) -> str | None:
    """A fine-tune's teacher: a model directory, or `model` for the recipe's own (trained) input model."""
    if teacher != "model":
        return teacher
    if recipe.model in TINY_CONFIGS or Path(recipe.model).is_file():
        raise SlimdiffError(
            f"finetune.teacher: 'model' names the recipe's input model, but '{recipe.model}' is a config, not a "
            "trained model; give the teacher's directory instead"
        )
    return recipe.model


def _model_dir(current: str) -> str:
    if current in TINY_CONFIGS or Path(current).is_file():
        raise SlimdiffError(f"'{current}' is not a trained model yet: start the recipe with a train step")
    return current
