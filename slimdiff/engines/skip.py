"""DiP-GO: learned, timestep-wise block skipping — a static skip table that plain diffusers pipelines honour.

Zhu et al., *DiP-GO: A Diffusion Pruner via Few-step Gradient Optimization* (NeurIPS 2024); summary in docs/methods.md.

The product is a table, not new weights: for one sampler (scheduler class, its trajectory settings, number of steps,
its timesteps), whether each unit is computed or reused at each step.

1. Runtime. `attach(model, table)` registers `diffusers.hooks` hooks: one on the model, which works out the step from
   the timestep it is called with, and one per unit, which returns the unit's output from the last step it ran when
   the table says "reuse" — or, with the table's `forecast_order` 1 or 2, a Taylor forecast of it from its last 2 or
   3 computed steps over the actual timestep gaps (Liu et al., TaylorSeer, ICCV 2025). Step 0 computes everything; a
   unit whose every consumer is skipped at a step is dead and skipped too. Several calls at one timestep (separate
   conditional and unconditional calls) each get their own cache slot; a doubled guidance batch is one call. A new
   sampling run starts whenever the table's first timestep comes again; a timestep the table was not made for is
   refused, and so is, at the start of each run, the scheduler of a diffusers pipeline calling the model (found up
   the call stack) when its class or trajectory settings are not the table's (DDPM and DDIM share their "leading"
   timesteps). The table declares its `SamplingPlan` (engines/base.py): per step, the fraction of a full call's MACs
   it runs, counted on first ask.
2. Units. `block` = `Adapter.blocks()`; `layer` = every resnet, attention and up/down-sampler inside the U-Net's
   blocks (DeepCache's branches), or the attention and the MLP of every DiT block (Learning-to-Cache; a DiT layer
   unit caches its branch output, the residual add and adaLN gate stay fresh).
3. Search (`dip-go`). A pruner network maps N×S learnable queries (units × steps) through self-attention and an MLP
   to keep/skip logits, offset by a prior: the step-reuse table at the target (default) or "keep everything" (the
   paper's start). Gates are hard with a straight-through gradient; every unit runs and returns
   `g·fresh + (1−g)·cache` (the cache: the table's forecast from the unit's kept steps), so the gated trajectory
   from fixed noise is differentiable in the gates.
   Loss = 1 − SSIM (or MSE) between the final samples of the gated and the full trajectory + α · the expected kept
   fraction of the sampling MACs (dead units counted as dead), the sparsity term dropped once below the target.
   The denoiser is frozen. Post-processing (METHODS §4): from the output side to the input side, skip the steps
   with the highest skip probability above a threshold (0.95, lowered by 0.05 per sweep, never step 0) until the
   table keeps at most the target fraction of the sampling MACs. By default the table is then compared with step
   reuse at the same budget (reusing, and forecasting with the table's order) on held-out noises and the most
   consistent one is shipped (`fallback`).
4. Baselines through the same runtime: `deepcache` (full steps at a uniform or non-uniform interval, otherwise
   only the shallow branch — the first units and the up-side units that consume them) and `step-reuse` (full steps
   at an interval, otherwise the whole step's output reused). For DDIM, step reuse is the same sampler with fewer
   steps on a shifted grid: a table is only worth shipping where it beats sampling with fewer steps.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from accelerate import PartialState
from accelerate.utils import reduce
from diffusers import DiffusionPipeline
from diffusers.hooks import HookRegistry, ModelHook
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils._pytree import TreeSpec, tree_flatten, tree_map, tree_unflatten
from torchmetrics.functional.image import structural_similarity_index_measure

from slimdiff.diffusion import guided, make_scheduler, null_condition
from slimdiff.engines import latency
from slimdiff.engines.base import (
    Calibration,
    Engine,
    LatencyBudget,
    Log,
    Result,
    SamplingPlan,
    described_sampler,
    exactly_one,
    no_log,
    register,
    register_artifact,
    sampler_mismatch,
    sampler_refusal,
    sampler_settings,
    set_sampling_plan,
)
from slimdiff.errors import SlimdiffError
from slimdiff.io import atomic_dir, atomic_write_json, load_optimizer_tensors, optimizer_tensors, read_json
from slimdiff.metrics.cost import count_macs, macs_by_module
from slimdiff.models import Adapter, adapter_for
from slimdiff.models.base import count_params, get_submodule

Granularity = Literal["block", "layer"]
GRANULARITIES: tuple[str, ...] = ("block", "layer")
ARTIFACT = "skip_table"
STEP_HOOK = "slimdiff_skip_step"
UNIT_HOOK = "slimdiff_skip_unit"
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


def skip_units(adapter: Adapter, granularity: str) -> list[SkipUnit]:
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
    settings (`engines.base.sampler_settings`), empty in tables saved before they were recorded (then the class and
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
    """Per-unit MACs of one full call (counted on the meta device with `metrics.cost`)."""
    with full_compute(model):
        per_unit = macs_by_module(model, units)
        total = count_macs(model).total
    return UnitCosts(per_unit, total)


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


# ----------------------------------------------------------------------------------------------------------------
# the runtime: diffusers hooks
# ----------------------------------------------------------------------------------------------------------------
class _RunState:
    """Where the sampling run is: step, call slot within the step, what runs, and each slot's cached outputs."""

    def __init__(self, table: SkipTable) -> None:
        self.table = table
        self.live = table.effective()
        self.step = -1
        self.slot = 0
        self.slots: int | None = None  # calls per step, known once step 1 is reached
        self.caches: list[dict[str, _History]] = []
        self.active = False
        self.paused = False
        #: search mode: unit name → gate tensor for the current call (None: follow the table), its timestep, and
        #: the units' histories (`_History` timesteps and outputs) before this step (in) and after it (out) — passed
        #: explicitly, so that a checkpointed step recomputed in the backward pass sees its own inputs
        self.gates: dict[str, torch.Tensor] | None = None
        self.gated_t = 0.0
        self.cache_in: dict[str, tuple[list[float], list[Any]]] = {}
        self.cache_out: dict[str, tuple[list[float], list[Any]]] = {}

    def reset(self) -> None:
        self.step, self.slot, self.slots, self.caches = -1, 0, None, []

    def _matches(self, step: int, t: float) -> bool:
        return 0 <= step < len(self.table.timesteps) and abs(self.table.timesteps[step] - t) < 1e-3

    def advance(self, t: float) -> None:
        """Move to the step (and call slot) that a call at timestep `t` belongs to."""
        if self.step == 0 and self.slots is None and self._matches(0, t):
            self.slot += 1  # another call at the first timestep: separate cond/uncond calls
        elif self.slots is not None and self.slot + 1 < self.slots and self._matches(self.step, t):
            self.slot += 1
        elif self._matches(self.step + 1, t) and (self.step < 0 or self.slots is None or self.slot + 1 == self.slots):
            if self.step == 0:
                self.slots = self.slot + 1
            elif self.step < 0:
                _check_calling_pipeline(self.table)
            self.step += 1
            self.slot = 0
        elif self._matches(0, t):
            _check_calling_pipeline(self.table)
            self.reset()
            self.step = 0
        else:
            if self.step < 0:
                where = f"expected the first, {self.table.timesteps[0]:g}"
            elif self.step + 1 < len(self.table.timesteps):
                where = f"after step {self.step} expected timestep {self.table.timesteps[self.step + 1]:g}"
            else:
                where = f"after the last step expected the first, {self.table.timesteps[0]:g}"
            raise sampler_refusal("skip table", self.table.described(), f"got timestep {t:g} ({where})")
        while len(self.caches) <= self.slot:
            self.caches.append({})


