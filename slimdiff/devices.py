"""The torch devices this machine has, the one check every `--device` goes through, and the precisions a
`--dtype` names."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch

from slimdiff.errors import SlimdiffError


def available_devices() -> list[str]:
    """The device names this machine can run on: `cpu`, then `cuda` and `cuda:N` per GPU, `mps` on Apple."""
    names = ["cpu"]
    if torch.cuda.is_available():
        names += ["cuda", *(f"cuda:{index}" for index in range(torch.cuda.device_count()))]
    if torch.backends.mps.is_available():
        names.append("mps")
    return names


def check_device(name: str) -> str:
    """`name` when this machine has that device; otherwise one line saying so and listing what it has."""
    have = available_devices()
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise SlimdiffError(f"unknown device '{name}'; this machine has: {', '.join(have)}") from None
    if str(device) not in have:
        raise SlimdiffError(f"device '{name}' is not available here; this machine has: {', '.join(have)}")
    return name


#: The precisions a `--dtype` names.
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """The device `name` names (`auto`: the first GPU when there is one, else the CPU), refused in one line listing
    what this machine has when it has no such device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(check_device(name))


def half_dtype(device: torch.device, *, bf16_supported: bool | None = None) -> torch.dtype:
    """The precision a frozen model (a KD teacher) is held in on `device`: bf16 on a GPU that supports it, fp16 on
    another GPU, fp32 elsewhere (CPU half-precision kernels are slow or missing). `bf16_supported` defaults to
    asking CUDA."""
    if device.type != "cuda":
        return torch.float32
    if bf16_supported is None:
        bf16_supported = torch.cuda.is_bf16_supported()
    return torch.bfloat16 if bf16_supported else torch.float16


def autocast(device: torch.device, dtype: torch.dtype) -> AbstractContextManager[object]:
    """Compute in `dtype` on `device` with the weights kept as they are (`torch.autocast`); nothing for fp32."""
    return nullcontext() if dtype == torch.float32 else torch.autocast(device_type=device.type, dtype=dtype)
