"""DiP-GO: learned, timestep-wise block skipping — a static skip table that plain diffusers pipelines honour.

Zhu et al., *DiP-GO: A Diffusion Pruner via Few-step Gradient Optimization* (NeurIPS 2024); ../shared/METHODS.md §4.

The product is a table, not new weights: for one sampler (scheduler class, number of steps, its timesteps), whether
each unit is computed or reused at each step.

1. Runtime. `attach(model, table)` registers `diffusers.hooks` hooks: one on the model, which works out the step
   from the timestep it is called with, and one per unit, which returns the unit's output from the last step it
   ran when the table says "reuse". Step 0 computes everything; a unit whose every consumer is skipped at a step is
   dead and skipped too. Several calls at one timestep (separate conditional and unconditional calls) each get
   their own cache slot; a doubled guidance batch is one call. A new sampling run starts whenever the table's
   first timestep comes again; a timestep the table was not made for is refused.
2. Units. `block` = `Adapter.blocks()`; `layer` = every resnet, attention and up/down-sampler inside the U-Net's
   blocks (DeepCache's branches), or the attention and the MLP of every DiT block (Learning-to-Cache; a DiT layer
   unit caches its branch output, the residual add and adaLN gate stay fresh).
3. Search (`dip-go`). A pruner network maps N×S learnable queries (units × steps) through self-attention and an MLP
   to keep/skip logits (keep initialised high). Gates are hard with a straight-through gradient; every unit runs
   and returns `g·fresh + (1−g)·cache`, so the gated trajectory from fixed noise is differentiable in the gates.
   Loss = 1 − SSIM (or MSE) between the final samples of the gated and the full trajectory + α · the expected kept
   fraction of the sampling MACs (dead units counted as dead), the sparsity term dropped once below the target.
   The denoiser is frozen. Post-processing (METHODS §4): from the output side to the input side, skip the steps
   with the highest skip probability above a threshold (0.95, lowered by 0.05 per sweep, never step 0) until the
   table keeps at most the target fraction of the sampling MACs.
4. Baselines through the same runtime: `deepcache` (full steps at a uniform or non-uniform interval, otherwise
   only the shallow branch — the first units and the up-side units that consume them) and `step-reuse` (full steps
   at an interval, otherwise the whole step's output reused). For DDIM, step reuse is the same sampler with fewer
   steps on a shifted grid: a table is only worth shipping where it beats sampling with fewer steps.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from diffusers.hooks import HookRegistry, ModelHook
from torch import nn
from torch.utils._pytree import tree_map

from slimdiff.engines.base import register_artifact
from slimdiff.errors import SlimdiffError
from slimdiff.metrics.cost import count_macs, module_macs
from slimdiff.models import Adapter, adapter_for
from slimdiff.models.base import count_params, get_submodule

Granularity = Literal["block", "layer"]
GRANULARITIES: tuple[str, ...] = ("block", "layer")
ARTIFACT = "skip_table"
STEP_HOOK = "slimdiff_skip_step"
UNIT_HOOK = "slimdiff_skip_unit"


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
    what each unit consumes (for dead-unit propagation at run time).
    """

    scheduler: str
    num_inference_steps: int
    timesteps: list[float]
    granularity: str
    units: list[str]
    inputs: list[list[str]]
    compute: list[list[bool]]

    def __post_init__(self) -> None:
        steps, width = len(self.timesteps), len(self.units)
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
        }

    @classmethod
    def full(cls, scheduler: str, timesteps: Sequence[float], units: Sequence[SkipUnit], granularity: str) -> SkipTable:
        """The table that computes every unit at every step."""
        return cls(
            scheduler=scheduler,
            num_inference_steps=len(timesteps),
            timesteps=[float(t) for t in timesteps],
            granularity=granularity,
            units=[u.name for u in units],
            inputs=[list(u.inputs) for u in units],
            compute=[[True] * len(units) for _ in timesteps],
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
        ts = self.timesteps
        shown = ", ".join(f"{t:g}" for t in ts[:3]) + (f", …, {ts[-1]:g}" if len(ts) > 3 else "")
        return f"{self.scheduler} with {self.num_inference_steps} steps (timesteps {shown})"


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
        per_unit = module_macs(model, units)
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


def sampling_summary(model: nn.Module, table: SkipTable) -> dict[str, Any]:
    """MACs of one sampling run for one image with the table and without it, and the sampler it is for."""
    costs = unit_costs(model, table.units)
    kept = kept_fractions(table, costs)
    return {
        "sampling_macs": round(sum(kept) * costs.total),
        "sampling_macs_full": costs.total * len(kept),
        "sampling_macs_fraction": sum(kept) / len(kept),
        "sampler": {"scheduler": table.scheduler, "steps": table.num_inference_steps, "timesteps": table.timesteps},
        "skip_granularity": table.granularity,
        "sampling_macs_counts": "one image, one denoiser call per step (×2 with classifier-free guidance)",
    }


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
        self.caches: list[dict[str, Any]] = []
        self.active = False
        self.paused = False
        #: search mode: unit name → gate tensor for the current call (None: follow the table)
        self.gates: dict[str, torch.Tensor] | None = None

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
            self.step += 1
            self.slot = 0
        elif self._matches(0, t):
            self.reset()
            self.step = 0
        else:
            if self.step < 0:
                where = f"expected the first, {self.table.timesteps[0]:g}"
            elif self.step + 1 < len(self.table.timesteps):
                where = f"after step {self.step} expected timestep {self.table.timesteps[self.step + 1]:g}"
            else:
                where = f"after the last step expected the first, {self.table.timesteps[0]:g}"
            raise SlimdiffError(
                f"this model's skip table was made for {self.table.described()}; got timestep {t:g} ({where}) — "
                "sample with that sampler, or load the model with artifacts=False"
            )
        while len(self.caches) <= self.slot:
            self.caches.append({})


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
        state.advance(t)
        state.active = True
        try:
            return self.fn_ref.original_forward(*args, **kwargs)
        finally:
            state.active = False


class _UnitHook(ModelHook):
    """On a unit: compute, or return the output of the last step the unit ran (per call slot)."""

    def __init__(self, state: _RunState, name: str, index: int) -> None:
        super().__init__()
        self.state, self.name, self.index = state, name, index

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        state = self.state
        if not state.active:
            return self.fn_ref.original_forward(*args, **kwargs)
        cache = state.caches[state.slot]
        if state.gates is not None:  # search: always compute, blend with the cache by the gate
            fresh = self.fn_ref.original_forward(*args, **kwargs)
            if self.name in cache:
                gate = state.gates[self.name]
                fresh = tree_map(lambda f, c: gate * f + (1 - gate) * c, fresh, cache[self.name])
            cache[self.name] = fresh
            return fresh
        if state.live[state.step][self.index] or self.name not in cache:
            cache[self.name] = self.fn_ref.original_forward(*args, **kwargs)
        return cache[self.name]


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


def detach(model: nn.Module) -> None:
    """Remove a skip table's hooks (the model computes everything again)."""
    registry = getattr(model, "_diffusers_hook", None)
    if registry is None or registry.get_hook(STEP_HOOK) is None:
        return
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


register_artifact(ARTIFACT, attach)
