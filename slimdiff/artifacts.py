"""The artifact layer: what a model may carry beside its weights, and what a sampling run of it then computes.

Below the exporter and the engines: `export.load` re-attaches a saved artifact through `attach_artifact`, and an
engine's module teaches it how (`register_artifact(name, attach)`); evaluation, `sample` and `slimdiff info` read
the model's `SamplingPlan` (`sampling_plan(model)`) without knowing the engine that made the artifact. This module
imports nothing of `slimdiff.engines`: it names the module that registers each built-in artifact kind
(`BUILTIN_ARTIFACTS`) and imports it by name on first need, as the engine registry does with its engines.

- `register_artifact` / `attach_artifact` — the registry: artifact name → `attach(model, payload)`.
- `SamplingPlan`, `set_sampling_plan(model, make)` (an artifact's attach and detach), `sampling_plan(model)` — the
  sampler an artifact was made for and the fraction of a full denoiser call each step computes.
- `check_sampler(model, scheduler)` — refuse another sampler; `full_compute(model)` — a context in which the model
  computes everything (counting or timing one call); `sampler_settings(scheduler)` — a scheduler's trajectory
  settings as JSON.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from slimdiff.errors import SlimdiffError

# ----------------------------------------------------------------------------------------------------------------
# the registry
# ----------------------------------------------------------------------------------------------------------------
#: Artifacts that `slimdiff.load` knows how to re-attach: artifact name → the module that registers its `attach`
#: (imported by name on first need: loading a model imports only what attaches its artifacts).
BUILTIN_ARTIFACTS: dict[str, str] = {
    "skip_table": "slimdiff.engines.skip.runtime",
}

_artifacts: dict[str, Callable[[nn.Module, Any], None]] = {}


def register_artifact(name: str, attach: Callable[[nn.Module, Any], None]) -> None:
    """Teach `slimdiff.load` to re-attach the artifact `name` (`attach(model, payload)`)."""
    _artifacts[name] = attach


def attach_artifact(model: nn.Module, name: str, payload: Any) -> None:
    """Re-attach a saved artifact to a loaded model; an artifact nothing knows is refused by name."""
    if name not in _artifacts and name in BUILTIN_ARTIFACTS:
        importlib.import_module(BUILTIN_ARTIFACTS[name])  # the module registers its attach function
    if name not in _artifacts:
        known = ", ".join(sorted(set(BUILTIN_ARTIFACTS) | set(_artifacts))) or "none"
        raise SlimdiffError(f"the model carries an artifact '{name}' this slimdiff cannot attach (known: {known})")
    _artifacts[name](model, payload)


# ----------------------------------------------------------------------------------------------------------------
# sampling plans
# ----------------------------------------------------------------------------------------------------------------
#: The CLI flag that runs a model without its artifacts (e.g. a skip table): the denoiser computes every step.
WITHOUT_ARTIFACTS_FLAG = "--no-artifacts"


def sampler_settings(scheduler: Any) -> dict[str, Any]:
    """The settings that shape a diffusers scheduler's trajectory, as JSON: its whole config without diffusers'
    bookkeeping keys (`_class_name`, …) — every key of a scheduler's config is a constructor setting of its timesteps
    (spacing, offset, train steps) or of its update (prediction type, betas, solver order, algorithm, clipping, …).
    Non-finite floats (DPM's `lambda_min_clipped=-inf`) are written as strings."""

    def plain(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return str(value)
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value.tolist() if hasattr(value, "tolist") else value

    return {key: plain(value) for key, value in scheduler.config.items() if not key.startswith("_")}


def sampler_mismatch(
    scheduler: Any, made_for: str, timesteps: Sequence[float], settings: Mapping[str, Any]
) -> str | None:
    """How `scheduler` (its timesteps set) differs from the sampler a plan was made for — its class `made_for`,
    `timesteps` and trajectory `settings` — in words; None when it is that sampler. Empty `settings` (a plan
    recorded before slimdiff kept them) compare the class and timesteps only; a setting this diffusers' scheduler
    does not have is not compared."""
    name = type(scheduler).__name__
    if name != made_for:
        return f"got {name}"
    running = sampler_settings(scheduler)
    for key, value in settings.items():
        if key in running and running[key] != value:
            return f"got {key}={running[key]!r} instead of {value!r}"
    ran = [float(t) for t in scheduler.timesteps]
    if len(ran) != len(timesteps):
        return f"got {len(ran)} steps"
    if any(abs(a - b) > 1e-3 for a, b in zip(ran, timesteps, strict=True)):
        return f"got timesteps {_shown(ran)}"
    return None


@dataclass(frozen=True)
class SamplingPlan:
    """What a sampling run of a model computes, as declared by an attached artifact (e.g. a skip table).

    `artifact` names it in messages ("skip table"); `scheduler` (class name), `timesteps` (one per step) and
    `settings` (`sampler_settings`; empty for plans recorded before they were kept: class and timesteps only) are
    the sampler it was made for; `computed[step]` is the fraction of one full denoiser call's MACs computed at that
    step; `bypass(model)` is a context inside which the model computes everything and keeps no state (one call
    timed or counted outside a sampling run); `details` are JSON-able extras `slimdiff info` reports.
    """

    artifact: str
    scheduler: str
    timesteps: tuple[float, ...]
    computed: tuple[float, ...]
    bypass: Callable[[nn.Module], AbstractContextManager[None]]
    details: Mapping[str, Any] = field(default_factory=dict)
    settings: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.timesteps or len(self.computed) != len(self.timesteps):
            raise SlimdiffError(
                f"the {self.artifact}'s sampling plan needs one computed fraction per timestep "
                f"(got {len(self.computed)} for {len(self.timesteps)})"
            )
        if not all(0.0 <= f <= 1.0 for f in self.computed):
            raise SlimdiffError(f"the {self.artifact}'s computed fractions must lie in [0, 1]")

    @property
    def steps(self) -> int:
        return len(self.timesteps)

    def described(self) -> str:
        """The sampler the plan was made for, in words."""
        return described_sampler(self.scheduler, self.timesteps)

    def sampler(self) -> dict[str, Any]:
        """The sampler as JSON: scheduler, steps, timesteps (whole numbers as ints) and its trajectory settings
        where the plan records them."""
        timesteps = [int(t) if float(t).is_integer() else t for t in self.timesteps]
        sampler = {"scheduler": self.scheduler, "steps": self.steps, "timesteps": timesteps}
        return sampler | ({"settings": dict(self.settings)} if self.settings else {})

    def check(self, scheduler: Any) -> None:
        """Refuse to sample with `scheduler` (its timesteps set) unless it is the sampler the plan was made for."""
        mismatch = sampler_mismatch(scheduler, self.scheduler, self.timesteps, self.settings)
        if mismatch is not None:
            raise sampler_refusal(self.artifact, self.described(), mismatch)


def sampler_refusal(artifact: str, made_for: str, mismatch: str) -> SlimdiffError:
    """The one-line refusal to sample with another sampler than the `artifact` was `made_for` (in words)."""
    return SlimdiffError(
        f"the model's {artifact} was made for {made_for}; {mismatch} — sample with that sampler and step count, "
        f"or without the {artifact} ({WITHOUT_ARTIFACTS_FLAG} on the command line, "
        "slimdiff.load(..., artifacts=False) in Python)"
    )


def described_sampler(scheduler: str, timesteps: Sequence[float]) -> str:
    """A sampler in words, e.g. "DDIMScheduler with 6 steps (timesteps 833, 667, 500, …, 0)"."""
    return f"{scheduler} with {len(timesteps)} steps (timesteps {_shown(timesteps)})"


def _shown(timesteps: Sequence[float]) -> str:
    """The first three timesteps and the last, e.g. "833, 667, 500, …, 0"."""
    return ", ".join(f"{t:g}" for t in timesteps[:3]) + (f", …, {timesteps[-1]:g}" if len(timesteps) > 3 else "")


@dataclass
class _Declared:
    """A model's declared plan: how to make it, and the plan once made."""

    make: Callable[[nn.Module], SamplingPlan]
    plan: SamplingPlan | None = None


_PLAN = "_slimdiff_sampling_plan"


def set_sampling_plan(model: nn.Module, make: Callable[[nn.Module], SamplingPlan] | None) -> None:
    """Declare (an artifact's `attach`) or withdraw (`make=None`, its detach) the model's one sampling plan.

    `make(model)` runs on the first `sampling_plan(model)`, not here, so attaching stays cheap where the plan
    counts MACs; it must not close over `model` (a deep copy of the model keeps `make` and the plan made).
    """
    if make is None:
        vars(model).pop(_PLAN, None)
    else:
        setattr(model, _PLAN, _Declared(make))


def sampling_plan(model: nn.Module) -> SamplingPlan | None:
    """The sampling plan an attached artifact declared on `model` (made once, then cached), or None."""
    declared: _Declared | None = vars(model).get(_PLAN)
    if declared is None:
        return None
    if declared.plan is None:
        declared.plan = declared.make(model)
    return declared.plan


def check_sampler(model: nn.Module, scheduler: Any) -> None:
    """Refuse to sample `model` with `scheduler` (its timesteps set) when the model's sampling plan was made for
    another sampler (`SamplingPlan.check`); a model without a plan samples with any."""
    plan = sampling_plan(model)
    if plan is not None:
        plan.check(scheduler)


def full_compute(model: nn.Module) -> AbstractContextManager[None]:
    """Inside the block the model computes everything, whatever plan it carries (counting or timing one call)."""
    plan = sampling_plan(model)
    return nullcontext() if plan is None else plan.bypass(model)
