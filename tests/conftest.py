"""Test-wide fixtures."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import huggingface_hub
import pytest
import torch
from helpers import run_cli


@pytest.fixture(scope="session", autouse=True)
def slimdiff_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One slimdiff cache for the whole test run (`$SLIMDIFF_CACHE`, inherited by subprocesses), never the home
    directory: the digits feature network trains once per run, and reference features are computed once."""
    cache = tmp_path_factory.getbasetemp() / "slimdiff-cache"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SLIMDIFF_CACHE", str(cache))
        yield cache


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face cache, offline: the environment for subprocesses, huggingface_hub's constants (read
    once at its import) for this process."""
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


@pytest.fixture
def recipe_cli(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> Callable[[str], tuple[int, str, str]]:
    """`slimdiff run` in-process on a recipe written from text to `tmp_path/r.yaml`: its exit code, stdout, stderr."""

    def run(text: str) -> tuple[int, str, str]:
        recipe = tmp_path / "r.yaml"
        recipe.write_text(text)
        return run_cli(monkeypatch, capsys, "run", recipe)

    return run


@pytest.fixture
def fake_timer(monkeypatch: pytest.MonkeyPatch) -> None:
    """A deterministic stand-in for the latency timers, following the MACs: a denoiser call takes 2 ms + 1 ms per
    M MACs·image; a sampling run, the sum of its steps' calls (0.5 ms + the MACs a skip table keeps)."""
    from slimdiff.artifacts import check_sampler
    from slimdiff.engines import budgets, skip
    from slimdiff.metrics.cost import LatencyStats, count_macs
    from slimdiff.training.diffusion import make_scheduler

    def stats(ms: float, batch: int, what: str) -> LatencyStats:
        return LatencyStats(ms, ms, ms, ms, 0.0, repeats=10, warmup=3, batch_size=batch, device="cpu", what=what)

    def denoiser(model: torch.nn.Module, batch: int) -> LatencyStats:
        return stats(2 + count_macs(model).total * batch / 1e6, batch, "denoiser call")

    def sampling(adapter, batch: int, *, steps: int, scheduler: str, schedule, guidance_scale: float) -> LatencyStats:
        table = skip.table_of(adapter.model)
        kept = 1.0
        if table is not None:  # a real run over another sampler than the table's is refused: so is this one
            sched = make_scheduler(scheduler, schedule)
            sched.set_timesteps(steps)
            check_sampler(adapter.model, sched)
            kept = skip.kept_fraction(table, skip.unit_costs(adapter.model, table.units))
        per_call = count_macs(adapter.model).total * batch / 1e6
        return stats(steps * (0.5 + per_call * kept), batch, "sampling run")

    monkeypatch.setattr(budgets, "time_denoiser", denoiser)
    monkeypatch.setattr(budgets, "time_sampling", sampling)
