"""Skip tables: the units a model can skip, the table that says which run at each step, and what a table costs.

A table is made for one sampler (scheduler class, its trajectory settings, number of steps, its timesteps) and
says, per step, whether each unit is computed or reused. Units (`model_units`): `block` = `Adapter.blocks()`;
`layer` = every resnet, attention and up/down-sampler inside the U-Net's blocks (DeepCache's branches), or the
attention and the MLP of every DiT block (Learning-to-Cache; a DiT layer unit caches its branch output, the
residual add and adaLN gate stay fresh). A unit whose every consumer is skipped at a step is dead and skipped too
(`SkipTable.effective`). `unit_costs` and `kept_fraction(s)` count what a table runs in MACs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from torch import nn

from slimdiff.artifacts import described_sampler
from slimdiff.errors import SlimdiffError
from slimdiff.metrics.cost import count_macs, macs_by_module
from slimdiff.models import Adapter
from slimdiff.models.base import count_params, get_submodule

Granularity = Literal["block", "layer"]
GRANULARITIES: tuple[str, ...] = ("block", "layer")
#: what a skipped unit returns: 0 reuses its last output, 1 and 2 forecast it (first/second-order Taylor)
FORECAST_ORDERS: tuple[int, ...] = (0, 1, 2)


def check_forecast_order(order: int) -> None:
    """Refuse a forecast order the runtime does not have, naming the valid ones."""
    if order not in FORECAST_ORDERS:
        raise SlimdiffError(f"forecast_order {order} is not one of {', '.join(map(str, FORECAST_ORDERS))}")


# ----------------------------------------------------------------------------------------------------------------
# units
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SkipUnit:
    """A module whose output can be reused. `inputs` are the units whose outputs it consumes; a unit no other unit
    consumes feeds the model's output (directly or through a residual stream) and is never dead."""

    name: str
    inputs: tuple[str, ...] = ()


def model_units(adapter: Adapter, granularity: str) -> list[SkipUnit]:
    """The units of a model at `granularity` (`block` or `layer`), in execution order."""
    if granularity not in GRANULARITIES:
        raise SlimdiffError(f"unknown granularity '{granularity}'; valid: {', '.join(GRANULARITIES)}")
    if granularity == "block":
        blocks = adapter.blocks()
        names = {b.name for b in blocks}  # conv_in / pos_embed are no units: they always run
        return [SkipUnit(b.name, tuple(i for i in b.inputs if i in names)) for b in blocks]
    if adapter.family == "dit":
        units = []
        for i, block in enumerate(adapter.model.transformer_blocks):
            for part in ("attn1", "ff"):
                if getattr(block, part, None) is None:
                    raise SlimdiffError(f"transformer_blocks.{i} has no {part}; use granularity 'block'")
                units.append(SkipUnit(f"transformer_blocks.{i}.{part}"))
        return units
    return _unet_layer_units(adapter.model)


