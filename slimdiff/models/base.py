"""The adapter contract every engine works through, whatever the diffusers model family."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch_pruning as tp
from diffusers.models.attention_processor import Attention
from torch import nn

from slimdiff.errors import SlimdiffError
from slimdiff.models.resize import fix_after_surgery

CondKind = Literal["none", "class", "text"]


@dataclass(frozen=True)
class Block:
    """A skippable block (DiP-GO / DeepCache granularity), in execution order.

    `inputs` names the blocks (or `conv_in`) whose outputs this block consumes: the previous block in the chain
    plus, for U-Net up blocks, the down blocks whose skip connections it concatenates.
    """

    name: str
    kind: Literal["down", "mid", "up", "transformer"]
    inputs: tuple[str, ...]


@dataclass(frozen=True)
class Layer:
    """A residual layer (LAPTOP-Diff granularity). `removable` layers can be replaced by `SkippedLayer`."""

    name: str
    kind: Literal["resnet", "attention", "transformer"]
    params: int
    removable: bool
    reason: str = ""


@dataclass(frozen=True)
class ChannelGroup:
    """Channels that must be pruned together (torch-pruning's dependency graph is the source of truth).

    `root` is the layer whose output channels define the group; `members` every layer the group couples
    (residual adds, skip concatenations, norms, attention projections). Groups that touch attention projections
    must be pruned consistently per head (`attention=True`).
    """

    root: str
    channels: int
    members: tuple[str, ...]
    attention: bool


class SkippedLayer(nn.Module):
    """Stands in for a removed residual layer: returns its input unchanged.

    `returns_tuple` mirrors layers called with `return_dict=False` (e.g. `Transformer2DModel`), whose callers
    index the result with `[0]`. `keep_channels` is set for a U-Net up-block resnet, whose input is the hidden state
    concatenated with a skip tensor: the stand-in returns the first `keep_channels` channels (the hidden state),
    so the skip connection is dropped with the layer (as BK-SDM removes an up-stage resnet with its skip).
    """

    def __init__(self, returns_tuple: bool = False, keep_channels: int | None = None) -> None:
        super().__init__()
        self.returns_tuple = returns_tuple
        self.keep_channels = keep_channels

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor | tuple[torch.Tensor]:
        if self.keep_channels is not None:  # a split (not a slice), which torch-pruning maps through the concat
            rest = hidden_states.shape[1] - self.keep_channels
            hidden_states = torch.split(hidden_states, [self.keep_channels, rest], dim=1)[0]
        return (hidden_states,) if self.returns_tuple else hidden_states


def get_submodule(model: nn.Module, name: str) -> nn.Module:
    """`model.get_submodule` with an error that names the missing path."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise SlimdiffError(f"the model has no module '{name}'") from None


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the module at dotted path `name` (works inside ModuleLists)."""
    parent_name, _, child = name.rpartition(".")
    parent = get_submodule(model, parent_name) if parent_name else model
    get_submodule(model, name)  # validate the path
    setattr(parent, child, module) if not isinstance(parent, nn.ModuleList) else parent.__setitem__(int(child), module)


def count_params(module: nn.Module) -> int:
    """Number of parameters (shared tensors counted once; works on the meta device)."""
    return sum(p.numel() for p in module.parameters())


def per_model(value: Any) -> Any:
    """A config value diffusers allows per block or per axis (a list) or once for the model: its first entry."""
    return value[0] if isinstance(value, (list, tuple)) else value


class Adapter(ABC):
    """Uniform view of one diffusers denoiser for the engines, the trainer and the metrics.

    `adapter(x_t, t, cond)` returns the noise prediction (epsilon or v, as the model was trained), with any learned
    variance channels dropped. The adapter never copies the model: it is a lens on `adapter.model`. Calls go
    through `forward_module`, which is the model itself or a wrapper of it (DDP, accelerate) whose forward takes the
    same arguments.
    """

    family: ClassVar[str]
    cond_kind: CondKind
    #: Probability with which the model itself replaces class labels by the null class in training mode.
    builtin_label_dropout: ClassVar[float] = 0.0
    #: The dimension of a block's output that holds its channels (U-Nets: (B, C, H, W); DiTs: (B, tokens, C)).
    block_channel_dim: ClassVar[int] = 1

    def __init__(self, model: nn.Module, forward_module: nn.Module | None = None) -> None:
        self.model = model
        self.forward_module = forward_module if forward_module is not None else model

    # -- calling ---------------------------------------------------------------------------------------------
    @abstractmethod
    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """Noise prediction for a batch."""

    @abstractmethod
    def example_inputs(self, batch_size: int = 1, device: torch.device | str | None = None) -> dict[str, Any]:
        """Keyword arguments for `model(**inputs)` at the model's native size (for tracing and counting)."""

    @property
    def in_channels(self) -> int:
        return self.model.config.in_channels

    @property
    def sample_size(self) -> int:
        return per_model(self.model.config.sample_size)

    @property
    def num_classes(self) -> int | None:
        """Number of class labels for class-conditional models (the null label for guidance excluded)."""
        return None

    @property
    def null_class(self) -> int | None:
        """The label index meaning 'no class' (classifier-free guidance), if the model has one."""
        return None

    def check_cond(self, cond: torch.Tensor | None, batch_size: int) -> None:
        """Refuse a condition that does not fit this model."""
        if self.cond_kind == "none":
            if cond is not None:
                raise SlimdiffError(f"this {self.family} model is unconditional; pass cond=None")
            return
        if cond is None:
            what = "class labels" if self.cond_kind == "class" else "prompt embeddings"
            raise SlimdiffError(f"this {self.family} model needs {what} as cond")
        if cond.shape[0] != batch_size:
            raise SlimdiffError(f"cond has batch {cond.shape[0]} but x_t has batch {batch_size}")

    # -- structure for the engines ---------------------------------------------------------------------------
    @abstractmethod
    def blocks(self) -> list[Block]:
        """Skippable blocks in execution order, with what feeds what."""

    @abstractmethod
    def layers(self) -> list[Layer]:
        """Residual layers, each marked removable or not (with the reason)."""

    @abstractmethod
    def layer_returns_tuple(self, name: str) -> bool:
        """Whether the layer's caller expects a tuple (so its stand-in must return one)."""

    def stand_in(self, name: str) -> SkippedLayer:
        """The identity that replaces layer `name` when it is removed."""
        return SkippedLayer(returns_tuple=self.layer_returns_tuple(name))

    def remove_layer(self, name: str) -> None:
        """Replace a removable layer by an identity so the model stays runnable (LAPTOP-Diff)."""
        layer = next((layer for layer in self.layers() if layer.name == name), None)
        if layer is None:
            valid = ", ".join(layer.name for layer in self.layers() if layer.removable)
            raise SlimdiffError(f"'{name}' is not a layer of this model; removable layers: {valid}")
        if not layer.removable:
            raise SlimdiffError(f"layer '{name}' cannot be removed: {layer.reason}")
        set_submodule(self.model, name, self.stand_in(name))

    def dependency_graph(self) -> tp.DependencyGraph:
        """torch-pruning's dependency graph of the model, traced on the example inputs."""
        device = next(self.model.parameters()).device
        return tp.DependencyGraph().build_dependency(self.model, example_inputs=self.example_inputs(1, device))

    def channel_groups(self, graph: tp.DependencyGraph | None = None) -> list[ChannelGroup]:
        """Every prunable channel group (the output layers excluded), in the graph's order."""
        graph = graph or self.dependency_graph()
        names = {module: name for name, module in self.model.named_modules()}
        projections = {names[proj] for proj in self.attention_heads()}
        groups = []
        roots = [nn.Conv2d, nn.Linear]
        for group in graph.get_all_groups(ignored_layers=self.pruning_ignored(), root_module_types=roots):
            members = tuple(dict.fromkeys(names[dep.target.module] for dep, _ in group if dep.target.module in names))
            root_dep, root_idxs = group[0]
            groups.append(
                ChannelGroup(
                    root=names[root_dep.target.module],
                    channels=len(root_idxs),
                    members=members,
                    attention=any(member in projections for member in members),
                )
            )
        return groups

    def pruning_ignored(self) -> list[nn.Module]:
        """Layers whose output channels channel pruning must keep (the output layer, and family specifics)."""
        return self.output_modules()

    def chunked_outputs(self) -> dict[nn.Module, int]:
        """Group-root layers whose output is split into equal chunks that each join the same channels.

        torch-pruning must rank such a root chunk by chunk (its `out_channel_groups`), or it would drop different
        channels from each chunk. Only roots matter: the chunks of other members follow the root's indices.
        """
        return {}

    def channel_buffers(self) -> dict[str, str]:
        """Buffers whose last dimension follows a layer's output channels: buffer name → layer name.

        Channel pruning slices them with the layer (torch-pruning only resizes parameters).
        """
        return {}

    @abstractmethod
    def output_modules(self) -> list[nn.Module]:
        """Modules whose output channels must never be pruned (they produce the prediction)."""

    def attention_heads(self) -> dict[nn.Module, int]:
        """Each attention projection (q, k, v) mapped to its head count, for head-aware channel pruning."""
        heads: dict[nn.Module, int] = {}
        for module in self.model.modules():
            if isinstance(module, Attention):
                for proj in (module.to_q, module.to_k, module.to_v):
                    if proj is not None:
                        heads[proj] = module.heads
        return heads

    def fix_after_surgery(self, heads: Mapping[nn.Module, int] | None = None) -> None:
        """Re-derive cached sizes (heads, scale, channels, norm groups) from the weights after channel surgery.

        `heads` maps `Attention` modules whose whole heads were pruned to their new head count.
        """
        fix_after_surgery(self.model, heads)
