"""The skip-table runtime: hooks that reuse unit outputs, checked against hand-written references."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMPipeline, DDIMScheduler, DiTPipeline
from helpers import ddim_error_gain, tiny_sd_pipeline, tiny_vae
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from slimdiff.artifacts import full_compute, sampling_plan
from slimdiff.engines import skip
from slimdiff.errors import SlimdiffError
from slimdiff.export import load, save
from slimdiff.models import adapter_for, build_tiny
from slimdiff.text import make_tiny_clip_text
from slimdiff.training.diffusion import make_scheduler, sample

STEPS = 5


def _table(model: torch.nn.Module, granularity: str, scheduler: str = "ddim", steps: int = STEPS) -> skip.SkipTable:
    sched = make_scheduler(scheduler)
    sched.set_timesteps(steps)
    units = skip.model_units(adapter_for(model), granularity)
    return skip.SkipTable.full(type(sched).__name__, sched.timesteps.tolist(), units, granularity)


def _sample(model: torch.nn.Module, **kwargs) -> torch.Tensor:
    adapter = adapter_for(model)
    cond = None if adapter.cond_kind == "none" else torch.tensor([1, 3, 5])
    return sample(adapter, n=3, steps=STEPS, cond=cond, progress=False, **kwargs)


@pytest.mark.parametrize(
    ("family", "granularity"),
    [("tiny-unet", "block"), ("tiny-unet", "layer"), ("tiny-dit", "layer"), ("tiny-dit", "block")],
)
def test_all_compute_table_is_bit_identical_to_no_hooks(family: str, granularity: str) -> None:
    model = build_tiny(family).eval()
    reference = _sample(model, guidance_scale=2.0 if family == "tiny-dit" else 1.0)
    skip.attach(model, _table(model, granularity))
    assert sampling_plan(model).computed == (1.0,) * STEPS  # the table computes everything, and says so
    assert torch.equal(_sample(model, guidance_scale=2.0 if family == "tiny-dit" else 1.0), reference)
    skip.detach(model)
    assert skip.table_of(model) is None and sampling_plan(model) is None


def _manual_unet(model, x, t, live: set[str], cache: dict) -> torch.Tensor:
    """UNet2DModel's forward written out, with each block recomputed only when `live` names it."""
    emb = model.time_embedding(model.time_proj(t.expand(x.shape[0])).to(x.dtype))
    h = model.conv_in(x)
    skips: tuple[torch.Tensor, ...] = (h,)
    for i, down in enumerate(model.down_blocks):
        if f"down_blocks.{i}" in live:
            cache[f"down_blocks.{i}"] = down(hidden_states=h, temb=emb)
        h, res = cache[f"down_blocks.{i}"]
        skips += res
    if "mid_block" in live:
        cache["mid_block"] = model.mid_block(h, emb)
    h = cache["mid_block"]
    for j, up in enumerate(model.up_blocks):
        res, skips = skips[-len(up.resnets) :], skips[: -len(up.resnets)]
        if f"up_blocks.{j}" in live:
            cache[f"up_blocks.{j}"] = up(h, res, emb)
        h = cache[f"up_blocks.{j}"]
    return model.conv_out(model.conv_act(model.conv_norm_out(h)))


def test_table_equals_hand_written_reuse_loop_with_dead_blocks() -> None:
    model = build_tiny("tiny-unet").eval()
    table = _table(model, "block")
    names = table.units
    skipped = {1: {"mid_block", "up_blocks.0"}, 2: {"up_blocks.2"}, 3: {"mid_block"}, 4: {"down_blocks.0"}}
    for step, units in skipped.items():
        for name in units:
            table.compute[step][names.index(name)] = False
    # dead by hand: step 1 — down_blocks.2 feeds only mid_block and up_blocks.0 (both skipped); step 2 — the last up
    # block is skipped, so everything is dead; step 4 — down_blocks.0 is skipped, which kills nothing
    dead = {1: {"down_blocks.2"}, 2: set(names), 3: set(), 4: set()}
    expected_live = [set(names)] + [set(names) - skipped[s] - dead[s] for s in range(1, STEPS)]
    assert [{n for n, live in zip(names, row) if live} for row in table.effective()] == expected_live

    sched = make_scheduler("ddim")
    sched.set_timesteps(STEPS)
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    cache: dict = {}
    with torch.no_grad():
        manual = x.clone()
        for step, t in enumerate(sched.timesteps):
            manual = sched.step(_manual_unet(model, manual, t, expected_live[step], cache), t, manual).prev_sample
        skip.attach(model, table)
        hooked = x.clone()
        sched.set_timesteps(STEPS)
        for t in sched.timesteps:
            hooked = sched.step(model(hooked, t).sample, t, hooked).prev_sample
    assert torch.allclose(hooked, manual, atol=1e-6, rtol=0)
    assert not torch.allclose(hooked, _sample_from(model, x), atol=1e-3)


