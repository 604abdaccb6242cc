"""What a denoiser costs: parameters, multiply-accumulates, wall-clock latency and peak memory.

MACs are counted with `torch.utils.flop_counter` (MACs = FLOPs / 2) on the meta device: no arithmetic runs, the
weights are never touched, and scaled-dot-product attention decomposes into batched matmuls that the counter
sees (PyTorch's fused CPU attention kernel has no FLOP formula, so counting on real CPU tensors would miss it).

Latency is wall-clock time (`time.perf_counter`) under `torch.inference_mode()`, with CUDA synchronised around
every timed run so that queued kernels are counted. Peak memory is the increase above what was in use when the
measurement started: allocated tensor memory on CUDA, torch's CPU tensor allocations on CPU (`measure_peak_memory`).
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch._C._autograd import DeviceType
from torch.func import functional_call
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

from slimdiff.errors import SlimdiffError
from slimdiff.models import Adapter, adapter_for

#: aten ops that make up attention's QK^T and AV products (and fused kernels, should one be dispatched).
ATTENTION_OPS = {
    "aten.bmm",
    "aten.baddbmm",
    "aten._scaled_dot_product_efficient_attention",
    "aten._scaled_dot_product_flash_attention",
    "aten._scaled_dot_product_cudnn_attention",
}


@dataclass(frozen=True)
class MacCount:
    """MACs of one denoiser call. `attention` is the part spent in attention matmuls (QK^T, AV)."""

    total: int
    attention: int

    @property
    def without_attention(self) -> int:
        """Conv + linear MACs only — the convention most papers report."""
        return self.total - self.attention


def _to_meta(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return torch.empty_like(value, device="meta")
    return value


def _flop_counts(model: nn.Module, inputs: dict[str, Any] | None, batch_size: int) -> dict[str, dict[Any, int]]:
    """FlopCounterMode's counts of one meta-device call: "Global" and one entry per module path."""
    if inputs is None:
        inputs = adapter_for(model).example_inputs(batch_size, device="meta")
    tensors = {name: _to_meta(t) for name, t in [*model.named_parameters(), *model.named_buffers()]}
    meta_inputs = {key: _to_meta(value) for key, value in inputs.items()}
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        functional_call(model, tensors, args=(), kwargs=meta_inputs, strict=False)
    return counter.get_flop_counts()


