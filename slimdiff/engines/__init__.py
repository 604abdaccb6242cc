"""Compression engines, one module (or package) each, behind one contract (`slimdiff.engines.base`).

`get_engine(name)` returns a registered engine; `register(Engine(...))` adds one. Built-in engines are imported on
first use. What an engine's artifact does to a loaded model (re-attaching it, its sampling plan) lives in the
artifact layer below the exporter, `slimdiff.artifacts`.
"""

from slimdiff.engines.base import (
    Calibration,
    Engine,
    EngineConfig,
    Result,
    engine_names,
    get_engine,
    register,
)

__all__ = [
    "Calibration",
    "Engine",
    "EngineConfig",
    "Result",
    "engine_names",
    "get_engine",
    "register",
]