def _check_calling_pipeline(table: SkipTable) -> None:
    """At the start of a run: when a diffusers pipeline is calling the model (its `__call__` up the stack), refuse
    its scheduler unless it is the table's sampler — class, trajectory settings and timesteps. The timesteps alone
    cannot tell e.g. DDPM from DDIM with "leading" spacing; called outside a pipeline, the runtime can check only
    the timesteps (slimdiff's own `sample` and `eval` check the sampler before they start)."""
    frame = inspect.currentframe()
    while frame is not None:
        owner = frame.f_locals.get("self")
        if isinstance(owner, DiffusionPipeline):
            scheduler = getattr(owner, "scheduler", None)
            mismatch = None
            if scheduler is not None:
                mismatch = sampler_mismatch(scheduler, table.scheduler, table.timesteps, table.settings)
            if mismatch is not None:
                raise sampler_refusal("skip table", table.described(), f"the pipeline's scheduler: {mismatch}")
            return
        frame = frame.f_back


def _timestep_value(args: tuple[Any, ...], kwargs: dict[str, Any]) -> float | None:
    """The timestep of a denoiser call (every supported family takes it second, or as `timestep=`); None on meta."""
    t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
    if t is None:
        raise SlimdiffError("a model with a skip table must be called with its timestep")
    if not isinstance(t, torch.Tensor):
        return float(t)
    if t.device.type == "meta":
        return None
    flat = t.detach().flatten()
    if flat.numel() > 1 and not bool((flat == flat[0]).all()):
        raise SlimdiffError("a model with a skip table must be called with one timestep for the whole batch")
    return float(flat[0])


class _StepHook(ModelHook):
    """On the model: sets the step and call slot from the timestep, for the unit hooks to read."""

    def __init__(self, state: _RunState) -> None:
        super().__init__()
        self.state = state

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        state = self.state
        t = None if state.paused else _timestep_value(args, kwargs)
        if t is None:  # paused, or counting on the meta device: a plain full call
            return self.fn_ref.original_forward(*args, **kwargs)
        if state.gates is None:  # search mode: the step's gates and caches are given
            state.advance(t)
        state.active = True
        try:
            return self.fn_ref.original_forward(*args, **kwargs)
        finally:
            state.active = False


class _History:
    """One unit's outputs at the last `order + 1` steps it computed (in one call slot), newest first, and its
    forecast at another timestep: Σ_i f[t_0, …, t_i] · (t − t_0)^i — the Taylor series about the newest computed
    step t_0 with the i-th derivative estimated as i! times the divided difference over the actual timestep gaps
    (TaylorSeer's finite differences where the gaps are equal). Order 0, or one computed step so far, returns the
    newest output itself."""

    def __init__(self, order: int, timesteps: Sequence[float] = (), outputs: Sequence[Any] = ()) -> None:
        self.order = order
        self.timesteps, self.outputs = list(timesteps), list(outputs)

    def add(self, t: float, output: Any) -> None:
        self.timesteps = [t, *self.timesteps][: self.order + 1]
        self.outputs = [output, *self.outputs][: self.order + 1]

    def forecast(self, t: float) -> Any:
        if len(self.outputs) == 1:
            return self.outputs[0]
        columns = zip(*(tree_flatten(output)[0] for output in self.outputs), strict=True)
        leaves = [self._taylor(list(c), t) if isinstance(c[0], torch.Tensor) else c[0] for c in columns]
        return tree_unflatten(leaves, tree_flatten(self.outputs[0])[1])

    def _taylor(self, values: list[torch.Tensor], t: float) -> torch.Tensor:
        ts, delta = self.timesteps, t - self.timesteps[0]
        result, differences = values[0], values
        for i in range(1, len(values)):
            differences = [
                (differences[j] - differences[j + 1]) / (ts[j] - ts[j + i]) for j in range(len(differences) - 1)
            ]
            result = result + differences[0] * delta**i
        return result


class _UnitHook(ModelHook):
    """On a unit: compute, or return the table's forecast of its output from the last steps it ran (order 0: the
    output of the last step it ran), per call slot."""

    def __init__(self, state: _RunState, name: str, index: int) -> None:
        super().__init__()
        self.state, self.name, self.index = state, name, index

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        state = self.state
        if not state.active:
            return self.fn_ref.original_forward(*args, **kwargs)
        if state.gates is not None:  # search: always compute, blend with the table's forecast by the gate
            fresh = out = self.fn_ref.original_forward(*args, **kwargs)
            history = _History(state.table.forecast_order, *state.cache_in.get(self.name, ((), ())))
            gate = state.gates[self.name] if history.outputs else None
            if gate is not None:
                forecast = history.forecast(state.gated_t)
                out = tree_map(lambda new, cached: gate * new + (1 - gate) * cached, fresh, forecast)
            if gate is not None and gate.item() < 0.5:  # skipped: the history keeps its values, the gate's gradient
                history.outputs[0] = tree_map(
                    lambda last, new, cached: last + gate * (new - cached), history.outputs[0], fresh, forecast
                )
            else:
                history.add(state.gated_t, out)
            state.cache_out[self.name] = (history.timesteps, history.outputs)
            return out
        history = state.caches[state.slot].get(self.name)
        t = state.table.timesteps[state.step]
        if history is not None and not state.live[state.step][self.index]:
            return history.forecast(t)
        if history is None:
            history = state.caches[state.slot][self.name] = _History(state.table.forecast_order)
        output = self.fn_ref.original_forward(*args, **kwargs)
        history.add(t, output)
        return output