def _mac_count(flops_per_op: dict[Any, int]) -> MacCount:
    per_op = {str(op): flops for op, flops in flops_per_op.items()}
    attention = sum(flops for op, flops in per_op.items() if op in ATTENTION_OPS)
    return MacCount(total=sum(per_op.values()) // 2, attention=attention // 2)


def count_macs(model: nn.Module, inputs: dict[str, Any] | None = None, *, batch_size: int = 1) -> MacCount:
    """MACs of `model(**inputs)` (default: the adapter's example inputs at batch `batch_size`), on the meta device."""
    return _mac_count(_flop_counts(model, inputs, batch_size)["Global"])


@dataclass(frozen=True)
class FixedCost:
    """MACs of one image's sampling run spent outside the denoiser, which no denoiser compression removes: the VAE
    decoder once and each text encoder once (on the prompt; the guidance prompt is one more call per batch)."""

    vae_decoder: MacCount
    text_encoders: dict[str, MacCount]

    @property
    def total(self) -> int:
        return self.vae_decoder.total + sum(count.total for count in self.text_encoders.values())


def _meta_macs(build: Callable[[], nn.Module], call: Callable[[nn.Module], Any]) -> MacCount:
    """MACs of `call(build())` with the module built on the meta device: no weights are read, no arithmetic runs."""
    with torch.device("meta"):
        module = build().eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        call(module)
    return _mac_count(counter.get_flop_counts()["Global"])


def _token_length(pipeline: Path, encoder: str, config: Any) -> int:
    """The padded prompt length the pipeline's tokenizer gives its text encoder (SD pads to `model_max_length`)."""
    tokenizer = pipeline / encoder.replace("text_encoder", "tokenizer") / "tokenizer_config.json"
    limit = config.max_position_embeddings
    if tokenizer.is_file():
        return min(limit, int(json.loads(tokenizer.read_text()).get("model_max_length", limit)))
    return limit


def pipeline_fixed_macs(pipeline: str | Path, latent_shape: Sequence[int]) -> FixedCost:
    """The fixed cost of one image sampled through `pipeline` (a diffusers pipeline folder): its VAE decoder on one
    latent of `latent_shape` (channels, height, width) and each of its text encoders (`text_encoder/`,
    `text_encoder_2/`) on one padded prompt, counted on the meta device from their configs."""
    import transformers
    from diffusers import AutoencoderKL

    pipeline = Path(pipeline)
    vae_config = AutoencoderKL.load_config(pipeline / "vae")
    latent = torch.empty(1, *latent_shape, device="meta")
    vae = _meta_macs(lambda: AutoencoderKL.from_config(vae_config), lambda m: m.decode(latent))
    encoders = {}
    for name in ("text_encoder", "text_encoder_2"):
        if not (pipeline / name / "config.json").is_file():
            continue
        config = transformers.AutoConfig.from_pretrained(pipeline / name, local_files_only=True)
        model_class = getattr(transformers, config.architectures[0])
        ids = torch.zeros(1, _token_length(pipeline, name, config), dtype=torch.long, device="meta")
        encoders[name] = _meta_macs(lambda: model_class(config), lambda m: m(input_ids=ids))  # noqa: B023
    return FixedCost(vae_decoder=vae, text_encoders=encoders)


def macs_by_module(
    model: nn.Module, names: Sequence[str], inputs: dict[str, Any] | None = None, *, batch_size: int = 1
) -> dict[str, int]:
    """MACs spent inside each named submodule during one call (one meta-device trace for all of them)."""
    counts = _flop_counts(model, inputs, batch_size)
    root = type(model).__name__
    return {name: sum(counts.get(f"{root}.{name}", {}).values()) // 2 for name in names}


def sampling_macs(
    per_call: MacCount,
    steps: int,
    guidance: bool,
    *,
    computed_fraction_per_step: Sequence[float] | None = None,
) -> MacCount:
    """MACs of one whole sampling run for one image: `steps` denoiser calls on `per_call` (a batch-1 count).

    With classifier-free guidance every step runs the denoiser on a doubled batch (conditional + unconditional),
    so each step costs 2× `per_call`. `computed_fraction_per_step` (one float in [0, 1] per step, e.g. a sampling
    plan's `computed`) is the fraction of a call's MACs computed at that step (block skipping or caching saves the
    rest); the attention part is assumed to shrink by the same fraction.
    """
    if steps < 1:
        raise SlimdiffError(f"steps must be ≥ 1 (got {steps})")
    fractions = [1.0] * steps if computed_fraction_per_step is None else [float(f) for f in computed_fraction_per_step]
    if len(fractions) != steps:
        raise SlimdiffError(f"computed_fraction_per_step has {len(fractions)} entries; need one per step ({steps})")
    bad = [f for f in fractions if not 0.0 <= f <= 1.0]
    if bad:
        raise SlimdiffError(f"computed fractions must lie in [0, 1] (got {bad[0]})")
    calls = 2 if guidance else 1
    kept = sum(fractions)
    return MacCount(total=round(per_call.total * calls * kept), attention=round(per_call.attention * calls * kept))


@dataclass(frozen=True)
class LatencyStats:
    """Wall-clock time of `repeats` timed runs of one thing (`what`), after `warmup` untimed runs.

    Each run processes `batch_size` images; the times are per run, in milliseconds (`per_image_ms` divides).
    """

    median_ms: float
    p10_ms: float
    p90_ms: float
    mean_ms: float
    std_ms: float
    repeats: int
    warmup: int
    batch_size: int
    device: str
    what: str = "call"

    @property
    def per_image_ms(self) -> float:
        """Median time per image."""
        return self.median_ms / self.batch_size


def _percentile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolated percentile (`q` in [0, 100]) of sorted values."""
    position = (len(sorted_values) - 1) * q / 100
    low, high = math.floor(position), math.ceil(position)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device(device: torch.device | str) -> torch.device:
    try:
        return torch.device(device)
    except (RuntimeError, TypeError):
        raise SlimdiffError(f"unknown device '{device}'; valid: cpu, cuda, cuda:N, …") from None


def time_callable(
    fn: Callable[[], Any],
    *,
    warmup: int,
    repeats: int,
    device: torch.device | str,
    batch_size: int = 1,
    what: str = "call",
) -> LatencyStats:
    """Time `fn()` `repeats` times after `warmup` untimed calls, under `torch.inference_mode()`.

    On CUDA the device is synchronised before and after each timed call, so each time covers the kernels `fn`
    queued. `batch_size` and `what` only label the result (the images one call processes, and what a call is).
    """
    if warmup < 0 or repeats < 1 or batch_size < 1:
        raise SlimdiffError(f"need warmup ≥ 0, repeats ≥ 1, batch_size ≥ 1 (got {warmup}, {repeats}, {batch_size})")
    dev = _device(device)
    times = []
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        for _ in range(repeats):
            _synchronize(dev)
            start = time.perf_counter()
            fn()
            _synchronize(dev)
            times.append((time.perf_counter() - start) * 1000)
    ordered = sorted(times)
    return LatencyStats(
        median_ms=statistics.median(ordered),
        p10_ms=_percentile(ordered, 10),
        p90_ms=_percentile(ordered, 90),
        mean_ms=statistics.fmean(ordered),
        std_ms=statistics.stdev(ordered) if len(ordered) > 1 else 0.0,
        repeats=repeats,
        warmup=warmup,
        batch_size=batch_size,
        device=str(dev),
        what=what,
    )


def device_description(device: torch.device | str) -> str:
    """The device a latency was measured on, for the record: the GPU's name, or the CPU model and torch's threads."""
    dev = _device(device)
    if dev.type == "cuda":
        return f"{dev} ({torch.cuda.get_device_name(dev)})"
    model = platform.processor() or platform.machine()
    try:
        names = [line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")]
        model = names[0].split(":", 1)[1].strip() if names else model
    except OSError:
        pass
    return f"{dev} ({model}, {torch.get_num_threads()} torch threads of {os.cpu_count()} cores)"


def _check_on_device(model: nn.Module, device: torch.device | str) -> torch.device:
    """The requested device, refused unless the model's weights are already there (metrics never move a model)."""
    dev = _device(device)
    param = next(model.parameters(), None)
    here = param.device if param is not None else torch.device("cpu")
    if here.type != dev.type or (dev.index is not None and here.index is not None and here.index != dev.index):
        raise SlimdiffError(f"the model is on {here} but device='{device}'; move it first (model.to('{device}'))")
    return dev


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Put every module in eval mode for the block, then restore each module's own flag."""
    flags = {module: module.training for module in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for module, training in flags.items():
            module.training = training


def _denoiser_inputs(model: nn.Module, batch_size: int, device: torch.device) -> dict[str, Any]:
    """The adapter's example inputs on `device`, floating-point ones in the model's dtype."""
    param = next(model.parameters(), None)
    dtype = param.dtype if param is not None else torch.float32
    inputs = adapter_for(model).example_inputs(batch_size, device)
    return {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in inputs.items()}


def denoiser_latency(
    model: nn.Module,
    *,
    batch_size: int,
    warmup: int = 3,
    repeats: int = 10,
    device: torch.device | str = "cpu",
) -> LatencyStats:
    """Wall-clock time of one denoiser call `model(**example_inputs)` on a batch of `batch_size`, in eval mode.

    The model must already be on `device`; its train/eval flags are restored afterwards.
    """
    dev = _check_on_device(model, device)
    if batch_size < 1:
        raise SlimdiffError(f"batch_size must be ≥ 1 (got {batch_size})")
    inputs = _denoiser_inputs(model, batch_size, dev)
    with _eval_mode(model):
        return time_callable(
            lambda: model(**inputs),
            warmup=warmup,
            repeats=repeats,
            device=dev,
            batch_size=batch_size,
            what="denoiser call",
        )


def _default_cond(adapter: Adapter, batch_size: int) -> torch.Tensor | None:
    """Stand-in conditions for timing (the values do not change the cost): class 0, or random prompt embeddings."""
    key = {"class": "class_labels", "text": "encoder_hidden_states"}.get(adapter.cond_kind)
    return None if key is None else adapter.example_inputs(batch_size, "cpu")[key]


def _sampling_run(
    adapter: Adapter,
    steps: int,
    batch_size: int,
    scheduler: str,
    schedule: dict[str, Any] | None,
    cond: torch.Tensor | None,
    guidance_scale: float,
) -> Callable[[], None]:
    """One whole `diffusion.sample` run drawing `batch_size` images in one batch over the model's noise `schedule`
    (its timesteps are the ones a skip table checks), stand-in conditions by default."""
    from slimdiff.training.diffusion import sample  # diffusion imports schedulers; keep cost.py light to import

    if cond is None:
        cond = _default_cond(adapter, batch_size)
    uncond = None
    if adapter.cond_kind == "text" and guidance_scale != 1.0 and cond is not None:
        uncond = torch.zeros_like(cond[:1])  # the empty prompt's embedding, for timing only

    def run() -> None:
        sample(
            adapter,
            n=batch_size,
            steps=steps,
            scheduler=scheduler,
            schedule=schedule,
            cond=cond,
            guidance_scale=guidance_scale,
            uncond_embedding=uncond,
            batch_size=batch_size,
            progress=False,
        )

    return run


def sampling_latency(
    adapter: Adapter,
    *,
    steps: int,
    batch_size: int,
    scheduler: str = "ddim",
    schedule: dict[str, Any] | None = None,
    warmup: int = 1,
    repeats: int = 3,
    device: torch.device | str = "cpu",
    cond: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
) -> LatencyStats:
    """Wall-clock time of one whole `diffusion.sample` run drawing `batch_size` images in one batch, in eval mode.

    Covers noise creation, every scheduler step and denoiser call (no decoding). `schedule` is the model's training
    noise-scheduler config (default: DDPM's); `cond` defaults to stand-in conditions for conditional models; with
    `guidance_scale != 1` each step runs the denoiser on a doubled batch.
    """
    dev = _check_on_device(adapter.model, device)
    run = _sampling_run(adapter, steps, batch_size, scheduler, schedule, cond, guidance_scale)
    with _eval_mode(adapter.model):
        return time_callable(
            run,
            warmup=warmup,
            repeats=repeats,
            device=dev,
            batch_size=batch_size,
            what=f"sampling run ({scheduler}, {steps} steps)",
        )


@dataclass
class PeakMemory:
    """The peak memory of a measured block beyond what was in use when it started, in bytes, and what was counted
    (`counts`: CUDA's allocated tensor memory, or torch's CPU tensor allocations)."""

    bytes: int = 0
    counts: str = ""

    def record(self) -> dict[str, Any]:
        """The measurement as a log or report entry."""
        return {"peak_memory_bytes": self.bytes, "peak_memory_counts": self.counts}


#: What each device's peak memory counts (`measure_peak_memory`).
MEMORY_COUNTS = {
    "cuda": "CUDA tensor memory allocated (torch.cuda.max_memory_allocated)",
    "cpu": "CPU tensor memory allocated by torch (the profiler's memory events)",
}


@contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2 for the block: this torch build's profiler prints a line on every start and stop."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


@contextmanager
def measure_peak_memory(device: torch.device | str) -> Iterator[PeakMemory]:
    """`with measure_peak_memory(device) as peak:` … then `peak.bytes`: the peak of tensor memory the block held
    beyond what was in use when it started.

    On CUDA: `torch.cuda.max_memory_allocated` (after resetting the peak statistics) minus what was allocated
    before; exact for tensors, blind to the caching allocator's slack and the CUDA context. On CPU: every tensor
    allocation and free torch's CPU allocator makes, from the profiler's memory events, summed in order — exact for
    tensors (not Python objects or library buffers), at the profiler's cost of a few µs per op.
    """
    dev = _device(device)
    if dev.type not in MEMORY_COUNTS:
        raise SlimdiffError(f"peak memory is measured on cpu and cuda devices (got '{device}')")
    peak = PeakMemory(counts=MEMORY_COUNTS[dev.type])
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        baseline = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        yield peak
        torch.cuda.synchronize(dev)
        peak.bytes = max(0, torch.cuda.max_memory_allocated(dev) - baseline)
        return
    profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _quiet_stderr():
        profiler.__enter__()
    try:
        yield peak
    finally:
        with _quiet_stderr():
            profiler.__exit__(None, None, None)
    events = [e for e in profiler.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        if event.device_type() == DeviceType.CPU:
            live += event.nbytes()
            peak.bytes = max(peak.bytes, live)


def peak_memory(fn: Callable[[], Any], device: torch.device | str) -> int:
    """Peak memory `fn()` needs beyond what was in use when it started, in bytes, run under inference mode
    (`measure_peak_memory` says what is counted on each device)."""
    with measure_peak_memory(device) as peak, torch.inference_mode():
        fn()
    return peak.bytes


def denoiser_memory(model: nn.Module, *, batch_size: int, device: torch.device | str = "cpu") -> int:
    """Peak memory of one denoiser call on `batch_size` example inputs, beyond the weights and inputs (bytes).

    See `measure_peak_memory` for what is counted on each device.
    """
    dev = _check_on_device(model, device)
    inputs = _denoiser_inputs(model, batch_size, dev)
    with _eval_mode(model):
        return peak_memory(lambda: model(**inputs), dev)


def sampling_memory(
    adapter: Adapter,
    *,
    steps: int,
    batch_size: int,
    scheduler: str = "ddim",
    schedule: dict[str, Any] | None = None,
    device: torch.device | str = "cpu",
    cond: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
) -> int:
    """Peak memory of one whole sampling run (as `sampling_latency` times it) beyond the weights (bytes)."""
    dev = _check_on_device(adapter.model, device)
    run = _sampling_run(adapter, steps, batch_size, scheduler, schedule, cond, guidance_scale)
    with _eval_mode(adapter.model):
        return peak_memory(run, dev)
