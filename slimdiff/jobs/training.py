"""Train a model from scratch, or fine-tune a saved one (optionally distilling a teacher)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from slimdiff.data import DataConfig
from slimdiff.engines.base import Log, no_log
from slimdiff.errors import SlimdiffError
from slimdiff.export import Provenance, load, load_scheduler_config, read_provenance, save
from slimdiff.io import output_dir, read_json
from slimdiff.jobs.conditioning import training_conditioning, training_data
from slimdiff.models import TINY_CONFIGS, adapter_for, build, build_tiny
from slimdiff.settings import KDConfig, TrainConfig
from slimdiff.training.diffusion import DEFAULT_SCHEDULE
from slimdiff.training.distill import KeptChannels
from slimdiff.training.loop import TrainResult, train


def new_model(spec: str) -> nn.Module:
    """A fresh model from a tiny-config name (`tiny-unet`, `tiny-sd`, `tiny-dit`) or a config JSON file."""
    if spec in TINY_CONFIGS:
        return build_tiny(spec)
    path = Path(spec)
    if not path.is_file():
        raise SlimdiffError(f"--model must be one of {', '.join(TINY_CONFIGS)} or a config.json file; got '{spec}'")
    return build(read_json(path, "model config"))


def train_model(
    model: nn.Module,
    data: str | DataConfig,
    out_dir: str | Path,
    config: TrainConfig,
    *,
    source: str,
    source_dir: str | Path | None = None,
    teacher_dir: str | Path | None = None,
    kd: KDConfig | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    log: Log = no_log,
) -> TrainResult:
    """Train (or fine-tune) `model` on `data` and save the EMA weights to `out_dir` in the export format.

    An `out_dir` that holds anything is refused unless `resume` (continue the run there from its last checkpoint)
    or `overwrite` (train beside it, then swap the new run in) — `slimdiff.io.output_dir`.
    """
    adapter = adapter_for(model)
    data = DataConfig.of(data)
    source_path = Path(source_dir) if source_dir is not None else None
    dataset = training_data(adapter, data, config.seed, source_path, log=log)
    schedule = (load_scheduler_config(source_path) if source_path else None) or DEFAULT_SCHEDULE
    teacher = load(teacher_dir) if teacher_dir is not None else None
    provenance = read_provenance(source_path) if source_path else Provenance(source=source)
    with output_dir(out_dir, resume=resume, overwrite=overwrite) as work:
        conditioning, recorded = training_conditioning(adapter, dataset, work, source_path, config.seed, data, log)
        result = train(
            model,
            dataset,
            work,
            config,
            conditioning=conditioning,
            schedule=schedule,
            teacher=teacher,
            kd=kd,
            kept_channels=kept_block_channels(provenance) if teacher is not None else None,
            resume=resume,
            progress=progress,
        )
        provenance.history.append(
            {
                "job": "finetune" if source_path else "train",
                "data": data.data,
                "steps": config.steps,
                "batch_size": config.batch_size,
                "seconds": round(result.seconds, 1),
                "final_loss": result.final_loss,
            }
            | ({"teacher": str(teacher_dir), "kd": vars(kd or KDConfig())} if teacher_dir else {})
        )
        save(result.model, work, provenance=provenance, scheduler_config=dict(schedule), conditioning=recorded)
    return result


def kept_block_channels(provenance: Provenance) -> dict[str, KeptChannels]:
    """The original channels each block output of a channel-pruned model kept, through every pruning it went through
    (each compress record's indices are relative to its own source, so successive ones compose)."""
    kept: dict[str, KeptChannels] = {}
    for entry in provenance.history:
        for block, record in entry.get("block_channels", {}).items():
            before = kept.get(block)
            indices = tuple(int(i) for i in record["kept"])
            if before is None:
                kept[block] = KeptChannels(indices, int(record["of"]))
            elif int(record["of"]) == len(before.indices):
                kept[block] = KeptChannels(tuple(before.indices[i] for i in indices), before.width)
            else:
                raise SlimdiffError(
                    f"the provenance's channel records for '{block}' do not chain: {len(before.indices)} channels "
                    f"kept, then a pruning of {record['of']}"
                )
    return kept


def finetune_model(
    model_dir: str | Path, data: str | DataConfig, out_dir: str | Path, config: TrainConfig, **kwargs: Any
) -> TrainResult:
    """Continue training a saved (typically compressed) model; `kwargs` as `train_model` (e.g. `teacher_dir`, `kd`:
    a `FinetuneConfig` gives them as `teacher` and `distillation()`)."""
    model = load(model_dir)
    if Path(out_dir).resolve() == Path(model_dir).resolve():
        raise SlimdiffError("--out must differ from the model directory (the source is never overwritten)")
    return train_model(model, data, out_dir, config, source=str(model_dir), source_dir=model_dir, **kwargs)