def _sample_from(model, x: torch.Tensor) -> torch.Tensor:
    with full_compute(model), torch.no_grad():
        sched = make_scheduler("ddim")
        sched.set_timesteps(STEPS)
        for t in sched.timesteps:
            x = sched.step(model(x, t).sample, t, x).prev_sample
    return x


def test_unet_whole_step_reuse_equals_reusing_the_noise_prediction() -> None:
    # the U-Net's head (norm, conv_out) does not see the timestep, so reusing every layer reuses the prediction
    model = build_tiny("tiny-unet").eval()
    table = _table(model, "layer")
    for step in (2, 4):
        table.compute[step] = [False] * len(table.units)
    skip.attach(model, table)
    sched = make_scheduler("ddim")
    sched.set_timesteps(STEPS)
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    hooked, manual, eps = x.clone(), x.clone(), None
    with torch.no_grad():
        for t in sched.timesteps:
            hooked = sched.step(model(hooked, t).sample, t, hooked).prev_sample
        for step, t in enumerate(sched.timesteps):
            if step not in (2, 4):
                with full_compute(model):
                    eps = model(manual, t).sample
            manual = sched.step(eps, t, manual).prev_sample
    assert torch.allclose(hooked, manual, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("family", "granularity", "guidance"), [("tiny-unet", "layer", 1.0), ("tiny-sd", "block", 2.0)]
)
def test_measured_sampling_macs_equal_the_tables_prediction(family: str, granularity: str, guidance: float) -> None:
    model = build_tiny(family).eval()
    table = _table(model, granularity)
    generator = torch.Generator().manual_seed(0)
    for step in range(1, STEPS):
        table.compute[step] = (torch.rand(len(table.units), generator=generator) < 0.5).tolist()
    costs = skip.unit_costs(model, table.units)
    predicted = sum(skip.kept_fractions(table, costs)) * costs.total * (2 if guidance != 1.0 else 1)
    assert predicted < 0.9 * STEPS * costs.total * (2 if guidance != 1.0 else 1)
    skip.attach(model, table)
    adapter = adapter_for(model)
    cond = None
    if adapter.cond_kind == "text":
        cond = adapter.example_inputs(1)["encoder_hidden_states"]
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        sample(
            adapter,
            n=1,
            steps=STEPS,
            cond=cond,
            guidance_scale=guidance,
            uncond_embedding=None if cond is None else torch.zeros_like(cond),
            progress=False,
        )
    assert counter.get_total_flops() // 2 == round(predicted)


def test_separate_cond_and_uncond_calls_each_get_their_own_cache() -> None:
    model = build_tiny("tiny-unet", num_class_embeds=10).eval()
    table = _table(model, "block")
    for step in range(1, STEPS, 2):
        table.compute[step][table.units.index("mid_block")] = False
    sched = make_scheduler("ddim")
    sched.set_timesteps(STEPS)
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    cond, uncond = torch.tensor([1, 2]), torch.tensor([3, 4])
    guidance = 3.0

    def run(cond_model: torch.nn.Module, uncond_model: torch.nn.Module | None = None) -> torch.Tensor:
        """Guided DDIM: one doubled-batch call per step, or (with `uncond_model`) separate cond and uncond calls."""
        y = x.clone()
        with torch.no_grad():
            for t in sched.timesteps:
                if uncond_model is not None:
                    a, b = cond_model(y, t, cond).sample, uncond_model(y, t, uncond).sample
                else:
                    a, b = cond_model(torch.cat([y, y]), t, torch.cat([cond, uncond])).sample.chunk(2)
                y = sched.step(b + guidance * (a - b), t, y).prev_sample
        return y

    with torch.no_grad():  # what batching alone changes in one call (the CPU kernels sum in another order)
        t0 = sched.timesteps[0]
        doubled = model(torch.cat([x, x]), t0, torch.cat([cond, uncond])).sample
        call_noise = (doubled - torch.cat([model(x, t0, cond).sample, model(x, t0, uncond).sample])).abs().max()
    unskipped = run(model)
    alone = [copy.deepcopy(model), copy.deepcopy(model)]
    for one in (model, *alone):
        skip.attach(one, table)

    # exact: each call slot has its own cache — two calls a step are two slots, and equal two models that each
    # serve one of the calls alone (the same computation, bit for bit); a doubled batch is one slot
    separate = run(model, model)
    assert skip.run_state(model).slots == 2
    assert torch.equal(separate, run(alone[0], alone[1]))
    together = run(model)
    assert skip.run_state(model).slots == 1

    # floats: the doubled batch differs from the separate calls only by batching noise. Each guided ε weighs the
    # two calls' errors by |w| + |w − 1| = 2w − 1, DDIM carries an ε error to the final x at most by its gain, and
    # a factor 4 covers the network's response to the input differences it then carries from step to step
    # (measured 1.2× here). Skipping itself moves the result by far more (checked), so the bound is not vacuous.
    tolerance = 4 * (2 * guidance - 1) * ddim_error_gain(sched) * float(call_noise)
    assert (together - separate).abs().max() <= tolerance
    assert (together - unskipped).abs().max() > 100 * max(tolerance, 1e-6)


