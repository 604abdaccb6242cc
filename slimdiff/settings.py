"""Every job's settings, one dataclass each: `TrainConfig`, `KDConfig`, `FinetuneConfig`, `DeviceConfig`,
`SampleConfig`, `EvalSettings`, `CompareSettings` (each engine's config lives with its engine, on
`engines.base.EngineConfig`; `compress` takes a `DeviceConfig` beside it).

A field carries its help in `metadata["help"]`; its default is the measured best setting, named in the docs
(docs/training.md). The command line derives `--field-name` from each field (`slimdiff.cli_config`), a recipe
step takes the field names (`slimdiff.recipe_spec`), the Python API takes the dataclasses (`slimdiff.api`), and `check`
refuses a bad value in one line naming the field and its flag, so a mistake reads the same from every surface.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from slimdiff.errors import SlimdiffError

if TYPE_CHECKING:
    import torch


def flag_of(field: dataclasses.Field) -> str:
    """The command-line flag of a settings field: `--` and its name with dashes."""
    return "--" + field.name.replace("_", "-")


def literal_choices(tp: Any) -> tuple[Any, ...] | None:
    """The choices of `Literal[...]`, `Literal[...] | None` or `tuple[Literal[...], ...]`, else None."""
    if typing.get_origin(tp) is Literal:
        return typing.get_args(tp)
    options = [a for a in typing.get_args(tp) if a is not type(None) and a is not Ellipsis]
    if len(options) == 1 and typing.get_origin(options[0]) is Literal:
        return typing.get_args(options[0])
    return None


def check(settings: Any, rules: dict[str, tuple[bool, str]], *, what: str = "setting") -> None:
    """Refuse the first `Literal` field outside its choices (every item of a tuple of them), then the first rule
    that fails.

    `rules` maps a field name to (whether its value is valid, what a valid value is). The error names the field
    and its flag: `invalid training setting warmup_steps ('--warmup-steps'): must be ≥ 0, got -1`.
    """
    fields = {f.name: f for f in dataclasses.fields(settings)}
    hints = typing.get_type_hints(type(settings))
    failures = []
    for name in fields:
        options, value = literal_choices(hints[name]), getattr(settings, name)
        values = value if isinstance(value, (tuple, list)) else (value,)
        if options is not None and any(v is not None and v not in options for v in values):
            failures.append((name, "one of " + ", ".join(map(str, options))))
    failures += [(name, valid) for name, (ok, valid) in rules.items() if not ok]
    if failures:
        name, valid = failures[0]
        value = getattr(settings, name)
        raise SlimdiffError(f"invalid {what} {name} ('{flag_of(fields[name])}'): must be {valid}, got {value!r}")


Scheduler = Literal["ddpm", "ddim", "dpm", "euler"]
KDMode = Literal["plain", "normalized"]
Precision = Literal["fp32", "bf16", "fp16"]
EVAL_METRICS = ("fid", "kid", "is", "pr", "clip", "macs", "latency", "memory")


@dataclass
class DeviceConfig:
    """Where `compress`, `eval` and `sample` run, and in which precision: the model's weights, the calibration
    tensors and everything timed or measured live there (training's device is accelerate's: docs/gpu.md)."""

    device: str = field(
        default="auto", metadata={"help": "auto (the GPU when there is one, else cpu), cpu, cuda, cuda:N or mps."}
    )
    dtype: Precision = field(
        default="fp32",
        metadata={"help": "fp32, bf16 or fp16 (sample, eval: weights cast; compress: autocast, fp32 weights kept)."},
    )

    def validate(self) -> None:
        check(self, {}, what="device setting")
        self.torch_device()

    def torch_device(self) -> torch.device:
        """The device, refused in one line listing this machine's devices when it has no such one."""
        from slimdiff.devices import resolve_device

        return resolve_device(self.device)

    def torch_dtype(self) -> torch.dtype:
        from slimdiff.devices import DTYPES

        return DTYPES[self.dtype]


