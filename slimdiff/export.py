"""Save and load any slimdiff model — pruned, layer-removed or untouched — without pickles.

A model directory holds:

- `config.json` — the diffusers config the model was originally built from (so the unmodified skeleton can be
  rebuilt, and plain diffusers can read an unmodified model);
- `diffusion_pytorch_model.safetensors` — the weights, under diffusers' own names;
- `slimdiff.json` — the *structure* (every module whose sizes or type differ from the skeleton built from the
  config), the weights' checksum, and the provenance (source, engine, budget, metrics so far);
- `<artifact>.json` — what an engine made beside the weights (e.g. a skip table), listed in `slimdiff.json` with
  its checksum and re-attached by `load` (`slimdiff.artifacts.attach_artifact`: the artifact layer, below this
  module; the exporter imports nothing of the engines).

A model saved with `weights_from=SOURCE` whose weights are SOURCE's, unchanged (a skip table on an untouched
model), shares SOURCE's weights file instead of copying it: a hard link where the filesystem allows (the directory
then looks like any other), otherwise `slimdiff.json` records the file's absolute path and sha256
(`weights_reference`, format 2) and `load` refuses it, naming the checksum, once that file is gone or changed.

`load` builds the skeleton with empty weights, applies the structure, resizes parameters to the shapes in the
safetensors header, then assigns the weights: the result is an instance of the original diffusers class. Nothing
in any file is executed; every mismatch is refused with an error that names it, and so are weights holding NaN or
Inf (`check_finite` streams a model's weights for the same check without loading them).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import diffusers
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from slimdiff.artifacts import attach_artifact
from slimdiff.errors import SlimdiffError
from slimdiff.hub import locate
from slimdiff.io import atomic_path, atomic_write_json, read_json, sha256_file
from slimdiff.models import build, config_of, model_class
from slimdiff.models.structure import (
    apply_structure,
    changed_buffers,
    check_consistent,
    resize_parameters,
    set_buffer,
    structure_of,
)

FORMAT = "slimdiff"
#: The newest format this slimdiff reads: 2 adds `weights_reference` (weights shared with another model by checksum);
#: a spec without a reference is still written as format 1, which older slimdiffs read.
FORMAT_VERSION = 2
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
BUFFERS_NAME = "slimdiff_buffers.safetensors"
SPEC_NAME = "slimdiff.json"
CONFIG_NAME = "config.json"
SCHEDULER_NAME = "scheduler_config.json"
#: Pipeline subfolders that hold the denoiser, in the order they are looked for.
DENOISER_SUBFOLDERS = ("unet", "transformer")


@dataclass
class Provenance:
    """What a saved model was made from; engines and the trainer append to `history`."""

    source: str = ""
    engine: str | None = None
    budget: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Provenance:
        known = {k: data[k] for k in ("source", "engine", "budget", "metrics", "history") if k in data}
        return cls(**known)

    def chain(self) -> list[str]:
        """The model's making, one short line per job: `train 1500 steps`, `compress channels: macs 0.5 → 0.49`."""
        lines = []
        for entry in self.history:
            job = entry.get("job", "?")
            target, achieved = entry.get("target", {}), entry.get("achieved", {})
            if target or achieved:
                parts = [
                    f"{unit} {_short(value)} → {_short(achieved[unit])}"
                    if unit in achieved
                    else f"{unit} {_short(value)}"
                    for unit, value in target.items()
                ]
                parts += [f"{unit} {_short(value)}" for unit, value in achieved.items() if unit not in target]
                lines.append(f"{job}: {', '.join(parts)}")
            else:
                lines.append(f"{job} {entry['steps']} steps" if "steps" in entry else job)
        return lines


def _short(value: Any) -> str:
    """A budget figure for people: 3 significant digits; lists (e.g. OFA's sizes) joined by '/'."""
    if isinstance(value, (list, tuple)):
        return "/".join(_short(v) for v in value)
    return f"{value:.3g}" if isinstance(value, float) else str(value)


# ----------------------------------------------------------------------------------------------------------------
# save
# ----------------------------------------------------------------------------------------------------------------
#: The key of the placeholder spec a save writes first: a folder whose save was interrupted is refused, not loaded.
SAVING = "saving"


