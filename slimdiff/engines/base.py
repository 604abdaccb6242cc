"""The engine contract: what every compression engine is, and what it hands back.

An engine is a name, a `Config` dataclass and a `compress` function:

```python
@dataclass
class ToyConfig(EngineConfig):
    scale: float = field(default=1.0, metadata={"help": "Multiply conv_out by this."})

    def validate(self) -> None:
        super().validate()  # a `Literal` field outside its choices, refused by flag
        if self.scale <= 0:
            raise SlimdiffError(f"scale must be > 0, got {self.scale}")

def compress(adapter: Adapter, config: ToyConfig, data: Calibration, *, log: Log) -> Result:
    model = copy.deepcopy(adapter.model)
    ...
    return Result(model=model, achieved={"params": 1.0}, record={"scale": config.scale}, summary="scaled")

register(Engine("toy", ToyConfig, compress, help="Scale the output layer."))
```

From that alone the rest is derived: `slimdiff compress toy MODEL --out DIR --scale 2` (flags and help from the
fields and their `metadata["help"]`), the recipe step `compress: {engine: toy, scale: 2}` (validated by the same
dataclass), and the provenance in `slimdiff.json` (engine, config, budget, achieved, the engine's record).

Rules: an engine never trains and never parses arguments; it never changes `adapter.model` (it compresses a copy,
or returns the model untouched with an artifact); what it adds beside the weights (e.g. a skip table) travels in
`Result.artifacts` and is written by the exporter like any other artifact. An attached artifact that changes what a
sampling run computes declares a `SamplingPlan` (`set_sampling_plan`), which evaluation and `slimdiff info` read
through `sampling_plan(model)` without knowing the engine.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Self

import torch
from torch import nn

from slimdiff.data import ImageDataset
from slimdiff.errors import SlimdiffError
from slimdiff.settings import check

Log = Callable[[str], None]


def no_log(message: str) -> None:
    """The default `log`: say nothing."""


@dataclass
class EngineConfig:
    """Base of every engine's settings. Fields carry their CLI help in `metadata["help"]` (and, optionally, an
    older flag spelling accepted beside `--field-name` in `metadata["flag"]`); `validate` raises `SlimdiffError`
    naming the bad field. A `Literal`-typed field's choices are its type: the base `validate` refuses any other
    value, naming the flag and the choices, so an engine declares a choice list once."""

    def validate(self) -> None:
        """Refuse settings that cannot work (called by every surface before `compress`). This base check refuses a
        `Literal` field outside its choices; an engine's `validate` calls it first (`super().validate()`)."""
        check(self, {})

    def budget(self) -> dict[str, Any]:
        """The budget asked for, in the user's unit (e.g. `{"macs": 0.5}`); recorded in the provenance."""
        return {}