def _unet_layer_units(model: nn.Module) -> list[SkipUnit]:
    """Every resnet, attention and sampler of a U-Net's blocks, wired as the blocks' forwards wire them."""
    units: list[SkipUnit] = []
    skips: list[str] = ["conv_in"]  # producers of the skip tensors, in push order
    previous = "conv_in"

    def add(name: str, *inputs: str) -> str:
        units.append(SkipUnit(name, tuple(dict.fromkeys(inputs))))
        return name

    def check_covered(block_name: str, names: list[str]) -> None:
        block = get_submodule(model, block_name)
        covered = sum(count_params(get_submodule(model, name)) for name in names)
        if covered != count_params(block):
            raise SlimdiffError(
                f"{block_name} ({type(block).__name__}) has layers outside its resnets, attentions and "
                "samplers; layer granularity cannot skip it — use granularity 'block'"
            )

    for i, down in enumerate(model.down_blocks):
        start = len(units)
        attentions = getattr(down, "attentions", None) or [None] * len(down.resnets)
        for k, attention in enumerate(attentions):
            previous = add(f"down_blocks.{i}.resnets.{k}", previous)
            if attention is not None:
                previous = add(f"down_blocks.{i}.attentions.{k}", previous)
            skips.append(previous)
        for k, _ in enumerate(down.downsamplers or []):
            previous = add(f"down_blocks.{i}.downsamplers.{k}", previous)
            skips.append(previous)
        check_covered(f"down_blocks.{i}", [u.name for u in units[start:]])
    if model.mid_block is not None:
        start = len(units)
        mid = model.mid_block
        previous = add("mid_block.resnets.0", previous)
        for k, attention in enumerate(getattr(mid, "attentions", [])):
            if attention is not None:
                previous = add(f"mid_block.attentions.{k}", previous)
            previous = add(f"mid_block.resnets.{k + 1}", previous)
        check_covered("mid_block", [u.name for u in units[start:]])
    for j, up in enumerate(model.up_blocks):
        start = len(units)
        attentions = getattr(up, "attentions", None) or [None] * len(up.resnets)
        for k, attention in enumerate(attentions):
            previous = add(f"up_blocks.{j}.resnets.{k}", previous, skips.pop())
            if attention is not None:
                previous = add(f"up_blocks.{j}.attentions.{k}", previous)
        for k, _ in enumerate(up.upsamplers or []):
            previous = add(f"up_blocks.{j}.upsamplers.{k}", previous)
        check_covered(f"up_blocks.{j}", [u.name for u in units[start:]])
    names = {u.name for u in units}  # conv_in is no unit: it always runs
    return [SkipUnit(u.name, tuple(i for i in u.inputs if i in names)) for u in units]


def consumers(units: Sequence[SkipUnit]) -> dict[str, list[str]]:
    """Unit name → the units that consume its output."""
    out: dict[str, list[str]] = {u.name: [] for u in units}
    for unit in units:
        for source in unit.inputs:
            out[source].append(unit.name)
    return out


