"""Budgets, in the user's unit, for every engine: `Budget` (exactly one of a MACs fraction, a params fraction or a
measured latency), its latency half `LatencyBudget`, and the search that meets a latency budget.

Meet a latency measured on this machine by searching on measurements, not on MACs.

An engine with a latency budget (`LatencyBudget.target_latency_ms`, at batch `latency_batch`) still searches in its
own unit — the fraction of the MACs it keeps (channels, layers) or of the sampling MACs a skip table keeps — but
every trial is a real compressed model (or table), timed:

1. Time the uncompressed model; start at the MACs fraction target_ms / teacher_ms.
2. Compress to that fraction, time the product, and correct the fraction by the secant through the two nearest
   measurements (regula falsi once the target is bracketed, bisection when the secant leaves the bracket, the
   proportional step when noise makes the slope useless), clamped to what the engine can reach.
3. Stop once a product is within half the `latency_tolerance` of the target (`AIM`: timings are noisy, and a
   product at the tolerance's edge falls outside it on the next measurement), or after `MAX_TRIALS`; the product
   nearest the target is kept, and meets the budget if within the whole tolerance. Where the engine's granularity
   answers an ask again with the same product, the next ask goes halfway past it towards the nearest measurement
   on the other side (stopping when that was asked too). Every trial is recorded. A target the smallest allowed
   product still misses is refused, naming the best achieved.

Timings are `metrics.cost.denoiser_latency` / `sampling_latency` (median of `repeats` calls after `warmup`, on the
device the model lives on, CUDA synchronised): `time_denoiser` and `time_sampling` here, which tests may replace.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, Self, TypeVar

from torch import nn

from slimdiff.engines.base import EngineConfig, Log, no_log
from slimdiff.errors import SlimdiffError
from slimdiff.metrics.cost import LatencyStats, denoiser_latency, device_description, sampling_latency
from slimdiff.models import Adapter


@dataclass
class LatencyBudget(EngineConfig):
    """The measured-latency budget: `target_latency_ms` on this machine, at batch `latency_batch`, met within
    `latency_tolerance` (relative) by searching on measurements (`slimdiff.engines.budgets`). Engines whose budget
    may be a latency build on it; what is timed (one denoiser call, or a whole sampling run) is the engine's."""

    target_latency_ms: float | None = field(
        default=None,
        metadata={
            "help": "Meet this measured latency in ms on this machine instead (channels, layers: one denoiser call "
            "at --batch; skip: a whole sampling run).",
            "flag": "--target-latency",
        },
    )
    latency_batch: int = field(default=1, metadata={"help": "Batch the latency is measured at.", "flag": "--batch"})
    latency_tolerance: float = field(
        default=0.05, metadata={"help": "Relative tolerance of a latency budget.", "flag": "--latency-tolerance"}
    )

    def validate_latency(self) -> None:
        """Refuse a bad latency budget (the engine's `validate` calls this)."""
        ms = self.target_latency_ms
        if ms is not None and not (math.isfinite(ms) and ms > 0):
            raise SlimdiffError(f"target_latency_ms (--target-latency) must be a positive number of ms, got {ms}")
        if self.latency_batch < 1:
            raise SlimdiffError(f"latency_batch (--batch) must be ≥ 1, got {self.latency_batch}")
        if not 0 < self.latency_tolerance < 0.5:
            raise SlimdiffError(f"latency_tolerance {self.latency_tolerance} must be in (0, 0.5)")

    def latency_budget(self) -> dict[str, float]:
        """The latency budget as recorded in the provenance."""
        return {"latency_ms": self.target_latency_ms, "batch": self.latency_batch}

    def at_macs(self, fraction: float) -> Self:
        """The same settings with the budget `target_macs=fraction` instead (one trial of a latency search)."""
        cleared = {f.name: None for f in dataclasses.fields(self) if f.name.startswith("target_")}
        return dataclasses.replace(self, **cleared | {"target_macs": fraction})


def exactly_one(given: dict[str, Any]) -> str:
    """The one budget field set among `given` (name → value or None); refuses none or several, by name."""
    chosen = [name for name, value in given.items() if value is not None]
    if len(chosen) != 1:
        names = ", ".join(given)
        got = f"got {' and '.join(chosen)}" if chosen else "got none"
        raise SlimdiffError(f"give exactly one budget of {names} ({got})")
    return chosen[0]


