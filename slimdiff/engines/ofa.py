"""OFA-Diffusion: one weight-sharing training run yields K nested sizes, each extracted as a plain diffusers model.

Jiang et al., *OFA-Diffusion Compression* (arXiv 2604.12668); summary in docs/methods.md. The engine never trains: it
returns an elastic model and a `Training` that the compression job runs through the one training loop, then
`finish` extracts every size.

1. Importance. `I_c = mean_n |Σ_j w_cj g_cj^(n)|` over `importance_samples` single-sample backward passes of the
   denoising loss (each pass its own image, noise and timestep t ~ U[0, T)), scored on torch-pruning's channel
   groups exactly as the channels engine prunes them (`make_pruner`: residual adds, skip concatenations, GroupNorm,
   attention, chunked adaLN roots). Per group, torch-pruning's multivariable Taylor score takes |Σ_j w g| in each
   coupled layer and averages the layers. Attention groups are ranked per within-head offset (torch-pruning
   averages the score over the heads and drops the same offsets from each), so every head keeps the same offsets.
   Channels are ranked once and every subnet keeps the top channels of each group: smaller subnets are nested in
   larger ones.
2. Allocation. Within a resolution group B, channel group l of width |l| keeps
   `C_l = max(min(I_l / Σ_B I · |B| · P · |l|, |l|), P_0 · |l|)` channels, rounded to whole heads / chunks and
   to whole GroupNorm groups (a GroupNorm loses whole groups and `num_groups` drops with them, as the channels
   engine prunes: the kept groups' statistics, and so the subnet's norms on its channels, stay the full model's).
   I_l is the group's mean channel score divided by the mean of that over all groups of its layer kind
   (`importance_norm=kind`, the default): raw Taylor means of different kinds (resnet interiors, residual
   streams, attention offsets, the time embedding) differ by up to 10× in scale, and the formula on raw means
   (`importance_norm=none`, the paper's formula as written) starves the low-scale kinds at the floor — e.g. the time
   embedding and every attention at P_0, which cost untrained FID 30 vs 16 and, after a 150-step shared run,
   2.00 vs 0.85 at 0.3 of the MACs (docs/ofa.md). A layer's kind is its roots' names without the block path
   (`conv1+time_emb_proj`, `to_k+to_q+to_v`, …). Resolution groups: for a U-Net, stage s = down block s, up block
   n−1−s (they run at the same resolution) and, for the deepest stage, the mid block; the stem (conv_in, time
   embedding, output norm) is one more group. For a DiT every transformer block sees the same tokens, so all
   blocks form one group, and the residual stream (it runs through every block) is the stem. `allocation=uniform`
   (an ablation) gives every group the same share, i.e. a uniform keep ratio P, as Diff-Pruning prunes.
3. Sizes. The keep ratio P walks the ladder P_i = 0.25 + 0.025 i; each requested size (a fraction of the MACs or
   params) is bracketed by two rungs, then P is bisected between them until the subnet lands within `tolerance`.
4. Training: the elastic model (`engines/ofa_elastic.py`) runs each step's subnet with its slices of the shared
   weights, and each size is extracted from it after the shared run.
"""

from __future__ import annotations

import copy
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

from slimdiff.engines.base import Calibration, Engine, EngineConfig, Log, Result, Training, no_log, register
from slimdiff.engines.channel_surgery import (
    ChannelScores,
    GroupKey,
    NormPlan,
    PrunedCopy,
    calibration_batch,
    make_pruner,
    prune_copy,
    verify_slices,
)
from slimdiff.engines.ofa_elastic import (
    ElasticModel,
    Subnet,
    check_nested,
    draw_subnet,
    extract_all,
    gather,
    named_tensors,
    slice_indices,
    subnet_probabilities,
)
from slimdiff.errors import SlimdiffError
from slimdiff.metrics.cost import count_macs
from slimdiff.models import Adapter, adapter_for
from slimdiff.models.base import count_params
from slimdiff.training.diffusion import make_scheduler, training_target
from slimdiff.training.loop import stream_seed

