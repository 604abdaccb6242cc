"""Evaluate models (quality, MACs, latency, each with its settings) and compare several in one report."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from slimdiff.artifacts import full_compute, sampling_plan
from slimdiff.data import DataConfig, load_data
from slimdiff.errors import SlimdiffError
from slimdiff.export import load, load_scheduler_config, read_spec
from slimdiff.io import atomic_write_json, output_dir, read_json
from slimdiff.jobs.conditioning import decoder_for, pipeline_dir, sampling_inputs
from slimdiff.jobs.info import model_info
from slimdiff.jobs.sampling import draw, refuse_other_sampler
from slimdiff.metrics.cost import (
    MEMORY_COUNTS,
    count_macs,
    denoiser_latency,
    denoiser_memory,
    pipeline_fixed_macs,
    sampling_latency,
    sampling_macs,
    sampling_memory,
)
from slimdiff.metrics.features import feature_extractor
from slimdiff.metrics.quality import clip_score, compute_quality, reference_features
from slimdiff.models import Adapter, adapter_for
from slimdiff.models.base import count_params
from slimdiff.report import markdown_table, save_grid, write_compare_report
from slimdiff.settings import EvalSettings as EvalSettings


def evaluate_model(
    model_dir: str | Path, settings: EvalSettings, *, grid: str | Path | None = None, progress: bool = True
) -> dict[str, Any]:
    """Measure a model: quality of `n` seeded samples against the data's training split, MACs, latency."""
    settings.validate()
    device, dtype = settings.torch_device(), settings.torch_dtype()
    model = load(model_dir, device=device, dtype=dtype, artifacts=settings.artifacts)
    schedule = load_scheduler_config(model_dir)
    refuse_other_sampler(model, settings.scheduler, settings.steps, schedule)
    adapter = adapter_for(model)
    plan = sampling_plan(model)
    quality = [m for m in settings.metrics if m in ("fid", "kid", "is", "pr")]
    common = {
        "n": settings.n,
        "steps": settings.steps,
        "scheduler": settings.scheduler,
        "seed": settings.seed,
        "batch_size": settings.batch_size,
        "guidance_scale": settings.guidance_scale,
        "device": str(device),
        "dtype": settings.dtype,
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
        decode = decoder_for(model_dir, device=device, dtype=dtype)
        images = draw(adapter, settings, inputs, schedule=schedule, decode=decode, progress=progress)
        if grid is not None:
            save_grid(images[:64], grid, scale=max(1, 128 // images.shape[-1]))
    if quality:
        extractor = feature_extractor(settings.feature)
        reference = load_data(settings.data, size=images.shape[-1], channels=images.shape[1], split="train")
        real = reference_features(reference, extractor, split="train")
        values = compute_quality(images, real, extractor, metrics=quality, seed=settings.seed)
        source = DataConfig.of(settings.data).data
        setting = common | {"extractor": extractor.name, "reference": f"{source} train split ({len(real)})"}
        for key, value in values.items():
            report["metrics"][key] = {"value": value} | setting
    if "clip" in settings.metrics:
        if adapter.cond_kind != "text" or settings.clip_dir is None:
            raise SlimdiffError("the clip metric needs a text-conditioned model and --clip-dir (a local CLIP folder)")
        value = clip_score(images, inputs.description, settings.clip_dir)
        report["metrics"]["clip"] = {"value": value, "clip_dir": settings.clip_dir} | common
    if "macs" in settings.metrics:
        with full_compute(model):
            per_call = count_macs(model)
        guided = settings.guidance_scale != 1.0 and adapter.cond_kind != "none"
        computed = None if plan is None else plan.computed
        run = sampling_macs(per_call, settings.steps, guidance=guided, computed_fraction_per_step=computed)
        counts = "per denoiser call, batch 1"
        report["metrics"]["macs"] = {"value": per_call.total, "counts": counts + ", attention matmuls included"}
        report["metrics"]["macs_no_attn"] = {"value": per_call.without_attention, "counts": counts}
        steps = (
            f"one image, {settings.steps} {settings.scheduler} steps"
            + (", guided (2 calls a step)" if guided else "")
            + ("" if plan is None else f", with its {plan.artifact}")
        )
        report["metrics"]["sampling_macs"] = {"value": run.total, "counts": steps}
        pipeline = pipeline_dir(model_dir)
        if pipeline is not None:  # a latent model: the VAE decoder and text encoders run once per image
            latent = (adapter.in_channels, adapter.sample_size, adapter.sample_size)
            fixed = pipeline_fixed_macs(pipeline, latent)
            parts = {"vae_decoder": fixed.vae_decoder.total} | {k: v.total for k, v in fixed.text_encoders.items()}
            report["metrics"]["fixed_macs"] = parts | {
                "value": fixed.total,
                "counts": "one image: the VAE decoder and each text encoder once, outside the denoiser; "
                "no denoiser compression removes it (not in sampling_macs)",
            }
    if "latency" in settings.metrics:
        report["metrics"] |= _latency(model, adapter, settings, schedule, device)
    if "memory" in settings.metrics:
        report["metrics"] |= _memory(model, adapter, settings, schedule, device)
    return report


def _latency(
    model: torch.nn.Module,
    adapter: Adapter,
    settings: EvalSettings,
    schedule: dict[str, Any] | None,
    device: torch.device,
) -> dict[str, Any]:
    """Median wall-clock time of one denoiser call and of one sampling run at the evaluation's batch."""
    with full_compute(model):  # one call outside a sampling run computes everything
        call = denoiser_latency(model, batch_size=settings.batch_size, device=device)
    run = sampling_latency(adapter, **_sampling_run(settings, schedule), device=device)
    threads = {"threads": torch.get_num_threads()} if device.type == "cpu" else {}
    call_counts, run_counts = _measured_runs(settings)
    measured = {"device": str(device), "dtype": settings.dtype} | threads
    timed = [
        {"value": stats.median_ms, "p10": stats.p10_ms, "p90": stats.p90_ms, "counts": counts, "repeats": stats.repeats}
        for stats, counts in ((call, call_counts), (run, run_counts))
    ]
    return {"latency_ms": timed[0] | measured, "sampling_latency_ms": timed[1] | measured}


def _memory(
    model: torch.nn.Module,
    adapter: Adapter,
    settings: EvalSettings,
    schedule: dict[str, Any] | None,
    device: torch.device,
) -> dict[str, Any]:
    """Peak memory beyond the weights of one denoiser call and of one sampling run at the evaluation's batch."""
    with full_compute(model):  # one call outside a sampling run computes everything
        call = denoiser_memory(model, batch_size=settings.batch_size, device=device)
    run = sampling_memory(adapter, **_sampling_run(settings, schedule), device=device)
    call_counts, run_counts = _measured_runs(settings)
    measured = {"device": str(device), "dtype": settings.dtype, "measures": MEMORY_COUNTS[device.type]}
    return {
        "peak_memory_bytes": {"value": call, "counts": call_counts} | measured,
        "sampling_peak_memory_bytes": {"value": run, "counts": run_counts} | measured,
    }


def _sampling_run(settings: EvalSettings, schedule: dict[str, Any] | None) -> dict[str, Any]:
    """The sampling run that latency and memory measure, over the model's noise schedule, as `metrics.cost` takes
    it."""
    return {
        "steps": settings.steps,
        "batch_size": settings.batch_size,
        "scheduler": settings.scheduler,
        "schedule": schedule,
        "guidance_scale": settings.guidance_scale,
    }


def _measured_runs(settings: EvalSettings) -> tuple[str, str]:
    """What a latency or memory figure counts: one denoiser call, and one sampling run, at the evaluation's batch."""
    batch = settings.batch_size
    return f"one denoiser call at batch {batch}", f"{settings.steps}-step sampling run at batch {batch}"


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


@dataclasses.dataclass(frozen=True)
class Comparison:
    """What `compare_models` wrote: the report's `index.html`, and its table's rows (model → metric values)."""

    index: Path
    rows: list[dict[str, Any]]


def compare_models(
    model_dirs: list[str | Path],
    out_dir: str | Path,
    settings: EvalSettings,
    *,
    names: list[str] | None = None,
    curve_steps: tuple[int, ...] = (),
    curve_schedulers: tuple[str, ...] = ("ddim", "dpm"),
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> Comparison:
    """Evaluate each model with the same settings and write one HTML report: table (with each model's chain),
    quality vs sampling MACs and vs measured sampling time with the Pareto front, MACs per block, sample grids.

    With `curve_steps`, the first model (the teacher) is also evaluated at each of those sampler step counts for
    each of `curve_schedulers`: its quality-vs-cost curve, the free alternative every compressed model is read
    against, drawn in both plots. `names` label the models (default: `index:directory name`). An `out_dir` that
    holds anything is refused unless `resume` (reuse the evaluations recorded there for the same model files and
    settings) or `overwrite` (write the report beside it, then swap it in) — `slimdiff.io.output_dir`.
    """
    if not model_dirs:
        raise SlimdiffError("compare needs at least one model directory")
    names = names or [f"{index}:{Path(model_dir).name}" for index, model_dir in enumerate(model_dirs)]
    if len(names) != len(model_dirs):
        raise SlimdiffError(f"{len(names)} names for {len(model_dirs)} models")
    settings.validate()
    with output_dir(out_dir, resume=resume, overwrite=overwrite) as work:
        rows = _report_into(work, model_dirs, names, settings, curve_steps, curve_schedulers, progress)
    return Comparison(Path(out_dir) / "index.html", rows)


def _report_into(
    out_dir: Path,
    model_dirs: list[str | Path],
    names: list[str],
    settings: EvalSettings,
    curve_steps: tuple[int, ...],
    curve_schedulers: tuple[str, ...],
    progress: bool,
) -> list[dict[str, Any]]:
    """`compare_models` writing into `out_dir`, the folder that becomes its `out_dir`; returns the table's rows."""
    rows, grids, breakdown = [], {}, {}
    quality_key = next((m for m in ("fid", "kid_mean", "is_mean", "clip") if m.split("_")[0] in settings.metrics), None)
    for index, (name, model_dir) in enumerate(zip(names, model_dirs)):
        grid = out_dir / f"samples-{index}.png"
        report = _evaluate_once(model_dir, settings, out_dir / f"eval-{index}.json", grid=grid, progress=progress)
        info = model_info(model_dir)
        rows.append(
            {"model": name, "params": report["params"]}
            | {k: v["value"] for k, v in report["metrics"].items()}
            | {"chain": " → ".join(info["chain"])}
        )
        grids[name] = grid
        breakdown[name] = {block["name"]: block["macs"] for block in info["blocks"]}
    curves = {}
    for scheduler in curve_schedulers if curve_steps else ():
        curve = []
        for steps in curve_steps:
            point = dataclasses.replace(settings, steps=steps, scheduler=scheduler)
            report = _evaluate_once(
                model_dirs[0], point, out_dir / f"curve-{scheduler}-{steps}.json", progress=progress
            )
            curve.append({"label": str(steps)} | {k: v["value"] for k, v in report["metrics"].items()})
        curves[f"{names[0]}, {scheduler} over steps"] = curve
    atomic_write_json(out_dir / "curves.json", curves)
    write_compare_report(
        rows,
        out_dir,
        quality_key=quality_key or "params",
        grids=grids,
        macs_key="sampling_macs",
        latency_key="sampling_latency_ms",
        curves=curves,
        breakdown=breakdown,
        notes={"chain": "how the model was made: its source, then each job (engine budgets → achieved fractions)"},
    )
    return rows


def _evaluate_once(
    model_dir: str | Path, settings: EvalSettings, record: Path, *, grid: Path | None = None, progress: bool
) -> dict[str, Any]:
    """`evaluate_model`, written to `record`; reused when `record` holds the same model files and settings (so an
    interrupted comparison resumes), recomputed otherwise."""
    key = {
        "settings": json.loads(json.dumps(dataclasses.asdict(settings))),
        "files": (read_spec(model_dir) or {}).get("files"),
    }
    if record.is_file() and (grid is None or grid.is_file()):
        previous = read_json(record, "evaluation record")
        if isinstance(previous, dict) and previous.get("cache_key") == key:
            return previous
    report = evaluate_model(model_dir, settings, grid=grid, progress=progress) | {"cache_key": key}
    atomic_write_json(record, report)
    return report
