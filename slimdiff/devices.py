"""The torch devices this machine has, and the one check every `--device` goes through."""

from __future__ import annotations

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
