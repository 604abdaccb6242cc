"""The `skip` engine: a skip table for one sampler (DiP-GO, DeepCache or step reuse), under a sampling-MACs or a
measured-latency budget; the model is returned untouched and the table travels as the `skip_table` artifact."""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable
from typing import Any

import torch

from slimdiff.engines import budgets
from slimdiff.engines.base import Calibration, Engine, Log, Result, no_log, register
from slimdiff.engines.skip.baselines import base_table, baseline_table, baseline_tables, interval_table
from slimdiff.engines.skip.config import SkipConfig
from slimdiff.engines.skip.dipgo import NoiseSet, choose_table, held_out_noise_set, search
from slimdiff.engines.skip.runtime import ARTIFACT, attach, detach
from slimdiff.engines.skip.table import SkipTable, UnitCosts, kept_fraction, unit_costs
from slimdiff.errors import SlimdiffError
from slimdiff.models import Adapter, adapter_for

FEWER_STEPS_ADVICE = (
    "A table is worth shipping only where it beats the same sampler with fewer steps at equal sampling MACs: for "
    "DDIM, whole-step reuse (--method step-reuse) IS a DDIM sampler with fewer steps, and DPM-Solver++ with fewer "
    "steps is often better still. Measure the teacher's FID against its step count first (benchmarks/skipping.py "
    "--stage curve) and make the table for the step count where the teacher is best: if DDIM or DPM-Solver++ with "
    "target-macs x steps steps is as good as the table, sample with fewer steps and ship no table. Measured on "
    "digits U-Nets, fewer steps matched every table; on a DiT, layer tables from its best step count beat fewer "
    "steps (docs/skipping.md)."
)


def _fit_latency(
    adapter: Adapter,
    config: SkipConfig,
    base: SkipTable,
    costs: UnitCosts,
    table_for: Callable[[SkipConfig], tuple[SkipTable, str]],
    schedule: dict[str, Any],
    log: Log,
) -> budgets.LatencyFit[tuple[SkipTable, str]]:
    """The table whose whole sampling run at `latency_batch` meets the latency budget (engines/budgets.py): each
    trial a table for a sampling-MACs fraction, attached to a copy of the model and timed."""
    timed = copy.deepcopy(adapter.model).eval()
    timed_adapter = adapter_for(timed)

    def measure(table: SkipTable | None) -> budgets.LatencyStats:
        if table is not None:
            attach(timed, table)
        try:
            return budgets.time_sampling(
                timed_adapter,
                config.latency_batch,
                steps=config.steps,
                scheduler=config.scheduler,
                schedule=schedule,
                guidance_scale=config.guidance_scale,
            )
        finally:
            detach(timed)

    if config.method == "deepcache":
        lowest = min(kept for kept, _, _ in baseline_tables(adapter, config, base, costs))
    else:  # every unit reused after step 0
        lowest = kept_fraction(interval_table(base, [0], [False] * len(base.units)), costs)

    def build(fraction: float) -> tuple[tuple[SkipTable, str], float]:
        table, how = table_for(config.at_macs(fraction))
        return (table, how), kept_fraction(table, costs)

    return budgets.fit_latency(
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
    base = base_table(adapter, config, data.schedule)
    costs = unit_costs(adapter.model, base.units)
    record: dict[str, Any] = {
        "method": config.method,
        "granularity": config.granularity,
        "forecast_order": config.forecast_order,
        "units": len(base.units),
    }
    skip_probs: torch.Tensor | None = None
    held_out: NoiseSet | None = None

    def table_for(budget: SkipConfig) -> tuple[SkipTable, str]:
        """The table for a sampling-MACs budget (dip-go: post-processing the one search's probabilities)."""
        nonlocal skip_probs, held_out
        if config.method != "dip-go":
            return baseline_table(adapter, budget, base, costs)
        if skip_probs is None:  # the search runs once, for the first budget asked
            start = None
            if config.start == "step-reuse":
                try:
                    start, _ = baseline_table(adapter, dataclasses.replace(budget, method="step-reuse"), base, costs)
                except SlimdiffError as error:  # reusing every unit after step 0 keeps no less: dip-go cannot either
                    raise SlimdiffError(f"dip-go's warm start: {error}") from None
            skip_probs, history = search(adapter, budget, data, base, costs, log, start=start)
            record.update(
                search_history=history,
                skip_probabilities=[[round(float(p), 4) for p in row] for row in skip_probs],
            )
            if config.fallback != "none":
                held_out = held_out_noise_set(adapter, config, data)
        chosen = choose_table(adapter, budget, data, base, costs, skip_probs, held_out)
        record.update(chosen.record())
        return chosen.table, chosen.how

    fit = None
    if config.target_latency_ms is None:
        table, how = table_for(config)
    else:
        fit = _fit_latency(adapter, config, base, costs, table_for, data.schedule, log)
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
