"""slimdiff — make trained diffusers diffusion models smaller and faster.

The public API (imported lazily, so that `slimdiff --help` stays fast):

- `compress(model, config, data, out)`, `finetune(...)`, `evaluate(...)` — the jobs on folders or in-memory
  models (`slimdiff.api`); each engine's config is in `slimdiff.engines.<name>` (e.g. `ChannelPruningConfig`)
- `TrainConfig`, `KDConfig`, `FinetuneConfig`, `SampleConfig`, `EvalSettings` — every job's settings
  (`slimdiff.settings`): the same fields, defaults and checks as the command's flags and a recipe step's keys
- `load(dir)`, `save(model, dir)`, `load_architecture(dir)`, `Provenance` — pickle-free export (`slimdiff.export`)
- `adapter_for(model)`, `build_tiny(name)` — the family adapters (`slimdiff.models`)
- `apply_skip(model, table_or_config)`, `remove_skip(model)` — a skip table's hooks on an in-memory model, as
  diffusers' `apply_first_block_cache`; `compile_units(model)` — `torch.compile` of its units, the hooks eager
  (`slimdiff.engines.skip`)
- `train(...)` — the training loop (`slimdiff.training.loop`); `sample(...)` — sampling through diffusers schedulers
- `SlimdiffError` — raised for bad input
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "compress": "slimdiff.api",
    "finetune": "slimdiff.api",
    "evaluate": "slimdiff.api",
    "TrainConfig": "slimdiff.settings",
    "KDConfig": "slimdiff.settings",
    "FinetuneConfig": "slimdiff.settings",
    "SampleConfig": "slimdiff.settings",
    "EvalSettings": "slimdiff.settings",
    "load": "slimdiff.export",
    "save": "slimdiff.export",
    "load_architecture": "slimdiff.export",
    "Provenance": "slimdiff.export",
    "adapter_for": "slimdiff.models",
    "build_tiny": "slimdiff.models",
    "apply_skip": "slimdiff.engines.skip",
    "remove_skip": "slimdiff.engines.skip",
    "compile_units": "slimdiff.engines.skip",
    "train": "slimdiff.training.loop",
    "sample": "slimdiff.training.diffusion",
    "SlimdiffError": "slimdiff.errors",
}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'slimdiff' has no attribute '{name}'")


def __dir__() -> list[str]:
    """The public API and the submodules already imported (not this module's own helpers)."""
    submodules = [name for name, value in globals().items() if type(value).__name__ == "module" and name != "importlib"]
    return sorted({*__all__, *submodules})
