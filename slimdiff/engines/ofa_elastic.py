"""OFA-Diffusion's elastic model: K nested subnets of one set of shared full-width weights, trained as one model.

Slicing, not masking. The subnet of a step runs the pruned architecture with weights gathered
(index_select) from the shared full-width weights, so the trained function *is* the extracted model's —
masking would leave GroupNorm statistics and the attention scale those of the full width, and would cost the
full MACs every step. DDP stays happy: every shared tensor enters every subnet's graph (through its gather),
so every parameter gets a gradient (zero outside the subnet) and none is "unused".

Sampling. Step s trains one subnet drawn from a generator seeded by (seed, s), so a resumed or multi-process run
draws the same ones: `reweighted` (weights falling linearly from m for the smallest to 1 for the largest),
`uniform`, or `sandwich` (the sandwich rule's largest / smallest / random spread over consecutive steps, so
every step still costs one subnet).

EMA. The trainer keeps one EMA of the shared weights. Slicing is linear, so the slice of the EMA is exactly the
EMA of the slice: each extracted size gets the EMA of its own weights over the run — the right average, with
no per-size copies.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from slimdiff.engines.base import Result
from slimdiff.engines.channel_surgery import PrunedCopy
from slimdiff.errors import SlimdiffError
from slimdiff.metrics.cost import count_macs
from slimdiff.models import adapter_for
from slimdiff.models.base import count_params
from slimdiff.training.loop import stream_seed


@dataclass
class Subnet:
    """One size: its pruned architecture (on the meta device) and, per tensor, the shared indices it keeps."""

    name: str
    size: float
    keep_ratio: float
    rung: int
    skeleton: nn.Module
    index: dict[str, dict[int, torch.Tensor]]  # tensor name → {dim: kept indices along dim}
    record: dict[str, Any] = field(default_factory=dict)

    def kept(self, name: str, dim: int, full: int) -> set[int]:
        """The shared indices along `dim` of tensor `name` this subnet keeps."""
        return set(self.index.get(name, {}).get(dim, torch.arange(full)).tolist())


def named_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Every parameter and buffer of `model`, by name."""
    return chain(model.named_parameters(), model.named_buffers())


def slice_indices(model: nn.Module, prune: Callable[[nn.Module], PrunedCopy], pruned: nn.Module) -> dict:
    """For every tensor of `pruned`, the indices of `model`'s tensor it kept along each shrunk dim.

    Read off probe copies whose entries are their own index along one dim, pruned by the same plan (`prune` ranks
    with fixed scores, so the weights' values cannot change it).
    """
    shared = dict(named_tensors(model))
    small = dict(named_tensors(pruned))
    dims = sorted({d for n, t in small.items() for d in range(t.ndim) if t.shape[d] != shared[n].shape[d]})
    index: dict[str, dict[int, torch.Tensor]] = {}
    for dim in dims:
        probe = copy.deepcopy(model)
        with torch.no_grad():
            for _, tensor in named_tensors(probe):
                if tensor.ndim > dim and tensor.is_floating_point():
                    shape = [1] * tensor.ndim
                    shape[dim] = tensor.shape[dim]
                    tensor.copy_(torch.arange(tensor.shape[dim], dtype=tensor.dtype).view(shape).expand_as(tensor))
        for name, tensor in named_tensors(prune(probe).model):
            if tensor.ndim > dim and tensor.shape[dim] != shared[name].shape[dim]:
                line = [0] * tensor.ndim
                line[dim] = slice(None)
                index.setdefault(name, {})[dim] = tensor[tuple(line)].round().long()
    return index


def gather(tensor: torch.Tensor, dims: dict[int, torch.Tensor]) -> torch.Tensor:
    """The slice of a shared tensor that a subnet keeps (differentiable: gradients flow into the shared tensor)."""
    for dim, idx in sorted(dims.items()):
        tensor = tensor.index_select(dim, idx.to(tensor.device))
    return tensor


def subnet_probabilities(sampling: str, count: int, smallest_weight: float) -> list[float]:
    """Long-run share of the steps each subnet (smallest first) trains under a sampling rule."""
    if count == 1:
        return [1.0]
    if sampling == "uniform":
        return [1 / count] * count
    if sampling == "sandwich":
        shares = [1 / (3 * count)] * count
        shares[0] += 1 / 3
        shares[-1] += 1 / 3
        return shares
    weights = [smallest_weight - (smallest_weight - 1) * i / (count - 1) for i in range(count)]
    return [w / sum(weights) for w in weights]


