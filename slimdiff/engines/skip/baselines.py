"""Tables that need no search, through the same runtime: DeepCache and step reuse.

`deepcache`: full steps at a uniform or non-uniform interval, otherwise only the shallow branch — the first units
and the up-side units that consume them (Ma et al., DeepCache, CVPR 2024). `step-reuse`: full steps at an interval,
otherwise the whole step's output reused. For DDIM, step reuse is the same sampler with fewer steps on a shifted
grid: a table is only worth shipping where it beats sampling with fewer steps.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn

from slimdiff.artifacts import sampler_settings
from slimdiff.engines.skip.config import SkipConfig
from slimdiff.engines.skip.table import SkipTable, UnitCosts, kept_fraction, model_units, unit_costs
from slimdiff.errors import SlimdiffError
from slimdiff.models import Adapter, adapter_for
from slimdiff.training.diffusion import make_scheduler


def base_table(adapter: Adapter, config: SkipConfig, schedule: dict[str, Any] | None) -> SkipTable:
    """The all-compute table of the configured sampler (over the noise `schedule`), granularity and forecast order."""
    sched = make_scheduler(config.scheduler, schedule)
    sched.set_timesteps(config.steps)
    units = model_units(adapter, config.granularity)
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
    """`base` computing every unit at the `full` steps and the units `partial` marks at the others."""
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


def baseline_tables(
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


def baseline_table(adapter: Adapter, config: SkipConfig, base: SkipTable, costs: UnitCosts) -> tuple[SkipTable, str]:
    """The deepcache or step-reuse table that keeps the most MACs at or below the target."""
    tables = baseline_tables(adapter, config, base, costs)
    fitting = [(kept, table, how) for kept, table, how in tables if kept <= config.limit]
    if not fitting:
        raise SlimdiffError(
            f"{config.method} cannot keep as little as {config.target_macs} of the sampling MACs of "
            f"{len(base.timesteps)} steps (its least is {min(kept for kept, _, _ in tables):.3f}); raise target_macs"
        )
    _, table, how = max(fitting, key=lambda entry: entry[0])
    return table, how


def baseline_for(model: nn.Module, config: SkipConfig, schedule: dict[str, Any] | None) -> SkipTable:
    """`apply_skip`'s table for a config: step reuse or DeepCache at `target_macs`, for the sampler over `schedule`
    (a dip-go table or a latency budget needs a search on data, and is refused here)."""
    if not isinstance(config, SkipConfig):
        raise SlimdiffError(f"apply_skip takes a SkipTable, its JSON or a SkipConfig, got {type(config).__name__}")
    config.validate()
    if config.method == "dip-go" or config.target_macs is None:
        raise SlimdiffError(
            "apply_skip makes step-reuse and deepcache tables at a target_macs; a dip-go table or a latency "
            "budget is searched on data: slimdiff.compress(model, SkipConfig(...), data)"
        )
    adapter = adapter_for(model)
    base = base_table(adapter, config, schedule)
    table, _ = baseline_table(adapter, config, base, unit_costs(model, base.units))
    return table