Sampling = Literal["reweighted", "uniform", "sandwich"]
ImportanceNorm = Literal["kind", "none", "sqrt", "rank"]
#: The ladder of keep ratios of the reference code: P_i = LADDER_START + LADDER_STEP · i.
LADDER_START, LADDER_STEP = 0.25, 0.025
#: Interpolation steps between two rungs before the closest subnet found is taken.
REFINE_STEPS = 12
#: Single-group steps tried when the formula's next step jumps over a size.
HOLD_BACK_TRIALS = 12


@dataclass
class OFAConfig(EngineConfig):
    """The sizes to make, how to rank and allocate channels, and the shared run's settings."""

    sizes: tuple[float, ...] = field(
        default=(0.3, 0.5, 0.75), metadata={"help": "Sizes to extract, fractions of the original (comma-separated)."}
    )
    unit: Literal["macs", "params"] = field(default="macs", metadata={"help": "What sizes measure: macs or params."})
    steps: int = field(default=1000, metadata={"help": "Optimizer steps of the shared run."})
    sampling: Sampling = field(
        default="reweighted", metadata={"help": "Subnet of each step: reweighted, uniform or sandwich."}
    )
    smallest_weight: float = field(
        default=3.0, metadata={"help": "Reweighted: the smallest size is this many times as likely as the largest."}
    )
    allocation: Literal["importance", "uniform"] = field(
        default="importance",
        metadata={"help": "importance (the paper's proportional widths) or uniform (every group keeps P)."},
    )
    importance_norm: ImportanceNorm = field(
        default="kind",
        metadata={
            "help": "I_l of the importance allocation: kind (a layer's mean Taylor score over the mean of its "
            "kind, e.g. all resnet conv1s), none (the paper's raw means), sqrt (raw^½), rank (rank in its stage)."
        },
    )
    floor: float = field(default=0.25, metadata={"help": "P_0: every group keeps at least this fraction."})
    importance_samples: int = field(
        default=64, metadata={"help": "Single-sample backward passes averaged for the importance."}
    )
    tolerance: float = field(default=0.02, metadata={"help": "Relative tolerance of each size."})
    batch_size: int = field(default=64, metadata={"help": "Batch size of the shared run."})
    lr: float = field(default=5e-4, metadata={"help": "Peak learning rate of the shared run (AdamW, cosine)."})
    warmup: int = field(default=20, metadata={"help": "Linear warm-up steps of the shared run."})
    ema_decay: float = field(default=0.995, metadata={"help": "EMA decay of the shared weights."})
    teacher_kd: float = field(
        default=10.0, metadata={"help": "Weight of output distillation from the original model (0 = off)."}
    )
    checkpoint_every: int = field(default=250, metadata={"help": "Checkpoint the shared run every N steps."})
    seed: int = field(default=0, metadata={"help": "Random seed (importance samples, subnet draws, training)."})

    def validate(self) -> None:
        super().validate()
        if not self.sizes:
            raise SlimdiffError("sizes: give at least one size, e.g. 0.3,0.5,0.75")
        bad = [s for s in self.sizes if not 0.05 <= s < 1]
        if bad:
            raise SlimdiffError(f"sizes: {bad[0]} is not a fraction of the original in [0.05, 1)")
        if len(set(self.sizes)) != len(self.sizes):
            raise SlimdiffError(f"sizes: {list(self.sizes)} repeats a size")
        rules = {
            "steps": (self.steps >= 1, "≥ 1"),
            "smallest_weight": (self.smallest_weight >= 1, "≥ 1 (1 = uniform)"),
            "floor": (0 < self.floor <= LADDER_START, f"in (0, {LADDER_START}] (the ladder starts there)"),
            "importance_samples": (self.importance_samples >= 1, "≥ 1"),
            "tolerance": (0 < self.tolerance < 0.5, "in (0, 0.5)"),
            "batch_size": (self.batch_size >= 1, "≥ 1"),
            "lr": (self.lr > 0, "> 0"),
            "warmup": (self.warmup >= 0, "≥ 0"),
            "ema_decay": (0 <= self.ema_decay < 1, "in [0, 1)"),
            "teacher_kd": (self.teacher_kd >= 0, "≥ 0"),
            "checkpoint_every": (self.checkpoint_every >= 1, "≥ 1"),
        }
        for name, (ok, valid) in rules.items():
            if not ok:
                raise SlimdiffError(f"{name}={getattr(self, name)!r} is invalid; it must be {valid}")

    def budget(self) -> dict[str, Any]:
        return {self.unit: sorted(self.sizes)}