def _state_of(model: nn.Module) -> _RunState | None:
    registry = getattr(model, "_diffusers_hook", None)
    hook = registry.get_hook(STEP_HOOK) if registry is not None else None
    return hook.state if hook is not None else None


def table_of(model: nn.Module) -> SkipTable | None:
    """The skip table attached to a model, if any."""
    state = _state_of(model)
    return state.table if state is not None else None


def attach(model: nn.Module, payload: SkipTable | dict[str, Any]) -> None:
    """Attach a skip table to a diffusers model through `diffusers.hooks` (replacing any table attached before)."""
    table = payload if isinstance(payload, SkipTable) else SkipTable.from_json(payload)
    adapter = adapter_for(model)
    valid = [u.name for u in skip_units(adapter, table.granularity)]
    unknown = [name for name in table.units if name not in valid]
    if unknown:
        raise SlimdiffError(f"the skip table names '{unknown[0]}', which is no {table.granularity} unit of this model")
    detach(model)
    state = _RunState(table)
    HookRegistry.check_if_exists_or_initialize(model).register_hook(_StepHook(state), STEP_HOOK)
    for index, name in enumerate(table.units):
        unit = get_submodule(model, name)
        HookRegistry.check_if_exists_or_initialize(unit).register_hook(_UnitHook(state, name, index), UNIT_HOOK)
    set_sampling_plan(model, _sampling_plan)


def detach(model: nn.Module) -> None:
    """Remove a skip table's hooks and its sampling plan (the model computes everything again)."""
    registry = getattr(model, "_diffusers_hook", None)
    if registry is None or registry.get_hook(STEP_HOOK) is None:
        return
    set_sampling_plan(model, None)
    registry.remove_hook(STEP_HOOK, recurse=False)
    for module in model.modules():
        child = getattr(module, "_diffusers_hook", None)
        if child is not None and child.get_hook(UNIT_HOOK) is not None:
            child.remove_hook(UNIT_HOOK, recurse=False)


@contextmanager
def full_compute(model: nn.Module) -> Iterator[None]:
    """Inside the block, a model with a skip table computes every unit and keeps no state (e.g. for timing one
    call, or counting)."""
    state = _state_of(model)
    if state is None:
        yield
        return
    state.paused = True
    try:
        yield
    finally:
        state.paused = False


def _sampling_plan(model: nn.Module) -> SamplingPlan:
    """The attached table's sampling plan: per step, the fraction of a full call's MACs the table runs."""
    table = table_of(model)
    return SamplingPlan(
        artifact="skip table",
        scheduler=table.scheduler,
        timesteps=tuple(table.timesteps),
        computed=tuple(kept_fractions(table, unit_costs(model, table.units))),
        full_compute=full_compute,
        details={"skip_granularity": table.granularity},
        settings=table.settings,
    )


# ----------------------------------------------------------------------------------------------------------------
# the engine
# ----------------------------------------------------------------------------------------------------------------
Method = Literal["dip-go", "deepcache", "step-reuse"]
Start = Literal["full", "step-reuse"]

FEWER_STEPS_ADVICE = (
    "A table is worth shipping only where it beats the same sampler with fewer steps at equal sampling MACs: for "
    "DDIM, whole-step reuse (--method step-reuse) IS a DDIM sampler with fewer steps, and DPM-Solver++ with fewer "
    "steps is often better still. Measure the teacher's FID against its step count first (benchmarks/skipping.py "
    "--stage curve) and make the table for the step count where the teacher is best: if DDIM or DPM-Solver++ with "
    "target-macs x steps steps is as good as the table, sample with fewer steps and ship no table. Measured on "
    "digits U-Nets, fewer steps matched every table; on a DiT, layer tables from its best step count beat fewer "
    "steps (docs/skipping.md)."
)