@dataclass
class TrainConfig:
    """Settings of one training run; the defaults train the digits teacher (`slimdiff train`, docs/training.md).

    `batch_size` is the global batch (split across processes). The learning rate rises linearly from 0 over the
    first `warmup_steps` optimizer steps (cosine and linear schedules), then decays. A warm-up longer than the run is
    recorded as given and warms up over the whole run (the schedule uses `min(warmup_steps, steps)`), so the same
    settings resumed with more steps keep the same record.
    """

    steps: int = field(default=1500, metadata={"help": "Optimizer steps."})
    batch_size: int = field(default=64, metadata={"help": "Global batch size (split across processes)."})
    lr: float = field(default=1e-3, metadata={"help": "Peak learning rate (AdamW)."})
    lr_schedule: Literal["constant", "cosine", "linear"] = field(
        default="cosine", metadata={"help": "Decay after the warm-up: constant (no warm-up), cosine or linear."}
    )
    warmup_steps: int = field(
        default=100, metadata={"help": "Steps of the linear warm-up to the peak lr.", "flag": "--warmup"}
    )
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    grad_clip: float = field(default=1.0, metadata={"help": "Clip the gradient norm to this (0 = off)."})
    grad_accumulation: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    ema_decay: float = field(default=0.995, metadata={"help": "EMA decay of the saved weights."})
    label_dropout: float = field(
        default=0.1, metadata={"help": "Conditioned models: drop the condition this often (classifier-free guidance)."}
    )
    checkpoint_every: int = field(default=250, metadata={"help": "Checkpoint every N steps."})
    keep_checkpoints: int = field(default=3, metadata={"help": "Checkpoints kept (the newest)."})
    seed: int = field(default=0, metadata={"help": "Random seed (data order, noise, timesteps, dropout)."})
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = field(
        default="auto", metadata={"help": "auto (bf16 on a GPU), no, fp16 or bf16."}
    )
    log_every: int = field(default=10, metadata={"help": "Log the losses every N steps (log.jsonl)."})
    snr_gamma: float | None = field(
        default=None,
        metadata={"help": "Min-SNR-γ weighting of the denoising loss (e.g. 5; Hang et al. 2023); default: plain MSE."},
    )
    gradient_checkpointing: bool = field(
        default=False,
        metadata={
            "help": "Recompute the student's blocks in the backward instead of keeping their activations (less "
            "memory, ~30 % more compute; diffusers models)."
        },
    )

    def validate(self) -> None:
        check(
            self,
            {
                "steps": (self.steps >= 1, "≥ 1"),
                "batch_size": (self.batch_size >= 1, "≥ 1"),
                "lr": (self.lr > 0, "> 0"),
                "warmup_steps": (self.warmup_steps >= 0, "≥ 0"),
                "weight_decay": (self.weight_decay >= 0, "≥ 0"),
                "grad_clip": (self.grad_clip >= 0, "≥ 0"),
                "grad_accumulation": (self.grad_accumulation >= 1, "≥ 1"),
                "ema_decay": (0 <= self.ema_decay < 1, "in [0, 1)"),
                "label_dropout": (0 <= self.label_dropout < 1, "in [0, 1)"),
                "checkpoint_every": (self.checkpoint_every >= 1, "≥ 1"),
                "keep_checkpoints": (self.keep_checkpoints >= 1, "≥ 1"),
                "log_every": (self.log_every >= 1, "≥ 1"),
                "snr_gamma": (self.snr_gamma is None or self.snr_gamma > 0, "> 0"),
            },
            what="training setting",
        )

    def fingerprint(self) -> dict[str, Any]:
        """Settings a resumed run must share with the run it continues (`steps` may grow). Settings that are off
        (None) are left out, so a checkpoint written before such a setting existed still resumes."""
        skip = ("steps", "checkpoint_every", "keep_checkpoints", "gradient_checkpointing")
        return {k: v for k, v in asdict(self).items() if k not in skip and v is not None}


@dataclass(frozen=True)
class KDConfig:
    """Weights of the distillation terms; `features` pairs (student module, teacher module) by name.

    The defaults are the measured fine-tune of a channel-pruned model (docs/training.md): output KD weight 10, no
    feature KD (a layer-removed model gains from normalized feature KD weight 1: docs/layers.md).
    """

    mode: KDMode = "normalized"
    output_weight: float = 10.0
    feature_weight: float = 0.0
    features: tuple[tuple[str, str], ...] | None = None  # None: match the shared blocks automatically

    def __post_init__(self) -> None:
        if self.mode not in typing.get_args(KDMode):
            raise SlimdiffError(f"unknown KD mode '{self.mode}'; valid: {', '.join(typing.get_args(KDMode))}")
        if self.output_weight < 0 or self.feature_weight < 0:
            raise SlimdiffError("KD weights must be ≥ 0")


@dataclass
class FinetuneConfig(TrainConfig):
    """Settings of a fine-tune: the training settings with the measured fine-tune's defaults (lr 5e-4, 20 warm-up
    steps: docs/training.md), plus an optional teacher to distil (`teacher` is a model directory; in a recipe,
    `model` names the recipe's input model)."""

    steps: int = field(default=500, metadata={"help": "Optimizer steps."})
    lr: float = field(default=5e-4, metadata={"help": "Peak learning rate (AdamW)."})
    warmup_steps: int = field(
        default=20, metadata={"help": "Steps of the linear warm-up to the peak lr.", "flag": "--warmup"}
    )
    teacher: str | None = field(default=None, metadata={"help": "Teacher model directory: distil its outputs."})
    kd: KDMode = field(
        default=KDConfig.mode, metadata={"help": "Feature KD: plain (BK-SDM) or normalized (LAPTOP-Diff)."}
    )
    kd_output_weight: float = field(
        default=KDConfig.output_weight, metadata={"help": "Weight of the MSE to the teacher's prediction."}
    )
    kd_feature_weight: float = field(
        default=KDConfig.feature_weight,
        metadata={"help": "Weight of feature KD (a channel-pruned student is compared at the channels it kept)."},
    )

    def validate(self) -> None:
        super().validate()
        check(
            self,
            {
                "kd_output_weight": (self.kd_output_weight >= 0, "≥ 0"),
                "kd_feature_weight": (self.kd_feature_weight >= 0, "≥ 0"),
            },
            what="training setting",
        )

    def training(self) -> TrainConfig:
        """The training-loop settings alone (what a resumed run must share)."""
        return TrainConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(TrainConfig)})

    def distillation(self) -> KDConfig | None:
        """The distillation terms, when a teacher is given."""
        return None if self.teacher is None else KDConfig(self.kd, self.kd_output_weight, self.kd_feature_weight)


