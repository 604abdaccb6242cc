"""Diff-Pruning: structural channel pruning scored by a timestep-aware Taylor expansion, to a MACs/params budget.

Fang, Ma, Wang, *Structural Pruning for Diffusion Models* (NeurIPS 2023); summary in docs/methods.md.

1. Importance. `diff-pruning` accumulates ∂L_t/∂w over a sweep t = 0, s, 2s, … on one calibration batch with one
   fixed noise tensor, stopping once L_t < thr · max L (the pure-noise steps carry little information); the
   channel score is Σ|w·g| over every layer the dependency graph couples to the channel. Baselines: `taylor` (the
   same score from one pass of the ordinary training loss, random timesteps), `magnitude` (L1 norm of the weights),
   `random`.
2. Pruning. torch-pruning's `MetaPruner` removes the lowest-scored channels of every group; attention keeps its
   head count and shrinks the head dimension (or drops whole heads); the output layer is never pruned. A GroupNorm
   loses whole groups: channels a GroupNorm normalises together are pruned together (the lowest-scored such units,
   as many as come closest to MetaPruner's count) and `num_groups` drops to the groups kept, so the kept groups'
   statistics — and the norm's output on the kept channels — do not change. A GroupNorm over a skip concatenation
   whose parts do not split into its groups (48 + 32 channels in groups of 5) cannot lose channels exactly under
   any choice; it is regrouped (the most groups of at least its group size) and named in `regrouped_norms`.
   Cached sizes (heads, scale, sampler channels) are re-derived afterwards, and buffers
   that follow a layer's channels (a DiT's position table) are sliced with it.
3. Budget. A uniform per-layer ratio lands on a coarse grid of MACs, so the ratio is searched: first the uniform
   ratio that brackets the target, then how many groups (in the dependency graph's order) take the larger of
   the two ratios. The scores are taken once on the real model (`channel_scores`); every trial prunes a
   weightless (meta-device) copy with them and counts its MACs, and the real model is pruned once, at the
   chosen ratios. The achieved MACs and params are reported, not assumed. A latency budget searches the MACs
   fraction on measurements (`engines/budgets.py`): each trial meets a MACs target as above, prunes the real model
   and times one denoiser call at the budget's batch.
4. Check. Every kept weight must equal its slice of the original (`verify_slices`); a ratio of 0 is the identity.
"""

from __future__ import annotations

import copy
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
import torch_pruning as tp
from diffusers.models.attention_processor import Attention
from torch import nn

from slimdiff.data import ImageDataset
from slimdiff.engines import budgets
from slimdiff.engines.base import Calibration, Engine, Log, Result, no_log, register
from slimdiff.engines.budgets import Budget
from slimdiff.errors import SlimdiffError
from slimdiff.metrics.cost import count_macs, count_params, macs_by_module
from slimdiff.models import Adapter, adapter_for
from slimdiff.models.base import get_submodule
from slimdiff.training.diffusion import make_scheduler, training_target
from slimdiff.training.distill import first_tensor

Importance = Literal["diff-pruning", "taylor", "magnitude", "random"]
IMPORTANCES: tuple[str, ...] = ("diff-pruning", "taylor", "magnitude", "random")
#: The largest uniform ratio searched.
MAX_RATIO = 0.7
#: How the search log names each budget unit.
UNIT_NAMES = {"macs": "MACs", "params": "params"}