@dataclass
class SkipConfig(LatencyBudget):
    """Which sampler the table is for, what to keep — exactly one of `target_macs` (a fraction of a full sampling
    run's MACs) or `target_latency_ms` (a whole sampling run at `latency_batch`, measured) — and how to find it."""

    target_macs: float | None = field(
        default=None, metadata={"help": "Keep this fraction of the MACs of a full sampling run (e.g. 0.25)."}
    )
    steps: int = field(default=50, metadata={"help": "Sampling steps the table is made for."})
    scheduler: Literal["ddim", "dpm", "ddpm"] = field(
        default="ddim", metadata={"help": "Sampler the table is made for: ddim, dpm or ddpm."}
    )
    method: Method = field(default="dip-go", metadata={"help": "dip-go (learned), deepcache or step-reuse."})
    granularity: Granularity = field(
        default="block", metadata={"help": "block (U-Net/DiT blocks) or layer (resnets/attentions; DiT attn/MLP)."}
    )
    forecast_order: int = field(
        default=0,
        metadata={
            "help": "What a skipped unit returns: 0 its last output (reuse), 1 or 2 a first/second-order Taylor "
            "forecast from its last computed steps (TaylorSeer)."
        },
    )
    schedule: Literal["uniform", "non-uniform"] = field(
        default="uniform", metadata={"help": "Baselines: full steps at a uniform or non-uniform (DeepCache) interval."}
    )
    iterations: int = field(default=200, metadata={"help": "dip-go: optimizer steps of the pruner network."})
    lr: float = field(default=0.001, metadata={"help": "dip-go: Adam learning rate of the pruner network."})
    batch_size: int = field(
        default=8, metadata={"help": "dip-go: noises per optimizer step.", "flag": "--search-batch"}
    )
    noises: int = field(default=32, metadata={"help": "dip-go: fixed noises (and conditions) the search uses."})
    loss: Literal["ssim", "mse"] = field(default="ssim", metadata={"help": "dip-go consistency: ssim or mse."})
    start: Start = field(
        default="step-reuse",
        metadata={
            "help": "dip-go: search from step reuse at the target (a warm start) or from everything kept "
            "(full, the paper's start)."
        },
    )
    checkpointing: Literal["steps", "none"] = field(
        default="steps",
        metadata={
            "help": "dip-go: recompute each sampling step's activations in the backward pass (steps: memory of one "
            "step, not of the whole trajectory) or keep them all (none: faster where memory allows)."
        },
    )
    fallback: Literal["step-reuse", "none"] = field(
        default="step-reuse",
        metadata={
            "help": "dip-go: keep step reuse at the same budget instead when it is more consistent with the full "
            "sampler on held-out noises (none: always the search's table)."
        },
    )
    alpha: float = field(default=1.0, metadata={"help": "dip-go: weight of the expected-MACs (sparsity) term."})
    guidance_scale: float = field(default=1.0, metadata={"help": "Classifier-free guidance during the search."})
    threshold: float = field(default=0.95, metadata={"help": "dip-go post-processing: first skip threshold."})
    tolerance: float = field(
        default=0.01, metadata={"help": "Accept tables keeping up to target_macs × (1 + tolerance)."}
    )
    seed: int = field(default=0, metadata={"help": "Random seed (noises, conditions, pruner init)."})

    def validate(self) -> None:
        super().validate()
        exactly_one({"target_macs": self.target_macs, "target_latency_ms": self.target_latency_ms})
        self.validate_latency()
        if self.target_macs is not None and not 0 < self.target_macs < 1:
            raise SlimdiffError(f"target_macs {self.target_macs} must be a fraction of a full run's MACs in (0, 1)")
        if self.steps < 2:
            raise SlimdiffError(f"steps must be ≥ 2 (got {self.steps})")
        check_forecast_order(self.forecast_order)
        if self.iterations < 1 or self.batch_size < 1 or self.noises < self.batch_size:
            raise SlimdiffError("iterations and batch_size must be ≥ 1, and noises ≥ batch_size")
        if self.lr <= 0 or self.alpha < 0 or not 0 < self.threshold <= 1 or not 0 <= self.tolerance < 0.5:
            raise SlimdiffError("lr must be > 0, alpha ≥ 0, threshold in (0, 1] and tolerance in [0, 0.5)")

    def budget(self) -> dict[str, float]:
        return self.latency_budget() if self.target_macs is None else {"sampling_macs": self.target_macs}

    @property
    def limit(self) -> float:
        """The most a table may keep: the target and its tolerance (the always-run stem and head cost a little)."""
        return self.target_macs * (1 + self.tolerance)


def _base_table(adapter: Adapter, config: SkipConfig, schedule: dict[str, Any] | None) -> SkipTable:
    """The all-compute table of the configured sampler (over the noise `schedule`), granularity and forecast order."""
    sched = make_scheduler(config.scheduler, schedule)
    sched.set_timesteps(config.steps)
    units = skip_units(adapter, config.granularity)
    timesteps, settings = [float(t) for t in sched.timesteps], sampler_settings(sched)
    return SkipTable.full(type(sched).__name__, timesteps, units, config.granularity, settings, config.forecast_order)


def full_steps(steps: int, count: int, schedule: str, center: float = 0.3, power: float = 1.4) -> list[int]:
    """`count` steps (step 0 and the last among them) that compute everything: evenly spaced, or — DeepCache's
    non-uniform schedule, reconstructed — denser around `center` (a fraction of the run), by a power law."""
    if count >= steps:
        return list(range(steps))
    if schedule == "uniform" or count < 3:
        return sorted({math.floor(i * steps / count) for i in range(count)})
    middle = round(center * (steps - 1))
    while power > 1.0:
        xs = torch.linspace(-1, 1, count).tolist()
        picked = {
            round(middle + math.copysign(abs(x) ** power, x) * (middle if x < 0 else steps - 1 - middle)) for x in xs
        }
        if len(picked) == count:
            return sorted(picked)
        power -= 0.05  # too dense to stay distinct: flatten the law
    return sorted({math.floor(i * steps / count) for i in range(count)})


def interval_table(base: SkipTable, full: list[int], partial: list[bool]) -> SkipTable:
    table = copy.deepcopy(base)
    table.compute = [[True] * len(base.units) if s in full else list(partial) for s in range(len(base.timesteps))]
    return table


def deepcache_branches(base: SkipTable) -> dict[str, list[bool]]:
    """DeepCache's partial steps, one per skip branch k: the down-side units up to the k-th one whose output is a skip
    tensor, and the up-side units from the first one that consumes one of them onward; everything deeper is reused
    from the last full step."""
    names, units = base.units, base.skip_units
    down = [i for i, n in enumerate(names) if n.startswith("down_blocks")]
    up = [u for u in units if u.name.startswith("up_blocks")]
    producers = [i for i in down if any(names[i] in u.inputs for u in up)]  # the units whose output is a skip tensor
    branches = {}
    for k, last in enumerate(producers):
        shallow = {names[i] for i in down if i <= last}
        first = min(i for i, u in enumerate(units) if u in up and shallow & set(u.inputs))
        computed = shallow | {n for n in names[first:] if n.startswith("up_blocks")}
        branches[f"branch {k}"] = [n in computed for n in names]
    return branches


def _baseline_tables(
    adapter: Adapter, config: SkipConfig, base: SkipTable, costs: UnitCosts
) -> list[tuple[float, SkipTable, str]]:
    """Every deepcache or step-reuse table of the sampler: (kept fraction of the sampling MACs, table, how)."""
    steps = len(base.timesteps)
    partials: dict[str, list[bool]] = {"whole step": [False] * len(base.units)}
    if config.method == "deepcache":
        if adapter.family == "dit":
            raise SlimdiffError(
                "deepcache needs a U-Net (its cache sits on the skip branches); for a DiT use step-reuse or dip-go"
            )
        partials = deepcache_branches(base)
    tables = []
    for label, partial in partials.items():
        for count in range(1, steps + 1):
            full = full_steps(steps, count, config.schedule)
            table = interval_table(base, full, partial)
            tables.append(
                (kept_fraction(table, costs), table, f"{label}, {len(full)} full steps of {steps} ({config.schedule})")
            )
    return tables


