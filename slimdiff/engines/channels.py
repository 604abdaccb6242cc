"""Diff-Pruning: structural channel pruning scored by a timestep-aware Taylor expansion, to a MACs/params budget.

Fang, Ma, Wang, *Structural Pruning for Diffusion Models* (NeurIPS 2023); summary in docs/methods.md.

1. Importance. `diff-pruning` accumulates ∂L_t/∂w over a sweep t = 0, s, 2s, … on one calibration batch with one
   fixed noise tensor, stopping once L_t < thr · max L (the pure-noise steps carry little information); the
   channel score is Σ|w·g| over every layer the dependency graph couples to the channel. Baselines: `taylor` (the
   same score from one pass of the ordinary training loss, random timesteps), `magnitude` (L1 norm of the weights),
   `random`.
2. Pruning. torch-pruning's `MetaPruner` removes the lowest-scored channels of every group; attention keeps its
   head count and shrinks the head dimension (or drops whole heads); the output layer is never pruned. A GroupNorm
   loses whole groups, or is regrouped and named in `regrouped_norms` where no choice keeps it exact (the surgery
   is `engines/channel_surgery.py`, shared with OFA). Cached sizes (heads, scale, sampler channels) are re-derived
   afterwards, and buffers that follow a layer's channels (a DiT's position table) are sliced with it.
3. Budget. A uniform per-layer ratio lands on a coarse grid of MACs, so the ratio is searched: first the uniform
   ratio that brackets the target, then how many groups (in the dependency graph's order) take the larger of
   the two ratios. The scores are recorded once on the real model (`channel_scores`); every trial prunes a
   weightless (meta-device) copy with them and counts its MACs, and the real model is pruned once, at the
   chosen ratios. The achieved MACs and params are reported, not assumed. A latency budget searches the MACs
   fraction on measurements (`engines/budgets.py`): each trial meets a MACs target as above, prunes the real model
   and times one denoiser call at the budget's batch.
4. Check. Every kept weight must equal its slice of the original (`verify_slices`); a ratio of 0 is the identity.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from slimdiff.engines import budgets
from slimdiff.engines.base import Calibration, Engine, Log, Result, no_log, register
from slimdiff.engines.budgets import Budget
from slimdiff.engines.channel_surgery import (
    MAX_RATIO,
    AttentionPruning,
    ChannelScores,
    Importance,
    PrunedCopy,
    calibration_batch,
    channel_scores,
    prune_copy,
    verify_slices,
    weightless_copy,
)
from slimdiff.errors import SlimdiffError
from slimdiff.metrics.cost import count_macs, macs_by_module
from slimdiff.models import Adapter, adapter_for
from slimdiff.models.base import count_params, get_submodule
from slimdiff.training.diffusion import make_scheduler, training_target
from slimdiff.training.distill import first_tensor

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
    batch_size: int = field(
        default=32, metadata={"help": "Images per backward pass of the sweep (summed; lower it to fit memory)."}
    )
    attention: AttentionPruning = field(default="head-dim", metadata={"help": "head-dim (keep heads) or heads."})
    widths: Literal["uniform", "global"] = field(
        default="uniform", metadata={"help": "uniform (the paper) or global (channels ranked across layers)."}
    )
    seed: int = field(default=0, metadata={"help": "Random seed (calibration batch, noise, random importance)."})

    def validate(self) -> None:
        super().validate()
        if not 0 <= self.thr < 1:
            raise SlimdiffError(f"thr {self.thr} must be in [0, 1)")
        if min(self.timestep_stride, self.calibration_size, self.batch_size) < 1:
            raise SlimdiffError(
                f"timestep_stride ({self.timestep_stride}), calibration_size ({self.calibration_size}) and "
                f"batch_size ({self.batch_size}) must be ≥ 1"
            )


@dataclass(kw_only=True)
class ChannelPruningResult(Result):
    """The pruned model, what was achieved (fractions of the original), and how the budget was met."""

    ratio: float
    original: dict[str, int]
    pruned: dict[str, int]
    scored_timesteps: list[int] = field(default_factory=list)


def accumulate_gradients(adapter: Adapter, data: Calibration, config: ChannelPruningConfig) -> list[int]:
    """Fill `.grad` of every parameter for Taylor importance; returns the timesteps that contributed.

    Each timestep's loss is the mean over the calibration batch, back-propagated in passes of `batch_size` images
    (the gradients add up to the whole batch's); a `diff-pruning` timestep whose loss falls under `thr` times the
    largest so far adds nothing. With more than one pass, a timestep's gradients are held apart from the sum until
    its loss is known, which costs one more gradient-sized buffer.
    """
    model = adapter.model
    scheduler = make_scheduler("ddpm", data.schedule)
    device = next(model.parameters()).device
    x0, labels = calibration_batch(data.dataset, config.calibration_size, config.seed)
    generator = torch.Generator().manual_seed(config.seed + 1)
    noise = torch.randn(x0.shape, generator=generator)
    passes = torch.split(torch.arange(len(x0)), config.batch_size)
    model.zero_grad(set_to_none=True)
    model.eval()

    def pass_loss(part: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The loss of the images in `part` at their timesteps, weighted by their share of the batch."""
        x, eps, step = x0[part].to(device), noise[part].to(device), t[part].to(device)
        out = adapter(scheduler.add_noise(x, eps, step), step, data.cond_for(labels[part]))
        return F.mse_loss(out, training_target(scheduler, x, eps, step)) * (len(part) / len(x0))

    if config.importance == "taylor":
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(x0),), generator=generator)
        for part in passes:
            pass_loss(part, t).backward()
        return sorted(set(t.tolist()))
    params = [p for p in model.parameters() if p.requires_grad]

    def measure(t: torch.Tensor) -> tuple[float, Callable[[bool], None]]:
        """L_t, and `keep(yes)`, which adds its gradient to the sum over timesteps (or leaves the sum as it was)."""
        if len(passes) == 1:  # the loss is known before its backward: no gradient is computed in vain
            loss = pass_loss(passes[0], t)
            return loss.item(), lambda yes: loss.backward() if yes else None
        summed = [p.grad for p in params]  # Σ over the timesteps so far, set aside while L_t is measured
        model.zero_grad(set_to_none=True)
        value = 0.0
        for part in passes:
            loss = pass_loss(part, t)
            loss.backward()
            value += loss.item()

        def keep(yes: bool) -> None:
            for p, before in zip(params, summed, strict=True):
                if not yes or p.grad is None:
                    p.grad = before
                elif before is not None:
                    p.grad.add_(before)

        return value, keep

    used: list[int] = []
    peak = 0.0
    for step in range(0, scheduler.config.num_train_timesteps, config.timestep_stride):
        value, keep = measure(torch.full((len(x0),), step, dtype=torch.long))
        peak = max(peak, value)
        stop = bool(used) and value < config.thr * peak
        keep(not stop)  # gradients accumulate over the kept timesteps: Σ_t ∂L_t/∂w
        if stop:
            break
        used.append(step)
    return used


