"""LAPTOP-Diff: one-shot layer pruning by an additive output-loss criterion, solved as a 0/1 knapsack to a budget.

Zhang et al., *LAPTOP-Diff* (arXiv 2404.11098); summary in docs/methods.md.

1. Candidates. Every removable residual layer the adapter lists (`Adapter.layers()`): resnets that keep their
   channels and resolution, attention / transformer layers, DiT blocks after the first, and U-Net up-block resnets
   whose hidden-state input already has the output's channels (removed with their skip connection, as BK-SDM
   does). A removed layer becomes `SkippedLayer`, which the exporter saves like any other structure change.
2. Scores, on a seeded calibration set of `calibration_size` triples (x_t, t, cond): x_0 drawn from the data, t
   stratified over the whole training range [0, T), one noise tensor each, conditions from the data's labels.
   - `output-loss` (the paper's): L_out({i}) = E‖ε_without_i − ε‖², one batched forward per candidate;
   - `task-loss`: the increase of the denoising loss E‖ε_without_i − target‖² − E‖ε − target‖²;
   - `magnitude`: Σ|w| over the layer's weights (so the knapsack removes the lowest mean magnitude first);
   - `random`: a seeded uniform draw times the layer's cost (a random order of removal, size-neutral);
   - `handcrafted` (BK-SDM style, U-Nets): in every down and every up stage, the last (resnet k, attention k)
     pair whose resnet is removable (a stage with no removable resnet loses its last attention alone);
     `handcrafted-mid` also removes every removable layer of the mid block (BK-SDM-Small drops the mid stage).
     These two fix the set, so the budget only reports the gap. For a DiT, `handcrafted` removes the fewest
     evenly spaced blocks (block 0 excepted) that meet the budget; `handcrafted-mid` is refused (no mid block).
   Candidates are scored by swapping the stand-in into one working copy and back (not by a forward hook that
   returns the input): the layer's compute is really skipped, and the score is measured through exactly the
   stand-in the pruned model will carry (e.g. the skip-dropping one of an up-block resnet).
3. Selection. Minimise Σ score over the removed set subject to removed cost ≥ what the budget requires, and at
   most `tolerance` (relative) past it: an exact 0/1 knapsack by dynamic programming over a cost grid (exact when
   the total cost fits the grid, otherwise within the grid's rounding, which is reported). When no set lands in
   the window, the cheapest set that still meets the budget is taken and the gap is reported. A latency budget
   searches the MACs fraction on measurements (`engines/budgets.py`): each trial solves the knapsack on MACs,
   removes the set from a copy and times one denoiser call.
4. Check. The measured L_out of the removed set is reported beside the predicted Σ L_out({i}); with
   `check_additivity K`, K random budget-meeting sets are measured too, with Pearson and Spearman correlations
   between predicted and measured L_out — the additivity the method rests on.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from scipy import stats
from torch import nn

from slimdiff.engines import budgets
from slimdiff.engines.base import Calibration, Engine, Log, Result, no_log, register
from slimdiff.engines.budgets import Budget
from slimdiff.errors import SlimdiffError
from slimdiff.metrics.cost import count_macs, macs_by_module
from slimdiff.models import Adapter, adapter_for
from slimdiff.models.base import Layer, count_params, get_submodule, set_submodule
from slimdiff.training.diffusion import make_scheduler, training_target

Criterion = Literal["output-loss", "task-loss", "magnitude", "random", "handcrafted", "handcrafted-mid"]
#: The knapsack's dynamic-programming table holds at most this many cells (items × cost grid), ~32 MB of bools.
KNAPSACK_CELLS = 1 << 25


@dataclass
class LayerPruningConfig(Budget):
    """What to prune to: exactly one of `target_params` / `target_macs` (the fraction of the original to keep) or
    `target_latency_ms` (one denoiser call at `latency_batch`, measured)."""

    criterion: Criterion = field(
        default="output-loss",
        metadata={"help": "output-loss, task-loss, magnitude, random, handcrafted or handcrafted-mid."},
    )
    calibration_size: int = field(
        default=64,
        metadata={"help": "Calibration triples (x_t, t, cond), t spread over [0, T).", "flag": "--calibration"},
    )
    batch_size: int = field(default=64, metadata={"help": "Batch of the scoring forward passes."})
    check_additivity: int = field(
        default=0, metadata={"help": "Measure L_out of this many random budget-meeting sets (0: off, else ≥ 3)."}
    )
    seed: int = field(default=0, metadata={"help": "Random seed (calibration set, random criterion, random sets)."})

    def validate(self) -> None:
        super().validate()
        if self.calibration_size < 1 or self.batch_size < 1:
            raise SlimdiffError(
                f"calibration_size ({self.calibration_size}) and batch_size ({self.batch_size}) must be ≥ 1"
            )
        if self.check_additivity < 0 or 0 < self.check_additivity < 3:
            raise SlimdiffError(f"check_additivity must be 0 (off) or ≥ 3 sets, got {self.check_additivity}")


# ----------------------------------------------------------------------------------------------------------------
# the knapsack
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Selection:
    """A removal set: item indices, its exact cost and value, and whether it landed in the budget window."""

    items: tuple[int, ...]
    cost: int
    value: float
    in_window: bool
    grid: int  # cost units per grid cell (1: the DP was exact on the true costs)


def select_layers(
    costs: Sequence[int], values: Sequence[float], required: int, allowance: int, *, cells: int = KNAPSACK_CELLS
) -> Selection:
    """Minimise Σ values over a subset whose Σ costs lies in [required, required + allowance].

    Dynamic programming over the reachable cost sums on a grid of `ceil(Σ costs · n / cells)` units (1 — exact —
    whenever the table fits in `cells`). When no subset lands in the window, the subset with the smallest cost ≥
    `required` is returned (`in_window=False`); when even every item together costs less, `SlimdiffError`.
    """
    n, total = len(costs), int(sum(costs))
    if total < required:
        raise SlimdiffError(f"removing every candidate removes {total}, less than the {required} required")
    grid = max(1, math.ceil(total * max(n, 1) / cells))
    weights = [round(c / grid) for c in costs]
    size = sum(weights) + 1
    best = np.full(size, np.inf)
    best[0] = 0.0
    take = np.zeros((n, size), dtype=bool)
    for i, (w, v) in enumerate(zip(weights, values, strict=True)):
        candidate = np.full(size, np.inf)
        candidate[w:] = best[: size - w] + v
        take[i] = candidate < best
        best = np.minimum(best, candidate)

    def backtrack(s: int) -> tuple[int, ...]:
        chosen = []
        for i in range(n - 1, -1, -1):
            if take[i, s]:
                chosen.append(i)
                s -= weights[i]
        return tuple(sorted(chosen))

    slack = n * grid  # rounding moves a set's true cost by at most n·grid/2 away from its grid sum
    low, high = max(0, (required - slack) // grid), min(size - 1, (required + allowance + slack) // grid + 1)
    reachable = [s for s in range(low, high + 1) if np.isfinite(best[s])]
    for s in sorted(reachable, key=lambda s: best[s]):
        items = backtrack(s)
        cost = sum(costs[i] for i in items)
        if required <= cost <= required + allowance:
            return Selection(items, cost, float(best[s]), True, grid)
    for s in (s for s in range(low, size) if np.isfinite(best[s])):
        items = backtrack(s)
        cost = sum(costs[i] for i in items)
        if cost >= required:
            return Selection(items, cost, float(best[s]), False, grid)
    everything = tuple(range(n))
    return Selection(everything, total, float(sum(values)), False, grid)


# ----------------------------------------------------------------------------------------------------------------
# calibration and scoring
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class _Calibration:
    x_t: torch.Tensor
    t: torch.Tensor
    cond: torch.Tensor | None
    target: torch.Tensor


def _calibration_set(adapter: Adapter, data: Calibration, config: LayerPruningConfig) -> _Calibration:
    """`calibration_size` seeded triples: images from the data, t stratified over [0, T), one noise each."""
    scheduler = make_scheduler("ddpm", data.schedule)
    steps = scheduler.config.num_train_timesteps
    n = config.calibration_size
    generator = torch.Generator().manual_seed(config.seed)
    indices = torch.randint(0, len(data.dataset), (n,), generator=generator)
    images, labels = zip(*(data.dataset[int(i)] for i in indices), strict=True)
    x0, labels = torch.stack(images), torch.tensor(labels)
    t = ((torch.arange(n) + torch.rand(n, generator=generator)) * steps / n).long().clamp_max(steps - 1)
    noise = torch.randn(x0.shape, generator=generator)
    device = next(adapter.model.parameters()).device
    cond = data.cond_for(labels)
    return _Calibration(
        x_t=scheduler.add_noise(x0, noise, t).to(device),
        t=t.to(device),
        cond=None if cond is None else cond.to(device),
        target=training_target(scheduler, x0, noise, t).to(device),
    )


@torch.no_grad()
def _predict(adapter: Adapter, calib: _Calibration, batch_size: int) -> torch.Tensor:
    chunks = []
    for start in range(0, calib.x_t.shape[0], batch_size):
        part = slice(start, start + batch_size)
        cond = None if calib.cond is None else calib.cond[part]
        chunks.append(adapter(calib.x_t[part], calib.t[part], cond).float())
    return torch.cat(chunks)


def _mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).pow(2).mean())


class _Bypass:
    """Swaps stand-ins into a working copy and back, to measure the model without a set of layers."""

    def __init__(self, model: nn.Module) -> None:
        self.model = copy.deepcopy(model).eval()
        self.adapter = adapter_for(self.model)

    @torch.no_grad()
    def predict_without(self, names: Sequence[str], calib: _Calibration, batch_size: int) -> torch.Tensor:
        stand_ins = {name: self.adapter.stand_in(name) for name in names}
        originals = {name: get_submodule(self.model, name) for name in names}
        try:
            for name, stand_in in stand_ins.items():
                set_submodule(self.model, name, stand_in)
            return _predict(self.adapter, calib, batch_size)
        finally:
            for name, original in originals.items():
                set_submodule(self.model, name, original)


def _magnitude(model: nn.Module, name: str) -> float:
    return float(sum(p.detach().abs().sum() for p in get_submodule(model, name).parameters()))


# ----------------------------------------------------------------------------------------------------------------
# handcrafted (BK-SDM) sets
# ----------------------------------------------------------------------------------------------------------------
def handcrafted_set(adapter: Adapter, candidates: Sequence[Layer], with_mid: bool) -> list[str]:
    """BK-SDM's rule for a U-Net: per down/up stage, the last (resnet k, attention k) pair whose resnet is
    removable (else the stage's last attention); `with_mid` adds every removable mid-block layer."""
    removable = {layer.name for layer in candidates}
    chosen: list[str] = []
    for prefix, stages in (("down_blocks", adapter.model.down_blocks), ("up_blocks", adapter.model.up_blocks)):
        for i, stage in enumerate(stages):
            base = f"{prefix}.{i}"
            attentions = len(getattr(stage, "attentions", None) or [])
            resnets = [k for k in range(len(stage.resnets)) if f"{base}.resnets.{k}" in removable]
            if resnets:
                k = resnets[-1]
                pair = [f"{base}.resnets.{k}"] + ([f"{base}.attentions.{k}"] if k < attentions else [])
            else:
                pair = [f"{base}.attentions.{k}" for k in range(attentions)][-1:]
            chosen += [name for name in pair if name in removable]
    if with_mid:
        chosen += [name for name in sorted(removable) if name.startswith("mid_block.")]
    return chosen


def _evenly_spaced(candidates: Sequence[Layer], costs: Sequence[int], required: int) -> list[int]:
    """The fewest candidates, evenly spaced in depth, whose costs reach `required` (DiT blocks all cost the same)."""
    n = len(candidates)
    for k in range(1, n + 1):
        picks = sorted({min(n - 1, int((j + 0.5) * n / k)) for j in range(k)})
        if sum(costs[i] for i in picks) >= required:
            return picks
    return list(range(n))


# ----------------------------------------------------------------------------------------------------------------
# the engine
# ----------------------------------------------------------------------------------------------------------------
def _correlations(predicted: Sequence[float], measured: Sequence[float]) -> dict[str, float | None]:
    def finite(value: float) -> float | None:
        return None if not np.isfinite(value) else float(value)

    if np.ptp(predicted) == 0 or np.ptp(measured) == 0:
        return {"pearson": None, "spearman": None}
    return {
        "pearson": finite(stats.pearsonr(predicted, measured).statistic),
        "spearman": finite(stats.spearmanr(predicted, measured).statistic),
    }


@dataclass
class _Removal:
    """A removal set chosen for a target fraction, and the model without it."""

    target: float
    removed: list[str]
    grid: int
    in_window: bool | None
    model: nn.Module


def compress(adapter: Adapter, config: LayerPruningConfig, data: Calibration, *, log: Log = no_log) -> Result:
    """Remove whole layers from a copy of `adapter.model` to the budget; the original model is left unchanged."""
    config.validate()
    start = time.perf_counter()
    model = adapter.model
    is_unet = adapter.family in ("unet", "sd-unet")
    if config.criterion == "handcrafted-mid" and not is_unet:
        raise SlimdiffError(
            f"criterion handcrafted-mid needs a U-Net mid block; a {adapter.family} model has none "
            "(use handcrafted: evenly spaced blocks)"
        )
    fixed_set = config.criterion.startswith("handcrafted") and is_unet
    if config.unit == "latency" and fixed_set:
        raise SlimdiffError(
            f"criterion {config.criterion} fixes the removed set; a latency budget needs a criterion that can be "
            "searched (output-loss, task-loss, magnitude, random)"
        )
    candidates = [layer for layer in adapter.layers() if layer.removable]
    if not candidates:
        raise SlimdiffError(f"this {adapter.family} model has no removable layer")
    names = [layer.name for layer in candidates]
    original = {"params": count_params(model), "macs": count_macs(model).total}
    layer_macs = macs_by_module(model, names)
    unit = "macs" if config.unit == "latency" else config.unit  # a latency budget is searched on MACs
    costs = [layer.params if unit == "params" else layer_macs[layer.name] for layer in candidates]
    total = original[unit]

    def required_for(target: float) -> int:
        # removed cost needed so that kept ≤ target; the guard keeps `1 - removable / total` (the latency search's
        # floor) from rounding to one unit more than every removable layer
        return total - math.floor(target * total * (1 + 1e-12))

    if unit == config.unit and sum(costs) < required_for(config.target):
        reachable = 1 - sum(costs) / total
        raise SlimdiffError(
            f"cannot reach {config.target:.2f} of the original {unit}: removing every removable layer "
            f"({len(candidates)}) keeps {reachable:.3f}"
        )

    calib = _calibration_set(adapter, data, config)
    bypass = _Bypass(model)
    reference = _predict(bypass.adapter, calib, config.batch_size)
    needs_l_out = config.criterion == "output-loss" or config.check_additivity > 0
    l_out: dict[str, float] = {}
    scores: dict[str, float] = {}
    scoring_start = time.perf_counter()
    if needs_l_out or config.criterion == "task-loss":
        full_task = _mse(reference, calib.target)
        for layer in candidates:
            eps = bypass.predict_without([layer.name], calib, config.batch_size)
            l_out[layer.name] = _mse(eps, reference)
            if config.criterion == "task-loss":
                scores[layer.name] = _mse(eps, calib.target) - full_task
            log(f"{layer.name}: L_out {l_out[layer.name]:.3g}")
    scoring_seconds = time.perf_counter() - scoring_start
    if not needs_l_out:
        l_out = {}
    if config.criterion == "output-loss":
        scores = dict(l_out)
    elif config.criterion == "magnitude":
        scores = {name: _magnitude(model, name) for name in names}
    elif config.criterion == "random":
        draws = torch.rand(len(candidates), generator=torch.Generator().manual_seed(config.seed)).tolist()
        scores = {name: u * c for name, u, c in zip(names, draws, costs, strict=True)}

    def remove(target: float) -> _Removal:
        """The removal set for a target fraction of `unit`, and the model without it."""
        if fixed_set:
            removed = handcrafted_set(adapter, candidates, with_mid=config.criterion == "handcrafted-mid")
            grid, in_window = 1, None
        elif config.criterion == "handcrafted":
            removed = [names[i] for i in _evenly_spaced(candidates, costs, required_for(target))]
            grid, in_window = 1, None
        else:
            allowance = math.floor(config.tolerance * target * total)
            selection = select_layers(costs, [scores[n] for n in names], required_for(target), allowance)
            removed = [names[i] for i in selection.items]
            grid, in_window = selection.grid, selection.in_window
        pruned = copy.deepcopy(model).eval()
        pruned_adapter = adapter_for(pruned)
        for name in removed:
            pruned_adapter.remove_layer(name)
        return _Removal(target, removed, grid, in_window, pruned)

    fit = None
    if config.unit == "latency":  # every trial a real pruned model, timed (engines/budgets.py)

        def build(fraction: float) -> tuple[_Removal, float]:
            removal = remove(fraction)
            return removal, count_macs(removal.model).total / original["macs"]

        fit = budgets.fit_latency(
            config,
            budgets.time_denoiser(model, config.latency_batch),
            build,
            lambda removal: budgets.time_denoiser(removal.model, config.latency_batch),
            lowest=max(0.05, 1 - sum(costs) / total),
            engine="layer pruning",
            log=log,
        )
        removal = fit.product
    else:
        removal = remove(config.target)
    target, removed, grid, in_window, pruned = (
        removal.target,
        removal.removed,
        removal.grid,
        removal.in_window,
        removal.model,
    )
    pruned_adapter = adapter_for(pruned)
    required = required_for(target)
    achieved = {
        "params": count_params(pruned) / original["params"],
        "macs": count_macs(pruned).total / original["macs"],
    }
    measured = _mse(_predict(pruned_adapter, calib, config.batch_size), reference)
    gap = achieved[unit] - target
    if in_window is None:
        in_window = -config.tolerance * target <= gap <= 0
    record: dict[str, Any] = {
        "criterion": config.criterion,
        "calibration": {"size": config.calibration_size, "t_min": int(calib.t.min()), "t_max": int(calib.t.max())},
        "candidates": [
            {
                "name": layer.name,
                "kind": layer.kind,
                "params": layer.params,
                "macs": layer_macs[layer.name],
                **({"score": scores[layer.name]} if layer.name in scores else {}),
                **({"l_out": l_out[layer.name]} if layer.name in l_out else {}),
            }
            for layer in candidates
        ],
        "removed": removed,
        "measured_l_out": measured,
        "gap": gap,
        "within_tolerance": in_window,
        "knapsack_grid": grid,
        "scoring_seconds": round(scoring_seconds, 2),
    }
    if l_out:
        record["predicted_l_out"] = sum(l_out[name] for name in removed)
    if config.check_additivity:
        record["additivity"] = _check_additivity(bypass, calib, config, candidates, costs, required, l_out, reference)
        log(f"additivity: {record['additivity']['pearson']} (Pearson), {record['additivity']['spearman']} (Spearman)")
    if fit is not None:
        achieved |= fit.achieved()
        record["latency"] = fit.record()
    summary = (
        f"removed {len(removed)} of {len(candidates)} removable layers ({config.criterion}): "
        f"{achieved['params']:.3f} of the params, {achieved['macs']:.3f} of the MACs"
        + (fit.summary() if fit else "" if in_window else f" — {gap:+.3f} from the {unit} target {target:.2f}")
    )
    return Result(
        model=pruned,
        achieved=achieved,
        record=record,
        summary=summary,
        seconds=time.perf_counter() - start,
    )


def _check_additivity(
    bypass: _Bypass,
    calib: _Calibration,
    config: LayerPruningConfig,
    candidates: Sequence[Layer],
    costs: Sequence[int],
    required: int,
    l_out: dict[str, float],
    reference: torch.Tensor,
) -> dict[str, Any]:
    """Measured L_out(S) of K random budget-meeting sets (a random order, cut where the budget is met) against the
    predicted Σ L_out({i})."""
    generator = torch.Generator().manual_seed(config.seed + 1)
    predicted, measured, sizes = [], [], []
    for _ in range(config.check_additivity):
        order = torch.randperm(len(candidates), generator=generator).tolist()
        chosen, removed = [], 0
        for i in order:
            if removed >= required:
                break
            chosen.append(candidates[i].name)
            removed += costs[i]
        eps = bypass.predict_without(chosen, calib, config.batch_size)
        predicted.append(sum(l_out[name] for name in chosen))
        measured.append(_mse(eps, reference))
        sizes.append(len(chosen))
    return {
        "sets": config.check_additivity,
        **_correlations(predicted, measured),
        "predicted": predicted,
        "measured": measured,
        "set_sizes": sizes,
    }


ENGINE = register(
    Engine(
        "layers",
        LayerPruningConfig,
        compress,
        help="LAPTOP-Diff layer pruning: remove whole layers chosen by output loss (or a baseline) to a budget.",
    )
)