def _baseline(adapter: Adapter, config: SkipConfig, base: SkipTable, costs: UnitCosts) -> tuple[SkipTable, str]:
    """The deepcache or step-reuse table that keeps the most MACs at or below the target."""
    tables = _baseline_tables(adapter, config, base, costs)
    fitting = [(kept, table, how) for kept, table, how in tables if kept <= config.limit]
    if not fitting:
        raise SlimdiffError(
            f"{config.method} cannot keep as little as {config.target_macs} of the sampling MACs of "
            f"{len(base.timesteps)} steps (its least is {min(kept for kept, _, _ in tables):.3f}); raise target_macs"
        )
    _, table, how = max(fitting, key=lambda entry: entry[0])
    return table, how


#: |keep − skip logit| the pruner starts from: keep probability 0.95 (kept) or 0.05 (reused, warm start)
KEEP_LOGIT = 3.0


class Pruner(nn.Module):
    """DiP-GO's pruner: learnable queries, one per (step, unit), through self-attention and an MLP head to
    (skip, keep) logits plus a fixed prior: ±KEEP_LOGIT from the table `start` (a warm start), or +KEEP_LOGIT
    everywhere (the paper's start: the full model)."""

    def __init__(
        self, steps: int, units: int, dim: int = 64, heads: int = 4, start: torch.Tensor | None = None
    ) -> None:
        super().__init__()
        self.steps, self.units = steps, units
        self.queries = nn.Parameter(torch.randn(steps * units, dim))  # distinct from the start
        layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=False)
        self.head = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, 2))
        nn.init.normal_(self.head[-1].weight, std=1e-3)
        nn.init.zeros_(self.head[-1].bias)
        # the keep-minus-skip logit the search starts from: everything kept, or a given table (a warm start)
        prior = torch.full((steps, units), KEEP_LOGIT) if start is None else KEEP_LOGIT * (2 * start.float() - 1)
        self.register_buffer("prior", prior.flatten())

    def forward(self) -> torch.Tensor:
        """Keep probabilities, `(steps, units)`."""
        logits = self.head(self.encoder(self.queries[None]))[0]
        return torch.sigmoid(logits[:, 1] - logits[:, 0] + self.prior).view(self.steps, self.units)


def expected_kept(keep: torch.Tensor, table: SkipTable, costs: UnitCosts) -> torch.Tensor:
    """Expected kept fraction of the sampling MACs for keep probabilities `(steps, units)`; a unit runs only if it
    is kept and some consumer runs (step 0 runs everything)."""
    users = consumers(table.skip_units)
    index = {name: i for i, name in enumerate(table.units)}
    macs = torch.tensor([costs.units[n] for n in table.units], dtype=keep.dtype) / costs.total
    live: list[torch.Tensor] = [keep[1:, 0]] * len(table.units)
    for i in reversed(range(len(table.units))):
        feeds = users[table.units[i]]
        needed = 1 - torch.stack([1 - live[index[c]] for c in feeds]).prod(0) if feeds else 1.0
        live[i] = keep[1:, i] * needed
    per_step = costs.rest / costs.total + (torch.stack(live, dim=1) * macs).sum(1)
    return (1 + per_step.sum()) / keep.shape[0]


def _trajectory(
    adapter: Adapter,
    config: SkipConfig,
    schedule: dict[str, Any],
    noise: torch.Tensor,
    cond: torch.Tensor | None,
    null: torch.Tensor | None,
    seed: int,
    gates: torch.Tensor | None = None,
    units: Sequence[str] = (),
) -> torch.Tensor:
    """The final sample (latents, for latent models) of one sampling run from `noise` (gated by `gates[step, unit]`
    when given; then, with
    `config.checkpointing == "steps"`, each step's activations are recomputed in the backward pass, not kept)."""
    state = _state_of(adapter.model)
    sched = make_scheduler(config.scheduler, schedule)
    sched.set_timesteps(config.steps)
    generator = torch.Generator().manual_seed(seed)
    x = noise * sched.init_noise_sigma
    if state is not None:
        state.reset()
    cache: dict[str, Any] = {}
    for step, t in enumerate(sched.timesteps):
        x_in, t_in = sched.scale_model_input(x, t), t.expand(x.shape[0])
        if gates is None:
            eps = guided(adapter, x_in, t_in, cond, null, config.guidance_scale)
        else:
            assert state is not None
            eps, cache = _gated_step(adapter, config, state, x_in, t_in, cond, null, gates[step], units, cache)
        x = sched.step(eps, t, x, generator=generator).prev_sample
    if state is not None:
        state.gates = None
        state.cache_in, state.cache_out = {}, {}
        state.reset()
    return x


def _gated_step(
    adapter: Adapter,
    config: SkipConfig,
    state: _RunState,
    x: torch.Tensor,
    t: torch.Tensor,
    cond: torch.Tensor | None,
    null: torch.Tensor | None,
    gate_row: torch.Tensor,
    units: Sequence[str],
    cache: dict[str, Any],
) -> tuple[torch.Tensor, dict[str, Any]]:
    """One gated denoiser call: ε and every unit's output (the next step's cache). The cache goes in and comes out
    as explicit tensors, so a checkpointed call recomputed in the backward pass sees exactly this step's inputs."""
    leaves, spec = tree_flatten(cache)
    out_spec: list[TreeSpec] = []

    def call(x: torch.Tensor, gate_row: torch.Tensor, *leaves: Any) -> tuple[torch.Tensor, ...]:
        state.gates = {name: gate_row[i] for i, name in enumerate(units)}
        state.gated_t = float(t.flatten()[0])
        state.cache_in, state.cache_out = tree_unflatten(list(leaves), spec), {}
        eps = guided(adapter, x, t, cond, null, config.guidance_scale)
        out_leaves, made = tree_flatten(state.cache_out)
        out_spec[:] = [made]
        return (eps, *out_leaves)

    if config.checkpointing == "steps" and torch.is_grad_enabled():
        outputs = torch.utils.checkpoint.checkpoint(call, x, gate_row, *leaves, use_reentrant=False)
    else:
        outputs = call(x, gate_row, *leaves)
    return outputs[0], tree_unflatten(list(outputs[1:]), out_spec[0])