# ----------------------------------------------------------------------------------------------------------------
# importance on torch-pruning's groups
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ChannelGroupInfo:
    """One channel group as MetaPruner sees it: the layers whose outputs it sets, width, equal-sized chunks."""

    key: GroupKey
    roots: tuple[str, ...]  # layers whose output channels are this group (MetaPruner finds its ratio on any)
    width: int
    chunks: int  # attention heads / adaLN chunks: kept channels are a multiple of this
    stage: str
    kind: str  # the layer kind: the roots' own names without their block path, e.g. "conv1+time_emb_proj"
    unit: int = 1  # channels that leave together in each chunk: a GroupNorm group (or groups a residual ties)

    @property
    def step(self) -> int:
        """The granularity of the kept channels."""
        return self.chunks * self.unit


def group_info(
    key: GroupKey,
    group: tp.Group,
    width: int,
    pruner: tp.pruner.MetaPruner,
    norms: NormPlan,
    stage_of: Callable[[str], str],
) -> ChannelGroupInfo:
    """What allocation needs of a full-width group: its roots, width, chunks, resolution group, kind and unit."""
    graph = pruner.DG
    names = {module: name for name, module in pruner.model.named_modules()}
    # Conv/Linear outputs belong to one group each (a GroupNorm over a concatenation is in two)
    outs = [
        dep
        for dep, _ in group
        if graph.is_out_channel_pruning_fn(dep.handler) and isinstance(dep.target.module, (nn.Conv2d, nn.Linear))
    ]
    chunks = max(
        [
            (
                pruner.out_channel_groups if graph.is_out_channel_pruning_fn(dep.handler) else pruner.in_channel_groups
            ).get(dep.target.module, 1)
            for dep, _ in group
        ]
        + [1]
    )
    roots = tuple(dict.fromkeys(names[d.target.module] for d in outs if d.target.module in names))
    sizes = {len(unit) for unit in norms.split(group)}
    unit = sizes.pop() if len(sizes) == 1 else 1  # uneven units (a partial last one): rounded when pruned
    return ChannelGroupInfo(key, roots, width, chunks, stage_of(roots[0]), layer_kind(roots), unit)


def layer_kind(roots: tuple[str, ...]) -> str:
    """What kind of layer a group is, read off its roots' names without the block path: the last name part
    that is not an index (`up_blocks.1.resnets.0.conv1` → `conv1`, `attn1.to_out.0` → `to_out`), joined."""
    leaves = {next(part for part in reversed(root.split(".")) if not part.isdigit()) for root in roots}
    return "+".join(sorted(leaves))


def _stage_function(adapter: Adapter) -> Callable[[str], str]:
    """Layer name → the resolution group it belongs to (see the module docstring)."""
    model = adapter.model
    if adapter.family == "dit":
        return lambda name: "blocks" if name.startswith("transformer_blocks.") else "stem"
    deepest = len(model.down_blocks) - 1
    ups = len(model.up_blocks)

    def stage(name: str) -> str:
        parts = name.split(".")
        if parts[0] == "down_blocks":
            return f"stage {int(parts[1])}"
        if parts[0] == "up_blocks":
            return f"stage {ups - 1 - int(parts[1])}"
        if parts[0] == "mid_block":
            return f"stage {deepest}"
        return "stem"

    return stage