def save(
    model: nn.Module,
    out_dir: str | Path,
    *,
    provenance: Provenance | None = None,
    scheduler_config: dict[str, Any] | None = None,
    conditioning: dict[str, Any] | None = None,
    artifacts: dict[str, Any] | None = None,
    weights_from: str | Path | None = None,
) -> Path:
    """Save `model` into `out_dir` (created if needed; other files there, e.g. checkpoints, are left alone).

    Every file is written atomically, after a placeholder `slimdiff.json` that `load` refuses and before the real
    one, with the checksums of the files it belongs to: a save interrupted at any point leaves either the previous
    model or a folder that `load` refuses, never a wrong one (e.g. new weights without their skip table).
    `conditioning` records what the model is conditioned on (e.g. `{"classes": [...]}`) for samplers;
    `artifacts` maps artifact names to JSON-able payloads, each written to `<name>.json`. With `weights_from` (a
    model directory), weights equal to that model's (names, shapes, dtypes and values) share its weights file — a
    hard link, or a reference by checksum where links fail — instead of a second copy.
    """
    artifacts = artifacts or {}
    bad = [name for name in artifacts if not name.replace("_", "").replace("-", "").isalnum()]
    if bad:
        raise SlimdiffError(f"artifact name '{bad[0]}' must be letters, digits, '-' and '_'")
    model_class(config_of(model))  # refuse unsupported families before writing anything
    structure = structure_of(model)
    buffers = changed_buffers(model)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise SlimdiffError(f"output path {out_dir} exists and is not a directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / SPEC_NAME, {"format": FORMAT, SAVING: True})  # refused by load until the spec lands
    atomic_write_json(out_dir / CONFIG_NAME, config_of(model) | {"_diffusers_version": diffusers.__version__})
    files = {}
    source = _same_weights(state, weights_from) if weights_from is not None else None
    reference = None
    if source is not None:
        reference = _share_weights(source, out_dir / WEIGHTS_NAME)
        if reference is None:  # hard-linked
            files[WEIGHTS_NAME] = sha256_file(out_dir / WEIGHTS_NAME)
    for name, tensors in ((WEIGHTS_NAME, state), (BUFFERS_NAME, buffers)):
        if name == WEIGHTS_NAME and source is not None:
            continue
        if not tensors:
            (out_dir / name).unlink(missing_ok=True)
            continue
        with atomic_path(out_dir / name) as tmp:
            save_file(tensors, tmp, metadata={"format": "pt"})
        files[name] = sha256_file(out_dir / name)
    for name, payload in artifacts.items():
        atomic_write_json(out_dir / f"{name}.json", payload)
        files[f"{name}.json"] = sha256_file(out_dir / f"{name}.json")
    if scheduler_config is not None:
        atomic_write_json(out_dir / SCHEDULER_NAME, scheduler_config)
    spec = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION if reference else 1,
        "class": type(model).__name__,
        "dtype": str(next(iter(state.values())).dtype).removeprefix("torch."),
        "structure": structure,
        "files": files,
        **({"weights_reference": reference} if reference else {}),
        "conditioning": conditioning or {},
        "artifacts": sorted(artifacts),
        "provenance": asdict(provenance or Provenance()),
    }
    atomic_write_json(out_dir / SPEC_NAME, spec)
    return out_dir


def _same_weights(state: dict[str, torch.Tensor], source_dir: str | Path) -> Path | None:
    """The one weights file of the model in `source_dir` when it holds exactly `state`, else None (read one tensor
    at a time, stopping at the first difference; a pruned model differs in the header already)."""
    source_dir = resolve_model_dir(source_dir)
    files = _weight_files(source_dir, read_spec(source_dir))
    if len(files) != 1 or not files[0].is_file():
        return None
    header = _open_header(files[0])
    if set(header) != set(state) or any(header[name][0] != tensor.shape for name, tensor in state.items()):
        return None
    with safe_open(files[0], framework="pt") as f:
        for name, tensor in state.items():
            stored = f.get_tensor(name)
            if stored.dtype != tensor.dtype or not torch.equal(stored, tensor):
                return None
    return files[0]


