"""DiP-GO: learned, timestep-wise block skipping — a static skip table that plain diffusers pipelines honour.

Zhu et al., *DiP-GO: A Diffusion Pruner via Few-step Gradient Optimization* (NeurIPS 2024); summary in
docs/methods.md and docs/skipping.md. The product is a table, not new weights: for one sampler (scheduler class, its
trajectory settings, number of steps, its timesteps), whether each unit is computed or reused at each step.

One module per concept, each importing only those before it:

- `table` — units (`model_units`), `SkipTable`, `UnitCosts` / `unit_costs`, kept fractions;
- `runtime` — the `diffusers.hooks` that honour a table (`attach`, `detach`, `table_of`, `apply_skip`,
  `remove_skip`, `compile_units`) and its `SamplingPlan`; loading a model with a skip table imports only `table`
  and `runtime`;
- `config` — `SkipConfig`, the engine's settings;
- `baselines` — DeepCache and step-reuse tables, through the same runtime;
- `dipgo` — the search: `GateNetwork`, the gated trajectory, post-processing, held-out choice, checkpoints;
- `engine` — `compress` (budgets in sampling MACs or measured latency) and the registered engine.

The names below are re-exported here; those of `config`, `baselines`, `dipgo` and `engine` are imported on first
use, so that `import slimdiff.engines.skip` stays as light as loading a model with a table.
"""

from __future__ import annotations

import importlib
from typing import Any

from slimdiff.engines.skip.runtime import (
    ARTIFACT,
    apply_skip,
    attach,
    compile_units,
    detach,
    remove_skip,
    run_state,
    table_of,
)
from slimdiff.engines.skip.table import (
    FORECAST_ORDERS,
    GRANULARITIES,
    SkipTable,
    SkipUnit,
    UnitCosts,
    check_forecast_order,
    kept_fraction,
    kept_fractions,
    model_units,
    unit_costs,
)

_LAZY = {
    "SkipConfig": "config",
    "Start": "config",
    "base_table": "baselines",
    "baseline_table": "baselines",
    "deepcache_branches": "baselines",
    "full_steps": "baselines",
    "interval_table": "baselines",
    "GateNetwork": "dipgo",
    "Gating": "dipgo",
    "NoiseSet": "dipgo",
    "SEARCH_STATE": "dipgo",
    "TableChoice": "dipgo",
    "choose_table": "dipgo",
    "expected_kept": "dipgo",
    "held_out_consistency": "dipgo",
    "held_out_noise_set": "dipgo",
    "postprocess": "dipgo",
    "search": "dipgo",
    "trajectory": "dipgo",
    "ENGINE": "engine",
    "compress": "engine",
}

__all__ = [
    "ARTIFACT",
    "FORECAST_ORDERS",
    "GRANULARITIES",
    "SkipTable",
    "SkipUnit",
    "UnitCosts",
    "apply_skip",
    "attach",
    "check_forecast_order",
    "compile_units",
    "detach",
    "kept_fraction",
    "kept_fractions",
    "model_units",
    "remove_skip",
    "run_state",
    "table_of",
    "unit_costs",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*__all__, *globals()})
