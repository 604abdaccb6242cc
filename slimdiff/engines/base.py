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
`Result.artifacts` and is written by the exporter like any other artifact; the artifact layer below the exporter
(`slimdiff.artifacts`) re-attaches it on load and holds the `SamplingPlan` it declares.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimdiff import export
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
    re-attached by `slimdiff.load` through `slimdiff.artifacts.attach_artifact`; `training`, when set, is a run the
    job must do before the products exist (then `model` is the model to train, and `finish` makes the products).
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
        return export.save(self.model, out_dir, artifacts=self.artifacts, **save_kwargs)


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
    "skip": "slimdiff.engines.skip.engine",
    "ofa": "slimdiff.engines.ofa",
}

_engines: dict[str, Engine] = {}


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
        register(importlib.import_module(BUILTIN_ENGINES[name]).ENGINE)  # its module registered it on first import
    if name not in _engines:
        raise SlimdiffError(f"unknown engine '{name}'; valid: {', '.join(engine_names())}")
    return _engines[name]