_ARTIFACTS_HELP = (
    "Use what an engine saved beside the weights (a skip table); --no-artifacts: the bare denoiser, computing every "
    "step."
)


@dataclass
class SamplingSettings(DeviceConfig):
    """What every sampling run shares (a sample grid, an evaluation): `n` seeded samples, `steps` of a diffusers
    scheduler, batched, optionally guided, with the model's artifacts or without; one rule set for all."""

    #: How a refusal names these settings ("invalid sample setting n ('--n'): …").
    what: ClassVar[str] = "sampling setting"

    n: int = field(default=64, metadata={"help": "Number of samples."})
    steps: int = field(default=50, metadata={"help": "Sampling steps."})
    scheduler: Scheduler = field(default="ddim", metadata={"help": "ddpm, ddim, dpm (DPM-Solver++) or euler."})
    seed: int = field(default=0, metadata={"help": "Random seed of the initial noise."})
    batch_size: int = field(default=64, metadata={"help": "Samples per denoiser batch."})
    guidance_scale: float = field(
        default=1.0, metadata={"help": "Classifier-free guidance (1 = off).", "flag": "--guidance"}
    )
    artifacts: bool = field(default=True, metadata={"help": _ARTIFACTS_HELP})

    def validate(self) -> None:
        check(
            self,
            {
                "n": (self.n >= 1, "≥ 1"),
                "steps": (self.steps >= 1, "≥ 1"),
                "batch_size": (self.batch_size >= 1, "≥ 1"),
                "guidance_scale": (self.guidance_scale >= 0, "≥ 0 (1 = off)"),
            },
            what=self.what,
        )
        super().validate()


@dataclass
class SampleConfig(SamplingSettings):
    """How a sample grid is drawn: the sampling settings, and the labels or prompts to draw."""

    what: ClassVar[str] = "sample setting"

    labels: tuple[int, ...] | None = field(
        default=None, metadata={"help": "Class labels, comma-separated (default: the model's classes in turn)."}
    )
    prompts: str | None = field(
        default=None, metadata={"help": "Prompts file, one per line (default: the prompts saved with the model)."}
    )


@dataclass
class EvalSettings(SamplingSettings):
    """How a model is evaluated; every reported metric carries these settings.

    `n` is 1000: the sample count at which `digits` FID differences below about 0.1 are noise (docs/metrics.md).
    """

    what: ClassVar[str] = "evaluation setting"

    n: int = field(default=1000, metadata={"help": "Samples for the quality metrics."})
    seed: int = field(default=0, metadata={"help": "Random seed of the samples (and of KID's subsets)."})
    batch_size: int = field(default=64, metadata={"help": "Samples per denoiser batch; latency is timed at it."})
    data: str = field(
        default="digits", metadata={"help": "Reference data: 'digits' (bundled) or an image folder (class subfolders)."}
    )
    metrics: tuple[str, ...] = field(
        default=("fid", "kid", "macs", "latency"),
        metadata={"help": "Comma-separated, of: " + ",".join(EVAL_METRICS) + "."},
    )
    feature: str = field(
        default="digits",
        metadata={"help": "'digits' or 'digits-ms' (our two digits networks) or the FID Inception TorchScript file."},
    )
    clip_dir: str | None = field(default=None, metadata={"help": "Local CLIP folder for the clip metric."})

    def validate(self) -> None:
        unknown = [m for m in self.metrics if m not in EVAL_METRICS]
        if unknown or not self.metrics:
            raise SlimdiffError(
                f"unknown metric {unknown[0] if unknown else '(none)'}; valid: {', '.join(EVAL_METRICS)}"
            )
        super().validate()


@dataclass
class CompareSettings(EvalSettings):
    """`compare`'s settings: one evaluation's, plus the teacher's curve over sampler step counts."""

    curve_steps: tuple[int, ...] = field(
        default=(),
        metadata={
            "help": "Also evaluate the first model (the teacher) at these sampler step counts, e.g. "
            "4,6,8,13,25,50,100: the curve every other model is read against."
        },
    )
    curve_schedulers: tuple[Scheduler, ...] = field(
        default=("ddim", "dpm"), metadata={"help": "Samplers of the teacher's curve."}
    )

    def validate(self) -> None:
        super().validate()
        check(
            self, {"curve_steps": (all(s >= 1 for s in self.curve_steps), "step counts ≥ 1")}, what="comparison setting"
        )

    def evaluation(self) -> EvalSettings:
        """The settings every model is evaluated with."""
        return EvalSettings(**{f.name: getattr(self, f.name) for f in dataclasses.fields(EvalSettings)})