def test_state_resets_each_run_and_survives_repeated_timesteps() -> None:
    model = build_tiny("tiny-unet").eval()
    timesteps = [900.0, 700.0, 700.0, 300.0, 100.0]  # a solver that evaluates one timestep twice
    units = skip.model_units(adapter_for(model), "block")
    table = skip.SkipTable.full("HeunLikeScheduler", timesteps, units, "block")
    table.compute[2] = [False] * len(units)
    table.compute[3][units.index(next(u for u in units if u.name == "mid_block"))] = False
    skip.attach(model, table)
    x = torch.randn(1, 1, 16, 16)
    with torch.no_grad():
        first = [model(x, torch.tensor(t)).sample for t in timesteps]
        second = [model(x, torch.tensor(t)).sample for t in timesteps]  # a new run starts at the first timestep
    assert torch.equal(first[2], first[1])  # step 2 (the repeated timestep) reused the whole of step 1
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    state = skip.run_state(model)
    assert state.step == 4 and state.slots == 1


def test_other_timesteps_are_refused_naming_the_tables_sampler() -> None:
    model = build_tiny("tiny-unet").eval()
    skip.attach(model, _table(model, "block"))
    with pytest.raises(SlimdiffError, match="made for DDIMScheduler with 5 steps") as error:
        sample(adapter_for(model), n=1, steps=7, progress=False)
    assert "\n" not in str(error.value)
    assert _sample(model).shape == (3, 1, 16, 16)  # the right sampler still works after the refusal


def test_bad_tables_are_refused() -> None:
    model = build_tiny("tiny-unet").eval()
    payload = _table(model, "block").to_json()
    with pytest.raises(SlimdiffError, match="step 0 must compute"):
        skip.SkipTable.from_json(payload | {"compute": [[False] * 7] * STEPS})
    with pytest.raises(SlimdiffError, match="keys"):
        skip.SkipTable.from_json({"units": []})
    with pytest.raises(SlimdiffError, match="no block unit"):
        skip.attach(model, payload | {"units": [*payload["units"][:-1], "nowhere"]})


# ----------------------------------------------------------------------------------------------------------------
# saved with the model, honoured by plain diffusers pipelines
# ----------------------------------------------------------------------------------------------------------------
def _unit_runs(model: torch.nn.Module, units: list[str]) -> dict[str, int]:
    """Count how often each unit really computes (a forward hook on its first parameterised child)."""
    runs = dict.fromkeys(units, 0)
    for name in units:
        child = next(
            m for m in model.get_submodule(name).modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))
        )
        child.register_forward_hook(lambda *_, name=name: runs.__setitem__(name, runs[name] + 1))
    return runs


def _sparse_table(model: torch.nn.Module, scheduler, steps: int, granularity: str) -> skip.SkipTable:
    scheduler.set_timesteps(steps)
    units = skip.model_units(adapter_for(model), granularity)
    table = skip.SkipTable.full(type(scheduler).__name__, scheduler.timesteps.tolist(), units, granularity)
    for step in range(1, steps):
        for i in range(len(units)):
            table.compute[step][i] = (step + i) % 3 != 0
    return table


def _save_with_table(model, table, path: Path) -> torch.nn.Module:
    save(model, path, artifacts={"skip_table": table.to_json()})
    return load(path)


def _check_runs(runs: dict[str, int], table: skip.SkipTable, calls_per_step: int = 1) -> None:
    effective = table.effective()
    expected = {name: calls_per_step * sum(row[i] for row in effective) for i, name in enumerate(table.units)}
    assert runs == expected
    assert min(expected.values()) < len(effective) * calls_per_step  # something was skipped


