"""Forecasting skipped units (TaylorSeer) in the skip runtime, and the diffusers-style `apply_skip` call."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import torch
from helpers import run_cli
from torch.utils._pytree import tree_map

import slimdiff
from slimdiff.engines import skip
from slimdiff.errors import SlimdiffError
from slimdiff.export import load, save
from slimdiff.models import adapter_for, build_tiny
from slimdiff.training.diffusion import make_scheduler, sample

STEPS = 6
CASES = [("tiny-unet", "block"), ("tiny-unet", "layer"), ("tiny-dit", "block"), ("tiny-dit", "layer")]


def _table(model: torch.nn.Module, granularity: str, order: int) -> skip.SkipTable:
    """A table that skips every unit at steps 2, 4 and 5 and some at step 3 (never the last unit, so that most
    units have three computed steps to forecast from)."""
    sched = make_scheduler("ddim")
    sched.set_timesteps(STEPS)
    units = skip.model_units(adapter_for(model), granularity)
    table = skip.SkipTable.full(type(sched).__name__, sched.timesteps.tolist(), units, granularity, None, order)
    for step in (2, 4, 5):
        table.compute[step] = [False] * len(units)
    for i in range(1, len(units) - 1, 3):
        table.compute[3][i] = False
    return table


def _sample(model: torch.nn.Module, seed: int = 0) -> torch.Tensor:
    adapter = adapter_for(model)
    cond = None if adapter.cond_kind == "none" else torch.tensor([1, 3, 5])
    return sample(adapter, n=3, steps=STEPS, cond=cond, progress=False, seed=seed)


def _by_hand(y: list, ts: list[float], t: float) -> object:
    """The forecast written out: newest output first; order = len(y) − 1."""
    delta = t - ts[0]
    if len(y) == 1:
        return y[0]
    d1 = tree_map(lambda a, b: (a - b) / (ts[0] - ts[1]), y[0], y[1])
    if len(y) == 2:
        return tree_map(lambda a, d: a + d * delta, y[0], d1)
    d1_old = tree_map(lambda a, b: (a - b) / (ts[1] - ts[2]), y[1], y[2])
    d2 = tree_map(lambda a, b: (a - b) / (ts[0] - ts[2]), d1, d1_old)
    return tree_map(lambda a, d, e: a + d * delta + e * delta**2, y[0], d1, d2)


def _reference(model: torch.nn.Module, table: skip.SkipTable) -> torch.nn.Module:
    """A copy whose units, replaced by hand, compute at the table's effective steps and otherwise extrapolate
    their last computed outputs at the actual timesteps (a new run starts at the first timestep)."""
    reference = copy.deepcopy(model)
    where: dict[str, int] = {}

    def set_step(_module, args, kwargs) -> None:
        t = float(kwargs.get("timestep", args[1] if len(args) > 1 else None).flatten()[0])
        where["step"] = min(range(STEPS), key=lambda s: abs(table.timesteps[s] - t))

    reference.register_forward_pre_hook(set_step, with_kwargs=True)
    live = table.effective()
    for index, name in enumerate(table.units):
        module = reference.get_submodule(name)
        history: list[tuple[float, object]] = []

        def forward(*args, _original=module.forward, _index=index, _history=history, **kwargs):
            step = where["step"]
            t = table.timesteps[step]
            if step == 0:
                _history.clear()
            if live[step][_index]:
                _history.insert(0, (t, _original(*args, **kwargs)))
                del _history[table.forecast_order + 1 :]
                return _history[0][1]
            return _by_hand([y for _, y in _history], [s for s, _ in _history], t)

        module.forward = forward
    return reference


@pytest.mark.parametrize(("family", "granularity"), CASES)
@pytest.mark.parametrize("order", [0, 1, 2])
def test_forecast_equals_a_hand_written_extrapolation(family: str, granularity: str, order: int) -> None:
    model = build_tiny(family).eval()
    table = _table(model, granularity, order)
    expected = _sample(_reference(model, table))
    skip.attach(model, table)
    got = _sample(model)
    if order == 0:  # reuse: bit-identical to returning the last computed output
        assert torch.equal(got, expected)
    else:
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(_sample(model), got)  # the state resets per run: a second run is the same


@pytest.mark.parametrize(("family", "granularity"), CASES)
def test_all_compute_forecast_table_is_bit_identical_to_no_hooks(family: str, granularity: str) -> None:
    model = build_tiny(family).eval()
    reference = _sample(model)
    table = _table(model, granularity, 2)
    table.compute = [[True] * len(table.units) for _ in table.timesteps]
    skip.attach(model, table)
    assert torch.equal(_sample(model), reference)


def test_each_order_samples_differently() -> None:
    model = build_tiny("tiny-unet").eval()
    full = _sample(model)
    outputs = {}
    for order in (0, 1, 2):
        skip.attach(model, _table(model, "block", order))
        outputs[order] = _sample(model)
    assert not torch.equal(outputs[0], outputs[1]) and not torch.equal(outputs[1], outputs[2])
    assert all(not torch.equal(out, full) for out in outputs.values())


def test_tables_record_the_order_and_old_tables_reuse() -> None:
    model = build_tiny("tiny-unet").eval()
    table = _table(model, "block", 2)
    payload = table.to_json()
    assert payload["forecast_order"] == 2 and skip.SkipTable.from_json(payload) == table
    old = {k: v for k, v in payload.items() if k != "forecast_order"}  # saved before the order was recorded
    assert skip.SkipTable.from_json(old).forecast_order == 0
    with pytest.raises(SlimdiffError, match="forecast_order 3 is not one of 0, 1, 2"):
        skip.SkipTable.from_json(payload | {"forecast_order": 3})
    with pytest.raises(SlimdiffError, match="forecast_order"):
        skip.SkipConfig(target_macs=0.5, forecast_order=-1).validate()


@pytest.mark.parametrize("family", ["tiny-unet", "tiny-sd", "tiny-dit"])
def test_apply_skip_and_remove_skip_on_each_family(family: str) -> None:
    model = build_tiny(family).eval()  # UNet2DModel, UNet2DConditionModel, DiTTransformer2DModel
    adapter = adapter_for(model)
    noise = torch.randn(2, adapter.in_channels, adapter.sample_size, adapter.sample_size)

    def denoise() -> torch.Tensor:
        sched = make_scheduler("ddim")
        sched.set_timesteps(STEPS)
        kwargs = {}
        if adapter.cond_kind == "text":
            kwargs["encoder_hidden_states"] = torch.ones(2, 4, model.config.cross_attention_dim)
        elif adapter.cond_kind != "none":
            kwargs["class_labels"] = torch.tensor([1, 2])
        x = noise
        with torch.no_grad():
            for t in sched.timesteps:
                out = model(x, t.expand(x.shape[0]), return_dict=False, **kwargs)[0][:, : x.shape[1]]
                x = sched.step(out, t, x).prev_sample
        return x

    reference = denoise()
    config = skip.SkipConfig(target_macs=0.5, steps=STEPS, method="step-reuse", forecast_order=1)
    table = slimdiff.apply_skip(model, config)
    assert skip.table_of(model) is table and table.forecast_order == 1
    assert not all(all(row) for row in table.compute)
    forecast = denoise()
    assert not torch.equal(forecast, reference)
    slimdiff.remove_skip(model)
    assert skip.table_of(model) is None and torch.equal(denoise(), reference)
    slimdiff.apply_skip(model, table.to_json())  # a saved table's JSON attaches the same way
    assert torch.equal(denoise(), forecast)
    with pytest.raises(SlimdiffError, match="slimdiff.compress"):
        slimdiff.apply_skip(model, skip.SkipConfig(target_macs=0.5, steps=STEPS))  # dip-go needs data
    assert {"apply_skip", "remove_skip"} <= set(dir(slimdiff))


@pytest.mark.parametrize("family", ["tiny-unet", "tiny-dit"])
def test_compiled_units_give_the_same_samples_with_no_graph_break_and_no_recompile_per_step(family: str) -> None:
    from torch._dynamo.utils import counters

    model = build_tiny(family).eval()
    with pytest.raises(SlimdiffError, match="needs a model with a skip table"):
        slimdiff.compile_units(model)
    slimdiff.apply_skip(model, skip.SkipConfig(target_macs=0.5, steps=STEPS, method="step-reuse", forecast_order=1))
    eager = _sample(model)
    torch._dynamo.reset()
    counters.clear()
    slimdiff.compile_units(model, backend="eager")  # dynamo's tracing without a code generator: fast, exact
    assert torch.equal(_sample(model), eager)
    assert sum(counters["graph_break"].values()) == 0
    first = counters["stats"]["unique_graphs"]
    assert 0 < first <= len(skip.table_of(model).units)  # at most a graph per unit, not one per step
    _sample(model, seed=1)
    assert counters["stats"]["unique_graphs"] == first  # a second run compiles nothing new
    slimdiff.remove_skip(model)
    hooks = getattr(model, "_diffusers_hook", None)
    assert all(
        getattr(unit, "_diffusers_hook", None) is None or not unit._diffusers_hook.hooks for unit in model.modules()
    )
    assert hooks is None or not hooks.hooks
    torch._dynamo.reset()


def test_deepcache_forecast_table_is_saved_and_attached_on_load(tmp_path: Path) -> None:
    model = build_tiny("tiny-unet").eval()
    config = skip.SkipConfig(target_macs=0.85, steps=STEPS, method="deepcache", forecast_order=2)
    slimdiff.apply_skip(model, dataclasses.replace(config, forecast_order=0))
    reused = _sample(model)
    table = slimdiff.apply_skip(model, config)
    expected = _sample(model)
    assert not torch.equal(expected, reused)  # the deepcache table's reused units are forecast
    skip.remove_skip(model)
    save(model, tmp_path / "m", artifacts={"skip_table": table.to_json()})
    loaded = load(tmp_path / "m")
    assert skip.table_of(loaded).forecast_order == 2 and torch.equal(_sample(loaded), expected)


def test_cli_forecast_order(tmp_path: Path, monkeypatch, capsys) -> None:
    save(build_tiny("tiny-unet").eval(), tmp_path / "m")
    args = ["compress", "skip", tmp_path / "m", "--data", "digits", "--steps", "6", "--target-macs", "0.5"]
    code, out, _ = run_cli(
        monkeypatch, capsys, *args, "--method", "step-reuse", "--forecast-order", "2", "--out", tmp_path / "o"
    )
    assert code == 0 and skip.table_of(load(tmp_path / "o")).forecast_order == 2
    code, _, err = run_cli(monkeypatch, capsys, *args, "--forecast-order", "5", "--out", tmp_path / "bad")
    assert code == 2 and "forecast_order 5" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("order", [0, 1, 2])
def test_gated_trajectory_with_hard_gates_equals_the_forecasting_table(order: int) -> None:
    """DiP-GO's gated trajectory blends with the table's forecast: at 0/1 gates it is the runtime with that table."""
    model = build_tiny("tiny-unet").eval().requires_grad_(False)
    table = _table(model, "block", order)
    config = skip.SkipConfig(target_macs=0.5, steps=STEPS, forecast_order=order)
    noise = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(4))
    gated = copy.deepcopy(model)
    gating = skip.Gating(gated, table)  # gate hooks forecasting with the table's order
    gates = torch.tensor(table.effective(), dtype=torch.float32)  # dead units gated off, as the runtime skips them
    skip.attach(model, table)
    with torch.no_grad():
        expected = skip.trajectory(adapter_for(model), config, {}, noise, None, None, 0)
        got = skip.trajectory(adapter_for(gated), config, {}, noise, None, None, 0, gating=gating, gates=gates)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_select_compares_with_reuse_and_a_uniform_forecast_table() -> None:
    from slimdiff.engines.base import Calibration
    from slimdiff.jobs.compression import training_data

    model = build_tiny("tiny-unet").eval()
    adapter, base = adapter_for(model), _table(model, "block", 1)
    base.compute = [[True] * len(base.units)] * STEPS
    costs = skip.unit_costs(model, base.units)
    config = skip.SkipConfig(target_macs=0.5, steps=STEPS, noises=4, batch_size=2, forecast_order=1)
    data = Calibration(training_data(adapter, "digits", 0), lambda labels: None, {})
    held_out = skip.held_out_noise_set(adapter, config, data)
    probs = torch.rand(STEPS, len(base.units), generator=torch.Generator().manual_seed(0))
    chosen = skip.choose_table(adapter, config, data, base, costs, probs, held_out)
    losses = chosen.held_out
    assert set(losses) == {"dip-go", "step-reuse", "step-reuse-forecast"}
    assert losses["step-reuse"] != losses["step-reuse-forecast"]  # the forecast changes the samples
    assert chosen.selected == min(losses, key=losses.__getitem__)
    assert chosen.table.forecast_order == (0 if chosen.selected == "step-reuse" else 1)
