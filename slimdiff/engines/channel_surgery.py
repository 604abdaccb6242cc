"""Channel surgery on torch-pruning's dependency graph, shared by the channel-pruning and OFA engines.

- `make_pruner`: torch-pruning's `MetaPruner` over a model as slimdiff prunes it (the adapter's ignored layers,
  attention heads, chunked roots; GroupNorms left to `NormPlan`).
- `ChannelScores`: the one importance both engines hand torch-pruning. It records a scorer's per-channel scores of
  every pruning group (summed over as many passes as are recorded) and replays their mean on any copy of the model,
  so every copy ranks its channels exactly as the model it was scored on — including weightless (meta-device)
  copies, which have no values to score. Groups are keyed by `group_key`.
- `NormPlan`: a GroupNorm loses whole groups (the lowest-scored units, as many channels as come closest to
  MetaPruner's count) and `num_groups` drops with them, so the kept groups' statistics do not change. A GroupNorm
  over a skip concatenation whose parts do not split into its groups cannot lose channels exactly; it is
  regrouped (the most groups of at least its group size) and named in `PrunedCopy.regrouped`.
- `prune_copy`: prune a copy (real or weightless) to a ratio, per-root ratios or a global ranking, and record the
  original indices every layer keeps (`PrunedCopy`); `verify_slices` checks every kept weight is its slice of the
  original.

The sizes diffusers caches on its composite modules are re-derived afterwards by `slimdiff.models.resize`.
"""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch_pruning as tp
from diffusers.models.attention_processor import Attention
from torch import nn

from slimdiff.data import ImageDataset
from slimdiff.errors import SlimdiffError
from slimdiff.metrics.cost import count_macs
from slimdiff.models import adapter_for
from slimdiff.models.base import count_params, get_submodule

#: The scorers torch-pruning ranks by (`scorer`); `diff-pruning` and `taylor` read the `.grad` the caller filled.
Importance = Literal["diff-pruning", "taylor", "magnitude", "random"]
#: Attention: keep the heads and shrink the head dimension, or drop whole heads.
AttentionPruning = Literal["head-dim", "heads"]
#: The largest ratio a pruner takes from any layer.
MAX_RATIO = 0.7
#: A pruning group's key: its root layer's name and whether the root's output ("out") or input ("in") is pruned.
GroupKey = tuple[str, str]


