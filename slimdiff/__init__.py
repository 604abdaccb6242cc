"""slimdiff — make trained diffusers diffusion models smaller and faster.

The public API (imported lazily, so that `slimdiff --help` stays fast):

- `load(dir)`, `save(model, dir)`, `load_architecture(dir)`, `Provenance` — pickle-free export (`slimdiff.export`)
- `adapter_for(model)`, `build_tiny(name)` — the family adapters (`slimdiff.models`)
- `train(...)`, `TrainConfig`, `KDConfig` — the training loop (`slimdiff.train`, `slimdiff.distill`)
- `sample(...)` — sampling through diffusers schedulers (`slimdiff.diffusion`)
- `SlimdiffError` — raised for bad input
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "load": "slimdiff.export",
    "save": "slimdiff.export",
    "load_architecture": "slimdiff.export",
    "Provenance": "slimdiff.export",
    "adapter_for": "slimdiff.models",
    "build_tiny": "slimdiff.models",
    "train": "slimdiff.train",
    "TrainConfig": "slimdiff.train",
    "KDConfig": "slimdiff.distill",
    "sample": "slimdiff.diffusion",
    "SlimdiffError": "slimdiff.errors",
}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'slimdiff' has no attribute '{name}'")
