"""Compress a saved model with any registered engine and save the result with its provenance.

An engine whose product needs training (`Result.training`, e.g. OFA) gets its run here: the one training loop
trains the engine's model into `out/shared/` (resumable: the same command with `--resume` continues it), then
`finish` makes the products, each saved to `out/<name>/` with the provenance of the whole chain.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState

from slimdiff.data import DataConfig
from slimdiff.devices import autocast
from slimdiff.engines import Calibration, Engine, EngineConfig, Result, get_engine
from slimdiff.engines.base import Log, Training, no_log
from slimdiff.errors import SlimdiffError
from slimdiff.export import SPEC_NAME, load, load_scheduler_config, read_provenance, read_spec
from slimdiff.io import atomic_write_json, output_dir, read_json
from slimdiff.jobs.conditioning import decoder_for, training_conditioning, training_data
from slimdiff.models import Adapter, adapter_for
from slimdiff.settings import DeviceConfig, KDConfig, TrainConfig
from slimdiff.training.conditioning import Conditioning
from slimdiff.training.diffusion import DEFAULT_SCHEDULE
from slimdiff.training.loop import TrainResult, train

#: Where a training engine's shared run lives inside `--out`.
SHARED_RUN = "shared"
#: The engine settings a shared run was started with (a rerun with other settings must not continue it).
RUN_SETTINGS = "engine.json"
#: Where an engine keeps the state that lets an interrupted run resume, inside `--out` (removed once saved).
ENGINE_STATE = ".engine-state"


def compress_model(
    engine_name: str,
    model_dir: str | Path,
    data: str | DataConfig,
    out_dir: str | Path,
    config: EngineConfig,
    *,
    place: DeviceConfig | None = None,
    resume: bool = False,
    overwrite: bool = False,
    log: Log = no_log,
    progress: bool = True,
) -> Result:
    """Run engine `engine_name` with `config` on a saved model; saves the compressed model to `out_dir`.

    The provenance gains the engine, its budget and what was achieved, and one history entry with the whole config
    and the engine's record, so a chain of engines reads as a chain of entries. An engine that needs a training
    run gets it (see the module docstring); then `out_dir` holds one directory per product. An `out_dir` that
    holds anything is refused unless `resume` (continue the run of the same engine and settings there) or
    `overwrite` (compress beside it, then swap the new result in) — `slimdiff.io.output_dir`.

    `place` (default: the GPU when there is one, fp32) is where the engine runs: the model and the calibration
    tensors are moved there, so calibration, searches and latency budgets run and are timed on it; a bf16/fp16
    `dtype` runs the engine under autocast with the weights kept in fp32, so the product is saved as precise as
    its source.
    """
    engine = get_engine(engine_name)
    if not isinstance(config, engine.config):
        raise SlimdiffError(f"engine '{engine.name}' takes a {engine.config.__name__}, got {type(config).__name__}")
    config.validate()
    place = place or DeviceConfig()
    place.validate()
    out_dir = Path(out_dir)
    if out_dir.resolve() == Path(model_dir).resolve():
        raise SlimdiffError("--out must differ from the model directory (the source is never overwritten)")
    if resume:
        _refuse_other_run(out_dir, engine.name, config)
    _refuse_carried_artifacts(engine, Path(model_dir))
    with output_dir(out_dir, resume=resume, overwrite=overwrite) as work:
        return _compress_into(engine, Path(model_dir), data, out_dir, work, config, place, log, progress)


def _compress_into(
    engine: Engine,
    model_dir: Path,
    data: str | DataConfig,
    out_dir: Path,
    work: Path,
    config: EngineConfig,
    place: DeviceConfig,
    log: Log,
    progress: bool,
) -> Result:
    """`compress_model` writing into `work`, the folder that becomes `out_dir`, the engine running on `place`."""
    device = place.torch_device()
    # the bare denoiser: an engine that keeps the model (skip) makes its own artifacts, which replace the source's
    model = load(model_dir, device=device, artifacts=False)
    adapter = adapter_for(model)
    seed = getattr(config, "seed", 0)
    calibration, conditioning, recorded = calibration_for(model_dir, adapter, data, work, seed, log, device=device)
    calibration.work_dir = work / ENGINE_STATE
    with autocast(device, place.torch_dtype()):
        result = engine.compress(adapter, config, calibration, log=log)
    result.model.cpu()
    provenance = read_provenance(model_dir)
    provenance.engine = engine.name
    provenance.budget = config.budget()
    entry = {
        "job": f"compress {engine.name}",
        "source": str(model_dir),
        "config": dataclasses.asdict(config),
        "device": str(device),
        "dtype": place.dtype,
        "target": config.budget(),
        "seconds": round(result.seconds, 1),
        **result.record,
    }
    save_kwargs = {"scheduler_config": dict(calibration.schedule), "conditioning": recorded}
    if result.training is None:
        provenance.metrics.update({f"{unit}_fraction": value for unit, value in result.achieved.items()})
        provenance.history.append({**entry, "achieved": result.achieved})
        if PartialState().is_main_process:  # under `accelerate launch` every process made the same product
            # an unchanged model (a skip table's) shares the source's weights file instead of a second copy
            result.save(work, provenance=provenance, weights_from=model_dir, **save_kwargs)
            shutil.rmtree(calibration.work_dir, ignore_errors=True)
        return result

    run = _shared_run(
        result.training,
        engine.name,
        config,
        model_dir,
        calibration.dataset,
        conditioning,
        calibration.schedule,
        work,
        progress,
    )
    products = result.training.finish(run.model)
    entry["shared_run"] = {
        "dir": str(out_dir / SHARED_RUN),
        "steps": run.steps,
        "final_loss": run.final_loss,
        "seconds": round(run.seconds, 1),
        "teacher_kd": result.training.teacher_kd,
    }
    for name, product in products.items():
        product_provenance = copy.deepcopy(provenance)
        product_provenance.metrics.update({f"{unit}_fraction": value for unit, value in product.achieved.items()})
        product_provenance.history.append({**entry, "product": name, "achieved": product.achieved, **product.record})
        if PartialState().is_main_process:  # under `accelerate launch` every process made the same products
            product.save(work / name, provenance=product_provenance, **save_kwargs)
        log(product.summary)
    if PartialState().is_main_process:
        shutil.rmtree(calibration.work_dir, ignore_errors=True)
    return dataclasses.replace(
        result,
        record={**result.record, "products": {name: product.achieved for name, product in products.items()}},
        summary=f"{len(products)} models from one {run.steps}-step run: {', '.join(products)}",
    )


def calibration_for(
    model_dir: str | Path,
    adapter: Adapter,
    data: str | DataConfig,
    out_dir: Path,
    seed: int,
    log: Log = no_log,
    *,
    device: torch.device | str = "cpu",
) -> tuple[Calibration, Conditioning, dict[str, Any]]:
    """What an engine may look at for the model saved in `model_dir` (its training data `data` — latents for a
    latent model, center-cropped —, conditions on `device`, noise schedule, a latent model's decoder on `device`),
    the training conditioning, and what to record about it (a text model's encoder is saved to `out_dir`, or its
    pipeline recorded)."""
    data = DataConfig.of(data)
    dataset = training_data(adapter, data, seed, model_dir, purpose="calibrate", log=log)
    conditioning, recorded = training_conditioning(adapter, dataset, out_dir, Path(model_dir), seed, data, log)
    schedule = load_scheduler_config(model_dir) or DEFAULT_SCHEDULE
    placed = conditioning.to(device)

    def cond_for(labels: torch.Tensor) -> torch.Tensor | None:
        labels = labels.to(device)
        return placed(labels, torch.zeros_like(labels, dtype=torch.bool))

    decode = decoder_for(model_dir, device=device)
    calibration = Calibration(dataset, cond_for, schedule, placed.empty_prompt, decode)
    return calibration, conditioning, recorded


def _refuse_carried_artifacts(engine: Engine, model_dir: Path) -> None:
    """Refuse, before any work, an engine that changes the model on a source carrying artifacts (a skip table):
    they were made for the model as it is and would not hold for the product, nor may they be dropped unsaid."""
    carried = (read_spec(model_dir) or {}).get("artifacts", [])
    if not carried or engine.keeps_model:
        return
    history = read_provenance(model_dir).history
    source = history[-1].get("source") if history else None
    origin = f" ({source})" if source else ""
    raise SlimdiffError(
        f"{model_dir} carries {', '.join(carried)}, made for that model as it is; `compress {engine.name}` changes "
        f"the model, so it would no longer hold: compress the model it was made from{origin}, then make a new one "
        "for the result (e.g. `slimdiff compress skip`)"
    )


def _run_settings(engine_name: str, config: dict[str, Any]) -> dict[str, Any]:
    """What a run must keep across reruns: the engine and its settings (a training run may go on for more steps)."""
    growable = {"steps", "checkpoint_every"}
    config_values = {k: v for k, v in config.items() if k not in growable}
    return json.loads(json.dumps({"engine": engine_name, "config": config_values}))  # as read back from disk


def _refuse_other_run(out_dir: Path, engine_name: str, config: EngineConfig) -> None:
    """Refuse, before any work, to continue a run in `out_dir` that other settings started: a shared training
    run (its recorded settings), or a finished compressed model (its last history entry)."""
    settings = _run_settings(engine_name, dataclasses.asdict(config))
    marker = out_dir / SHARED_RUN / RUN_SETTINGS
    if marker.is_file():
        where, started = f"{marker.parent} holds a shared run", read_json(marker, "shared-run settings")
    elif (out_dir / SPEC_NAME).is_file():
        last = (read_provenance(out_dir).history or [{}])[-1]
        engine_name_there = str(last.get("job", "an unknown job")).removeprefix("compress ")
        where, started = f"{out_dir} holds a model", _run_settings(engine_name_there, last.get("config", {}))
    else:
        return
    if started == settings:
        return
    before = started.get("config", {})
    differs = sorted(k for k in {*before, *settings["config"]} if before.get(k) != settings["config"].get(k))
    if started.get("engine") != engine_name:
        raise SlimdiffError(
            f"{where} made by '{started.get('engine')}', not by compress {engine_name}; use --overwrite or a new --out"
        )
    key = differs[0]
    raise SlimdiffError(
        f"{where} started with other settings ({key}): {before.get(key)!r} there, {settings['config'].get(key)!r} now; "
        "use the same settings, --overwrite, or a new --out"
    )


def _shared_run(
    training: Training,
    engine_name: str,
    config: EngineConfig,
    model_dir: Path,
    dataset: Any,
    conditioning: Conditioning,
    schedule: dict[str, Any],
    out_dir: Path,
    progress: bool,
) -> TrainResult:
    """Train the engine's model in `out/shared/`, continuing a run of the same settings if one is there."""
    shared_dir = out_dir / SHARED_RUN
    shared_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(shared_dir / RUN_SETTINGS, _run_settings(engine_name, dataclasses.asdict(config)))
    teacher, kd = None, None
    if training.teacher_kd > 0:
        teacher = load(model_dir, artifacts=False)
        kd = KDConfig(output_weight=training.teacher_kd, feature_weight=0.0)
    return train(
        training.model,
        dataset,
        shared_dir,
        TrainConfig(steps=training.steps, **training.settings),
        conditioning=conditioning,
        schedule=schedule,
        teacher=teacher,
        kd=kd,
        resume=True,
        progress=progress,
        before_step=training.before_step,
    )
