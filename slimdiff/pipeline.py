"""A complete diffusers pipeline folder around a slimdiff model (`slimdiff export MODEL --pipeline SRC --out DIR`).

The folder is the source pipeline with the compressed denoiser in place of its `unet/` or `transformer/`. Its
`model_index.json` names the denoiser `["slimdiff.pipeline", "SlimdiffModel"]`: diffusers' pipeline loader resolves a
library it does not ship from `sys.modules`, so after `import slimdiff.pipeline`,
`DiffusionPipeline.from_pretrained(DIR)` calls `SlimdiffModel.from_pretrained(DIR/unet)`, which is `slimdiff.load`
— the original diffusers class with the pruned shapes and any skip table attached. Plain
`UNet2DConditionModel.from_pretrained` cannot express per-layer widths (its `ignore_mismatched_sizes=True` would load
random weights in their place).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
from diffusers import ModelMixin  # diffusers finds the load method by this base class in this module
from torch import nn

from slimdiff.errors import SlimdiffError
from slimdiff.export import CONFIG_NAME, DENOISER_SUBFOLDERS, SPEC_NAME, load, read_config, read_spec, resolve_model_dir
from slimdiff.hub import locate
from slimdiff.io import atomic_dir, atomic_write_json, read_json

INDEX_NAME = "model_index.json"
#: The `model_index.json` entry of a slimdiff denoiser: (module diffusers finds in `sys.modules`, loader class).
LOADER_ENTRY = ("slimdiff.pipeline", "SlimdiffModel")
#: Files never carried into a pipeline folder (slimdiff never loads pickles; diffusers would).
PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle"})
#: `from_pretrained` options diffusers may pass that slimdiff cannot honour when set.
_UNSUPPORTED = ("device_map", "max_memory", "offload_folder", "variant", "quantization_config")


class SlimdiffModel(ModelMixin):
    """diffusers' loader for a slimdiff denoiser in a pipeline folder; never instantiated."""

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, *, torch_dtype: torch.dtype | None = None, **options: Any
    ) -> nn.Module:
        """`slimdiff.load(folder, dtype=torch_dtype)`; options diffusers passes that slimdiff cannot honour are
        refused when set (the rest — mmap, low-memory loading, safetensors — hold for slimdiff anyway)."""
        given = [name for name in _UNSUPPORTED if options.get(name) is not None]
        if given:
            raise SlimdiffError(f"a slimdiff denoiser cannot be loaded with {', '.join(given)}; leave it unset")
        if torch_dtype is not None and not isinstance(torch_dtype, torch.dtype):
            raise SlimdiffError(f"torch_dtype must be a torch.dtype for a slimdiff denoiser, got {torch_dtype!r}")
        return load(pretrained_model_name_or_path, dtype=torch_dtype)


def _architecture(config: dict[str, Any]) -> dict[str, Any]:
    """A diffusers config without its bookkeeping keys (`_class_name` kept, `_diffusers_version` etc. dropped)."""
    return {k: v for k, v in config.items() if not k.startswith("_") or k == "_class_name"}


def _link(source: Path, target: Path) -> None:
    """`target` as a hard link to `source`'s file (a cache symlink followed), a copy where links cannot be made."""
    target.parent.mkdir(parents=True, exist_ok=True)
    real = source.resolve()
    try:
        os.link(real, target)
    except OSError:  # another filesystem, or one without hard links
        shutil.copy2(real, target)


def export_pipeline(model: str | Path, pipeline: str | Path, out_dir: str | Path) -> Path:
    """Write `out_dir`: the pipeline `pipeline` (folder or Hub id) with the slimdiff model `model` as its denoiser.

    Every other component is hard-linked from the source (copied across filesystems), the denoiser's files from
    the model folder; the model must have been made from the pipeline's denoiser architecture. Pickled files are
    left out. Written atomically: `out_dir` is replaced only once complete.
    """
    model_dir = resolve_model_dir(model)
    spec = read_spec(model_dir)
    if spec is None:
        raise SlimdiffError(
            f"{model} was not written by slimdiff (no {SPEC_NAME}); a plain diffusers model goes into a pipeline "
            "with diffusers itself"
        )
    source = locate(pipeline)
    if not (source / INDEX_NAME).is_file():
        raise SlimdiffError(f"{pipeline} is not a diffusers pipeline folder (no {INDEX_NAME}); pass a pipeline")
    index = read_json(source / INDEX_NAME, "pipeline index")
    denoiser = next((name for name in DENOISER_SUBFOLDERS if name in index), None)
    if denoiser is None:
        components = ", ".join(k for k in index if not k.startswith("_"))
        raise SlimdiffError(
            f"{pipeline} has no {' or '.join(DENOISER_SUBFOLDERS)} component (it has: {components or 'none'})"
        )
    ours, theirs = _architecture(read_config(model_dir)), _architecture(read_config(source / denoiser))
    differing = sorted(k for k in ours.keys() & theirs.keys() if ours[k] != theirs[k])  # a key one lacks: default
    if differing:
        key = differing[0]
        raise SlimdiffError(
            f"{model} was not made from this pipeline's {denoiser}: its config has {key} = {ours[key]!r}, "
            f"the pipeline's {theirs[key]!r}"
        )
    out_dir = Path(out_dir)
    for given, folder in ((pipeline, source), (model, model_dir)):
        if out_dir.resolve() == folder.resolve() or out_dir.resolve() in folder.resolve().parents:
            raise SlimdiffError(f"--out {out_dir} would replace {given}; choose another folder")
    with atomic_dir(out_dir) as tmp:
        for path in sorted(source.rglob("*")):
            relative = path.relative_to(source)
            skipped = relative.parts[0] in (denoiser, INDEX_NAME) or relative.parts[0].startswith(".")
            if path.is_file() and not skipped and path.suffix not in PICKLE_SUFFIXES:
                _link(path, tmp / relative)
        for name in (CONFIG_NAME, SPEC_NAME, *spec.get("files", {})):
            _link(model_dir / name, tmp / denoiser / name)
        atomic_write_json(tmp / INDEX_NAME, index | {denoiser: list(LOADER_ENTRY)})
    return out_dir


__all__ = ["LOADER_ENTRY", "SlimdiffModel", "export_pipeline"]