def _share_weights(source: Path, target: Path) -> dict[str, str] | None:
    """Hard-link `source` (a weights file) to `target`: None on success; where the filesystem refuses, the reference
    to record instead (`source`'s absolute path and sha256), `target` removed."""
    tmp = target.with_name(f".{target.name}.link.tmp")  # not `atomic_path`: it would re-mode the shared inode
    try:
        tmp.unlink(missing_ok=True)
        os.link(source, tmp)
        os.replace(tmp, target)
        return None
    except OSError:
        tmp.unlink(missing_ok=True)
        target.unlink(missing_ok=True)
        return {"path": str(source.resolve()), "sha256": sha256_file(source)}


# ----------------------------------------------------------------------------------------------------------------
# load
# ----------------------------------------------------------------------------------------------------------------
def resolve_model_dir(path: str | Path) -> Path:
    """The directory that holds the denoiser: `path` (a folder or a Hub id, `slimdiff.hub.locate`) itself, or its
    `unet/`/`transformer/` pipeline subfolder."""
    path = locate(path)
    if not path.is_dir():
        raise SlimdiffError(f"{path} is a file; pass a diffusers model or pipeline directory")
    if (path / CONFIG_NAME).is_file():
        return path
    for sub in DENOISER_SUBFOLDERS:
        if (path / sub / CONFIG_NAME).is_file():
            return path / sub
    raise SlimdiffError(
        f"{path} holds no model: expected {CONFIG_NAME} there, or a pipeline with a "
        f"{' or '.join(s + '/' for s in DENOISER_SUBFOLDERS)} subfolder"
    )


def read_spec(model_dir: str | Path) -> dict[str, Any] | None:
    """The `slimdiff.json` of a model directory, or None for a plain diffusers directory."""
    path = resolve_model_dir(model_dir) / SPEC_NAME
    if not path.exists():
        return None
    spec = read_json(path, "slimdiff spec")
    if not isinstance(spec, dict) or spec.get("format") != FORMAT:
        raise SlimdiffError(f'{path} is not a slimdiff spec (missing "format": "{FORMAT}")')
    if spec.get(SAVING):
        raise SlimdiffError(
            f"{path.parent} holds a model whose save did not finish: save it again, or delete the folder"
        )
    if spec.get("format_version", 0) > FORMAT_VERSION:
        raise SlimdiffError(
            f"{path} was written by a newer slimdiff (format {spec['format_version']}); upgrade slimdiff"
        )
    return spec


def read_provenance(model_dir: str | Path) -> Provenance:
    """What a saved model was made from (empty for a plain diffusers directory)."""
    spec = read_spec(model_dir)
    return Provenance.from_dict(spec["provenance"]) if spec else Provenance()


def read_config(model_dir: str | Path) -> dict[str, Any]:
    """The diffusers config of a model directory."""
    config = read_json(resolve_model_dir(model_dir) / CONFIG_NAME, "model config")
    if not isinstance(config, dict):
        raise SlimdiffError(f"{resolve_model_dir(model_dir) / CONFIG_NAME} is not a JSON object")
    model_class(config)
    return config


def _weight_files(model_dir: Path, spec: dict[str, Any] | None) -> list[Path]:
    if spec is not None and "weights_reference" in spec:
        reference = spec["weights_reference"]
        path = Path(reference["path"])
        if not path.is_file():
            raise SlimdiffError(
                f"{model_dir} shares the weights file {path} (sha256 {reference['sha256']}), which is gone: put "
                "that file back there (the model it belongs to), or save this model with its own weights"
            )
        return [path]
    if spec is not None:
        return [model_dir / WEIGHTS_NAME]
    index = model_dir / f"{WEIGHTS_NAME}.index.json"
    if index.is_file():
        weight_map = read_json(index, "weights index").get("weight_map", {})
        return sorted({model_dir / name for name in weight_map.values()})
    single = [model_dir / WEIGHTS_NAME, model_dir / WEIGHTS_NAME.replace(".safetensors", ".fp16.safetensors")]
    found = [p for p in single if p.is_file()]
    if found:
        return found[:1]
    if any(model_dir.glob("*.bin")) or any(model_dir.glob("*.pt")) or any(model_dir.glob("*.ckpt")):
        raise SlimdiffError(
            f"{model_dir} has only pickled weights (.bin/.pt/.ckpt), which slimdiff never loads; convert them to "
            f"{WEIGHTS_NAME} (e.g. `Model.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)` "
            "in a trusted environment)"
        )
    return [model_dir / WEIGHTS_NAME]