# ----------------------------------------------------------------------------------------------------------------
# the table
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class SkipTable:
    """Which unit is computed (True) or reused (False) at each step of one sampler; JSON-able via `to_json`.

    `timesteps` are the sampler's timesteps, one per step; `compute[step][unit]` follows `units`; `inputs` records
    what each unit consumes (for dead-unit propagation at run time); `settings` are the scheduler's trajectory
    settings (`artifacts.sampler_settings`), empty in tables saved before they were recorded (then the class and
    the timesteps alone identify the sampler). `forecast_order` is what a skipped unit returns: 0 its output from
    the last step it ran (reuse), 1 or 2 a Taylor forecast from its last 2 or 3 computed steps (TaylorSeer); tables
    saved before it was recorded reuse.
    """

    scheduler: str
    num_inference_steps: int
    timesteps: list[float]
    granularity: str
    units: list[str]
    inputs: list[list[str]]
    compute: list[list[bool]]
    settings: dict[str, Any] = field(default_factory=dict)
    forecast_order: int = 0

    def __post_init__(self) -> None:
        steps, width = len(self.timesteps), len(self.units)
        check_forecast_order(self.forecast_order)
        if steps < 2:
            raise SlimdiffError(f"a skip table needs at least 2 steps (got {steps})")
        if len(self.compute) != steps or any(len(row) != width for row in self.compute):
            raise SlimdiffError(f"skip table: compute must be {steps} rows (steps) of {width} booleans (units)")
        if len(self.inputs) != width or any(src not in self.units for row in self.inputs for src in row):
            raise SlimdiffError("skip table: inputs must list, for each unit, units of the table")
        if not all(self.compute[0]):
            raise SlimdiffError("skip table: step 0 must compute every unit (there is nothing to reuse yet)")

    @classmethod
    def from_json(cls, payload: Any) -> SkipTable:
        """A table from its JSON payload; malformed payloads are refused with what is missing."""
        needed = ("scheduler", "num_inference_steps", "timesteps", "granularity", "units", "inputs", "compute")
        if not isinstance(payload, dict) or any(key not in payload for key in needed):
            raise SlimdiffError(f"a skip table is a JSON object with the keys {', '.join(needed)}")
        return cls(
            scheduler=str(payload["scheduler"]),
            num_inference_steps=int(payload["num_inference_steps"]),
            timesteps=[float(t) for t in payload["timesteps"]],
            granularity=str(payload["granularity"]),
            units=[str(u) for u in payload["units"]],
            inputs=[[str(i) for i in row] for row in payload["inputs"]],
            compute=[[bool(c) for c in row] for row in payload["compute"]],
            settings=dict(payload.get("sampler_settings") or {}),
            forecast_order=int(payload.get("forecast_order", 0)),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "scheduler": self.scheduler,
            "num_inference_steps": self.num_inference_steps,
            "timesteps": [int(t) if float(t).is_integer() else t for t in self.timesteps],
            "granularity": self.granularity,
            "units": self.units,
            "inputs": self.inputs,
            "compute": self.compute,
            "sampler_settings": self.settings,
            "forecast_order": self.forecast_order,
        }

    @classmethod
    def full(
        cls,
        scheduler: str,
        timesteps: Sequence[float],
        units: Sequence[SkipUnit],
        granularity: str,
        settings: dict[str, Any] | None = None,
        forecast_order: int = 0,
    ) -> SkipTable:
        """The table that computes every unit at every step (of the sampler `scheduler` with `settings`; skipped
        units, once the table skips some, forecast with `forecast_order`)."""
        return cls(
            scheduler=scheduler,
            num_inference_steps=len(timesteps),
            timesteps=[float(t) for t in timesteps],
            granularity=granularity,
            units=[u.name for u in units],
            inputs=[list(u.inputs) for u in units],
            compute=[[True] * len(units) for _ in timesteps],
            settings=dict(settings or {}),
            forecast_order=forecast_order,
        )

    @property
    def skip_units(self) -> list[SkipUnit]:
        return [SkipUnit(name, tuple(inputs)) for name, inputs in zip(self.units, self.inputs, strict=True)]

    def effective(self) -> list[list[bool]]:
        """What actually runs: the table with dead units (every consumer skipped) switched off too."""
        users = consumers(self.skip_units)
        index = {name: i for i, name in enumerate(self.units)}
        result = []
        for row in self.compute:
            live = list(row)
            for i in reversed(range(len(self.units))):
                feeds = users[self.units[i]]
                live[i] = row[i] and (not feeds or any(live[index[c]] for c in feeds))
            result.append(live)
        return result

    def described(self) -> str:
        """The sampler the table was made for, in words."""
        return described_sampler(self.scheduler, self.timesteps)


@dataclass(frozen=True)
class UnitCosts:
    """MACs of one denoiser call at batch 1: per unit, and the part no unit covers (embeddings, stem, head)."""

    units: dict[str, int]
    total: int

    @property
    def rest(self) -> int:
        return self.total - sum(self.units.values())


def unit_costs(model: nn.Module, units: Sequence[str]) -> UnitCosts:
    """Per-unit MACs of one full call, counted on the meta device with `metrics.cost` (where an attached table's
    hooks compute everything: a meta timestep names no step)."""
    return UnitCosts(macs_by_module(model, units), count_macs(model).total)


def kept_fractions(table: SkipTable, costs: UnitCosts) -> list[float]:
    """Per step, the fraction of a full call's MACs the table runs (dead units included as skipped)."""
    return [
        (costs.rest + sum(costs.units[name] for name, live in zip(table.units, row, strict=True) if live)) / costs.total
        for row in table.effective()
    ]


def kept_fraction(table: SkipTable, costs: UnitCosts) -> float:
    """The fraction of a full sampling run's MACs the table runs."""
    fractions = kept_fractions(table, costs)
    return sum(fractions) / len(fractions)