def calibration_batch(data: ImageDataset, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`size` images (and their labels) drawn without replacement from `data`, seeded."""
    generator = torch.Generator().manual_seed(seed)
    indices = torch.randperm(len(data), generator=generator)[: min(size, len(data))]
    images, labels = zip(*(data[int(i)] for i in indices), strict=True)
    return torch.stack(images), torch.tensor(labels)


def scorer(name: Importance) -> tp.importance.Importance:
    """torch-pruning's importance for a channel-pruning importance name."""
    if name in ("diff-pruning", "taylor"):
        return tp.importance.GroupTaylorImportance()
    if name == "magnitude":
        return tp.importance.GroupMagnitudeImportance(p=1)
    return tp.importance.RandomImportance()


def group_key(group: tp.Group, names: dict[nn.Module, str], graph: tp.DependencyGraph) -> GroupKey:
    """The key of a pruning group that holds on any copy of the model: its root layer's name and side."""
    root = group[0].dep
    return names[root.target.module], "out" if graph.is_out_channel_pruning_fn(root.handler) else "in"


class ChannelScores(tp.importance.Importance):
    """Every pruning group's per-channel scores: recorded from `source` (`record`), replayed everywhere else.

    torch-pruning scores all groups before it prunes any (`MetaPruner._prune`, step 1), and with per-group ratios
    the number of channels a group loses depends only on its width and ratio, never on the scores. So scores
    recorded on the unpruned model, replayed on a copy, prune exactly what scoring the copy itself would.
    """

    def __init__(self, source: tp.importance.Importance | None = None) -> None:
        self.source = source
        self.totals: dict[GroupKey, torch.Tensor | None] = {}  # summed over the recorded passes (None: unscored)
        self.groups: dict[GroupKey, tp.Group] = {}  # each group as first recorded, at full width
        self.passes = 0
        self.recording = False
        self.names: dict[nn.Module, str] = {}
        self.graph: tp.DependencyGraph | None = None

    def attach(self, pruner: tp.pruner.MetaPruner) -> None:
        """Key the groups of `pruner`'s model (called by `make_pruner`)."""
        self.names = {module: name for name, module in pruner.model.named_modules()}
        self.graph = pruner.DG

    def record(self, pruner: tp.pruner.MetaPruner) -> None:
        """One recording pass: `source` scores every group of `pruner`'s model (its `.grad` as the caller left
        it); nothing is pruned."""
        if self.source is None:
            raise SlimdiffError("internal: these channel scores have no scorer to record")
        self.recording = True
        try:
            pruner.reset()
            for _ in pruner.step(interactive=True):  # every group answered None: nothing to prune
                raise SlimdiffError("internal: recording channel scores must not prune")
        finally:
            self.recording = False
        self.passes += 1

    @property
    def means(self) -> dict[GroupKey, torch.Tensor]:
        """The mean recorded score of every scored group's channels."""
        return {key: total / self.passes for key, total in self.totals.items() if total is not None}

    def __call__(self, group: tp.Group) -> torch.Tensor | None:
        key = group_key(group, self.names, self.graph)
        if self.recording:
            score = self.source(group)
            total = self.totals.get(key, 0.0)
            self.totals[key] = None if score is None or total is None else total + score.detach().double().cpu()
            self.groups.setdefault(key, group)
            return None
        if key not in self.totals:
            raise SlimdiffError(f"internal: no recorded channel scores for the group rooted at '{key[0]}' ({key[1]})")
        total = self.totals[key]
        return None if total is None else (total / self.passes).float()


def make_pruner(
    model: nn.Module,
    importance: tp.importance.Importance,
    ratio: float,
    *,
    attention: AttentionPruning = "head-dim",
    ratios: dict[str, float] | None = None,
    global_ranking: bool = False,
) -> tp.pruner.MetaPruner:
    """torch-pruning's `MetaPruner` over `model` as slimdiff prunes: the adapter's ignored layers, attention heads
    and chunked roots; `ratios` maps layer names to another ratio than `ratio` for the group they root.
    `global_ranking`: `ratio` of all channels go, ranked across groups by their (group-normalised) scores."""
    adapter = adapter_for(model)
    modules = dict(model.named_modules())
    pruner = tp.pruner.MetaPruner(
        model,
        adapter.example_inputs(1, next(model.parameters()).device),
        importance=importance,
        pruning_ratio=ratio,
        pruning_ratio_dict={modules[name]: r for name, r in (ratios or {}).items()},
        global_pruning=global_ranking,
        max_pruning_ratio=MAX_RATIO,
        ignored_layers=adapter.pruning_ignored(),
        num_heads=adapter.attention_heads(),
        prune_head_dims=attention == "head-dim",
        prune_num_heads=attention == "heads",
        head_pruning_ratio=ratio if attention == "heads" else 0.0,
        out_channel_groups=dict(adapter.chunked_outputs()),  # a copy: MetaPruner adds the heads to it
    )
    for norm in model.modules():  # MetaPruner would shrink every group; slimdiff drops whole ones (NormPlan)
        if isinstance(norm, nn.GroupNorm):
            pruner.in_channel_groups.pop(norm, None)
            pruner.out_channel_groups.pop(norm, None)
    if isinstance(importance, ChannelScores):
        importance.attach(pruner)
    return pruner


def channel_scores(
    model: nn.Module, importance: Importance, *, attention: AttentionPruning = "head-dim", seed: int = 0
) -> ChannelScores:
    """Score every pruning group of `model` once by `importance` (its `.grad` holds Taylor gradients when needed);
    `model` is left unchanged."""
    scores = ChannelScores(scorer(importance))
    with torch.random.fork_rng():
        torch.manual_seed(seed)  # RandomImportance draws from the global RNG
        scores.record(make_pruner(model, scores, 0.5, attention=attention))
    return scores


class NormPlan:
    """How each GroupNorm of a model about to be pruned loses channels: in whole groups where every group is fed by
    one pruning group (`exact`), or regrouped afterwards where a group straddles two (a skip concatenation whose
    parts do not split into its groups). Read off the unpruned model's full-width groups, and `ranking`'s scores
    of those that have units taken before any pruning (as MetaPruner takes its own: a group's layers change as
    others are pruned)."""

    def __init__(self, pruner: tp.pruner.MetaPruner, ranking: tp.importance.Importance | None = None) -> None:
        self.graph = graph = pruner.DG
        norms = [m for m in graph.model.modules() if isinstance(m, nn.GroupNorm)]
        self.size = {norm: norm.num_channels // norm.num_groups for norm in norms}
        groups = list(
            graph.get_all_groups(ignored_layers=pruner.ignored_layers, root_module_types=pruner.root_module_types)
        )
        feeders: dict[tuple[nn.GroupNorm, int], Counter[int]] = {}
        for k, group in enumerate(groups):
            for dep, idxs in group:
                if isinstance(dep.target.module, nn.GroupNorm):
                    norm = dep.target.module
                    for i in idxs:
                        feeders.setdefault((norm, i // self.size[norm]), Counter())[k] += 1
        straddling = {norm for (norm, _), fed in feeders.items() if len(fed) > 1 or sum(fed.values()) < self.size[norm]}
        self.exact = [norm for norm in norms if norm not in straddling]
        self.units = {self._root(group): self.split(group) for group in groups}
        self.scores: dict[tuple[nn.Module, bool], torch.Tensor] = {}
        for group in groups if ranking is not None else []:
            root = self._root(group)
            score = ranking(group) if len(self.units[root]) < len(group[0].idxs) else None
            if score is not None:
                self.scores[root] = score

    def _root(self, group: tp.Group) -> tuple[nn.Module, bool]:
        dep = group[0].dep
        return dep.target.module, self.graph.is_out_channel_pruning_fn(dep.handler)

    def split(self, full: tp.Group) -> list[list[int]]:
        """A full-width group's root channels split into the units that must go together: channels an exact
        GroupNorm normalises as one group (reached through any residual or concatenation) are one unit."""
        width = len(full[0].idxs)
        parent = list(range(width))

        def find(i: int) -> int:
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i

        for dep, idxs in full:
            norm = dep.target.module
            if norm in self.exact:
                if len(idxs) % width:  # each path from the root to the norm maps all `width` channels, in order
                    raise SlimdiffError(f"internal: GroupNorm channels of '{dep.target.name}' do not map one to one")
                first: dict[int, int] = {}
                for position, channel in enumerate(idxs):
                    i = position % width
                    parent[find(i)] = find(first.setdefault(channel // self.size[norm], i))
        units: dict[int, list[int]] = {}
        for i in range(width):
            units.setdefault(find(i), []).append(i)
        return list(units.values())

    def whole(self, group: tp.Group) -> tp.Group:
        """`group` with its pruned channels replaced by whole units: the lowest-scored units whose total comes
        closest to the count MetaPruner chose (never every unit)."""
        root = self._root(group)
        if root not in self.scores:  # no GroupNorm units (or an attention group MetaPruner re-rooted)
            return group
        units, scores = self.units[root], self.scores[root]
        wanted = len(group[0].idxs)
        chosen: list[int] = []
        for unit in sorted(units, key=lambda unit: float(scores[unit].mean()))[:-1]:
            if abs(len(chosen) + len(unit) - wanted) >= abs(len(chosen) - wanted):
                break
            chosen += unit
        return self.graph.get_pruning_group(root[0], group[0].dep.handler, sorted(chosen))

    def regroup(self, names: dict[nn.Module, str]) -> list[str]:
        """Set every pruned GroupNorm's `num_groups` to the groups it kept; the regrouped ones' names."""
        regrouped = []
        for norm, size in self.size.items():
            channels = norm.num_channels
            if norm in self.exact:
                norm.num_groups = channels // size
            elif channels != norm.num_groups * size:
                norm.num_groups = max(d for d in range(1, channels // size + 1) if channels % d == 0)
                regrouped.append(names[norm])
        return regrouped


@dataclass
class PrunedCopy:
    """A pruned copy of a model, the original indices each of its layers keeps, and what it costs."""

    model: nn.Module
    kept: dict[tuple[str, str], list[int]]  # (module name, "out"|"in") → original indices still present
    macs: int
    params: int
    regrouped: list[str] = field(default_factory=list)  # GroupNorms that could not lose whole groups


def weightless_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` whose parameters and buffers are meta tensors of the same shapes (nothing is copied)."""
    memo: dict[int, object] = {
        id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
        for p in model.parameters()
    }
    memo.update({id(b): torch.empty_like(b, device="meta") for b in model.buffers()})
    return copy.deepcopy(model, memo)


def attention_modules(model: nn.Module) -> list[Attention]:
    """Every diffusers `Attention` of `model`."""
    return [m for m in model.modules() if isinstance(m, Attention)]


def prune_copy(
    model: nn.Module,
    ratio: float,
    importance: Importance | ChannelScores,
    *,
    attention: AttentionPruning = "head-dim",
    boosted: dict[str, float] | None = None,
    global_ranking: bool = False,
    seed: int = 0,
    weightless: bool = False,
) -> PrunedCopy:
    """Prune a copy of `model` at a uniform `ratio`, by `importance` (a name: scored on `model`, whose `.grad` holds
    Taylor gradients when needed) or by `ChannelScores` recorded earlier.

    `boosted` maps group-root layer names to a different ratio (a budget search, or OFA's per-group widths);
    `global_ranking` ranks channels across groups instead (see `make_pruner`). `weightless=True` prunes a
    meta-device copy: the same architecture, kept indices, MACs and params, without copying a single weight.
    """
    if not isinstance(importance, ChannelScores):
        importance = channel_scores(model, importance, seed=seed, attention=attention)
    clone = weightless_copy(model) if weightless else copy.deepcopy(model)  # scores recorded: no .grad needed
    adapter = adapter_for(clone)
    names = {module: name for name, module in clone.named_modules()}
    kept: dict[tuple[str, str], list[int]] = {}
    pruner = make_pruner(clone, importance, ratio, attention=attention, ratios=boosted, global_ranking=global_ranking)
    norms = NormPlan(pruner, importance)
    for group in pruner.step(interactive=True):
        group = norms.whole(group)
        for dep, idxs in group:
            layer = dep.target.module
            if isinstance(layer, (nn.Conv2d, nn.Linear, nn.GroupNorm)) and layer in names:
                out = pruner.DG.is_out_channel_pruning_fn(dep.handler)
                width = layer.num_channels if isinstance(layer, nn.GroupNorm) else layer.weight.shape[0 if out else 1]
                alive = kept.setdefault((names[layer], "out" if out else "in"), list(range(width)))
                gone = {alive[i] for i in idxs}  # indices are relative to the layer's current width
                alive[:] = [i for i in alive if i not in gone]
        group.prune()
    regrouped = norms.regroup(names)
    for buffer_name, layer_name in adapter.channel_buffers().items():
        owner_name, _, attr = buffer_name.rpartition(".")
        owner = get_submodule(clone, owner_name)
        keep = kept.get((layer_name, "out"))
        if keep is not None:
            setattr(owner, attr, getattr(owner, attr)[..., keep].clone())
    new_heads = {
        attn: pruner.num_heads[attn.to_q] for attn in attention_modules(clone) if attn.to_q in pruner.num_heads
    }
    adapter.fix_after_surgery(new_heads if attention == "heads" else None)
    return PrunedCopy(clone, kept, count_macs(clone).total, count_params(clone), regrouped)


def _verify_norm(name: str, source: nn.GroupNorm, norm: nn.GroupNorm, keep: list[int], regrouped: bool) -> None:
    """A pruned GroupNorm keeps whole groups of the original (or is one of the regrouped ones) and their affine
    parameters: then its output on the kept channels is the original's there."""
    size = source.num_channels // source.num_groups
    whole = len(keep) % size == 0 and all(
        keep[i] % size == 0 and keep[i + size - 1] == keep[i] + size - 1 for i in range(0, len(keep), size)
    )
    if not regrouped and (not whole or norm.num_groups * size != len(keep) or norm.num_channels != len(keep)):
        raise SlimdiffError(f"channel surgery went wrong: GroupNorm '{name}' did not keep whole groups")
    for attr in ("weight", "bias") if source.affine else ():
        if not torch.equal(getattr(source, attr).detach()[keep], getattr(norm, attr).detach()):
            raise SlimdiffError(f"channel surgery went wrong: '{name}.{attr}' is not a slice of the original")


def verify_slices(original: nn.Module, pruned: PrunedCopy) -> None:
    """Every Conv/Linear weight (and channel buffer) of the pruned model must equal the original's at the kept
    indices, and every GroupNorm keep whole groups of the original's (except the regrouped ones)."""
    reference = dict(original.named_modules())
    for name, layer in pruned.model.named_modules():
        if isinstance(layer, nn.GroupNorm) and (name, "out") in pruned.kept:
            _verify_norm(name, reference[name], layer, pruned.kept[(name, "out")], name in pruned.regrouped)
        if not isinstance(layer, (nn.Conv2d, nn.Linear)):
            continue
        source = reference[name]
        keep = [
            pruned.kept.get((name, side), list(range(source.weight.shape[dim])))
            for dim, side in enumerate(("out", "in"))
        ]
        expected = source.weight.detach()[keep[0]][:, keep[1]]
        if expected.shape != layer.weight.shape or not torch.equal(expected, layer.weight.detach()):
            raise SlimdiffError(f"channel surgery went wrong: '{name}' is not a slice of the original weight")
        if layer.bias is not None and not torch.equal(source.bias.detach()[keep[0]], layer.bias.detach()):
            raise SlimdiffError(f"channel surgery went wrong: '{name}.bias' is not a slice of the original")
    original_buffers = dict(original.named_buffers())
    pruned_buffers = dict(pruned.model.named_buffers())
    for buffer_name, layer_name in adapter_for(original).channel_buffers().items():
        source = original_buffers[buffer_name]
        expected = source[..., pruned.kept.get((layer_name, "out"), list(range(source.shape[-1])))]
        if not torch.equal(expected, pruned_buffers[buffer_name]):
            raise SlimdiffError(f"channel surgery went wrong: buffer '{buffer_name}' does not follow '{layer_name}'")