@dataclass
class Budget(LatencyBudget):
    """A budget of exactly one of `target_macs` / `target_params` — the fraction of the original's MACs or params
    to keep, met within `tolerance` (relative) where the engine's granularity allows — or `target_latency_ms`, a
    measured latency met within `latency_tolerance` (see `LatencyBudget`)."""

    target_macs: float | None = field(default=None, metadata={"help": "Keep this fraction of MACs."})
    target_params: float | None = field(default=None, metadata={"help": "Keep this fraction of params."})
    tolerance: float = field(default=0.02, metadata={"help": "Relative tolerance of a MACs or params budget."})

    def validate(self) -> None:
        super().validate()
        given = {"target_macs": self.target_macs, "target_params": self.target_params}
        exactly_one(given | {"target_latency_ms": self.target_latency_ms})
        self.validate_latency()
        if self.unit != "latency" and not 0.05 <= self.target < 1:
            raise SlimdiffError(f"budget {self.target} must be a fraction of the original in [0.05, 1)")
        if not 0 < self.tolerance < 0.5:
            raise SlimdiffError(f"tolerance {self.tolerance} must be in (0, 0.5)")

    def budget(self) -> dict[str, float]:
        return self.latency_budget() if self.unit == "latency" else {self.unit: self.target}

    @property
    def unit(self) -> Literal["macs", "params", "latency"]:
        if self.target_latency_ms is not None:
            return "latency"
        return "macs" if self.target_macs is not None else "params"

    @property
    def target(self) -> float:
        """The target in its unit: a fraction of the original, or milliseconds."""
        return {"macs": self.target_macs, "params": self.target_params, "latency": self.target_latency_ms}[self.unit]


#: Untimed and timed calls of one denoiser-call measurement, and of one sampling-run measurement.
DENOISER_TIMING = {"warmup": 3, "repeats": 10}
SAMPLING_TIMING = {"warmup": 1, "repeats": 3}
#: The most compress-and-time trials one search makes.
MAX_TRIALS = 6
#: The search stops early only within this part of the tolerance (a product at its edge would fall outside it on
#: the next, noisy, measurement); past that, the best of the trials is kept and judged by the whole tolerance.
AIM = 0.5
#: The largest MACs fraction a trial asks for (a budget keeps less than the original).
HIGHEST = 0.99

T = TypeVar("T")


def _device_of(model: nn.Module) -> Any:
    param = next(model.parameters(), None)
    return "cpu" if param is None else param.device


def time_denoiser(model: nn.Module, batch: int) -> LatencyStats:
    """One denoiser call at `batch`, on the device the model lives on."""
    return denoiser_latency(model, batch_size=batch, device=_device_of(model), **DENOISER_TIMING)


def time_sampling(
    adapter: Adapter, batch: int, *, steps: int, scheduler: str, schedule: dict[str, Any], guidance_scale: float
) -> LatencyStats:
    """One whole sampling run drawing `batch` images over the model's noise `schedule` (with whatever sampling plan
    the model carries)."""
    return sampling_latency(
        adapter,
        steps=steps,
        batch_size=batch,
        scheduler=scheduler,
        schedule=schedule,
        guidance_scale=guidance_scale,
        device=_device_of(adapter.model),
        **SAMPLING_TIMING,
    )


@dataclass(frozen=True)
class Trial:
    """One step of the search: the fraction asked of the engine, the fraction it reached, and the timing."""

    asked: float
    reached: float
    stats: LatencyStats

    @property
    def ms(self) -> float:
        return self.stats.median_ms


@dataclass
class LatencyFit(Generic[T]):
    """The search's outcome: the product nearest the target, its trial, the teacher's timing and every trial."""

    product: T
    best: Trial
    teacher: LatencyStats
    target_ms: float
    tolerance: float
    unit: str
    trials: list[Trial] = field(default_factory=list)

    @property
    def within_tolerance(self) -> bool:
        return abs(self.best.ms - self.target_ms) <= self.tolerance * self.target_ms

    def achieved(self) -> dict[str, float]:
        """For `Result.achieved`: the latency as a fraction of the teacher's."""
        return {"latency": self.best.ms / self.teacher.median_ms}

    def record(self) -> dict[str, Any]:
        """For `Result.record`: what was measured, how, where, and every trial."""
        stats = self.best.stats
        return {
            "target_ms": round(self.target_ms, 3),
            "achieved_ms": round(stats.median_ms, 3),
            "teacher_ms": round(self.teacher.median_ms, 3),
            "p10_ms": round(stats.p10_ms, 3),
            "p90_ms": round(stats.p90_ms, 3),
            "tolerance": self.tolerance,
            "within_tolerance": self.within_tolerance,
            "batch": stats.batch_size,
            "device": device_description(stats.device),
            "measured": f"median of {stats.repeats} timed runs of one {stats.what} after {stats.warmup} warm-up, "
            f"batch {stats.batch_size}, wall clock (perf_counter, CUDA synchronised), inference mode",
            "searched_on": self.unit,
            "trials": [
                {"asked": round(t.asked, 4), "reached": round(t.reached, 4), "ms": round(t.ms, 3)} for t in self.trials
            ],
        }

    def summary(self) -> str:
        off = "" if self.within_tolerance else f", {self.best.ms / self.target_ms - 1:+.1%} off the target"
        return (
            f"; {self.best.ms:.1f} ms at batch {self.best.stats.batch_size} (target {self.target_ms:.4g} ms, teacher "
            f"{self.teacher.median_ms:.1f} ms{off})"
        )