def postprocess(
    skip_probs: torch.Tensor, base: SkipTable, costs: UnitCosts, target: float, tolerance: float, threshold: float
) -> SkipTable:
    """METHODS §4: from the output side to the input side, skip each unit's steps with the highest skip probability
    above the threshold (never step 0), lowering the threshold by 0.05 per sweep, until the table keeps at most
    `target × (1 + tolerance)` of the sampling MACs. A skip that would undershoot `target × (1 − tolerance)` is
    passed over (a smaller unit may land closer); only if no table lands in that band is the first one below taken.
    """
    table = copy.deepcopy(base)
    limit, floor = target * (1 + tolerance), target * (1 - tolerance)
    for strict in (True, False):
        sweep = threshold
        while sweep > -0.05:
            for i in reversed(range(len(table.units))):
                for step in sorted(range(1, len(table.timesteps)), key=lambda s: -float(skip_probs[s, i])):
                    if float(skip_probs[step, i]) < sweep:
                        break
                    if not table.compute[step][i]:
                        continue
                    table.compute[step][i] = False
                    kept = kept_fraction(table, costs)
                    if kept <= limit and (kept >= floor or not strict):
                        return table
                    if strict and kept < floor:
                        table.compute[step][i] = True
            sweep -= 0.05
    raise SlimdiffError(f"no table keeps as little as {limit:.3f} of the sampling MACs; raise target_macs")


@dataclass
class _Noises:
    """Fixed noises and conditions for search or validation, in batches, with the full sampler's final images
    (decoded by `decode` for latent models)."""

    noise: torch.Tensor
    cond: torch.Tensor | None
    null: torch.Tensor | None
    batches: list[slice]
    seed: int
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None
    references: dict[int, torch.Tensor] = field(default_factory=dict)

    def part(self, value: torch.Tensor | None, batch: slice) -> torch.Tensor | None:
        return None if value is None else value[batch]

    def run(
        self, adapter: Adapter, config: SkipConfig, schedule: dict[str, Any], k: int, **gating: Any
    ) -> torch.Tensor:
        """The final images of batch `k` in [-1, 1] (with the model's table, or gated by `gates`/`units`)."""
        b = self.batches[k]
        cond, null = self.part(self.cond, b), self.part(self.null, b)
        final = _trajectory(adapter, config, schedule, self.noise[b], cond, null, self.seed + k, **gating)
        return (final if self.decode is None else self.decode(final)).clamp(-1, 1)


def _batches(config: SkipConfig) -> list[slice]:
    """The search's noise batches: `noises` noises in whole batches of `batch_size`."""
    step = config.batch_size
    return [slice(i, i + step) for i in range(0, config.noises - step + 1, step)]


def _noises(
    adapter: Adapter, config: SkipConfig, data: Calibration, seed: int, used: Sequence[int] | None = None
) -> _Noises:
    """`config.noises` noises (and conditions drawn from the calibration data) from `seed`, with the references of
    the batches in `used` (default: all)."""
    generator = torch.Generator().manual_seed(seed)
    size = adapter.sample_size
    noise = torch.randn(config.noises, adapter.in_channels, size, size, generator=generator)
    cond = null = None
    if adapter.cond_kind != "none":
        picks = torch.randint(0, len(data.dataset), (config.noises,), generator=generator)
        cond = data.cond_for(torch.tensor([data.dataset[int(i)][1] for i in picks]))
        if config.guidance_scale != 1.0:
            null = null_condition(adapter, cond, data.uncond_embedding)
    noises = _Noises(noise, cond, null, _batches(config), seed, data.decode)
    with torch.no_grad():
        for k in range(len(noises.batches)) if used is None else used:
            noises.references[k] = noises.run(adapter, config, data.schedule, k)
    return noises


def _consistency(config: SkipConfig, final: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    if config.loss == "ssim":
        return 1 - structural_similarity_index_measure(final, reference, data_range=2.0)
    return F.mse_loss(final, reference)


def held_out_noises(adapter: Adapter, config: SkipConfig, data: Calibration) -> _Noises:
    """Noises (and conditions) the search never sees (seed + 1), with the full sampler's final samples."""
    return _noises(adapter, config, data, config.seed + 1)


def held_out_consistency(
    adapter: Adapter, config: SkipConfig, data: Calibration, noises: _Noises, tables: dict[str, SkipTable]
) -> dict[str, float]:
    """Each table's mean consistency loss against the full sampler on `noises`."""
    model = copy.deepcopy(adapter.model).eval()
    skipping = adapter_for(model)
    losses = {}
    for name, table in tables.items():
        attach(model, table)
        with torch.no_grad():
            values = [
                _consistency(config, noises.run(skipping, config, data.schedule, k), reference).item()
                for k, reference in noises.references.items()
            ]
        losses[name] = round(sum(values) / len(values), 6)
    return losses


@dataclass
class Selection:
    """The table dip-go ships for one budget: the search's, or step reuse where that is more consistent with the
    full sampler on held-out noises (`held_out`: each candidate's consistency loss there)."""

    table: SkipTable
    how: str
    selected: str
    held_out: dict[str, float]

    def record(self) -> dict[str, Any]:
        return {"selected": self.selected, "held_out": self.held_out}


def select(
    adapter: Adapter,
    config: SkipConfig,
    data: Calibration,
    base: SkipTable,
    costs: UnitCosts,
    skip_probs: torch.Tensor,
    noises: _Noises | None,
) -> Selection:
    """Post-process the search's probabilities to the budget; with `fallback` step-reuse, compare the table with
    step reuse at the same budget — reusing (`step-reuse`) and, for a forecasting table, forecasting with its order
    (`step-reuse-forecast`) — on the held-out `noises` and keep the most consistent one (the search's on a tie)."""
    table = postprocess(skip_probs, base, costs, config.target_macs, config.tolerance, config.threshold)
    how = f"dip-go search, {config.iterations} iterations"
    if config.fallback == "none" or noises is None:
        return Selection(table, how, "dip-go", {})
    try:
        reuse, reuse_how = _baseline(adapter, dataclasses.replace(config, method="step-reuse"), base, costs)
    except SlimdiffError:  # step reuse cannot keep this little: nothing to compare with
        return Selection(table, how, "dip-go", {})
    candidates = {"dip-go": table, "step-reuse": dataclasses.replace(reuse, forecast_order=0)}
    if reuse.forecast_order:
        candidates["step-reuse-forecast"] = reuse
    first = {}  # one held-out run per distinct table (the search may end where it started)
    for name, candidate in candidates.items():
        first.setdefault(json.dumps(candidate.to_json()), name)
    scored = held_out_consistency(adapter, config, data, noises, {name: candidates[name] for name in first.values()})
    losses = {name: scored[first[json.dumps(candidate.to_json())]] for name, candidate in candidates.items()}
    best = min(losses, key=losses.__getitem__)
    if best == "dip-go":
        return Selection(table, how, "dip-go", losses)
    order = candidates[best].forecast_order
    why = "more consistent on held-out noises than the dip-go search's table"
    why += f" ({losses[best]:.4f} vs {losses['dip-go']:.4f})"
    return Selection(candidates[best], f"step reuse (forecast order {order}), {reuse_how}: {why}", best, losses)


#: The search writes a resumable checkpoint every this many optimizer steps (where the calibration allows).
SEARCH_CHECKPOINT_EVERY = 10
SEARCH_STATE = "dip-go-search"


def _search_settings(config: SkipConfig, base: SkipTable, start: SkipTable | None, processes: int) -> dict[str, Any]:
    """Everything a search's trajectory depends on: a checkpoint made with other settings is not resumed."""
    settings = {
        "config": dataclasses.asdict(config),
        "units": base.units,
        "timesteps": base.timesteps,
        "start": None if start is None else start.compute,
        "processes": processes,
    }
    return json.loads(json.dumps(settings))


def _save_search(
    folder: Path,
    done: int,
    pruner: Pruner,
    optimizer: torch.optim.Optimizer,
    cosine: Any,
    history: list,
    settings: dict,
) -> None:
    tensors, param_groups = optimizer_tensors(optimizer)
    with atomic_dir(folder) as tmp:
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in pruner.state_dict().items()}, tmp / "pruner.safetensors"
        )
        save_file(tensors, tmp / "optimizer.safetensors")
        state = {"done": done, "history": history, "lr_scheduler": cosine.state_dict(), "settings": settings}
        atomic_write_json(tmp / "state.json", state | {"param_groups": param_groups})


