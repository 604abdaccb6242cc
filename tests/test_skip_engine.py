"""The skip engine: baselines, the DiP-GO search and its post-processing, the CLI."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import run_cli, tiny_vae

from slimdiff.engines import Calibration, get_engine, skip
from slimdiff.engines.skip import dipgo
from slimdiff.errors import SlimdiffError
from slimdiff.export import load, read_provenance, save
from slimdiff.io import read_json
from slimdiff.models import adapter_for, build_tiny
from slimdiff.training.diffusion import make_scheduler, sample


def _base(model: torch.nn.Module, granularity: str, steps: int = 8) -> skip.SkipTable:
    sched = make_scheduler("ddim")
    sched.set_timesteps(steps)
    units = skip.model_units(adapter_for(model), granularity)
    return skip.SkipTable.full("DDIMScheduler", sched.timesteps.tolist(), units, granularity)


def test_expected_kept_matches_the_table_for_hard_gates() -> None:
    model = build_tiny("tiny-unet").eval()
    base = _base(model, "layer")
    costs = skip.unit_costs(model, base.units)
    generator = torch.Generator().manual_seed(0)
    keep = (torch.rand(len(base.timesteps), len(base.units), generator=generator) < 0.6).float()
    keep[0] = 1
    table = skip.SkipTable.from_json(base.to_json() | {"compute": keep.bool().tolist()})
    assert skip.expected_kept(keep, base, costs).item() == pytest.approx(skip.kept_fraction(table, costs), rel=1e-5)


def test_full_step_schedules() -> None:
    assert skip.full_steps(10, 5, "uniform") == [0, 2, 4, 6, 8]
    steps = skip.full_steps(50, 10, "non-uniform")
    assert len(steps) == 10 and steps[0] == 0 and steps[-1] == 49
    gaps = [b - a for a, b in zip(steps, steps[1:])]
    assert min(gaps) < 50 / 10 < max(gaps)  # denser around the centre than uniform


def test_step_reuse_and_deepcache_tables() -> None:
    model = build_tiny("tiny-unet").eval()
    adapter = adapter_for(model)
    base = _base(model, "layer")
    costs = skip.unit_costs(model, base.units)
    engine = get_engine("skip")
    config = engine.make_config(method="step-reuse", steps=8, target_macs=0.5)
    table, how = skip.baseline_table(adapter, config, base, costs)
    assert [all(row) for row in table.compute] == [s in (0, 2, 4, 6) for s in range(8)]
    assert not any(any(row) for row in table.effective()[1::2]) and "4 full steps" in how
    config = engine.make_config(method="deepcache", steps=8, target_macs=0.6, granularity="layer")
    table, how = skip.baseline_table(adapter, config, base, costs)
    partial = next(row for row in table.compute if not all(row))
    # branch 0: the first down resnet and the up-side layers from the one that consumes its skip tensor
    assert {n for n, c in zip(base.units, partial, strict=True) if c} == {
        "down_blocks.0.resnets.0",
        "up_blocks.2.resnets.0",
        "up_blocks.2.resnets.1",
    }
    assert skip.kept_fraction(table, costs) <= config.limit
    with pytest.raises(SlimdiffError, match="least is"):
        skip.baseline_table(adapter, engine.make_config(method="deepcache", steps=8, target_macs=0.2), base, costs)
    dit = build_tiny("tiny-dit").eval()
    with pytest.raises(SlimdiffError, match="needs a U-Net"):
        skip.baseline_table(
            adapter_for(dit), config, _base(dit, "block"), skip.unit_costs(dit, _base(dit, "block").units)
        )


def test_postprocess_skips_from_the_output_side_by_probability_and_never_step_0() -> None:
    model = build_tiny("tiny-unet").eval()
    base = _base(model, "block", steps=4)
    costs = skip.unit_costs(model, base.units)
    probs = torch.zeros(4, len(base.units))
    probs[:, base.units.index("mid_block")] = torch.tensor([1.0, 0.97, 0.99, 0.5])
    probs[:, base.units.index("down_blocks.0")] = torch.tensor([1.0, 0.2, 0.96, 0.1])
    limit = skip.kept_fraction(base, costs) - 1e-6
    table = skip.postprocess(probs, base, costs, limit, 0.0, 0.95)
    skipped = {(s, n) for s, row in enumerate(table.compute) for n, c in zip(base.units, row, strict=True) if not c}
    assert skipped == {(2, "mid_block")}  # the first candidate met the limit
    strict = skip.kept_fraction(
        skip.SkipTable.from_json(
            base.to_json()
            | {"compute": [[n not in ("mid_block", "down_blocks.0") or s == 0 for n in base.units] for s in range(4)]}
        ),
        costs,
    )
    table = skip.postprocess(probs, base, costs, strict, 0.0, 0.95)
    assert all(table.compute[0]) and not table.compute[3][base.units.index("mid_block")]
    assert skip.kept_fraction(table, costs) <= strict


def test_dip_go_search_makes_a_table_at_the_target(tmp_path: Path) -> None:
    model = build_tiny("tiny-unet").eval()
    save(model, tmp_path / "m")
    from slimdiff.jobs.compression import compress_model

    config = get_engine("skip").make_config(
        target_macs=0.5, steps=4, iterations=3, noises=4, batch_size=2, granularity="layer"
    )
    result = compress_model("skip", tmp_path / "m", "digits", tmp_path / "out", config)
    assert (
        0.95 * config.target_macs <= result.achieved["sampling_macs"] <= config.limit
    )  # a table computing nothing fails
    assert len(result.record["search_history"]) == 2 and result.record["search_seconds"] > 0
    loaded = load(tmp_path / "out")
    table = skip.table_of(loaded)
    assert table is not None and table.num_inference_steps == 4 and not all(map(all, table.compute))
    assert torch.equal(next(loaded.parameters()), next(model.parameters()))  # the weights are untouched
    assert read_provenance(tmp_path / "out").engine == "skip"
    images = sample(adapter_for(loaded), n=2, steps=4, progress=False)
    assert images.shape == (2, 1, 16, 16) and torch.isfinite(images).all()


def test_warm_started_gate_network_begins_at_the_given_table() -> None:
    model = build_tiny("tiny-unet").eval()
    base = _base(model, "block")
    costs = skip.unit_costs(model, base.units)
    config = get_engine("skip").make_config(method="step-reuse", target_macs=0.5, steps=8)
    start, _ = skip.baseline_table(adapter_for(model), config, base, costs)
    keep = skip.GateNetwork(len(base.timesteps), len(base.units), start=torch.tensor(start.compute))()
    assert torch.equal(keep > 0.5, torch.tensor(start.compute))
    assert bool((skip.GateNetwork(len(base.timesteps), len(base.units))() > 0.9).all())  # the paper's start: all kept


def _calibration(model: torch.nn.Module) -> Calibration:
    from slimdiff.jobs.compression import training_data

    return Calibration(training_data(adapter_for(model), "digits", 0), lambda labels: None, {})


def test_choose_table_keeps_whichever_table_is_more_consistent_on_held_out_noises() -> None:
    model = build_tiny("tiny-unet").eval()
    adapter, base = adapter_for(model), _base(model, "block", steps=6)
    costs = skip.unit_costs(model, base.units)
    config = get_engine("skip").make_config(target_macs=0.5, steps=6, noises=4, batch_size=2)
    data = _calibration(model)
    held_out = skip.held_out_noise_set(adapter, config, data)
    assert skip.held_out_consistency(adapter, config, data, held_out, {"full": base})["full"] == pytest.approx(
        0, abs=1e-6
    )
    reuse, _ = skip.baseline_table(
        adapter, get_engine("skip").make_config(method="step-reuse", target_macs=0.5, steps=6), base, costs
    )
    for seed in range(3):  # random probabilities: whichever wins, the selection follows the held-out losses
        probs = torch.rand(6, len(base.units), generator=torch.Generator().manual_seed(seed))
        chosen = skip.choose_table(adapter, config, data, base, costs, probs, held_out)
        losses = chosen.held_out
        assert set(losses) == {"dip-go", "step-reuse"} and losses["dip-go"] > 0
        if losses["step-reuse"] < losses["dip-go"]:
            assert chosen.selected == "step-reuse" and chosen.table.compute == reuse.compute
        else:
            assert chosen.selected == "dip-go" and skip.kept_fraction(chosen.table, costs) <= config.limit
    never = skip.choose_table(adapter, dataclasses.replace(config, fallback="none"), data, base, costs, probs, held_out)
    assert never.selected == "dip-go" and never.held_out == {}
    assert never.table.compute == skip.postprocess(probs, base, costs, 0.5, config.tolerance, config.threshold).compute


def test_guided_dip_go_search_on_a_text_model(tmp_path: Path) -> None:
    from slimdiff.jobs.compression import compress_model
    from slimdiff.text import make_tiny_clip_text

    model = build_tiny("tiny-sd").eval()
    save(model, tmp_path / "m")
    make_tiny_clip_text(tmp_path / "m", hidden_size=adapter_for(model).cross_attention_dim, seed=0).save(tmp_path / "m")
    config = get_engine("skip").make_config(
        target_macs=0.5, steps=4, iterations=2, noises=4, batch_size=2, guidance_scale=3.0, start="step-reuse"
    )
    result = compress_model("skip", tmp_path / "m", "digits", tmp_path / "out", config)
    assert 0.9 * config.target_macs <= result.achieved["sampling_macs"] <= config.limit
    assert result.record["selected"] in ("dip-go", "step-reuse") and set(result.record["held_out"]) == {
        "dip-go",
        "step-reuse",
    }


def _search_setup(steps: int = 4) -> tuple[Any, skip.SkipTable, skip.UnitCosts, Calibration]:
    model = build_tiny("tiny-unet").eval()
    base = _base(model, "block", steps=steps)
    return adapter_for(model), base, skip.unit_costs(model, base.units), _calibration(model)


def test_checkpointed_trajectory_has_the_same_gradients_and_recomputes_each_step() -> None:
    adapter, base, _, _ = _search_setup(steps=5)
    model = copy.deepcopy(adapter.model).requires_grad_(False)
    gating = skip.Gating(model, base)
    calls = []
    model.mid_block.register_forward_pre_hook(lambda *_: calls.append(1))
    noise = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    results = {}
    for mode in ("steps", "none"):
        calls.clear()
        config = get_engine("skip").make_config(target_macs=0.5, steps=5, checkpointing=mode)
        gates = torch.full((5, len(base.units)), 0.6, requires_grad=True)
        final = skip.trajectory(adapter_for(model), config, {}, noise, None, None, 0, gating=gating, gates=gates)
        final.square().mean().backward()
        results[mode] = (final.detach(), gates.grad, len(calls))
    assert torch.equal(results["steps"][0], results["none"][0])
    assert torch.allclose(results["steps"][1], results["none"][1], atol=1e-7) and results["none"][1].abs().sum() > 0
    # every step recomputed once in the backward pass, but step 0 (no cache to blend: no gate reaches it)
    assert (results["none"][2], results["steps"][2]) == (5, 9)


def test_an_interrupted_search_resumes_where_its_checkpoint_left_off(tmp_path: Path, monkeypatch) -> None:
    adapter, base, costs, data = _search_setup()
    monkeypatch.setattr(dipgo, "SEARCH_CHECKPOINT_EVERY", 2)
    config = get_engine("skip").make_config(target_macs=0.5, steps=4, iterations=5, noises=4, batch_size=2)
    straight, _ = skip.search(adapter, config, data, base, costs, lambda message: None)

    def crash_at_4(message: str) -> None:
        if message.startswith("search    4"):
            raise KeyboardInterrupt

    resumable = dataclasses.replace(data, work_dir=tmp_path)
    with pytest.raises(KeyboardInterrupt):
        skip.search(adapter, config, resumable, base, costs, crash_at_4)
    assert read_json(tmp_path / skip.SEARCH_STATE / "state.json")["done"] == 4
    messages: list[str] = []
    resumed, history = skip.search(adapter, config, resumable, base, costs, messages.append)
    assert "resuming the dip-go search after 4 of 5 steps" in messages[0]
    searched = r"search    4: consistency loss \d\.\d{4} \(1 − SSIM to the full sampler's samples\), "
    assert any(re.fullmatch(searched + r"expected \d\.\d{3} of the sampling MACs kept", m) for m in messages), messages
    assert torch.equal(resumed, straight) and [row["iteration"] for row in history] == [0, 4]
    other = dataclasses.replace(config, lr=0.01)  # other settings: the checkpoint is not theirs
    messages.clear()
    skip.search(adapter, other, resumable, base, costs, messages.append)
    assert "other settings; starting over" in messages[0]


def test_the_search_scores_a_latent_model_through_its_vae() -> None:
    model = build_tiny("tiny-sd", in_channels=4, out_channels=4).eval()
    adapter, base = adapter_for(model), _base(model, "block", steps=3)
    vae = tiny_vae(4).eval().requires_grad_(False)
    seen: list[tuple[bool, int]] = []

    def decode(latents: torch.Tensor) -> torch.Tensor:
        images = vae.decode(latents).sample
        seen.append((latents.requires_grad, images.shape[1]))
        return images

    labels_only = _calibration(build_tiny("tiny-unet"))  # the search reads only labels from the data
    data = dataclasses.replace(labels_only, cond_for=lambda labels: torch.zeros(len(labels), 4, 32), decode=decode)
    config = get_engine("skip").make_config(target_macs=0.5, steps=3, iterations=2, noises=2, batch_size=1)
    skip.search(adapter, config, data, base, skip.unit_costs(model, base.units), lambda message: None)
    # the references decoded without gradient, the gated trajectories with it; SSIM compares 3-channel images
    assert seen == [(False, 3), (False, 3), (True, 3), (True, 3)]


def test_two_gloo_processes_search_the_same_gate_network(tmp_path: Path) -> None:
    script = Path(__file__).parent / "dip_go_search_script.py"
    command = ["torchrun", "--standalone", "--nproc_per_node", "2", str(script), str(tmp_path)]
    subprocess.run(command, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2] and ranks[0]["digest"] == ranks[1]["digest"]


def test_cli_compress_skip_and_its_help(tmp_path: Path, monkeypatch, capsys) -> None:
    save(build_tiny("tiny-unet").eval(), tmp_path / "m")

    def run(*args: str) -> tuple[int, str, str]:
        return run_cli(monkeypatch, capsys, *args)

    code, out, _ = run("compress", "skip", "--help")
    assert code == 0 and "fewer steps" in out and "--target-macs" in out and "--method" in out
    args = ["compress", "skip", tmp_path / "m", "--data", "digits", "--steps", "6", "--target-macs", "0.5"]
    code, _, _ = run(*args, "--method", "step-reuse", "--out", tmp_path / "o")
    assert code == 0 and skip.table_of(load(tmp_path / "o")).num_inference_steps == 6
    code, _, err = run(*args, "--method", "magic", "--out", tmp_path / "bad")
    assert code == 2 and "method" in err and "dip-go" in err and len(err.strip().splitlines()) == 1
    low = ["compress", "skip", tmp_path / "m", "--steps", "4", "--target-macs", "0.1", "--out", tmp_path / "low"]
    code, _, err = run(*low)  # below what reusing every unit after step 0 keeps: refused by name, with the least
    assert code != 0 and "dip-go's warm start" in err and "its least is" in err and len(err.strip().splitlines()) == 1