@dataclass
class ChannelPruningConfig(Budget):
    """What to prune to: exactly one of `target_macs` / `target_params` (a fraction of the original) or
    `target_latency_ms` (one denoiser call at `latency_batch`, measured)."""

    importance: Importance = field(
        default="diff-pruning", metadata={"help": "diff-pruning, taylor, magnitude or random."}
    )
    thr: float = field(default=0.05, metadata={"help": "Diff-Pruning early stop: drop t once L_t < thr·max L."})
    timestep_stride: int = field(
        default=10, metadata={"help": "Timestep stride of the importance sweep.", "flag": "--stride"}
    )
    calibration_size: int = field(default=32, metadata={"help": "Calibration images.", "flag": "--calibration"})
    attention: Literal["head-dim", "heads"] = field(
        default="head-dim", metadata={"help": "head-dim (keep heads) or heads."}
    )
    widths: Literal["uniform", "global"] = field(
        default="uniform",
        metadata={
            "help": "uniform: every layer loses the same fraction (the paper); global: channels ranked across all "
            "layers at once (torch-pruning's global ranking), so widths differ per layer."
        },
    )
    seed: int = field(default=0, metadata={"help": "Random seed (calibration batch, noise, random importance)."})

    def validate(self) -> None:
        if self.importance not in IMPORTANCES:
            raise SlimdiffError(f"unknown importance '{self.importance}'; valid: {', '.join(IMPORTANCES)}")
        super().validate()
        if not 0 <= self.thr < 1:
            raise SlimdiffError(f"thr {self.thr} must be in [0, 1)")
        if self.timestep_stride < 1 or self.calibration_size < 1:
            raise SlimdiffError("timestep_stride and calibration_size must be ≥ 1")
        if self.attention not in ("head-dim", "heads"):
            raise SlimdiffError(f"attention must be head-dim or heads, got '{self.attention}'")
        if self.widths not in ("uniform", "global"):
            raise SlimdiffError(f"widths must be uniform or global, got '{self.widths}'")


@dataclass(kw_only=True)
class ChannelPruningResult(Result):
    """The pruned model, what was achieved (fractions of the original), and how the budget was met."""

    ratio: float
    original: dict[str, int]
    pruned: dict[str, int]
    scored_timesteps: list[int] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------------------------