def taylor_importance(
    adapter: Adapter, data: Calibration, samples: int, seed: int
) -> tuple[ChannelScores, list[ChannelGroupInfo]]:
    """Every channel's mean per-sample multivariable Taylor score, recorded on every group (replayed by every
    prune of a copy), and the scored groups; `adapter.model` untouched."""
    work = copy.deepcopy(adapter.model).eval()
    work_adapter = adapter_for(work)
    scores = ChannelScores(tp.importance.GroupTaylorImportance(multivariable=True, normalizer=None))
    pruner = make_pruner(work, scores, 0.0)
    scheduler = make_scheduler("ddpm", data.schedule)
    x0, labels = calibration_batch(data.dataset, samples, seed)
    generator = torch.Generator().manual_seed(stream_seed(seed, 1))
    device = next(work.parameters()).device
    for n in range(samples):
        image, label = x0[n % len(x0)][None].to(device), labels[n % len(x0)][None]
        noise = torch.randn(image.shape, generator=generator).to(device)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (1,), generator=generator).to(device)
        work.zero_grad(set_to_none=True)
        prediction = work_adapter(scheduler.add_noise(image, noise, t), t, data.cond_for(label))
        F.mse_loss(prediction, training_target(scheduler, image, noise, t)).backward()
        scores.record(pruner)
    norms, stage_of = NormPlan(pruner), _stage_function(work_adapter)
    means = scores.means
    groups = [
        group_info(key, group, len(means[key]), pruner, norms, stage_of)
        for key, group in scores.groups.items()
        if key in means
    ]
    return scores, groups


# ----------------------------------------------------------------------------------------------------------------
# allocation and the size search
# ----------------------------------------------------------------------------------------------------------------
def layer_importance(
    groups: list[ChannelGroupInfo], scores: dict[GroupKey, torch.Tensor], norm: str
) -> dict[GroupKey, float]:
    """I_l of every group: its mean channel score, normalised as `norm` says (see `OFAConfig.importance_norm`).

    `kind` divides by the mean I of all groups of the same kind in the model, so the formula compares layers by
    how they rank among their own kind: raw Taylor means of different kinds (attention offsets, resnet interiors,
    residual streams, the time embedding) differ by up to 10× in scale, and the raw formula starves the low-scale
    kinds at the floor. `sqrt` tempers the raw means (I^½); `rank` uses each group's rank within its resolution
    group (1 … |B|).
    """
    means = {g.key: float(scores[g.key].mean()) for g in groups}
    if norm == "none":
        return means
    if norm == "sqrt":
        return {key: math.sqrt(max(m, 0.0)) for key, m in means.items()}
    if norm == "rank":
        ranks: dict[GroupKey, float] = {}
        for stage in {g.stage for g in groups}:
            members = sorted((g for g in groups if g.stage == stage), key=lambda g: means[g.key])
            ranks.update({g.key: float(i + 1) for i, g in enumerate(members)})
        return ranks
    by_kind: dict[str, list[float]] = {}
    for group in groups:
        by_kind.setdefault(group.kind, []).append(means[group.key])
    kind_mean = {kind: sum(values) / len(values) for kind, values in by_kind.items()}
    return {g.key: means[g.key] / kind_mean[g.kind] if kind_mean[g.kind] > 0 else 1.0 for g in groups}


def importance_shares(groups: list[ChannelGroupInfo], importance: dict[GroupKey, float]) -> dict[GroupKey, float]:
    """I_l / Σ_B I · |B| for every group l of its resolution group B (1 everywhere when B scores nothing)."""
    by_stage: dict[str, list[ChannelGroupInfo]] = {}
    for group in groups:
        by_stage.setdefault(group.stage, []).append(group)
    shares: dict[GroupKey, float] = {}
    for members in by_stage.values():
        total = sum(importance[g.key] for g in members)
        shares.update({g.key: importance[g.key] / total * len(members) if total > 0 else 1.0 for g in members})
    return shares


