"""Compression engines, one file each, behind one contract (`slimdiff.engines.base`).

`get_engine(name)` returns a registered engine; `register(Engine(...))` adds one. Built-in engines are imported on
first use. `sampling_plan(model)` is what an attached artifact says a sampling run of the model computes.
"""

from slimdiff.engines.base import (
    Calibration,
    Engine,
    EngineConfig,
    Result,
    SamplingPlan,
    attach_artifact,
    check_sampler,
    engine_names,
    full_compute,
    get_engine,
    register,
    register_artifact,
    sampling_plan,
    set_sampling_plan,
)

__all__ = [
    "Calibration",
    "Engine",
    "EngineConfig",
    "Result",
    "SamplingPlan",
    "attach_artifact",
    "check_sampler",
    "engine_names",
    "full_compute",
    "get_engine",
    "register",
    "register_artifact",
    "sampling_plan",
    "set_sampling_plan",
]