# importance
# ----------------------------------------------------------------------------------------------------------------
def calibration_batch(data: ImageDataset, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`size` images (and their labels) drawn without replacement from `data`, seeded."""
    generator = torch.Generator().manual_seed(seed)
    indices = torch.randperm(len(data), generator=generator)[: min(size, len(data))]
    images, labels = zip(*(data[int(i)] for i in indices), strict=True)
    return torch.stack(images), torch.tensor(labels)


def accumulate_gradients(adapter: Adapter, data: Calibration, config: ChannelPruningConfig) -> list[int]:
    """Fill `.grad` of every parameter for Taylor importance; returns the timesteps that contributed."""
    model = adapter.model
    scheduler = make_scheduler("ddpm", data.schedule)
    device = next(model.parameters()).device
    x0, labels = calibration_batch(data.dataset, config.calibration_size, config.seed)
    x0, cond = x0.to(device), data.cond_for(labels)
    generator = torch.Generator().manual_seed(config.seed + 1)
    noise = torch.randn(x0.shape, generator=generator).to(device)
    model.zero_grad(set_to_none=True)
    model.eval()
    used: list[int] = []
    if config.importance == "taylor":
        t = torch.randint(0, scheduler.config.num_train_timesteps, (x0.shape[0],), generator=generator).to(device)
        loss = F.mse_loss(adapter(scheduler.add_noise(x0, noise, t), t, cond), training_target(scheduler, x0, noise, t))
        loss.backward()
        return sorted(set(t.tolist()))
    peak = 0.0
    for step in range(0, scheduler.config.num_train_timesteps, config.timestep_stride):
        t = torch.full((x0.shape[0],), step, dtype=torch.long, device=device)
        target = training_target(scheduler, x0, noise, t)
        loss = F.mse_loss(adapter(scheduler.add_noise(x0, noise, t), t, cond), target)
        peak = max(peak, loss.item())
        if used and loss.item() < config.thr * peak:
            break
        loss.backward()  # gradients accumulate over timesteps: Σ_t ∂L_t/∂w
        used.append(step)
    return used


def _importance(name: str) -> tp.importance.Importance:
    if name in ("diff-pruning", "taylor"):
        return tp.importance.GroupTaylorImportance()
    if name == "magnitude":
        return tp.importance.GroupMagnitudeImportance(p=1)
    return tp.importance.RandomImportance()


# ----------------------------------------------------------------------------------------------------------------
# scores: computed once on the real model, replayed on every copy
# ----------------------------------------------------------------------------------------------------------------
#: A pruning group's key: its root layer's name and whether the root's output ("out") or input ("in") is pruned.
GroupKey = tuple[str, str]


@dataclass
class ChannelScores:
    """Every pruning group's per-channel importance, computed once on the unpruned model.

    torch-pruning scores all groups before it prunes any (`MetaPruner._prune`, step 1), and with per-group ratios
    the number of channels a group loses depends only on its width and ratio, never on the scores. So the scores
    taken here, replayed on a copy, prune exactly what scoring the copy itself would — and the budget search can
    count MACs on weightless (meta-device) copies, which have no values to score.
    """

    scores: dict[GroupKey, torch.Tensor | None]


def _group_key(group: tp.Group, names: dict[nn.Module, str], graph: tp.DependencyGraph) -> GroupKey:
    root = group[0].dep
    return names[root.target.module], "out" if graph.is_out_channel_pruning_fn(root.handler) else "in"


class _Replay(tp.importance.Importance):
    """Answers torch-pruning's importance queries from recorded scores, or records `source`'s scores."""

    def __init__(
        self,
        scores: ChannelScores,
        names: dict[nn.Module, str],
        *,
        source: tp.importance.Importance | None = None,
    ) -> None:
        self.scores, self.names, self.source = scores, names, source
        self.graph: tp.DependencyGraph | None = None

    def __call__(self, group: tp.Group) -> torch.Tensor | None:
        key = _group_key(group, self.names, self.graph)
        if self.source is not None:  # recording: score, remember, and prune nothing
            score = self.source(group)
            self.scores.scores[key] = None if score is None else score.detach().cpu().clone()
            return None
        if key not in self.scores.scores:
            raise SlimdiffError(f"internal: no recorded channel scores for the group rooted at '{key[0]}' ({key[1]})")
        return self.scores.scores[key]


def make_pruner(
    model: nn.Module,
    importance: tp.importance.Importance,
    ratio: float,
    *,
    attention: Literal["head-dim", "heads"] = "head-dim",
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
    for norm in model.modules():  # MetaPruner would shrink every group; slimdiff drops whole ones (_NormPlan)
        if isinstance(norm, nn.GroupNorm):
            pruner.in_channel_groups.pop(norm, None)
            pruner.out_channel_groups.pop(norm, None)
    if isinstance(importance, _Replay):
        importance.graph = pruner.DG
    return pruner


def channel_scores(
    model: nn.Module, importance: Importance, *, attention: Literal["head-dim", "heads"] = "head-dim", seed: int = 0
) -> ChannelScores:
    """Score every pruning group of `model` once (its `.grad` holds Taylor gradients when needed); `model` is left
    unchanged."""
    scores = ChannelScores({})
    names = {module: name for name, module in model.named_modules()}
    recorder = _Replay(scores, names, source=_importance(importance))
    with torch.random.fork_rng():
        torch.manual_seed(seed)  # RandomImportance draws from the global RNG
        for _ in make_pruner(model, recorder, 0.5, attention=attention).step(interactive=True):
            raise SlimdiffError("internal: recording channel scores must not prune")  # every score answered None
    return scores


# ----------------------------------------------------------------------------------------------------------------
# pruning one copy
# ----------------------------------------------------------------------------------------------------------------
class _NormPlan:
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
class _Pruned:
    model: nn.Module
    kept: dict[tuple[str, str], list[int]]  # (module name, "out"|"in") → original indices still present
    macs: int
    params: int
    regrouped: list[str] = field(default_factory=list)  # GroupNorms that could not lose whole groups


def _copy_with_grads(model: nn.Module) -> nn.Module:
    clone = copy.deepcopy(model)
    for original, copied in zip(model.parameters(), clone.parameters(), strict=True):
        copied.grad = None if original.grad is None else original.grad.clone()
    return clone


def _weightless_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` whose parameters and buffers are meta tensors of the same shapes (nothing is copied)."""
    memo: dict[int, object] = {
        id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
        for p in model.parameters()
    }
    memo.update({id(b): torch.empty_like(b, device="meta") for b in model.buffers()})
    return copy.deepcopy(model, memo)


def prune_copy(
    model: nn.Module,
    ratio: float,
    importance: Importance | ChannelScores | tp.importance.Importance,
    *,
    attention: Literal["head-dim", "heads"] = "head-dim",
    boosted: dict[str, float] | None = None,
    global_ranking: bool = False,
    seed: int = 0,
    weightless: bool = False,
) -> _Pruned:
    """Prune a copy of `model` at a uniform `ratio`, by `importance` (a name: scored on `model`, whose `.grad` holds
    Taylor gradients when needed) or by scores `channel_scores` took earlier.

    `boosted` maps group-root layer names to a different ratio (used by the budget search); `global_ranking` ranks
    channels across groups instead (see `make_pruner`). `weightless=True` prunes
    a meta-device copy: the same architecture, kept indices, MACs and params, without copying a single weight.
    """
    clone = _weightless_copy(model) if weightless else _copy_with_grads(model)
    adapter = adapter_for(clone)
    names = {module: name for name, module in clone.named_modules()}
    kept: dict[tuple[str, str], list[int]] = {}
    if isinstance(importance, tp.importance.Importance):
        ranking = importance  # the caller's own fixed ranking (OFA's averaged Taylor scores)
    elif isinstance(importance, ChannelScores):
        ranking = _Replay(importance, names)
    else:
        ranking = _Replay(channel_scores(model, importance, seed=seed, attention=attention), names)
    pruner = make_pruner(clone, ranking, ratio, attention=attention, ratios=boosted, global_ranking=global_ranking)
    norms = _NormPlan(pruner, ranking)
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
        attn: pruner.num_heads[attn.to_q] for attn in _attention_modules(clone) if attn.to_q in pruner.num_heads
    }
    adapter.fix_after_surgery(new_heads if attention == "heads" else None)
    return _Pruned(clone, kept, count_macs(clone).total, count_params(clone), regrouped)


