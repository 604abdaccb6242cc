"""The Python API: the command line's jobs on the same settings dataclasses, for folders and in-memory models.

```python
import slimdiff
from slimdiff.engines.channels import ChannelPruningConfig

teacher = slimdiff.load("runs/demo/teacher")                       # or any diffusers UNet2DModel / DiT in memory
pruned = slimdiff.compress(teacher, ChannelPruningConfig(target_macs=0.5), data="digits")
tuned = slimdiff.finetune(pruned.model, slimdiff.FinetuneConfig(steps=225), teacher=teacher, out="runs/tuned")
report = slimdiff.evaluate(tuned.model, slimdiff.EvalSettings(n=1000, steps=20))
```

A model given in memory is saved to a temporary folder first (the jobs read a model's noise schedule and
conditioning from its folder; an in-memory model gets the default DDPM schedule); `out=None` keeps the product in
memory only.
"""

from __future__ import annotations

import dataclasses
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from torch import nn

from slimdiff.engines import EngineConfig, Result, engine_names, get_engine
from slimdiff.engines.base import Log, no_log
from slimdiff.errors import SlimdiffError
from slimdiff.export import save
from slimdiff.jobs.compression import compress_model
from slimdiff.jobs.evaluation import evaluate_model
from slimdiff.jobs.training import finetune_model
from slimdiff.settings import EvalSettings, FinetuneConfig
from slimdiff.training.loop import TrainResult

ModelOrDir = nn.Module | str | Path


def _as_dir(model: ModelOrDir, stack: ExitStack) -> Path:
    """A folder holding `model`: the folder itself, or a temporary one (closed with `stack`) it is saved to."""
    if isinstance(model, (str, Path)):
        return Path(model)
    if not isinstance(model, nn.Module):
        raise SlimdiffError(
            f"expected a model folder or a diffusers model (torch.nn.Module), got {type(model).__name__}"
        )
    folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="slimdiff-model-")))
    save(model, folder)
    return folder


def _out_dir(out: str | Path | None, stack: ExitStack) -> Path:
    if out is not None:
        return Path(out)
    return Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="slimdiff-out-"))) / "out"


def _engine_of(config: EngineConfig) -> str:
    """The registered engine whose settings class `config` is."""
    for name in engine_names():
        if type(config) is get_engine(name).config:
            return name
    raise SlimdiffError(
        f"{type(config).__name__} is no engine's settings; give one of "
        + ", ".join(get_engine(name).config.__name__ for name in engine_names())
    )


def compress(
    model: ModelOrDir,
    config: EngineConfig,
    data: str = "digits",
    out: str | Path | None = None,
    *,
    log: Log = no_log,
    progress: bool = False,
) -> Result:
    """Compress `model` (a folder or an in-memory diffusers model) with the engine `config` belongs to, calibrating
    on `data`; the result's `model` is the compressed model. With `out`, it is also saved there (with provenance).

    An engine that makes several models from one training run (OFA) saves them to `out/<size>/` and needs `out`.
    """
    name = _engine_of(config)
    with ExitStack() as stack:
        source = _as_dir(model, stack)
        result = compress_model(name, source, data, _out_dir(out, stack), config, log=log, progress=progress)
        if out is None and "products" in result.record:
            raise SlimdiffError(f"{name} made {len(result.record['products'])} models; give out= to keep them")
        return result


def finetune(
    model: ModelOrDir,
    config: FinetuneConfig | None = None,
    data: str = "digits",
    out: str | Path | None = None,
    *,
    teacher: ModelOrDir | None = None,
    progress: bool = False,
) -> TrainResult:
    """Fine-tune `model` (a folder or an in-memory model) on `data`; the result's `model` holds the EMA weights.

    The teacher to distil is `config.teacher` (a folder) or `teacher` (a folder or an in-memory model), not both.
    """
    config = config or FinetuneConfig()
    if teacher is not None and config.teacher is not None:
        raise SlimdiffError("give the teacher once: config.teacher or teacher=, not both")
    config.validate()
    with ExitStack() as stack:
        source = _as_dir(model, stack)
        if teacher is not None:
            config = dataclasses.replace(config, teacher=str(_as_dir(teacher, stack)))
        return finetune_model(
            source,
            data,
            _out_dir(out, stack),
            config.training(),
            teacher_dir=config.teacher,
            kd=config.distillation(),
            progress=progress,
        )


def evaluate(model: ModelOrDir, settings: EvalSettings | None = None, *, progress: bool = False) -> dict[str, Any]:
    """Measure `model` (a folder or an in-memory model): the report `slimdiff eval --json` writes."""
    with ExitStack() as stack:
        report = evaluate_model(_as_dir(model, stack), settings or EvalSettings(), progress=progress)
    return report if isinstance(model, (str, Path)) else report | {"model": "(in memory)"}