def draw_subnet(sampling: str, count: int, smallest_weight: float, seed: int, step: int) -> int:
    """The subnet (0 = smallest) that step `step` trains: a function of (seed, step) only."""
    generator = torch.Generator().manual_seed(stream_seed(seed, step, 3))
    if sampling == "sandwich" and step % 3 < 2:
        return count - 1 if step % 3 == 0 else 0  # largest, smallest, then one at random
    probabilities = subnet_probabilities("uniform" if sampling == "sandwich" else sampling, count, smallest_weight)
    return int(torch.multinomial(torch.tensor(probabilities), 1, generator=generator))


class ElasticModel(nn.Module):
    """Shared full-width weights and K nested subnets; `forward` runs the active subnet with gathered weights.

    It computes like its diffusers model (`diffusers_class`, `config`), so the trainer and adapters take it as one.
    """

    def __init__(
        self, shared: nn.Module, subnets: list[Subnet], sampling: str, smallest_weight: float, seed: int
    ) -> None:
        super().__init__()
        self.shared = shared
        self.subnets = subnets  # a plain list: the meta skeletons hold no state
        self.sampling, self.smallest_weight, self.seed = sampling, smallest_weight, seed
        self.diffusers_class = type(shared).__name__
        self.active = len(subnets) - 1

    @property
    def config(self) -> Any:
        return self.shared.config

    def draw_subnet_for_step(self, step: int) -> None:
        """Activate the subnet of optimizer step `step` (the trainer's `before_step`)."""
        self.active = draw_subnet(self.sampling, len(self.subnets), self.smallest_weight, self.seed, step)

    def tensors(self, subnet: Subnet) -> dict[str, torch.Tensor]:
        """Every parameter and buffer of the subnet, gathered from the shared ones."""
        shared = dict(named_tensors(self.shared))
        return {name: gather(shared[name], subnet.index.get(name, {})) for name, _ in named_tensors(subnet.skeleton)}

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        subnet = self.subnets[self.active]
        subnet.skeleton.train(self.training)
        return functional_call(subnet.skeleton, self.tensors(subnet), args, kwargs)

    def extract(self, i: int) -> nn.Module:
        """Subnet `i` as a dense diffusers model whose weights are copies of its slices of the shared weights."""
        subnet = self.subnets[i]
        model = copy.deepcopy(subnet.skeleton).to_empty(device="cpu")
        tensors = self.tensors(subnet)
        with torch.no_grad():
            for name, tensor in named_tensors(model):
                tensor.copy_(tensors[name])
        return model.eval()


def extract_all(elastic: ElasticModel) -> dict[str, Result]:
    """Every size as its own dense model, each checked to compute what the elastic model computes for it."""
    elastic = elastic.cpu().eval()
    adapter = adapter_for(elastic.shared)
    inputs = adapter.example_inputs(2)
    original = {"macs": count_macs(elastic.shared).total, "params": count_params(elastic.shared)}
    products: dict[str, Result] = {}
    for i, subnet in enumerate(elastic.subnets):
        model = elastic.extract(i)
        elastic.active = i
        with torch.no_grad():
            expected = elastic(**inputs, return_dict=False)[0]
            got = model(**inputs, return_dict=False)[0]
        if not torch.allclose(expected, got, rtol=1e-4, atol=1e-5):
            raise SlimdiffError(f"internal: extracted '{subnet.name}' differs from the elastic model's subnet")
        macs, params = count_macs(model).total, count_params(model)
        achieved = {"macs": macs / original["macs"], "params": params / original["params"]}
        products[subnet.name] = Result(
            model=model,
            achieved=achieved,
            record={**subnet.record, "macs": macs, "params": params},
            summary=f"{subnet.name}: {achieved['macs']:.3f} of the MACs, {achieved['params']:.3f} of the params",
        )
    return products


def check_nested(subnets: list[Subnet], model: nn.Module) -> None:
    """Refuse subnets that are not nested: each keeps a subset of the next larger one's channels."""
    shared = dict(named_tensors(model))
    for small, large in zip(subnets, subnets[1:]):
        for name, dims in small.index.items():
            for dim in dims:
                if not small.kept(name, dim, shared[name].shape[dim]) <= large.kept(name, dim, shared[name].shape[dim]):
                    raise SlimdiffError(f"internal: '{small.name}' keeps channels of {name} that '{large.name}' drops")