def _resume_search(
    folder: Path, pruner: Pruner, optimizer: torch.optim.Optimizer, cosine: Any, settings: dict, log: Log
) -> tuple[int, list[dict[str, float]]]:
    """The optimizer steps done and the history of a checkpointed search with the same settings (else 0, [])."""
    if not (folder / "state.json").is_file():
        return 0, []
    state = read_json(folder / "state.json", "search checkpoint")
    if state.get("settings") != settings:
        log(f"{folder}: a search with other settings; starting over")
        return 0, []
    pruner.load_state_dict(load_file(folder / "pruner.safetensors"))
    load_optimizer_tensors(optimizer, load_file(folder / "optimizer.safetensors"), state["param_groups"])
    cosine.load_state_dict(state["lr_scheduler"])
    log(f"resuming the dip-go search after {state['done']} of {settings['config']['iterations']} steps")
    return state["done"], state["history"]


def search(
    adapter: Adapter,
    config: SkipConfig,
    data: Calibration,
    base: SkipTable,
    costs: UnitCosts,
    log: Log,
    start: SkipTable | None = None,
) -> tuple[torch.Tensor, list[dict[str, float]]]:
    """Train the pruner on the gated vs full trajectories, from everything kept or from the table `start`; returns
    the skip probabilities `(steps, units)`.

    Under `accelerate launch` each process runs its own noise batches and the pruner's gradients are averaged, so
    every process holds the same pruner. With `data.work_dir` set, the search checkpoints there (pruner, Adam and
    schedule state; safetensors + JSON, atomically) and an interrupted search with the same settings resumes.
    """
    processes = PartialState(cpu=not torch.cuda.is_available())  # as training: gloo processes on CPU machines
    rank, world = processes.process_index, processes.num_processes
    torch.manual_seed(config.seed)
    count = len(_batches(config))
    used = sorted({(it * world + rank) % count for it in range(min(config.iterations, count))})
    noises = _noises(adapter, config, data, config.seed, used)
    model = copy.deepcopy(adapter.model).eval().requires_grad_(False)
    attach(model, base)
    gated = adapter_for(model)
    pruner = Pruner(len(base.timesteps), len(base.units), start=None if start is None else torch.tensor(start.compute))
    optimizer = torch.optim.Adam(pruner.parameters(), lr=config.lr)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, config.iterations)
    settings = _search_settings(config, base, start, world)
    folder = None if data.work_dir is None else data.work_dir / SEARCH_STATE
    done, history = (0, []) if folder is None else _resume_search(folder, pruner, optimizer, cosine, settings, log)
    for it in range(done, config.iterations):
        k = (it * world + rank) % count
        keep = pruner()
        hard = (keep > 0.5).to(keep.dtype)
        gates = hard + keep - keep.detach()  # straight-through: hard forward, soft gradient
        gates = torch.cat([torch.ones_like(gates[:1]), gates[1:]])
        final = noises.run(gated, config, data.schedule, k, gates=gates, units=base.units)
        consistency = _consistency(config, final, noises.references[k])
        expected = expected_kept(keep, base, costs)
        loss = consistency + (config.alpha * expected if expected.item() > config.target_macs else 0.0)
        optimizer.zero_grad()
        loss.backward()
        if world > 1:
            for parameter in pruner.parameters():
                parameter.grad = reduce(parameter.grad, "mean")
            consistency = reduce(consistency.detach(), "mean")
        optimizer.step()
        cosine.step()
        if it % 10 == 0 or it == config.iterations - 1:
            row = {
                "iteration": it,
                "consistency": consistency.detach().item(),
                "expected_kept": expected.detach().item(),
                "hard_skipped": int((hard[1:] == 0).sum()),
            }
            history.append(row)
            log(f"search {it:4d}: 1-ssim/mse {row['consistency']:.4f}, expected kept {row['expected_kept']:.3f}")
        if folder is not None and (it + 1) % SEARCH_CHECKPOINT_EVERY == 0 and processes.is_main_process:
            _save_search(folder, it + 1, pruner, optimizer, cosine, history, settings)
    with torch.no_grad():
        skip_probs = 1 - pruner()
    return skip_probs, history


