"""Distillation losses and feature capture: task + output-KD + feature-KD (plain as BK-SDM, normalized as LAPTOP)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from slimdiff.errors import SlimdiffError
from slimdiff.models import Adapter
from slimdiff.settings import KDMode


def feature_kd_terms(
    student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor], mode: KDMode
) -> list[torch.Tensor]:
    """One feature-MSE term per stage; `normalized` divides each by the teacher feature's mean square.

    Normalizing makes every stage count equally however large its activations are: BK-SDM's plain sum is
    dominated by the few stages with the largest magnitudes (LAPTOP-Diff, Zhang et al., arXiv 2404.11098).
    """
    if len(student) != len(teacher) or not student:
        raise SlimdiffError(
            f"feature KD needs matched, non-empty feature lists (got {len(student)} and {len(teacher)})"
        )
    terms = []
    for index, (s, t) in enumerate(zip(student, teacher, strict=True)):
        if s.shape != t.shape:
            raise SlimdiffError(
                f"feature pair {index} has student shape {tuple(s.shape)} but teacher shape {tuple(t.shape)}; "
                "pair only same-shaped modules (channel-pruned students: set the feature-KD weight to 0)"
            )
        term = F.mse_loss(s.float(), t.float())
        if mode == "normalized":
            term = term / t.float().pow(2).mean().clamp_min(1e-12)
        terms.append(term)
    return terms


def output_kd_loss(student_eps: torch.Tensor, teacher_eps: torch.Tensor) -> torch.Tensor:
    """MSE between the student's and the teacher's noise predictions."""
    return F.mse_loss(student_eps.float(), teacher_eps.float())


@dataclass(frozen=True)
class KeptChannels:
    """The channels a channel-pruned student's block output keeps: `indices` into the teacher's `width` channels."""

    indices: tuple[int, ...]
    width: int


def default_feature_pairs(
    student: Adapter, teacher: Adapter, kept: Mapping[str, KeptChannels] | None = None
) -> tuple[tuple[str, str], ...]:
    """Pair the blocks both models share by name whose outputs have the same shape (probed on example inputs),
    the teacher's output taken at the student's kept channels (`kept`, by block) where the student lost some.

    Layer-pruned students keep every block's output shape; channel-pruned ones keep theirs once the teacher's is
    sliced. An empty result means feature KD has nothing to match.
    """
    kept = kept or {}
    teacher_names = {block.name for block in teacher.blocks()}
    names = [b.name for b in student.blocks() if b.name in teacher_names]
    shapes = []
    for adapter in (student, teacher):
        device = next(adapter.model.parameters()).device
        with capture(adapter.model, names) as cap, torch.no_grad():
            adapter.model(**adapter.example_inputs(1, device))
            shapes.append([list(f.shape) for f in cap.take()])
    dim = teacher.block_channel_dim
    for name, shape in zip(names, shapes[1], strict=True):
        if name in kept:
            if shape[dim] != kept[name].width:
                raise SlimdiffError(
                    f"the teacher's '{name}' has {shape[dim]} channels, but the student was pruned from a model "
                    f"with {kept[name].width}: distil from the model the student was pruned from"
                )
            shape[dim] = len(kept[name].indices)
    return tuple((n, n) for n, s, t in zip(names, *shapes, strict=True) if s == t)


def at_kept_channels(
    features: Sequence[torch.Tensor], names: Sequence[str], kept: Mapping[str, KeptChannels], dim: int
) -> list[torch.Tensor]:
    """The teacher's features of `names`, each taken at the student's kept channels where it has any recorded."""
    return [
        f.index_select(dim, torch.tensor(kept[n].indices, device=f.device)) if n in kept else f
        for f, n in zip(features, names, strict=True)
    ]


def first_tensor(output: object) -> torch.Tensor:
    """The tensor a module's output leads with (U-Net down blocks return (hidden_states, skips))."""
    while isinstance(output, (tuple, list)):
        output = output[0]
    if not isinstance(output, torch.Tensor):
        raise SlimdiffError(f"cannot capture a feature from a module returning {type(output).__name__}")
    return output


class FeatureCapture:
    """Records the outputs of named modules during forward passes.

    Names are resolved on the bare model (pass the unwrapped model, not a DDP/accelerate wrapper): the hooks sit on
    the module objects themselves, so wrapping the model afterwards changes nothing.
    """

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        self.names = list(names)
        self.features: dict[str, torch.Tensor] = {}
        self.recording = True
        self._handles = []
        for name in self.names:
            try:
                module = model.get_submodule(name.removeprefix("module."))
            except AttributeError:
                raise SlimdiffError(f"feature module '{name}' not found in the model") from None
            self._handles.append(module.register_forward_hook(self._hook(name)))

    def _hook(self, name: str):
        def record(_module: nn.Module, _inputs: object, output: object) -> None:
            if self.recording:
                self.features[name] = first_tensor(output)

        return record

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Record nothing inside the block: a gradient-checkpointed block recomputed in the backward runs its
        hooks again, and those outputs are not a forward pass's."""
        self.recording = False
        try:
            yield
        finally:
            self.recording = True

    def take(self) -> list[torch.Tensor]:
        """The captured features in name order; clears the record."""
        missing = [n for n in self.names if n not in self.features]
        if missing:
            raise SlimdiffError(f"modules {missing} did not run in the forward pass (were they removed?)")
        features = [self.features[n] for n in self.names]
        self.features.clear()
        return features

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


@contextmanager
def capture(model: nn.Module, names: Sequence[str]) -> Iterator[FeatureCapture]:
    """`with capture(model, names) as cap:` … `cap.take()`; the hooks are removed on exit."""
    cap = FeatureCapture(model, names)
    try:
        yield cap
    finally:
        cap.remove()
