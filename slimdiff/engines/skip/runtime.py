"""The skip-table runtime: a table attached to a diffusers model through `diffusers.hooks`.

`attach(model, table)` registers one hook on the model, which works out the step from the timestep it is called
with, and one per unit, which returns the unit's output from the last step it ran when the table says "reuse" — or,
with the table's `forecast_order` 1 or 2, a Taylor forecast of it from its last 2 or 3 computed steps over the
actual timestep gaps (Liu et al., TaylorSeer, ICCV 2025). Step 0 computes everything; a unit whose every consumer is
skipped at a step is dead and skipped too. Several calls at one timestep (separate conditional and unconditional
calls) each get their own cache slot; a doubled guidance batch is one call. A new sampling run starts whenever the
table's first timestep comes again; a timestep the table was not made for is refused, and so is, at the start of
each run, the scheduler of a diffusers pipeline calling the model (found up the call stack) when its class or
trajectory settings are not the table's (DDPM and DDIM share their "leading" timesteps). The table declares its
`SamplingPlan` (`slimdiff.artifacts`): per step, the fraction of a full call's MACs it runs, counted on first ask.

This is all that loading a model with a skip table imports (with `table`): no search, no baselines.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from diffusers import DiffusionPipeline
from diffusers.hooks import HookRegistry, ModelHook
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from slimdiff.artifacts import SamplingPlan, register_artifact, sampler_mismatch, sampler_refusal, set_sampling_plan
from slimdiff.engines.skip.table import SkipTable, kept_fractions, model_units, unit_costs
from slimdiff.errors import SlimdiffError
from slimdiff.models import adapter_for
from slimdiff.models.base import get_submodule

if TYPE_CHECKING:
    from slimdiff.engines.skip.config import SkipConfig

ARTIFACT = "skip_table"
STEP_HOOK = "slimdiff_skip_step"
UNIT_HOOK = "slimdiff_skip_unit"


class RunState:
    """Where the sampling run is: step, call slot within the step, what runs, and each slot's cached outputs."""

    def __init__(self, table: SkipTable) -> None:
        self.table = table
        self.live = table.effective()
        self.step = -1
        self.slot = 0
        self.slots: int | None = None  # calls per step, known once step 1 is reached
        self.caches: list[dict[str, UnitHistory]] = []
        self.active = False
        self.paused = False

    def reset(self) -> None:
        """Forget the run: the next call starts a new one."""
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

    def __init__(self, state: RunState) -> None:
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


class UnitHistory:
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

    def __init__(self, state: RunState, name: str, index: int) -> None:
        super().__init__()
        self.state, self.name, self.index = state, name, index
        self.compiled: Callable[..., Any] | None = None  # the unit's forward under torch.compile (`compile_units`)

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        state = self.state
        compute = self.compiled or self.fn_ref.original_forward
        if not state.active:
            return compute(*args, **kwargs)
        history = state.caches[state.slot].get(self.name)
        t = state.table.timesteps[state.step]
        if history is not None and not state.live[state.step][self.index]:
            return history.forecast(t)
        if history is None:
            history = state.caches[state.slot][self.name] = UnitHistory(state.table.forecast_order)
        output = compute(*args, **kwargs)
        history.add(t, output)
        return output


def run_state(model: nn.Module) -> RunState | None:
    """Where the sampling run of a model with a skip table is (None without a table)."""
    registry = getattr(model, "_diffusers_hook", None)
    hook = registry.get_hook(STEP_HOOK) if registry is not None else None
    return hook.state if hook is not None else None


def table_of(model: nn.Module) -> SkipTable | None:
    """The skip table attached to a model, if any."""
    state = run_state(model)
    return state.table if state is not None else None


def attach(model: nn.Module, payload: SkipTable | dict[str, Any]) -> None:
    """Attach a skip table to a diffusers model through `diffusers.hooks` (replacing any table attached before)."""
    table = payload if isinstance(payload, SkipTable) else SkipTable.from_json(payload)
    adapter = adapter_for(model)
    valid = [u.name for u in model_units(adapter, table.granularity)]
    unknown = [name for name in table.units if name not in valid]
    if unknown:
        raise SlimdiffError(f"the skip table names '{unknown[0]}', which is no {table.granularity} unit of this model")
    detach(model)
    state = RunState(table)
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
    registry.remove_hook(UNIT_HOOK, recurse=True)


@contextmanager
def _paused(model: nn.Module) -> Iterator[None]:
    """The table's `SamplingPlan.bypass`: inside the block, a model with a skip table computes every unit and keeps
    no state (`slimdiff.artifacts.full_compute`: timing or counting one call)."""
    state = run_state(model)
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
        bypass=_paused,
        details={"skip_granularity": table.granularity},
        settings=table.settings,
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
    if isinstance(table_or_config, SkipTable):
        table = table_or_config
    elif isinstance(table_or_config, dict):
        table = SkipTable.from_json(table_or_config)
    else:  # a table made here, without a search (the baselines are imported only for this)
        from slimdiff.engines.skip.baselines import baseline_for

        table = baseline_for(model, table_or_config, schedule)
    attach(model, table)
    return table


def compile_units(model: nn.Module, **compile_options: Any) -> None:
    """Regional compilation for a model with a skip table: each unit's own computation runs under
    `torch.compile(**compile_options)`, while the table's hooks — which read the timestep and decide per step whether
    a unit runs — stay eager. Compiling the whole model instead puts that per-step decision inside the graph: a graph
    break at the timestep read and a recompilation per step. `remove_skip` (or attaching another table) returns the
    units to eager."""
    state = run_state(model)
    if state is None:
        raise SlimdiffError("compile_units needs a model with a skip table (apply_skip or slimdiff.load)")
    for name in state.table.units:
        hook = HookRegistry.check_if_exists_or_initialize(get_submodule(model, name)).get_hook(UNIT_HOOK)
        hook.compiled = torch.compile(hook.fn_ref.original_forward, **compile_options)


def remove_skip(model: nn.Module) -> None:
    """Undo `apply_skip` (or a table attached on load): the model computes every unit again."""
    detach(model)


register_artifact(ARTIFACT, attach)