def _block_producers(model: nn.Module) -> dict[str, tuple[str, int]]:
    """Each block's output width and the last Conv/Linear inside it that writes that many channels.

    A block's output is that layer's output, or a residual sum with it: torch-pruning couples both, so the
    layer's kept output channels are the block output's. Probed on a weightless copy (shapes only).
    """
    probe = _weightless_copy(model)
    adapter = adapter_for(probe)
    order: list[tuple[str, int]] = []  # (layer, output channels) in execution order
    widths: dict[str, int] = {}

    def ran(name: str):
        def hook(module: nn.Module, inputs: object, output: object) -> None:
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                order.append((name, module.weight.shape[0]))
            else:
                widths[name] = first_tensor(output).shape[adapter.block_channel_dim]

        return hook

    layers = [n for n, m in probe.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    handles = [get_submodule(probe, n).register_forward_hook(ran(n)) for n in layers]
    handles += [get_submodule(probe, b.name).register_forward_hook(ran(b.name)) for b in adapter.blocks()]
    with torch.no_grad():
        probe(**adapter.example_inputs(1, "meta"))
    for handle in handles:
        handle.remove()
    producers = {}
    for block, width in widths.items():
        inside = [name for name, out in order if name.startswith(block + ".") and out == width]
        if inside:
            producers[block] = (inside[-1], width)
    return producers


def block_channels(original: nn.Module, pruned: _Pruned) -> dict[str, dict[str, Any]]:
    """For every block whose output lost channels: the original channel indices it keeps, and the original width.

    Recorded with the pruned model so that feature distillation can slice the teacher's block outputs to the
    student's channels. A block whose pruned width does not match the indices found is left out (never guessed).
    """
    after = _block_producers(pruned.model)
    record = {}
    for block, (layer, width) in _block_producers(original).items():
        keep = pruned.kept.get((layer, "out"))
        if keep is not None and len(keep) < width and after.get(block, (None, -1))[1] == len(keep):
            record[block] = {"kept": keep, "of": width}
    return record


def _attention_modules(model: nn.Module) -> list[Attention]:
    return [m for m in model.modules() if isinstance(m, Attention)]


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


def verify_slices(original: nn.Module, pruned: _Pruned) -> None:
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


# ----------------------------------------------------------------------------------------------------------------
# budget search
# ----------------------------------------------------------------------------------------------------------------
def limiting_layers(original: nn.Module, smallest: _Pruned, count: int = 5) -> str:
    """The Conv/Linear layers of the most-pruned copy that kept more outputs than `MAX_RATIO` leaves (the output
    layer, groups held whole by their GroupNorm units), the `count` that cost the most MACs, named with what they
    kept."""
    source = dict(original.named_modules())
    kept = {
        name: (layer.weight.shape[0], source[name].weight.shape[0])
        for name, layer in smallest.model.named_modules()
        if isinstance(layer, (nn.Conv2d, nn.Linear))
        and layer.weight.shape[0] > source[name].weight.shape[0] * (1 - MAX_RATIO)
    }
    macs = macs_by_module(smallest.model, list(kept))
    heaviest = sorted(kept, key=lambda name: -macs[name])[:count]
    return (
        ", ".join(
            f"{name} ({kept[name][0]}/{kept[name][1]} outputs, {macs[name] / smallest.macs:.0%} of the MACs)"
            for name in heaviest
        )
        or "none (attention and norms only)"
    )


_Choice = tuple[_Pruned, float, dict[str, float] | None]  # a pruned copy, its uniform ratio and its boosted groups


def _search(
    model: nn.Module, scores: ChannelScores, config: ChannelPruningConfig, original: dict[str, int], log: Log
) -> _Choice:
    """The ratios that meet a MACs or params budget, searched on weightless copies (the chosen one among them)."""
    unit, ranked = config.unit, config.widths == "global"

    def fraction(p: _Pruned) -> float:
        return (p.macs if unit == "macs" else p.params) / original[unit]

    def run(ratio: float, boosted: dict[str, float] | None = None) -> _Pruned:
        """One search trial: the pruned architecture's cost, on a weightless copy."""
        return prune_copy(
            model, ratio, scores, attention=config.attention, boosted=boosted, global_ranking=ranked, weightless=True
        )

    # 1. the ratio (uniform, or of all channels ranked globally): bisect for the largest ratio that keeps at least
    #    the target. Above MAX_RATIO small GroupNorm groups would lose every channel, which torch-pruning answers by
    #    not pruning them at all.
    lo, hi = 0.0, MAX_RATIO
    ratio_name = "global pruning ratio (of all channels ranked together)" if ranked else "uniform pruning ratio"
    best_lo, best_hi = None, run(hi)
    if fraction(best_hi) > config.target:
        raise SlimdiffError(
            f"cannot reach {config.target:.2f} of the original {unit}: the smallest reachable is "
            f"{fraction(best_hi):.3f} (every prunable group at ratio {MAX_RATIO}); the layers that keep most: "
            f"{limiting_layers(model, best_hi)}"
        )
    for _ in range(16 if ranked else 10):  # a global ranking moves one channel at a time: finer steps pay off
        mid = (lo + hi) / 2
        candidate = run(mid)
        log(f"{ratio_name} {mid:.3f} tried → {fraction(candidate):.3f} of the original {UNIT_NAMES[unit]} kept")
        if fraction(candidate) >= config.target:
            lo, best_lo = mid, candidate
        else:
            hi, best_hi = mid, candidate
        if abs(fraction(candidate) - config.target) <= config.tolerance * config.target:
            break
    chosen, ratio, boost = min(
        [(p, r, None) for p, r in ((best_lo, lo), (best_hi, hi)) if p is not None],
        key=lambda prb: abs(fraction(prb[0]) - config.target),
    )
    # 2. too coarse (whole GroupNorm units move many channels at once): move groups one by one from the lower to
    #    the higher ratio (each moved group ranked on its own at it) until the budget is met
    if abs(fraction(chosen) - config.target) > config.tolerance * config.target:
        roots = [g.root for g in adapter_for(model).channel_groups()]
        left, right = 0, len(roots)
        while right - left > 1:
            k = (left + right) // 2
            candidate = run(lo, {root: hi for root in roots[:k]})
            log(f"{k} groups at ratio {hi:.3f} → {fraction(candidate):.3f}")
            if fraction(candidate) >= config.target:
                left = k
            else:
                right = k
            if abs(fraction(candidate) - config.target) < abs(fraction(chosen) - config.target):
                chosen, ratio, boost = candidate, lo, {root: hi for root in roots[:k]}
    return chosen, ratio, boost


def _prune_to(
    model: nn.Module, scores: ChannelScores, config: ChannelPruningConfig, original: dict[str, int], log: Log
) -> _Choice:
    """Search the ratios for a MACs or params budget, then prune the real model once, at what the search chose."""
    searched, ratio, boost = _search(model, scores, config, original, log)
    ranked = config.widths == "global"
    chosen = prune_copy(model, ratio, scores, attention=config.attention, boosted=boost, global_ranking=ranked)
    if (chosen.macs, chosen.params, chosen.kept) != (searched.macs, searched.params, searched.kept):
        raise SlimdiffError("internal: the pruned model differs from the weightless trial the search chose")
    verify_slices(model, chosen)
    return chosen, ratio, boost


def compress(
    adapter: Adapter, config: ChannelPruningConfig, data: Calibration, *, log: Log = no_log
) -> ChannelPruningResult:
    """Prune a copy of `adapter.model` to the budget; the original model is left unchanged (its grads cleared)."""
    config.validate()
    start = time.perf_counter()
    model = adapter.model
    scored: list[int] = []
    if config.importance in ("diff-pruning", "taylor"):
        scored = accumulate_gradients(adapter, data, config)
        log(f"importance from {len(scored)} timesteps ({config.importance})")
    original = {"macs": count_macs(model).total, "params": count_params(model)}
    scores = channel_scores(model, config.importance, attention=config.attention, seed=config.seed)
    fit = None
    if config.unit == "latency":  # every trial a real pruned model, timed (engines/budgets.py)
        smallest = prune_copy(model, MAX_RATIO, scores, attention=config.attention, weightless=True)

        def build(fraction: float) -> tuple[_Choice, float]:
            choice = _prune_to(model, scores, config.at_macs(fraction), original, log)
            return choice, choice[0].macs / original["macs"]

        fit = budgets.fit_latency(
            config,
            budgets.time_denoiser(model, config.latency_batch),
            build,
            lambda choice: budgets.time_denoiser(choice[0].model, config.latency_batch),
            lowest=max(0.05, smallest.macs / original["macs"]),
            engine="channel pruning",
            log=log,
        )
        chosen, ratio, boost = fit.product
    else:
        chosen, ratio, boost = _prune_to(model, scores, config, original, log)
    model.zero_grad(set_to_none=True)
    achieved = {"macs": chosen.macs / original["macs"], "params": chosen.params / original["params"]}
    record = {
        "importance": config.importance,
        "thr": config.thr,
        "timesteps_scored": len(scored),
        "attention": config.attention,
        "widths": config.widths,
        "ratio": ratio,
        "macs": chosen.macs,
        "params": chosen.params,
        "block_channels": block_channels(model, chosen),
        "regrouped_norms": chosen.regrouped,
    }
    if fit is not None:
        achieved |= fit.achieved()
        record["latency"] = fit.record()
    return ChannelPruningResult(
        model=chosen.model.eval(),
        achieved=achieved,
        record=record,
        summary=(
            f"pruned at ratio {ratio:.3f}: {achieved['macs']:.3f} of the MACs ({chosen.macs / 1e6:.1f} M), "
            f"{achieved['params']:.3f} of the params ({chosen.params:,})" + (fit.summary() if fit else "")
        ),
        ratio=ratio,
        original=original,
        pruned={"macs": chosen.macs, "params": chosen.params},
        scored_timesteps=scored,
        seconds=time.perf_counter() - start,
    )


ENGINE = register(
    Engine(
        "channels",
        ChannelPruningConfig,
        compress,
        help="Structural channel pruning (Diff-Pruning or a baseline importance) to a MACs or params budget.",
    )
)
