"""Compression engines, one file each, behind one contract (`slimdiff.engines.base`).

`get_engine(name)` returns a registered engine; `register(Engine(...))` adds one. Built-in engines are imported on
first use.
"""

from slimdiff.engines.base import (
    Calibration,
    Engine,
    EngineConfig,
    Result,
    attach_artifact,
    engine_names,
    get_engine,
    register,
    register_artifact,
)

__all__ = [
    "Calibration",
    "Engine",
    "EngineConfig",
    "Result",
    "attach_artifact",
    "engine_names",
    "get_engine",
    "register",
    "register_artifact",
]
