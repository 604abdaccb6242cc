"""Cost metrics: MACs per call and per sampling run, latency statistics, peak memory."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import torch
from helpers import FAMILIES

from slimdiff.errors import SlimdiffError
from slimdiff.metrics.cost import (
    LatencyStats,
    MacCount,
    count_macs,
    denoiser_latency,
    denoiser_memory,
    peak_memory,
    sampling_latency,
    sampling_macs,
    time_callable,
)
from slimdiff.models import adapter_for, build_tiny

MB = 1_000_000
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Time single-threaded: on a busy 2-core machine, intra-op threads waiting on each other swamp the signal."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- MACs ------------------------------------------------------------------------------------------------------


def test_sampling_macs_counts_steps_and_guidance() -> None:
    per_call = MacCount(total=1000, attention=100)
    assert sampling_macs(per_call, 20, False) == MacCount(total=20_000, attention=2_000)
    assert sampling_macs(per_call, 20, True) == MacCount(total=40_000, attention=4_000)
    assert sampling_macs(per_call, 1, False) == per_call


def test_sampling_macs_counts_only_the_computed_fractions() -> None:
    per_call = MacCount(total=1000, attention=100)
    assert sampling_macs(per_call, 4, False, computed_fraction_per_step=[1.0, 0.5, 0.5, 0.0]) == MacCount(2000, 200)
    assert sampling_macs(per_call, 2, True, computed_fraction_per_step=[0.75, 0.75]) == MacCount(3000, 300)
    assert sampling_macs(per_call, 3, True, computed_fraction_per_step=[1.0] * 3) == sampling_macs(per_call, 3, True)


@pytest.mark.parametrize(
    ("steps", "fractions", "message"),
    [(0, None, "steps"), (3, [0.1, 0.2], "one per step"), (2, [0.5, 1.5], r"\[0, 1\]"), (1, [-0.1], r"\[0, 1\]")],
)
def test_sampling_macs_refuses_bad_input(steps: int, fractions: list[float] | None, message: str) -> None:
    with pytest.raises(SlimdiffError, match=message):
        sampling_macs(MacCount(10, 1), steps, False, computed_fraction_per_step=fractions)


@pytest.mark.parametrize("name", FAMILIES)
def test_macs_scale_with_batch(name: str) -> None:
    model = build_tiny(name)
    one, two = count_macs(model, batch_size=1), count_macs(model, batch_size=2)
    assert two.total == 2 * one.total
    assert two.attention == 2 * one.attention
    assert one.attention > 0


# -- latency ---------------------------------------------------------------------------------------------------


def test_time_callable_honours_warmup_and_repeats() -> None:
    calls: list[bool] = []
    durations = iter([0.0, 0.0, 0.001, 0.004, 0.002, 0.003, 0.005, 0.002, 0.006])

    def fn() -> None:
        calls.append(torch.is_inference_mode_enabled())
        time.sleep(next(durations))

    stats = time_callable(fn, warmup=2, repeats=7, device="cpu", batch_size=4, what="thing")
    assert len(calls) == 9 and all(calls)  # 2 warmup + 7 timed, all under inference mode
    assert (stats.repeats, stats.warmup, stats.batch_size, stats.device, stats.what) == (7, 2, 4, "cpu", "thing")
    assert stats.median_ms >= 3.0  # the timed sleeps are 1, 2, 2, 3, 4, 5, 6 ms: no run is shorter than its sleep
    assert stats.p10_ms >= 1.0 and stats.p90_ms >= 5.0
    assert stats.p10_ms <= stats.mean_ms <= stats.p90_ms and stats.std_ms > 0
    assert stats.per_image_ms == pytest.approx(stats.median_ms / 4)


def test_time_callable_measures_sleep() -> None:
    stats = time_callable(lambda: time.sleep(0.01), warmup=1, repeats=5, device="cpu")
    assert 9.5 <= stats.median_ms <= 40  # sleep never returns early; a busy machine may add a lot


def test_time_callable_synchronises_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[str] = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: events.append("sync"))
    stats = time_callable(lambda: events.append("run"), warmup=1, repeats=3, device="cuda")
    assert events == ["run"] + ["sync", "run", "sync"] * 3
    assert stats.device == "cuda"


def test_time_callable_refuses_bad_counts() -> None:
    with pytest.raises(SlimdiffError, match="repeats"):
        time_callable(lambda: None, warmup=0, repeats=0, device="cpu")
    with pytest.raises(SlimdiffError, match="device"):
        time_callable(lambda: None, warmup=0, repeats=1, device="quantum")


@pytest.mark.parametrize("name", FAMILIES)
def test_denoiser_latency_runs_on_every_family(name: str) -> None:
    model = build_tiny(name).train()
    stats = denoiser_latency(model, batch_size=2, warmup=1, repeats=3)
    assert isinstance(stats, LatencyStats)
    assert stats.batch_size == 2 and stats.repeats == 3 and stats.what == "denoiser call"
    assert 0 < stats.p10_ms <= stats.median_ms <= stats.p90_ms
    assert model.training and all(module.training for module in model.modules())  # flags restored


def test_bigger_batch_is_slower() -> None:
    model = build_tiny("tiny-dit")
    small = denoiser_latency(model, batch_size=1, warmup=2, repeats=7)
    big = denoiser_latency(model, batch_size=32, warmup=2, repeats=7)
    assert big.median_ms > small.median_ms


def test_latency_refuses_a_model_on_another_device() -> None:
    model = build_tiny("tiny-unet")
    with pytest.raises(SlimdiffError, match="model is on cpu"):
        denoiser_latency(model, batch_size=1, device="cuda")
    with pytest.raises(SlimdiffError, match="model is on cpu"):
        sampling_latency(adapter_for(model), steps=2, batch_size=1, device="cuda")


@pytest.mark.parametrize(("name", "guidance"), [("tiny-unet", 1.0), ("tiny-sd", 3.0), ("tiny-dit", 3.0)])
def test_sampling_latency_times_whole_runs(name: str, guidance: float) -> None:
    adapter = adapter_for(build_tiny(name))
    stats = sampling_latency(adapter, steps=2, batch_size=2, warmup=0, repeats=2, guidance_scale=guidance)
    assert stats.what == "sampling run (ddim, 2 steps)"
    assert stats.batch_size == 2 and stats.repeats == 2 and stats.median_ms > 0


def test_sampling_latency_grows_with_steps() -> None:
    adapter = adapter_for(build_tiny("tiny-dit"))
    few = sampling_latency(adapter, steps=1, batch_size=4, warmup=1, repeats=3)
    many = sampling_latency(adapter, steps=12, batch_size=4, warmup=1, repeats=3)
    assert many.median_ms > few.median_ms


# -- memory ----------------------------------------------------------------------------------------------------


def test_peak_memory_sees_a_200mb_tensor_on_cpu() -> None:
    def allocate() -> None:
        tensor = torch.ones(50 * MB)  # 200 MB of float32, every page touched
        time.sleep(0.02)
        del tensor

    assert peak_memory(allocate, "cpu") >= 150 * MB


def test_peak_memory_is_small_for_small_work() -> None:
    assert peak_memory(lambda: torch.ones(1000).sum(), "cpu") < 50 * MB


def test_denoiser_memory_is_a_byte_count() -> None:
    model = build_tiny("tiny-unet")
    memory = denoiser_memory(model, batch_size=2)
    first_conv = 2 * model.conv_in.out_channels * 16 * 16 * 4  # bytes of one activation the call must hold
    assert isinstance(memory, int) and memory >= first_conv
    assert denoiser_memory(model, batch_size=8) > memory  # activations grow with the batch


@needs_cuda
def test_cuda_latency_and_memory() -> None:
    model = build_tiny("tiny-unet").to("cuda")
    stats = denoiser_latency(model, batch_size=4, warmup=2, repeats=5, device="cuda")
    assert stats.device == "cuda" and 0 < stats.p10_ms <= stats.median_ms <= stats.p90_ms
    assert sampling_latency(adapter_for(model), steps=2, batch_size=2, repeats=1, device="cuda").median_ms > 0
    assert peak_memory(lambda: torch.ones(50 * MB, device="cuda"), "cuda") >= 200 * MB
    assert denoiser_memory(model, batch_size=8, device="cuda") > 0
