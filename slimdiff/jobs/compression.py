"""Compress a saved model with any registered engine and save the result with its provenance."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from slimdiff.diffusion import DEFAULT_SCHEDULE
from slimdiff.engines import Calibration, EngineConfig, Result, get_engine
from slimdiff.engines.base import Log, no_log
from slimdiff.errors import SlimdiffError
from slimdiff.export import load, load_scheduler_config, read_provenance
from slimdiff.jobs.conditioning import training_conditioning, training_data
from slimdiff.models import adapter_for


def compress_model(
    engine_name: str,
    model_dir: str | Path,
    data: str,
    out_dir: str | Path,
    config: EngineConfig,
    *,
    log: Log = no_log,
) -> Result:
    """Run engine `engine_name` with `config` on a saved model; saves the compressed model to `out_dir`.

    The provenance gains the engine, its budget and what was achieved, and one history entry with the whole config
    and the engine's record, so a chain of engines reads as a chain of entries.
    """
    engine = get_engine(engine_name)
    if not isinstance(config, engine.config):
        raise SlimdiffError(f"engine '{engine.name}' takes a {engine.config.__name__}, got {type(config).__name__}")
    config.validate()
    out_dir = Path(out_dir)
    if out_dir.resolve() == Path(model_dir).resolve():
        raise SlimdiffError("--out must differ from the model directory (the source is never overwritten)")
    # the bare denoiser: a skip table the source may carry belongs to the old model, not to its compressed copy
    model = load(model_dir, artifacts=False)
    adapter = adapter_for(model)
    seed = getattr(config, "seed", 0)
    dataset = training_data(adapter, data, seed)
    conditioning, recorded = training_conditioning(adapter, dataset.classes, out_dir, Path(model_dir), seed)
    schedule = load_scheduler_config(model_dir) or DEFAULT_SCHEDULE

    def cond_for(labels: torch.Tensor) -> torch.Tensor | None:
        return conditioning(labels, torch.zeros_like(labels, dtype=torch.bool))

    result = engine.compress(adapter, config, Calibration(dataset, cond_for, schedule), log=log)
    provenance = read_provenance(model_dir)
    provenance.engine = engine.name
    provenance.budget = config.budget()
    provenance.metrics.update({f"{unit}_fraction": value for unit, value in result.achieved.items()})
    provenance.history.append(
        {
            "job": f"compress {engine.name}",
            "source": str(model_dir),
            "config": dataclasses.asdict(config),
            "target": config.budget(),
            "achieved": result.achieved,
            "seconds": round(result.seconds, 1),
            **result.record,
        }
    )
    result.save(out_dir, provenance=provenance, scheduler_config=dict(schedule), conditioning=recorded)
    return result