def _block_producers(model: nn.Module) -> dict[str, tuple[str, int]]:
    """Each block's output width and the last Conv/Linear inside it that writes that many channels.

    A block's output is that layer's output, or a residual sum with it: torch-pruning couples both, so the
    layer's kept output channels are the block output's. Probed on a weightless copy (shapes only).
    """
    probe = weightless_copy(model)
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


def block_channels(original: nn.Module, pruned: PrunedCopy) -> dict[str, dict[str, Any]]:
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


# ----------------------------------------------------------------------------------------------------------------
# budget search
# ----------------------------------------------------------------------------------------------------------------
def limiting_layers(original: nn.Module, smallest: PrunedCopy, count: int = 5) -> str:
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


_Choice = tuple[PrunedCopy, float, dict[str, float] | None]  # a pruned copy, its uniform ratio and its boosted groups


def _search(
    model: nn.Module, scores: ChannelScores, config: ChannelPruningConfig, original: dict[str, int], log: Log
) -> _Choice:
    """The ratios that meet a MACs or params budget, searched on weightless copies (the chosen one among them)."""
    unit, ranked = config.unit, config.widths == "global"

    def fraction(p: PrunedCopy) -> float:
        return (p.macs if unit == "macs" else p.params) / original[unit]

    def run(ratio: float, boosted: dict[str, float] | None = None) -> PrunedCopy:
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