def _next_fraction(points: list[tuple[float, float]], target: float, lowest: float) -> float:
    """The next fraction to try, from the (reached fraction, ms) points measured so far (the teacher's included)."""
    below = [p for p in points if p[1] < target]  # too fast: pruned too much
    above = [p for p in points if p[1] >= target]  # too slow (the teacher always is)
    if below:  # bracketed: regula falsi between the nearest, bisection when it leaves the bracket
        (x0, y0), (x1, y1) = max(below), min(above)
        if x1 > x0 and y1 > y0:
            x = x0 + (target - y0) * (x1 - x0) / (y1 - y0)
            margin = 0.05 * (x1 - x0)
            if x0 + margin <= x <= x1 - margin:
                return x
        return (x0 + x1) / 2
    (x0, y0), (x1, y1) = sorted(points)[:2]  # all too slow (the teacher always is): extrapolate down
    if x1 > x0 and y1 > y0:
        x = x0 + (target - y0) * (x1 - x0) / (y1 - y0)
    else:  # the two smallest disagree on the slope (noise): scale the smallest by the ratio
        x = x0 * target / y0
    return min(HIGHEST, max(lowest, x))


def _past_granularity(
    following: float, trials: list[Trial], points: list[tuple[float, float]], target: float, lowest: float
) -> float | None:
    """`following`, or — when the engine already answered that ask (its granularity rounded it to a product on one
    side of the target) — the ask halfway past that product towards the nearest measurement on the other side;
    None when that was asked too."""
    earlier = [t for t in trials if abs(following - t.asked) < 1e-3]
    if not earlier:
        return following
    last = earlier[-1]
    if last.ms < target:  # its product was too fast: ask for more, short of the nearest slower point
        ceiling = min([x for x, y in points if y >= target and x > last.reached] or [1.0])
        following = (max(following, last.reached) + ceiling) / 2
    else:
        floor = max([x for x, y in points if y < target and x < last.reached] or [lowest])
        following = (min(following, last.reached) + floor) / 2
    return None if any(abs(following - t.asked) < 1e-3 for t in trials) else min(HIGHEST, following)


def fit_latency(
    budget: LatencyBudget,
    teacher: LatencyStats,
    build: Callable[[float], tuple[T, float]],
    measure: Callable[[T], LatencyStats],
    *,
    lowest: float,
    unit: str = "MACs",
    engine: str = "the engine",
    log: Log = no_log,
) -> LatencyFit[T]:
    """Search for the product whose measured latency meets `budget.target_latency_ms`.

    `build(fraction)` compresses to that fraction of `unit` and returns (product, the fraction reached);
    `measure(product)` times it the way `teacher` was timed; `lowest` is the least fraction the engine allows.
    """
    target, tolerance = float(budget.target_latency_ms), budget.latency_tolerance
    where = f"batch {teacher.batch_size} on {teacher.device}"
    if teacher.median_ms <= target:
        raise SlimdiffError(
            f"the model already runs in {teacher.median_ms:.1f} ms ≤ the target {target:g} ms ({where}); "
            "nothing to compress"
        )
    points = [(1.0, teacher.median_ms)]
    trials: list[Trial] = []
    best: tuple[Trial, T] | None = None
    fraction = min(HIGHEST, max(lowest, target / teacher.median_ms))
    for _ in range(MAX_TRIALS):
        product, reached = build(fraction)
        trial = Trial(fraction, reached, measure(product))
        trials.append(trial)
        log(f"latency search: {unit} {fraction:.3f} → {reached:.3f}: {trial.ms:.1f} ms (target {target:.4g} ms)")
        if best is None or abs(trial.ms - target) < abs(best[0].ms - target):
            best = (trial, product)
        if abs(trial.ms - target) <= AIM * tolerance * target:
            break
        if fraction <= lowest and trial.ms > target:
            if abs(best[0].ms - target) <= tolerance * target:
                break  # the smallest model the engine allows misses the aim, yet a trial is within tolerance
            raise SlimdiffError(
                f"cannot reach {target:g} ms ({where}): the smallest model {engine} allows ({reached:.2f} of the "
                f"{unit}) runs in {trial.ms:.1f} ms; the best achieved is {best[0].ms:.1f} ms (the original: "
                f"{teacher.median_ms:.1f} ms)"
            )
        points.append((reached, trial.ms))
        following = _past_granularity(_next_fraction(points, target, lowest), trials, points, target, lowest)
        if following is None:
            log("latency search: the next trial repeats an earlier one (the engine's granularity); stopping")
            break
        fraction = following
    assert best is not None
    return LatencyFit(best[1], best[0], teacher, target, tolerance, unit, trials)