@dataclass
class LatencyBudget(EngineConfig):
    """The measured-latency budget: `target_latency_ms` on this machine, at batch `latency_batch`, met within
    `latency_tolerance` (relative) by searching on measurements (`slimdiff.engines.latency`). Engines whose budget
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


@dataclass
class Calibration:
    """What an engine may look at besides the model: data, how labels become conditions, the noise schedule.

    `cond_for(labels)` turns dataset labels into the model's condition (class labels or prompt embeddings, None
    for unconditional models); `schedule` is the model's training noise-scheduler config; `uncond_embedding` is a
    text model's empty-prompt embedding `(1, tokens, dim)`, for classifier-free guidance; `decode` turns a latent
    model's latents into images (its VAE; None for pixel-space models); `work_dir`, when set, is where the engine
    may keep state that lets an interrupted run resume (the compression job removes it once the product is saved).
    """

    dataset: ImageDataset
    cond_for: Callable[[torch.Tensor], torch.Tensor | None]
    schedule: dict[str, Any]
    uncond_embedding: torch.Tensor | None = None
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None
    work_dir: Path | None = None


@dataclass
class Training:
    """A training run an engine's product needs before it is done (OFA's shared run). Engines never train: the
    compression job runs this with the one training loop, then calls `finish` on the trained model.

    `model` is trained in place (its forward is whatever the engine arranged, e.g. the subnet drawn for the step);
    `before_step(step)` runs before every optimizer step; `finish(trained)` returns the products, one `Result` per
    name, each saved to `out/<name>/`. `settings` are further `TrainConfig` fields (lr, batch_size, …);
    `teacher_kd` > 0 adds output distillation from the uncompressed model with that weight.
    """

    model: nn.Module
    steps: int
    finish: Callable[[nn.Module], dict[str, Result]]
    before_step: Callable[[int], None] | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    teacher_kd: float = 0.0


@dataclass(kw_only=True)
class Result:
    """What an engine made.

    `achieved` is what was reached against the budget (fractions of the original, e.g. `{"macs": 0.49,
    "params": 0.52}`); `record` is JSON-able detail for the provenance; `summary` is one line for people;
    `artifacts` maps an artifact name to a JSON-able payload saved beside the weights (`<name>.json`) and
    re-attached by `slimdiff.load` through `attach_artifact`; `training`, when set, is a run the job must do before
    the products exist (then `model` is the model to train, and `finish` makes the products).
    """

    model: nn.Module
    achieved: dict[str, float]
    record: dict[str, Any] = field(default_factory=dict)
    summary: str = ""
    artifacts: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    training: Training | None = None

    def save(self, out_dir: str | Path, **save_kwargs: Any) -> Path:
        """Save the model and its artifacts in the export format (`save_kwargs` go to `export.save`)."""
        from slimdiff.export import save

        return save(self.model, out_dir, artifacts=self.artifacts, **save_kwargs)


Compress = Callable[..., Result]


@dataclass(frozen=True)
class Engine:
    """A registered engine: its name (the CLI subcommand and recipe `engine:`), settings class and function."""

    name: str
    config: type[EngineConfig]
    compress: Compress
    help: str = ""
    #: The engine hands the model back unchanged with artifacts (e.g. skip): it may run on a model that carries
    #: artifacts (its own replace them). Any other engine changes the model, so the compression job refuses a
    #: source carrying artifacts made for the model as it is.
    keeps_model: bool = False

    def make_config(self, **values: Any) -> EngineConfig:
        """The engine's config from keyword values, validated."""
        config = self.config(**values)
        config.validate()
        return config


# ----------------------------------------------------------------------------------------------------------------
# the registry
# ----------------------------------------------------------------------------------------------------------------
#: Built-in engines: name → the module that defines `ENGINE` (imported on first use, so the CLI starts fast).
BUILTIN_ENGINES: dict[str, str] = {
    "channels": "slimdiff.engines.channels",
    "layers": "slimdiff.engines.layers",
    "skip": "slimdiff.engines.skip",
    "ofa": "slimdiff.engines.ofa",
}
#: Artifacts that `slimdiff.load` knows how to re-attach: artifact name → the module that defines `attach`.
BUILTIN_ARTIFACTS: dict[str, str] = {
    "skip_table": "slimdiff.engines.skip",
}

_engines: dict[str, Engine] = {}
_artifacts: dict[str, Callable[[nn.Module, Any], None]] = {}


def register(engine: Engine) -> Engine:
    """Add (or replace) an engine in the registry; returns it."""
    if not engine.name.replace("-", "").isalnum():
        raise SlimdiffError(f"engine name '{engine.name}' must be letters, digits and dashes")
    if not (dataclasses.is_dataclass(engine.config) and issubclass(engine.config, EngineConfig)):
        raise SlimdiffError(f"engine '{engine.name}': config must be an EngineConfig dataclass")
    _engines[engine.name] = engine
    return engine


def engine_names() -> list[str]:
    """Every engine name, built-in and registered, without importing any engine."""
    return sorted(set(BUILTIN_ENGINES) | set(_engines))


def get_engine(name: str) -> Engine:
    """The engine called `name`; an unknown name is refused with the list of engines."""
    if name not in _engines and name in BUILTIN_ENGINES:
        importlib.import_module(BUILTIN_ENGINES[name])  # the module registers its ENGINE
    if name not in _engines:
        raise SlimdiffError(f"unknown engine '{name}'; valid: {', '.join(engine_names())}")
    return _engines[name]


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
    step; `full_compute(model)` is a context inside which the model computes everything and keeps no state (one call
    timed or counted outside a sampling run); `details` are JSON-able extras `slimdiff info` reports.
    """

    artifact: str
    scheduler: str
    timesteps: tuple[float, ...]
    computed: tuple[float, ...]
    full_compute: Callable[[nn.Module], AbstractContextManager[None]]
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
    return nullcontext() if plan is None else plan.full_compute(model)
