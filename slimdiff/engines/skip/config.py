"""The skip engine's settings: which sampler a table is made for, its budget, and how it is found."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from slimdiff.engines.budgets import LatencyBudget, exactly_one
from slimdiff.engines.skip.table import Granularity, check_forecast_order
from slimdiff.errors import SlimdiffError
from slimdiff.settings import Scheduler

Method = Literal["dip-go", "deepcache", "step-reuse"]
Start = Literal["full", "step-reuse"]


@dataclass
class SkipConfig(LatencyBudget):
    """Which sampler the table is for, what to keep — exactly one of `target_macs` (a fraction of a full sampling
    run's MACs) or `target_latency_ms` (a whole sampling run at `latency_batch`, measured) — and how to find it."""

    target_macs: float | None = field(
        default=None, metadata={"help": "Keep this fraction of the MACs of a full sampling run (e.g. 0.25)."}
    )
    steps: int = field(default=50, metadata={"help": "Sampling steps the table is made for."})
    scheduler: Scheduler = field(
        default="ddim", metadata={"help": "Sampler the table is made for: ddim, dpm, ddpm or euler."}
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
    iterations: int = field(default=60, metadata={"help": "dip-go: optimizer steps of the gate network."})
    lr: float = field(default=0.001, metadata={"help": "dip-go: Adam learning rate of the gate network."})
    batch_size: int = field(
        default=4, metadata={"help": "dip-go: noises per optimizer step.", "flag": "--search-batch"}
    )
    noises: int = field(
        default=16, metadata={"help": "dip-go: fixed noises (and conditions) the search uses; as many held out."}
    )
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
    seed: int = field(default=0, metadata={"help": "Random seed (noises, conditions, gate network init)."})

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
