"""LAPTOP-Diff layer pruning: outputs equal the bypassed original, exact knapsack, budgets, additivity, export and
pipelines, composition with channel pruning, the CLI, a recipe, and refused input."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMPipeline, DDIMScheduler, DiTPipeline
from helpers import FAMILIES, run_cli, tiny_sd_pipeline, tiny_vae

from slimdiff.data import load_data
from slimdiff.engines import Calibration, channels
from slimdiff.engines.layers import LayerPruningConfig, compress, select_layers
from slimdiff.errors import SlimdiffError
from slimdiff.export import load, save
from slimdiff.models import SkippedLayer, adapter_for, build_tiny
from slimdiff.models.base import count_params
from slimdiff.text import make_tiny_clip_text
from slimdiff.training.diffusion import DEFAULT_SCHEDULE

#: A params target per family that some removal set meets within 2 % (a tiny DiT has 3 equal removable blocks).
TARGETS = {"tiny-unet": 0.6, "tiny-sd": 0.6, "tiny-dit": 0.51}


@pytest.fixture(scope="module")
def digits():
    return load_data("digits", size=16)


def _calibration(adapter, digits) -> Calibration:
    if adapter.cond_kind == "text":
        table = torch.randn(10, 5, adapter.cross_attention_dim, generator=torch.manual_seed(0))
        return Calibration(digits, lambda labels: table[labels], DEFAULT_SCHEDULE)
    return Calibration(
        digits, (lambda labels: labels) if adapter.cond_kind == "class" else lambda _: None, DEFAULT_SCHEDULE
    )


def _config(**kwargs) -> LayerPruningConfig:
    return LayerPruningConfig(**{"calibration_size": 8, "batch_size": 8, **kwargs})


def _inputs(adapter, batch: int = 2) -> dict:
    inputs = adapter.example_inputs(batch)
    inputs["timestep"] = torch.tensor([30, 700][:batch])
    if adapter.cond_kind == "text":
        inputs["encoder_hidden_states"] = inputs["encoder_hidden_states"][:, :5]
    return inputs


def _bypassed_output(model: torch.nn.Module, names: list[str], inputs: dict) -> torch.Tensor:
    """The original model's output with `names` bypassed by forward hooks returning their input (for an up-block
    resnet, the hidden-state part of its [hidden, skip] input: the channels its output has)."""

    def bypass(_module, args, kwargs, output):
        x = args[0] if args else kwargs["hidden_states"]
        out = output[0] if isinstance(output, tuple) else output
        x = x[:, : out.shape[1]] if x.ndim == 4 else x
        return (x,) if isinstance(output, tuple) else x

    handles = [model.get_submodule(n).register_forward_hook(bypass, with_kwargs=True) for n in names]
    try:
        with torch.no_grad():
            return model(**inputs).sample
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("name", FAMILIES)
def test_pruned_model_equals_the_original_with_those_layers_bypassed(name: str, digits) -> None:
    model = build_tiny(name).eval()
    adapter = adapter_for(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = compress(adapter, _config(target_params=TARGETS[name]), _calibration(adapter, digits))
    removed = result.record["removed"]
    assert removed and all(isinstance(result.model.get_submodule(n), SkippedLayer) for n in removed)
    assert not any(isinstance(m, SkippedLayer) for m in model.modules())  # the source is untouched
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    inputs = _inputs(adapter)
    with torch.no_grad():
        pruned = result.model(**inputs).sample
        full = model(**inputs).sample
    reference = _bypassed_output(model, removed, inputs)
    torch.testing.assert_close(pruned, reference, rtol=0, atol=1e-6)
    assert not torch.allclose(pruned, full)
    assert result.achieved["params"] == pytest.approx(TARGETS[name], rel=0.02)
    assert result.achieved["params"] <= TARGETS[name] and result.record["within_tolerance"]
    assert count_params(result.model) == count_params(model) - sum(
        c["params"] for c in result.record["candidates"] if c["name"] in removed
    )


def _brute_force(costs, values, required, allowance) -> float:
    best = np.inf
    for k in range(len(costs) + 1):
        for subset in itertools.combinations(range(len(costs)), k):
            if required <= sum(costs[i] for i in subset) <= required + allowance:
                best = min(best, sum(values[i] for i in subset))
    return best


@pytest.mark.parametrize("seed", range(6))
def test_knapsack_is_optimal_against_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    costs = rng.integers(1, 60, size=10).tolist()
    values = (rng.random(10) - (0.3 if seed % 2 else 0.0)).tolist()  # odd seeds: some negative (task-loss) scores
    required, allowance = int(sum(costs) * 0.4), int(rng.integers(0, 6))
    expected = _brute_force(costs, values, required, allowance)
    selection = select_layers(costs, values, required, allowance)
    if np.isfinite(expected):
        assert selection.in_window and selection.grid == 1
        assert required <= selection.cost <= required + allowance
        assert sum(values[i] for i in selection.items) == pytest.approx(expected)
    else:  # nothing lands in the window: the cheapest set that still meets the budget
        assert not selection.in_window and selection.cost >= required
        cheapest = min(sum(s) for k in range(11) for s in itertools.combinations(costs, k) if sum(s) >= required)
        assert selection.cost == cheapest


def test_knapsack_on_a_coarse_grid_still_lands_in_the_window() -> None:
    rng = np.random.default_rng(7)
    costs = rng.integers(10_000, 90_000, size=20).tolist()
    values = rng.random(20).tolist()
    required, allowance = sum(costs) // 2, sum(costs) // 100
    selection = select_layers(costs, values, required, allowance, cells=20 * 5_000)
    assert selection.grid > 1 and selection.in_window
    assert required <= selection.cost <= required + allowance
    assert selection.cost == sum(costs[i] for i in selection.items)


def test_unreachable_window_reports_the_gap(digits) -> None:
    # a tiny DiT's removable blocks cost 25 % of the params each: 0.6 cannot be met within 2 %
    adapter = adapter_for(build_tiny("tiny-dit"))
    result = compress(adapter, _config(target_params=0.6, criterion="magnitude"), _calibration(adapter, digits))
    assert not result.record["within_tolerance"]
    assert result.achieved["params"] < 0.6 and result.record["gap"] == pytest.approx(result.achieved["params"] - 0.6)
    assert "from the params target 0.60" in result.summary


def test_macs_budget_is_met_within_two_percent(digits) -> None:
    adapter = adapter_for(build_tiny("tiny-unet"))
    result = compress(adapter, _config(target_macs=0.7, criterion="random"), _calibration(adapter, digits))
    assert result.achieved["macs"] == pytest.approx(0.7, rel=0.02) and result.achieved["macs"] <= 0.7


def test_scores_and_additivity_are_recorded(digits) -> None:
    adapter = adapter_for(build_tiny("tiny-unet"))
    config = _config(target_params=0.6, check_additivity=4)
    record = compress(adapter, config, _calibration(adapter, digits)).record
    candidates = record["candidates"]
    assert all(c["score"] == c["l_out"] and c["l_out"] > 0 and c["macs"] > 0 for c in candidates)
    assert record["predicted_l_out"] == pytest.approx(
        sum(c["l_out"] for c in candidates if c["name"] in record["removed"])
    )
    assert record["measured_l_out"] > 0
    additivity = record["additivity"]
    assert additivity["sets"] == 4 and len(additivity["predicted"]) == len(additivity["measured"]) == 4
    predicted, measured = np.array(additivity["predicted"]), np.array(additivity["measured"])
    assert additivity["pearson"] == pytest.approx(np.corrcoef(predicted, measured)[0, 1], abs=1e-3)
    ranks = [np.argsort(np.argsort(x)) for x in (predicted, measured)]
    assert additivity["spearman"] == pytest.approx(np.corrcoef(*ranks)[0, 1], abs=1e-3)
    assert record["calibration"]["t_min"] < 250 and record["calibration"]["t_max"] > 750  # t spread over [0, T)


def test_criteria_choose_by_their_own_scores(digits) -> None:
    adapter = adapter_for(build_tiny("tiny-unet"))
    data = _calibration(adapter, digits)
    removed = {}
    for criterion in ("output-loss", "task-loss", "magnitude", "random"):
        record = compress(adapter, _config(target_params=0.6, criterion=criterion), data).record
        removed[criterion] = tuple(record["removed"])
        assert all("score" in c for c in record["candidates"])
    assert len(set(removed.values())) >= 3
    magnitude = compress(adapter, _config(target_params=0.6, criterion="magnitude"), data).record["candidates"]
    weights = {n: p for n, p in adapter.model.named_parameters()}
    first = magnitude[0]
    expected = sum(w.detach().abs().sum() for n, w in weights.items() if n.startswith(first["name"] + "."))
    assert first["score"] == pytest.approx(float(expected), rel=1e-5)


def test_handcrafted_bk_sdm_rule(digits) -> None:
    adapter = adapter_for(build_tiny("tiny-unet"))
    data = _calibration(adapter, digits)
    removed = compress(adapter, _config(target_params=0.6, criterion="handcrafted"), data).record["removed"]
    # per stage: the last removable resnet and its attention, or the last attention when no resnet is removable
    assert removed == [
        "down_blocks.0.resnets.0",
        "down_blocks.1.attentions.0",
        "down_blocks.2.resnets.0",
        "up_blocks.0.resnets.1",
        "up_blocks.1.resnets.1",
        "up_blocks.1.attentions.1",
        "up_blocks.2.resnets.1",
    ]
    with_mid = compress(adapter, _config(target_params=0.6, criterion="handcrafted-mid"), data).record["removed"]
    assert with_mid == removed + ["mid_block.attentions.0", "mid_block.resnets.0", "mid_block.resnets.1"]


def test_handcrafted_dit_removes_evenly_spaced_blocks_and_refuses_mid(digits) -> None:
    adapter = adapter_for(build_tiny("tiny-dit", num_layers=7))
    data = _calibration(adapter, digits)
    result = compress(adapter, _config(target_params=0.6, criterion="handcrafted"), data)
    assert result.record["removed"] == ["transformer_blocks.2", "transformer_blocks.4", "transformer_blocks.6"]
    with pytest.raises(SlimdiffError, match="handcrafted-mid needs a U-Net mid block"):
        compress(adapter, _config(target_params=0.6, criterion="handcrafted-mid"), data)


@pytest.mark.parametrize("name", FAMILIES)
def test_export_round_trip_and_pipeline(name: str, digits, tmp_path: Path) -> None:
    latent = {} if name == "tiny-unet" else {"in_channels": 4, "out_channels": 4}
    model = build_tiny(name, **latent).eval()
    adapter = adapter_for(model)
    data = Calibration(digits, _calibration(adapter, digits).cond_for, DEFAULT_SCHEDULE)
    if latent:  # the digits are 1-channel: calibrate on 4-channel copies
        data.dataset = [(image.repeat(4, 1, 1), label) for image, label in (digits[i] for i in range(64))]
    result = compress(adapter, _config(target_params=TARGETS[name]), data)
    save(result.model, tmp_path / "m")
    loaded = load(tmp_path / "m")
    inputs = _inputs(adapter)
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).sample, result.model(**inputs).sample)
    if name == "tiny-unet":
        images = DDIMPipeline(loaded, DDIMScheduler())(
            batch_size=2, num_inference_steps=2, generator=torch.manual_seed(0), output_type="np"
        ).images
        assert images.shape == (2, 16, 16, 1)
    elif name == "tiny-dit":
        images = DiTPipeline(transformer=loaded, vae=tiny_vae(4), scheduler=DDIMScheduler())(
            class_labels=[1, 7], num_inference_steps=2, guidance_scale=2.0, output_type="np"
        ).images
        assert images.shape == (2, 16, 16, 3)
    else:
        encoder = make_tiny_clip_text(tmp_path / "clip", hidden_size=32, max_length=16)
        pipeline = tiny_sd_pipeline(loaded, encoder)
        images = pipeline(["a 3"], num_inference_steps=2, height=16, width=16, output_type="np").images
        assert images.shape == (1, 16, 16, 3)
    assert np.isfinite(images).all()


@pytest.mark.parametrize("name", ["tiny-unet", "tiny-sd"])
def test_layers_then_channels_and_channels_then_layers(name: str, digits, tmp_path: Path) -> None:
    adapter = adapter_for(build_tiny(name).eval())
    data = _calibration(adapter, digits)
    channel_config = channels.ChannelPruningConfig(
        importance="magnitude", target_macs=0.6, calibration_size=4, timestep_stride=200, tolerance=0.25
    )
    layered = compress(adapter, _config(target_params=0.7), data).model
    inputs = _inputs(adapter)
    identity = channels.prune_copy(layered, 0.0, "magnitude").model  # every index mapped through the stand-ins
    with torch.no_grad():
        assert torch.equal(identity(**inputs).sample, layered(**inputs).sample)
    both = channels.compress(adapter_for(layered), channel_config, data).model
    narrowed = channels.compress(adapter, channel_config, data).model
    both_reversed = compress(adapter_for(narrowed), _config(target_params=0.6), data).model
    assert any(isinstance(m, SkippedLayer) for m in both_reversed.modules())
    for index, composed in enumerate((both, both_reversed)):
        inputs = _inputs(adapter_for(composed))
        with torch.no_grad():
            out = composed(**inputs).sample
        assert torch.isfinite(out).all()
        save(composed, tmp_path / str(index))
        with torch.no_grad():
            assert torch.equal(load(tmp_path / str(index))(**inputs).sample, out)
    assert count_params(both) < count_params(layered) and count_params(both_reversed) < count_params(narrowed)


def test_cli_compress_layers(tmp_path: Path, monkeypatch, capsys) -> None:
    save(build_tiny("tiny-unet"), tmp_path / "teacher")
    code, _, err = run_cli(
        monkeypatch, capsys, "compress", "layers", tmp_path / "teacher", "--out", tmp_path / "out", "--data",
        "digits", "--target-params", "0.6", "--calibration", "8", "--check-additivity", "3",
    )  # fmt: skip
    assert code == 0, err
    history = json.loads((tmp_path / "out" / "slimdiff.json").read_text())["provenance"]["history"]
    assert history[-1]["job"] == "compress layers" and history[-1]["additivity"]["sets"] == 3
    assert history[-1]["achieved"]["params"] == pytest.approx(0.6, rel=0.02)
    assert any(isinstance(m, SkippedLayer) for m in load(tmp_path / "out").modules())
    code, _, err = run_cli(
        monkeypatch, capsys, "compress", "layers", tmp_path / "teacher", "--out", tmp_path / "bad", "--data",
        "digits", "--target-params", "0.6", "--criterion", "l1",
    )  # fmt: skip
    assert code == 2 and "criterion ('--criterion'): must be one of output-loss, task-loss" in err


def test_recipe_prunes_layers_and_distils_features(tmp_path: Path, recipe_cli) -> None:
    save(build_tiny("tiny-unet"), tmp_path / "teacher")
    code, out, err = recipe_cli(
        f"model: {tmp_path / 'teacher'}\nout: {tmp_path / 'out'}\nsteps:\n"
        "  - compress: {engine: layers, criterion: task-loss, target_params: 0.6, calibration_size: 8}\n"
        "  - finetune: {steps: 2, batch_size: 8, teacher: model, kd: plain, kd_feature_weight: 1}\n",
    )
    assert code == 0, err
    summaries = [json.loads(line) for line in out.splitlines()]
    assert summaries[0]["achieved"]["params"] == pytest.approx(0.6, rel=0.02)
    log = [json.loads(line) for line in (tmp_path / "out" / "01-finetune" / "log.jsonl").read_text().splitlines()]
    terms = log[-1]["feat_kd_terms"]  # every block output of the layer-pruned student is matched and logged
    assert set(terms) == {b.name for b in adapter_for(build_tiny("tiny-unet")).blocks()}
    assert log[-1]["feat_kd"] == pytest.approx(sum(terms.values()), rel=1e-5)


def test_bad_configs_are_refused(digits) -> None:
    with pytest.raises(SlimdiffError, match="exactly one budget"):
        LayerPruningConfig().validate()
    with pytest.raises(SlimdiffError, match="exactly one budget"):
        LayerPruningConfig(target_params=0.5, target_macs=0.5).validate()
    with pytest.raises(
        SlimdiffError,
        match=r"invalid setting criterion \('--criterion'\): must be one of output-loss, task-loss, magnitude",
    ):
        LayerPruningConfig(target_params=0.5, criterion="l2").validate()
    with pytest.raises(SlimdiffError, match=r"budget 1.2 must be a fraction"):
        LayerPruningConfig(target_params=1.2).validate()
    with pytest.raises(SlimdiffError, match="check_additivity must be 0 \\(off\\) or ≥ 3"):
        LayerPruningConfig(target_params=0.5, check_additivity=2).validate()
    with pytest.raises(SlimdiffError, match="calibration_size \\(0\\)"):
        LayerPruningConfig(target_params=0.5, calibration_size=0).validate()
    adapter = adapter_for(build_tiny("tiny-unet"))
    with pytest.raises(SlimdiffError, match=r"cannot reach 0.10 of the original params: .* keeps 0.2\d\d"):
        compress(adapter, _config(target_params=0.1), _calibration(adapter, digits))
