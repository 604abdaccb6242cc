"""The data layer: image datasets (`images`), where they come from (`sources`, with the settings in `config`), and
the on-disk cache of encoded latents and text embeddings (`cache`).

Every dataset yields `(image, label)` with `image` a float32 `[C, H, W]` tensor in [-1, 1] (or a latent). Names are
resolved lazily, so that importing `DataConfig` for the CLI does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DataConfig": "slimdiff.data.config",
    "IMAGE_EXTENSIONS": "slimdiff.data.images",
    "ImageDataset": "slimdiff.data.images",
    "ImageItem": "slimdiff.data.images",
    "Split": "slimdiff.data.images",
    "check_fits": "slimdiff.data.images",
    "class_prompts": "slimdiff.data.images",
    "load_prompts": "slimdiff.data.images",
    "is_captioned": "slimdiff.data.sources",
    "load_data": "slimdiff.data.sources",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'slimdiff.data' has no attribute '{name}'")