def allocate(groups: list[ChannelGroupInfo], shares: dict[GroupKey, float], keep_ratio: float, floor: float) -> dict:
    """Channels each group keeps at keep ratio P (the paper's importance-proportional formula, floor P_0), in
    whole chunks of whole GroupNorm groups, and at least one."""
    counts: dict[GroupKey, int] = {}
    for group in groups:
        channels = max(min(shares[group.key] * keep_ratio * group.width, group.width), floor * group.width)
        counts[group.key] = min(max(round(channels / group.step), 1), group.width // group.step) * group.step
    return counts


def full_ratio(groups: list[ChannelGroupInfo], shares: dict[GroupKey, float]) -> float:
    """The smallest keep ratio at which every group with a positive score keeps all its channels."""
    return max([1 / shares[g.key] for g in groups if shares[g.key] > 0], default=1.0)


def ladder(top: float) -> list[float]:
    """The rungs P_i = 0.25 + 0.025 i up to the first one ≥ `top`."""
    return [LADDER_START + LADDER_STEP * i for i in range(max(math.ceil((top - LADDER_START) / LADDER_STEP), 0) + 1)]


@dataclass
class _Candidate:
    keep_ratio: float
    counts: dict[GroupKey, int]
    pruned: PrunedCopy
    fraction: float
    held_back: tuple[str, ...] = ()  # groups grown past a coarser one the formula would grow first


def _next_point(lo: float, hi: float, f_lo: float, f_hi: float, target: float, bisect: bool) -> float:
    """Where to look next for `target` between two evaluated points: interpolated, or the midpoint when asked
    (regula falsi stalls when one end sticks) or when the ends do not rise."""
    if bisect or f_hi <= f_lo:
        return (lo + hi) / 2
    guess = lo + (target - f_lo) / (f_hi - f_lo) * (hi - lo)
    margin = (hi - lo) / 20  # never the ends themselves
    return min(max(guess, lo + margin), hi - margin)


class _Search:
    """Prunes copies at a keep ratio and measures them, each distinct allocation once.

    `minimum` holds the counts of the previous (smaller) size: every count is at least that, so sizes stay nested
    even where a size needed the hold-back step.
    """

    def __init__(
        self,
        model: nn.Module,
        groups: list[ChannelGroupInfo],
        scores: ChannelScores,
        config: OFAConfig,
        log: Log,
    ) -> None:
        self.model, self.groups, self.config, self.log = model, groups, config, log
        uniform = config.allocation == "uniform"
        self.shares = (
            {g.key: 1.0 for g in groups}
            if uniform
            else importance_shares(groups, layer_importance(groups, scores.means, config.importance_norm))
        )
        self.importance = scores  # every prune of a copy replays them
        self.original = count_macs(model).total if config.unit == "macs" else count_params(model)
        self.cache: dict[tuple[int, ...], PrunedCopy] = {}
        self.minimum: dict[GroupKey, int] = {}

    def ratios(self, counts: dict[GroupKey, int]) -> dict[str, float]:
        """MetaPruner ratios that keep exactly `counts` (it keeps int(per_chunk · (1 − ratio)) per chunk)."""
        ratios = {}
        for group in self.groups:
            per_chunk = group.width // group.chunks
            kept = counts[group.key] // group.chunks
            if kept < per_chunk:
                ratios.update({root: 1 - (kept + 0.5) / per_chunk for root in group.roots})
        return ratios

    def prune(self, model: nn.Module, counts: dict[GroupKey, int]) -> PrunedCopy:
        return prune_copy(model, 0.0, self.importance, boosted=self.ratios(counts))

    def with_counts(
        self, keep_ratio: float, counts: dict[GroupKey, int], held_back: tuple[str, ...] = ()
    ) -> _Candidate:
        counts = {key: max(n, self.minimum.get(key, 0)) for key, n in counts.items()}
        signature = tuple(counts[g.key] for g in self.groups)
        if signature not in self.cache:
            self.cache[signature] = self.prune(self.model, counts)
        pruned = self.cache[signature]
        fraction = (pruned.macs if self.config.unit == "macs" else pruned.params) / self.original
        return _Candidate(keep_ratio, counts, pruned, fraction, held_back)

    def at(self, keep_ratio: float) -> _Candidate:
        return self.with_counts(keep_ratio, allocate(self.groups, self.shares, keep_ratio, self.config.floor))

    def hold_back(self, below: _Candidate, target: float, tol: float) -> _Candidate:
        """Grow groups one chunk at a time in the order the formula would grow them past `below`'s ratio,
        skipping any whose step overshoots: where one coarse group (e.g. a residual stream) jumps over the
        target, the finer groups after it fill the gap."""

        def next_ratio(group: ChannelGroupInfo, counts: dict[GroupKey, int]) -> float:
            steps = counts[group.key] // group.step
            share = self.shares[group.key]
            return (steps + 0.5) * group.step / (share * group.width) if share > 0 else math.inf

        current = below
        growable = [g for g in self.groups if below.counts[g.key] < g.width]
        for group in sorted(growable, key=lambda g: next_ratio(g, below.counts))[:HOLD_BACK_TRIALS]:
            counts = {**current.counts, group.key: current.counts[group.key] + group.step}
            trial = self.with_counts(below.keep_ratio, counts, (*current.held_back, group.roots[0]))
            if trial.fraction <= target + tol:
                current = trial
            if abs(current.fraction - target) <= tol:
                break
        return current

    def find(self, target: float) -> tuple[_Candidate, int]:
        """The candidate within tolerance of `target`, and the ladder rung at or below its keep ratio."""
        tol = self.config.tolerance * target
        rungs = ladder(full_ratio(self.groups, self.shares))
        low = self.at(rungs[0])
        if low.fraction > target + tol:
            raise SlimdiffError(
                f"size {target}: the smallest subnet (keep ratio {rungs[0]}, floor {self.config.floor}) keeps "
                f"{low.fraction:.3f} of the {self.config.unit}; ask for ≥ {low.fraction:.2f} or lower --floor"
            )

        def distance(candidate: _Candidate) -> float:
            return abs(candidate.fraction - target)

        # 1. the ladder: narrow the two rungs that bracket the target (interpolating; bisecting when the same end
        #    moved twice, where regula falsi stalls) until a rung lands within tolerance or the two are adjacent
        lo, hi = 0, len(rungs) - 1
        below, above = low, self.at(rungs[hi])
        best, last_side, stuck = min((below, above), key=distance), "", False
        while hi - lo > 1 and distance(best) > tol:
            guess = _next_point(lo, hi, below.fraction, above.fraction, target, stuck)
            mid = min(max(round(guess), lo + 1), hi - 1)
            candidate = self.at(rungs[mid])
            side = "below" if candidate.fraction <= target else "above"
            lo, below = (mid, candidate) if side == "below" else (lo, below)
            hi, above = (mid, candidate) if side == "above" else (hi, above)
            best, stuck, last_side = min((best, candidate), key=distance), side == last_side, side
        # 2. between the two rungs, the same on a continuous keep ratio
        for _ in range(REFINE_STEPS):
            if distance(best) <= tol or above.fraction <= below.fraction:
                break
            guess = _next_point(below.keep_ratio, above.keep_ratio, below.fraction, above.fraction, target, stuck)
            candidate = self.at(guess)
            side = "below" if candidate.fraction <= target else "above"
            below = candidate if side == "below" else below
            above = candidate if side == "above" else above
            best, stuck, last_side = min((best, candidate), key=distance), side == last_side, side
        if abs(best.fraction - target) > tol and below.fraction <= target:
            best = min((best, self.hold_back(below, target, tol)), key=lambda c: abs(c.fraction - target))
        rung = int((best.keep_ratio - LADDER_START) / LADDER_STEP + 1e-9)  # the rung at or below the ratio found
        held = f", {len(best.held_back)} groups grown past a coarser one" if best.held_back else ""
        self.log(f"size {target}: keep ratio {best.keep_ratio:.4f} (rung {rung}{held}) → {best.fraction:.4f}")
        if abs(best.fraction - target) > tol:
            raise SlimdiffError(
                f"size {target}: the closest subnet keeps {best.fraction:.4f} of the {self.config.unit}, outside "
                f"the {self.config.tolerance:.0%} tolerance (the model's channel granularity); raise --tolerance"
            )
        self.minimum = best.counts
        return best, rung


# ----------------------------------------------------------------------------------------------------------------
# the engine
# ----------------------------------------------------------------------------------------------------------------
def compress(adapter: Adapter, config: OFAConfig, data: Calibration, *, log: Log = no_log) -> Result:
    """Rank, allocate and search the sizes; return the elastic model and the shared run that trains it."""
    config.validate()
    start = time.perf_counter()
    model = copy.deepcopy(adapter.model).eval()
    model.zero_grad(set_to_none=True)
    scores, groups = taylor_importance(adapter, data, config.importance_samples, config.seed)
    log(f"importance of {len(groups)} channel groups from {config.importance_samples} single-sample passes")
    search = _Search(model, groups, scores, config, log)
    subnets: list[Subnet] = []
    for size in sorted(config.sizes):
        candidate, rung = search.find(size)
        verify_slices(model, candidate.pruned)
        index = slice_indices(model, lambda m, c=candidate.counts: search.prune(m, c), candidate.pruned.model)
        name = f"{config.unit}-{size:g}"
        subnets.append(
            Subnet(
                name=name,
                size=size,
                keep_ratio=candidate.keep_ratio,
                rung=rung,
                skeleton=copy.deepcopy(candidate.pruned.model).to("meta"),
                index=index,
                record={
                    "size": size,
                    "unit": config.unit,
                    "keep_ratio": candidate.keep_ratio,
                    "ladder_rung": rung,
                    "ladder_ratio": LADDER_START + LADDER_STEP * rung,
                    "searched_fraction": candidate.fraction,
                    "held_back_growth": list(candidate.held_back),
                    "group_widths": {g.roots[0]: [candidate.counts[g.key], g.width] for g in groups},
                },
            )
        )
        expected = dict(named_tensors(candidate.pruned.model))
        elastic_view = {n: gather(t, index.get(n, {})) for n, t in named_tensors(model) if n in expected}
        if any(not torch.equal(elastic_view[n], t) for n, t in expected.items()):
            raise SlimdiffError(f"internal: the slice indices of '{name}' do not reproduce its pruned weights")
    check_nested(subnets, model)
    elastic = ElasticModel(model, subnets, config.sampling, config.smallest_weight, config.seed)
    draws = Counter(
        draw_subnet(config.sampling, len(subnets), config.smallest_weight, config.seed, s) for s in range(config.steps)
    )
    for i, subnet in enumerate(subnets):
        subnet.record["steps_trained"] = draws[i]
    shares = subnet_probabilities(config.sampling, len(subnets), config.smallest_weight)
    record = {
        "sampling": config.sampling,
        "sampling_shares": dict(zip((s.name for s in subnets), shares, strict=True)),
        "groups": len(groups),
        "importance_samples": config.importance_samples,
        "subnets": {s.name: s.record for s in subnets},
    }
    settings = {
        "batch_size": config.batch_size,
        "lr": config.lr,
        "warmup_steps": config.warmup,
        "ema_decay": config.ema_decay,
        "checkpoint_every": config.checkpoint_every,
        "seed": config.seed,
    }
    summary = ", ".join(f"{s.name} (P={s.keep_ratio:.3f}, {s.record['searched_fraction']:.3f})" for s in subnets)
    return Result(
        model=elastic,
        achieved={},
        record=record,
        summary=f"{len(subnets)} nested sizes: {summary}",
        seconds=time.perf_counter() - start,
        training=Training(
            model=elastic,
            steps=config.steps,
            finish=extract_all,
            before_step=elastic.draw_subnet_for_step,
            settings=settings,
            teacher_kd=config.teacher_kd,
        ),
    )


ENGINE = register(
    Engine(
        "ofa",
        OFAConfig,
        compress,
        help="OFA-Diffusion: one shared training run yields several nested sizes, each a plain diffusers model.",
    )
)