def _fit_latency(
    adapter: Adapter,
    config: SkipConfig,
    base: SkipTable,
    costs: UnitCosts,
    table_for: Callable[[SkipConfig], tuple[SkipTable, str]],
    log: Log,
) -> latency.LatencyFit[tuple[SkipTable, str]]:
    """The table whose whole sampling run at `latency_batch` meets the latency budget (engines/latency.py): each
    trial a table for a sampling-MACs fraction, attached to a copy of the model and timed."""
    timed = copy.deepcopy(adapter.model).eval()
    timed_adapter = adapter_for(timed)

    def measure(table: SkipTable | None) -> latency.LatencyStats:
        if table is not None:
            attach(timed, table)
        try:
            return latency.time_sampling(
                timed_adapter,
                config.latency_batch,
                steps=config.steps,
                scheduler=config.scheduler,
                guidance_scale=config.guidance_scale,
            )
        finally:
            detach(timed)

    if config.method == "deepcache":
        lowest = min(kept for kept, _, _ in _baseline_tables(adapter, config, base, costs))
    else:  # every unit reused after step 0
        lowest = kept_fraction(interval_table(base, [0], [False] * len(base.units)), costs)

    def build(fraction: float) -> tuple[tuple[SkipTable, str], float]:
        table, how = table_for(config.at_macs(fraction))
        return (table, how), kept_fraction(table, costs)

    return latency.fit_latency(
        config,
        measure(None),
        build,
        lambda made: measure(made[0]),
        lowest=lowest,
        unit="sampling MACs",
        engine=config.method,
        log=log,
    )


def compress(adapter: Adapter, config: SkipConfig, data: Calibration, *, log: Log = no_log) -> Result:
    """Find a skip table for the configured sampler; the model is returned untouched, the table as an artifact."""
    config.validate()
    start = time.perf_counter()
    base = _base_table(adapter, config, data.schedule)
    costs = unit_costs(adapter.model, base.units)
    record: dict[str, Any] = {
        "method": config.method,
        "granularity": config.granularity,
        "forecast_order": config.forecast_order,
        "units": len(base.units),
    }
    skip_probs: torch.Tensor | None = None
    noises: _Noises | None = None

    def table_for(budget: SkipConfig) -> tuple[SkipTable, str]:
        """The table for a sampling-MACs budget (dip-go: post-processing the one search's probabilities)."""
        nonlocal skip_probs, noises
        if config.method != "dip-go":
            return _baseline(adapter, budget, base, costs)
        if skip_probs is None:  # the search runs once, for the first budget asked
            start = None
            if config.start == "step-reuse":
                try:
                    start, _ = _baseline(adapter, dataclasses.replace(budget, method="step-reuse"), base, costs)
                except SlimdiffError as error:  # reusing every unit after step 0 keeps no less: dip-go cannot either
                    raise SlimdiffError(f"dip-go's warm start: {error}") from None
            skip_probs, history = search(adapter, budget, data, base, costs, log, start=start)
            record.update(
                search_history=history,
                skip_probabilities=[[round(float(p), 4) for p in row] for row in skip_probs],
            )
            if config.fallback != "none":
                noises = held_out_noises(adapter, config, data)
        chosen = select(adapter, budget, data, base, costs, skip_probs, noises)
        record.update(chosen.record())
        return chosen.table, chosen.how

    fit = None
    if config.target_latency_ms is None:
        table, how = table_for(config)
    else:
        fit = _fit_latency(adapter, config, base, costs, table_for, log)
        table, how = fit.product
        record["latency"] = fit.record()
    kept = kept_fraction(table, costs)
    seconds = time.perf_counter() - start
    per_step = ["".join("1" if c else "." for c in row) for row in table.effective()]
    record |= {"kept_sampling_macs": kept, "how": how, "search_seconds": round(seconds, 1), "effective": per_step}
    log(f"{how}: keeps {kept:.3f} of the sampling MACs of {table.described()}")
    return Result(
        model=adapter.model,
        achieved={"sampling_macs": kept} | (fit.achieved() if fit else {}),
        record=record,
        summary=f"skip table ({config.method}, {config.granularity}, forecast order {config.forecast_order}): "
        f"{kept:.1%} of the sampling MACs of {base.scheduler} with {config.steps} steps; {how}"
        + (fit.summary() if fit else ""),
        artifacts={ARTIFACT: table.to_json()},
        seconds=seconds,
    )


def apply_skip(
    model: nn.Module, table_or_config: SkipTable | dict[str, Any] | SkipConfig, schedule: dict[str, Any] | None = None
) -> SkipTable:
    """Make a diffusers model (UNet2DModel, UNet2DConditionModel, DiTTransformer2DModel, …) skip units at sampling
    time, in the style of diffusers' `apply_first_block_cache(model, config)`; returns the table attached.

    `table_or_config` is a skip table (or its JSON, e.g. `skip_table.json` of a saved model) or a `SkipConfig` of a
    table that needs no search — `method` step-reuse or deepcache at `target_macs` — made for the sampler over
    `schedule` (the model's training noise-scheduler config; default diffusers' DDPM schedule). A dip-go table is
    searched on data: `slimdiff.compress(model, SkipConfig(...), data)`. `remove_skip(model)` undoes it."""
    if isinstance(table_or_config, SkipConfig):
        config = table_or_config
        config.validate()
        if config.method == "dip-go" or config.target_macs is None:
            raise SlimdiffError(
                "apply_skip makes step-reuse and deepcache tables at a target_macs; a dip-go table or a latency "
                "budget is searched on data: slimdiff.compress(model, SkipConfig(...), data)"
            )
        adapter = adapter_for(model)
        base = _base_table(adapter, config, schedule)
        table, _ = _baseline(adapter, config, base, unit_costs(model, base.units))
    else:
        table = table_or_config if isinstance(table_or_config, SkipTable) else SkipTable.from_json(table_or_config)
    attach(model, table)
    return table


def remove_skip(model: nn.Module) -> None:
    """Undo `apply_skip` (or a table attached on load): the model computes every unit again."""
    detach(model)


register_artifact(ARTIFACT, attach)
ENGINE = register(
    Engine(
        "skip",
        SkipConfig,
        compress,
        help="Timestep-wise block skipping (DiP-GO, DeepCache, step reuse): a skip table for one sampler, saved with "
        "the model and honoured by diffusers pipelines. " + FEWER_STEPS_ADVICE,
        keeps_model=True,
    )
)
