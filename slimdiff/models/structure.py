"""The structure of a modified diffusers model, as JSON: what differs from the skeleton its config builds.

A pruned or layer-removed model is still an instance of its diffusers class; what changed is a set of module size
attributes (a narrower conv's `out_channels`, a GroupNorm's `num_groups`) and whole layers replaced by
`SkippedLayer`. `structure_of` records exactly that, `apply_structure` replays it on a skeleton built empty from the
config, and the helpers below give the replayed skeleton the saved tensors' shapes and check they agree. The
exporter (`slimdiff.export`) writes and reads the record; nothing here touches a file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimdiff.errors import SlimdiffError
from slimdiff.models import SkippedLayer, build, config_of
from slimdiff.models.base import get_submodule, set_submodule

#: Module types a structure may put in place of a skeleton module.
REPLACEMENTS: dict[str, type[nn.Module]] = {"SkippedLayer": SkippedLayer}

_SCALARS = (bool, int, float, str, type(None))


def _simple_attrs(module: nn.Module) -> dict[str, Any]:
    """Plain size/flag attributes of a module (the ones constructors derive from their arguments)."""
    attrs = {}
    for key, value in vars(module).items():
        if key.startswith("_") or key == "training":
            continue
        if isinstance(value, _SCALARS) or (
            isinstance(value, (tuple, list)) and all(isinstance(v, _SCALARS) for v in value)
        ):
            attrs[key] = value
    return attrs


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def structure_of(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Every module of `model` whose type or size attributes differ from the skeleton built from its config."""
    skeleton = dict(build(config_of(model), empty=True).named_modules())
    structure: dict[str, dict[str, Any]] = {}
    replaced: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in replaced):
            continue
        reference = skeleton.get(name)
        kind = type(module).__name__
        if reference is None or type(reference) is not type(module):
            if kind not in REPLACEMENTS:
                raise SlimdiffError(
                    f"module '{name}' ({kind}) is not part of the {type(model).__name__} architecture and is not "
                    f"a replacement slimdiff can save (valid: {', '.join(REPLACEMENTS)})"
                )
            structure[name] = {"replace": kind, "attrs": {k: _jsonable(v) for k, v in _simple_attrs(module).items()}}
            replaced.append(name)
            continue
        ours, theirs = _simple_attrs(module), _simple_attrs(reference)
        changed = {k: _jsonable(v) for k, v in ours.items() if k in theirs and theirs[k] != v}
        if changed:
            structure[name] = {"attrs": changed}
    present = set(dict(model.named_modules()))
    for name in skeleton:
        if name not in present and not any(name == p or name.startswith(p + ".") for p in replaced):
            raise SlimdiffError(f"module '{name}' was deleted from the model; only whole layers can be replaced")
    return structure


def apply_structure(model: nn.Module, structure: dict[str, dict[str, Any]]) -> None:
    """Apply a saved structure to a skeleton (replacements first, then attributes)."""
    for name, entry in structure.items():
        if "replace" in entry:
            kind = entry["replace"]
            if kind not in REPLACEMENTS:
                raise SlimdiffError(f"structure replaces '{name}' with unknown type '{kind}'")
            set_submodule(model, name, REPLACEMENTS[kind](**entry.get("attrs", {})))
    for name, entry in structure.items():
        if "replace" in entry:
            continue
        module = get_submodule(model, name)
        current = _simple_attrs(module)
        for key, value in entry.get("attrs", {}).items():
            if key not in current:
                raise SlimdiffError(f"structure sets unknown attribute '{key}' on '{name}'")
            setattr(module, key, tuple(value) if isinstance(current[key], tuple) else value)


def changed_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """Non-persistent buffers (not in the state dict) whose value differs from the skeleton's."""
    skeleton = build(config_of(model), empty=True)
    reference = dict(skeleton.named_buffers())
    persistent = set(model.state_dict())
    changed = {}
    for name, buffer in model.named_buffers():
        if name in persistent:
            continue
        ref = reference.get(name)
        if ref is None or ref.shape != buffer.shape or not torch.equal(ref.to(buffer), buffer):
            changed[name] = buffer.detach().cpu().contiguous()
    return changed


def resize_parameters(model: nn.Module, shapes: dict[str, tuple[torch.Size, Any]], where: Path) -> None:
    """Give every (empty) parameter the shape recorded in the weights file; refuse missing or extra tensors."""
    expected = set(model.state_dict())
    missing, extra = sorted(expected - set(shapes)), sorted(set(shapes) - expected)
    if missing or extra:
        detail = "; ".join(
            part
            for part in (f"missing {missing[:5]}" if missing else "", f"unexpected {extra[:5]}" if extra else "")
            if part
        )
        raise SlimdiffError(f"weights in {where} do not match the model's structure: {detail}")
    for name, param in list(model.named_parameters()):
        shape = shapes[name][0]
        if param.shape != shape:
            owner_name, _, attr = name.rpartition(".")
            owner = model.get_submodule(owner_name) if owner_name else model
            setattr(owner, attr, nn.Parameter(torch.empty(shape, device="meta"), requires_grad=param.requires_grad))


def _expected_weight_shape(module: nn.Module) -> tuple[int, ...] | None:
    """The weight shape a layer's own size attributes imply (None for layers without such attributes)."""
    if isinstance(module, nn.Conv2d):
        return (module.out_channels, module.in_channels // module.groups, *module.kernel_size)
    if isinstance(module, nn.Linear):
        return (module.out_features, module.in_features)
    if isinstance(module, nn.GroupNorm) and module.affine:
        return (module.num_channels,)
    if isinstance(module, nn.LayerNorm) and module.elementwise_affine:
        return tuple(module.normalized_shape)
    if isinstance(module, nn.Embedding):
        return (module.num_embeddings, module.embedding_dim)
    return None


def check_consistent(model: nn.Module, where: Path) -> None:
    """Refuse weights whose shapes contradict the recorded structure (e.g. weights of another model)."""
    for name, module in model.named_modules():
        expected = _expected_weight_shape(module)
        if expected is not None and tuple(module.weight.shape) != expected:
            raise SlimdiffError(
                f"weights in {where} do not match the model's structure: '{name}.weight' has shape "
                f"{tuple(module.weight.shape)} but the architecture needs {expected}"
            )


def set_buffer(model: nn.Module, name: str, value: torch.Tensor | torch.Size) -> None:
    """Put a saved non-persistent buffer in place of the skeleton's (refusing a name the model lacks); a shape
    alone gives an empty meta tensor of that shape."""
    owner_name, _, attr = name.rpartition(".")
    owner = get_submodule(model, owner_name) if owner_name else model
    if owner._buffers.get(attr) is None:
        raise SlimdiffError(f"saved buffer '{name}' is not a buffer of the {type(model).__name__} architecture")
    if isinstance(value, torch.Size):
        value = torch.empty(value, dtype=owner._buffers[attr].dtype, device="meta")
    owner.register_buffer(attr, value, persistent=False)