def test_ddim_pipeline_runs_the_saved_table(tmp_path: Path) -> None:
    model = build_tiny("tiny-unet").eval()
    table = _sparse_table(model, DDIMScheduler(), 6, "layer")
    loaded = _save_with_table(model, table, tmp_path / "m")
    assert skip.table_of(loaded).to_json() == table.to_json()
    assert skip.table_of(load(tmp_path / "m", artifacts=False)) is None
    runs = _unit_runs(loaded, table.units)
    pipeline = DDIMPipeline(loaded, DDIMScheduler())
    images = pipeline(batch_size=2, num_inference_steps=6, generator=torch.manual_seed(0), output_type="np").images
    _check_runs(runs, table)
    bare = DDIMPipeline(load(tmp_path / "m", artifacts=False), DDIMScheduler())
    reference = bare(batch_size=2, num_inference_steps=6, generator=torch.manual_seed(0), output_type="np").images
    assert np.isfinite(images).all() and not np.allclose(images, reference, atol=1e-3)
    with pytest.raises(SlimdiffError, match="made for DDIMScheduler with 6 steps"):
        pipeline(batch_size=1, num_inference_steps=8, output_type="np")


def test_stable_diffusion_pipeline_runs_the_saved_table(tmp_path: Path) -> None:
    model = build_tiny("tiny-sd", in_channels=4, out_channels=4).eval()
    # the pipeline itself sets steps_offset=1 on an old-style config; the table is made for what it will run
    table = _sparse_table(model, DDIMScheduler(clip_sample=False, steps_offset=1), 4, "block")
    unet = _save_with_table(model, table, tmp_path / "m")
    runs = _unit_runs(unet, table.units)
    encoder = make_tiny_clip_text(tmp_path / "clip", hidden_size=32, max_length=16)
    pipeline = tiny_sd_pipeline(unet, encoder)
    out = pipeline(["a 3"], num_inference_steps=4, height=16, width=16, output_type="np", guidance_scale=3.0)
    assert np.isfinite(out.images).all()
    _check_runs(runs, table)  # the guidance batch is doubled: still one call per step


def test_dit_pipeline_runs_the_saved_table(tmp_path: Path) -> None:
    model = build_tiny("tiny-dit", in_channels=4, out_channels=4).eval()
    table = _sparse_table(model, DDIMScheduler(), 4, "layer")
    transformer = _save_with_table(model, table, tmp_path / "m")
    runs = _unit_runs(transformer, table.units)
    pipeline = DiTPipeline(transformer=transformer, vae=tiny_vae(4), scheduler=DDIMScheduler())
    out = pipeline(class_labels=[1, 7], num_inference_steps=4, guidance_scale=2.0, output_type="np")
    assert np.isfinite(out.images).all()
    _check_runs(runs, table)


def test_info_reports_the_tables_sampling_macs(tmp_path: Path) -> None:
    from slimdiff.jobs.info import model_info

    model = build_tiny("tiny-unet").eval()
    table = _sparse_table(model, DDIMScheduler(), 6, "block")
    save(model, tmp_path / "m", artifacts={"skip_table": table.to_json()})
    info = model_info(tmp_path / "m")
    costs = skip.unit_costs(model, table.units)
    assert info["sampling_macs_full"] == 6 * info["macs"] == 6 * costs.total
    assert info["sampling_macs"] == round(sum(skip.kept_fractions(table, costs)) * costs.total)
    assert info["sampling_macs"] < info["sampling_macs_full"]
    assert info["sampler"]["scheduler"] == "DDIMScheduler" and info["sampler"]["steps"] == 6


def test_eval_counts_the_tables_sampling_macs_and_times_it(tmp_path: Path) -> None:
    from slimdiff.jobs.evaluation import EvalSettings, evaluate_model

    model = build_tiny("tiny-unet").eval()
    sched = make_scheduler("ddim")
    table = _sparse_table(model, sched, 4, "block")
    save(model, tmp_path / "m", artifacts={"skip_table": table.to_json()}, scheduler_config=dict(sched.config))
    settings = EvalSettings(metrics=("macs", "latency"), steps=4, batch_size=2)
    report = evaluate_model(tmp_path / "m", settings, progress=False)
    costs = skip.unit_costs(model, table.units)
    assert report["metrics"]["sampling_macs"]["value"] == round(sum(skip.kept_fractions(table, costs)) * costs.total)
    assert "skip table" in report["metrics"]["sampling_macs"]["counts"]
    assert report["metrics"]["sampling_latency_ms"]["value"] > 0
    with pytest.raises(SlimdiffError, match="made for DDIMScheduler with 4 steps .*; got 5 steps"):
        evaluate_model(tmp_path / "m", EvalSettings(metrics=("macs",), steps=5), progress=False)
