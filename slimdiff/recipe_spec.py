"""The recipe spec: multi-step jobs in YAML, typed as dataclasses and validated with errors that name the bad field.

```yaml
model: tiny-unet          # a tiny-config name, a config.json, or a model directory
data: digits              # `digits` or an image folder
out: runs/my-recipe
steps:
  - train: {steps: 1500, batch_size: 64, lr: 1.0e-3}
  - compress: {engine: channels, importance: diff-pruning, target_macs: 0.5}   # any engine + its settings
  - finetune: {steps: 225, teacher: runs/my-recipe/00-train}
  - eval: {n: 1000, steps: 20, metrics: [fid, kid, macs, latency]}
```
Each step writes to `out/<index>-<kind>/`; a step that makes a model hands it to the next step. A step's settings
are the fields of the dataclass its command is built from (`slimdiff.settings`, each engine's config), with the
same names and defaults as the flags (`warmup_steps` is `--warmup-steps`); an eval step measures against the
recipe's `data`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from slimdiff.engines import EngineConfig, get_engine
from slimdiff.errors import SlimdiffError
from slimdiff.settings import EvalSettings, FinetuneConfig, SampleConfig, TrainConfig


@dataclass
class TrainStep:
    """Train a new model (the recipe's `model` is a tiny-config name or config.json)."""

    train: TrainConfig


@dataclass
class FinetuneStep:
    """Continue training the current model; `teacher: model` names the recipe's own input model."""

    finetune: FinetuneConfig


@dataclass
class SampleStep:
    """Sample a grid from the current model."""

    sample: SampleConfig


@dataclass
class CompressStep:
    """Compress the current model with one engine: `compress: {engine: NAME, <that engine's settings>}`.

    The settings are validated by the engine's own config dataclass (the one `slimdiff compress NAME` is built
    from); `engine` defaults to `channels`.
    """

    engine: str
    config: EngineConfig

    @classmethod
    def parse(cls, options: Any, where: str) -> CompressStep:
        if not isinstance(options, dict):
            raise SlimdiffError(f"{where}: expected a mapping with `engine` and its settings, got {options!r}")
        settings = dict(options)
        name = settings.pop("engine", "channels")
        try:
            engine = get_engine(name)
        except SlimdiffError as error:
            raise SlimdiffError(f"{where}.engine: {error}") from None
        return cls(engine=name, config=from_dict(engine.config, settings, where))


@dataclass
class EvalStep:
    """Measure the current model (and write eval.json) against the recipe's `data`."""

    eval: EvalSettings

    @classmethod
    def parse(cls, options: Any, where: str) -> EvalStep:
        if isinstance(options, dict) and "data" in options:
            raise SlimdiffError(f"{where}.data: an eval step measures against the recipe's `data`; drop it here")
        return cls(from_dict(EvalSettings, options, where))


Step = Union[TrainStep, FinetuneStep, SampleStep, CompressStep, EvalStep]
STEP_KINDS: dict[str, type] = {
    "train": TrainStep,
    "finetune": FinetuneStep,
    "compress": CompressStep,
    "sample": SampleStep,
    "eval": EvalStep,
}


@dataclass
class Recipe:
    model: str
    data: str = "digits"
    out: str = "runs/recipe"
    steps: list[Step] = field(default_factory=list)


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is Union:
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false", type(None): "null"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp`; returns the (possibly converted) value."""
    if tp is Step:
        return _step(value, where)
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise SlimdiffError(f"{where}: expected {_type_name(tp)}, got {value!r}")
        return value
    if isinstance(tp, types.UnionType) or origin is Union:
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option, where)
            except SlimdiffError:
                continue
        raise SlimdiffError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if tp is type(None):
        if value is not None:
            raise SlimdiffError(f"{where}: expected null, got {value!r}")
        return None
    if tp is bool:
        if not isinstance(value, bool):
            raise SlimdiffError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SlimdiffError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SlimdiffError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise SlimdiffError(f"{where}: expected a string, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise SlimdiffError(f"{where}: expected a list, got {value!r}")
        item = typing.get_args(tp)[0]  # list[X] or tuple[X, ...]
        items = [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    raise TypeError(f"unsupported annotation {tp!r}")


def _step(value: Any, where: str) -> Step:
    if not isinstance(value, dict) or len(value) != 1:
        raise SlimdiffError(f"{where}: a step is one mapping like `train: {{...}}`; kinds: {', '.join(STEP_KINDS)}")
    ((kind, options),) = value.items()
    if kind not in STEP_KINDS:
        raise SlimdiffError(f"{where}: unknown step '{kind}'; valid: {', '.join(STEP_KINDS)}")
    options = options if options is not None else {}
    step_class = STEP_KINDS[kind]
    if hasattr(step_class, "parse"):
        return step_class.parse(options, f"{where}.{kind}")
    return from_dict(step_class, {kind: options}, where)


def from_dict(cls: type, data: Any, where: str) -> Any:
    """Build dataclass `cls` from a mapping, validating every field; errors name the field path."""
    if not isinstance(data, dict):
        raise SlimdiffError(f"{where}: expected a mapping of {cls.__name__} fields, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise SlimdiffError(f"{where}.{unknown[0]}: unknown field; valid: {', '.join(fields)}")
    values = {}
    for name, f in fields.items():
        if name in data:
            values[name] = _coerce(data[name], hints[name], f"{where}.{name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise SlimdiffError(f"{where}.{name}: required field is missing")
    instance = cls(**values)
    if hasattr(instance, "validate"):
        try:
            instance.validate()
        except SlimdiffError as error:
            raise SlimdiffError(f"{where}: {error}") from None
    return instance


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a YAML recipe."""
    path = Path(path)
    if not path.is_file():
        raise SlimdiffError(f"recipe not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise SlimdiffError(f"{path} is not valid YAML: {str(error).splitlines()[0]}") from None
    recipe = from_dict(Recipe, data, path.name)
    if not recipe.steps:
        raise SlimdiffError(f"{path.name}.steps: a recipe needs at least one step")
    return recipe