def _open_header(path: Path) -> dict[str, tuple[torch.Size, str]]:
    """Shapes and dtypes of every tensor in a safetensors file, reading only its header."""
    if not path.is_file():
        raise SlimdiffError(f"weights file not found: {path}")
    try:
        with safe_open(path, framework="pt") as f:
            header = {}
            for key in f.keys():
                piece = f.get_slice(key)
                header[key] = (torch.Size(piece.get_shape()), piece.get_dtype())
            return header
    except (SafetensorError, OSError) as error:
        raise SlimdiffError(f"{path} is corrupt or truncated (not a valid safetensors file): {error}") from None


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, each in its own freshly allocated, contiguous memory.

    A tensor read from a safetensors file lies at its byte offset in the file (4-byte aligned for float32), not at
    the 64-byte alignment of PyTorch's allocator; MKL picks its kernel (and so its summation order) by alignment on
    some CPUs, so a model holding such tensors can differ from the original in the last bits. Copying into the
    allocator's memory gives the loaded model the layout of a freshly built one, hence bit-identical outputs.
    """
    return {key: tensor.clone(memory_format=torch.contiguous_format) for key, tensor in _streamed([path])}


def _finite(tensor: torch.Tensor) -> bool:
    """Whether a tensor holds no NaN or Inf: one sum (NaN and Inf carry through it), checked element-wise only when
    the sum is not finite (it may overflow)."""
    if not tensor.is_floating_point():
        return True
    total = tensor.sum(dtype=torch.float64 if tensor.dtype == torch.float64 else torch.float32)
    return bool(torch.isfinite(total)) or bool(torch.isfinite(tensor).all())


def _refuse_nonfinite(tensors: Iterable[tuple[str, torch.Tensor]], where: Path) -> int:
    """Refuse weights holding NaN or Inf in one line: the first such tensor and how many there are; returns the
    number of tensors checked."""
    checked, broken, first = 0, 0, ""
    for name, tensor in tensors:
        checked += 1
        if _finite(tensor):
            continue
        broken += 1
        if not first:
            nan, inf = int(torch.isnan(tensor).sum()), int(torch.isinf(tensor).sum())
            first = f"'{name}' ({nan} NaN, {inf} Inf of {tensor.numel()} values)"
    if broken:
        raise SlimdiffError(
            f"{where}: the weights hold NaN or Inf in {broken} of {checked} tensors, the first {first} — the model "
            "is broken (e.g. a diverged training run); restore or retrain it"
        )
    return checked


def _streamed(paths: Iterable[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of some safetensors files, one at a time (memory-mapped: at most one tensor in memory)."""
    for path in paths:
        try:
            with safe_open(path, framework="pt") as f:
                for key in f.keys():
                    yield key, f.get_tensor(key)
        except (SafetensorError, OSError) as error:
            raise SlimdiffError(f"{path} is corrupt or truncated (not a valid safetensors file): {error}") from None


def check_finite(model_dir: str | Path) -> int:
    """Refuse a model whose weights hold NaN or Inf (as `load` does), streaming them tensor by tensor instead of
    loading the model; returns the number of tensors checked (0 for a directory with only a config)."""
    model_dir = resolve_model_dir(model_dir)
    spec = read_spec(model_dir)
    if spec is None and not any(model_dir.glob("*.safetensors")):
        return 0
    paths = _weight_files(model_dir, spec)
    if spec is not None and (model_dir / BUFFERS_NAME).is_file():
        paths.append(model_dir / BUFFERS_NAME)
    return _refuse_nonfinite(_streamed(paths), model_dir)


def _verify_checksums(model_dir: Path, spec: dict[str, Any]) -> None:
    reference = spec.get("weights_reference")
    if reference is not None and sha256_file(reference["path"]) != reference["sha256"]:
        raise SlimdiffError(
            f"{model_dir} shares the weights file {reference['path']}, which has changed since (its sha256 is no "
            f"longer {reference['sha256']}): restore that file, or save this model with its own weights"
        )
    for name, digest in spec.get("files", {}).items():
        path = model_dir / name
        if not path.is_file():
            raise SlimdiffError(f"{path} is missing (listed in {SPEC_NAME})")
        if sha256_file(path) != digest:
            raise SlimdiffError(
                f"{path} does not match its checksum in {SPEC_NAME}: the file is corrupt or was changed"
            )


def load(
    model_dir: str | Path,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    weights: bool = True,
    artifacts: bool = True,
) -> nn.Module:
    """Load a model saved by `save` or a plain diffusers model/pipeline directory (safetensors only).

    `weights=False` builds the exact architecture on the meta device without reading any weights (for counting;
    its artifacts are attached all the same, so that it declares their sampling plan). `artifacts=False` leaves the
    saved artifacts (e.g. a skip table) unattached: the bare denoiser.
    """
    model_dir = resolve_model_dir(model_dir)
    config = read_config(model_dir)
    spec = read_spec(model_dir)
    if spec is not None and spec.get("class") != config.get("_class_name"):
        raise SlimdiffError(
            f"{model_dir}: {SPEC_NAME} says class {spec.get('class')} "
            f"but {CONFIG_NAME} says {config.get('_class_name')}"
        )
    files = _weight_files(model_dir, spec)
    shapes: dict[str, tuple[torch.Size, Any]] = {}
    for path in files:
        shapes.update(_open_header(path))

    model = build(config, empty=True)
    if spec is not None:
        apply_structure(model, spec.get("structure", {}))
    resize_parameters(model, shapes, model_dir)
    check_consistent(model, model_dir)
    buffers_file = model_dir / BUFFERS_NAME if spec is not None and (model_dir / BUFFERS_NAME).is_file() else None
    if not weights:
        if buffers_file is not None:  # e.g. a residual-pruned DiT's narrower position table: its saved shape
            for name, (shape, _) in _open_header(buffers_file).items():
                set_buffer(model, name, shape)
        model.to("meta")
    else:
        if spec is not None:
            _verify_checksums(model_dir, spec)
        state: dict[str, torch.Tensor] = {}
        for path in files:
            state.update(_read_tensors(path))
        buffers = _read_tensors(buffers_file) if buffers_file is not None else {}
        _refuse_nonfinite([*state.items(), *buffers.items()], model_dir)
        model.load_state_dict(state, strict=True, assign=True)
        for name, value in buffers.items():
            set_buffer(model, name, value)
        if any(p.is_meta for p in model.parameters()):
            raise SlimdiffError(f"{model_dir}: some parameters were not loaded")
        model.to(device)
        if dtype is not None and dtype != next(model.parameters()).dtype:  # (diffusers warns on every `to(dtype)`)
            model.to(dtype)
    if spec is not None and artifacts:
        for name in spec.get("artifacts", []):
            attach_artifact(model, name, read_json(model_dir / f"{name}.json", f"artifact {name}"))
    return model.eval()


def read_artifact(model_dir: str | Path, name: str) -> Any:
    """The payload of an artifact saved with a model (refused by name when the model has none)."""
    model_dir = resolve_model_dir(model_dir)
    spec = read_spec(model_dir) or {}
    if name not in spec.get("artifacts", []):
        raise SlimdiffError(f"{model_dir} carries no artifact '{name}' (it has: {spec.get('artifacts') or 'none'})")
    return read_json(model_dir / f"{name}.json", f"artifact {name}")


def load_architecture(model_dir: str | Path) -> nn.Module:
    """The model's exact architecture on the meta device, without reading any weights (its artifacts attached).

    A directory that holds only a `config.json` gives the architecture the config describes.
    """
    resolved = resolve_model_dir(model_dir)
    if read_spec(resolved) is None and not any(resolved.glob("*.safetensors")):
        return build(read_config(resolved), empty=True).to("meta").eval()
    return load(resolved, weights=False)


def load_scheduler_config(model_dir: str | Path) -> dict[str, Any] | None:
    """The noise-scheduler config saved beside a model (or a pipeline's `scheduler/`), if any."""
    path = Path(model_dir)
    for candidate in (
        resolve_model_dir(path) / SCHEDULER_NAME,
        path / "scheduler" / SCHEDULER_NAME,
        resolve_model_dir(path).parent / "scheduler" / SCHEDULER_NAME,
    ):
        if candidate.is_file():
            return read_json(candidate, "scheduler config")
    return None


__all__ = [
    "Provenance",
    "check_finite",
    "load",
    "load_architecture",
    "load_scheduler_config",
    "read_artifact",
    "read_config",
    "read_provenance",
    "read_spec",
    "resolve_model_dir",
    "save",
]
