"""Skip tables stay true: the sampler they were made for (class and trajectory settings) is checked in slimdiff's
jobs and inside diffusers pipelines, a structure-changing engine refuses a model carrying one, and a table on an
unchanged model shares its source's weights instead of copying them."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler

from slimdiff.artifacts import sampler_settings, sampling_plan
from slimdiff.engines import skip
from slimdiff.errors import SlimdiffError
from slimdiff.export import SPEC_NAME, WEIGHTS_NAME, load, save
from slimdiff.models import adapter_for, build_tiny
from slimdiff.settings import SampleConfig
from slimdiff.training.diffusion import DEFAULT_SCHEDULE, make_scheduler, sample

STEPS = 4


def _table(model: torch.nn.Module, name: str = "ddim", *, recorded: bool = True) -> skip.SkipTable:
    """A sparse block table for `name` at STEPS steps over the default schedule (its settings recorded or not,
    as in tables saved before they were)."""
    sched = make_scheduler(name, DEFAULT_SCHEDULE)
    sched.set_timesteps(STEPS)
    units = skip.model_units(adapter_for(model), "block")
    settings = sampler_settings(sched) if recorded else None
    table = skip.SkipTable.full(type(sched).__name__, sched.timesteps.tolist(), units, "block", settings)
    for step in range(1, STEPS):
        table.compute[step] = [i % 2 == 0 for i in range(len(units))]
    return table


def _saved(tmp_path: Path, *, recorded: bool = True) -> tuple[torch.nn.Module, Path]:
    model = build_tiny("tiny-unet").eval()
    out = save(
        model,
        tmp_path / "m",
        artifacts={"skip_table": _table(model, recorded=recorded).to_json()},
        scheduler_config=dict(DEFAULT_SCHEDULE),
    )
    return model, out


def _run(pipeline, steps: int = STEPS) -> np.ndarray:
    return pipeline(batch_size=1, num_inference_steps=steps, generator=torch.manual_seed(0), output_type="np").images


def test_ddpm_and_ddim_share_leading_timesteps_yet_the_pipeline_is_told_apart(tmp_path: Path) -> None:
    _, path = _saved(tmp_path)
    ddim, ddpm = DDIMScheduler.from_config(DEFAULT_SCHEDULE), DDPMScheduler.from_config(DEFAULT_SCHEDULE)
    ddim.set_timesteps(STEPS)
    ddpm.set_timesteps(STEPS)
    assert torch.equal(ddim.timesteps, ddpm.timesteps)  # the runtime's timesteps alone cannot tell them apart
    assert np.isfinite(_run(DDIMPipeline(load(path), DDIMScheduler.from_config(DEFAULT_SCHEDULE)))).all()
    with pytest.raises(SlimdiffError, match="made for DDIMScheduler with 4 steps.*the pipeline's scheduler: got DDPM"):
        _run(DDPMPipeline(load(path), DDPMScheduler.from_config(DEFAULT_SCHEDULE)))


@pytest.mark.parametrize(
    ("setting", "value"), [("prediction_type", "v_prediction"), ("clip_sample", False), ("set_alpha_to_one", False)]
)
def test_a_trajectory_setting_of_the_same_class_is_refused_by_name(tmp_path: Path, setting: str, value) -> None:
    _, path = _saved(tmp_path)
    other = DDIMScheduler.from_config(DEFAULT_SCHEDULE, **{setting: value})
    with pytest.raises(SlimdiffError, match=f"got {setting}={value!r} instead of"):
        _run(DDIMPipeline(load(path), other))


def test_a_dpm_table_refuses_another_solver_order(tmp_path: Path) -> None:
    model = build_tiny("tiny-unet").eval()
    sched = make_scheduler("dpm", DEFAULT_SCHEDULE)
    sched.set_timesteps(STEPS)
    units = skip.model_units(adapter_for(model), "block")
    table = skip.SkipTable.full(type(sched).__name__, sched.timesteps.tolist(), units, "block", sampler_settings(sched))
    skip.attach(model, json.loads(json.dumps(table.to_json())))  # as read back from disk (-inf as a string)
    plan = sampling_plan(model)
    plan.check(sched)  # the very sampler passes
    third = make_scheduler("dpm", DEFAULT_SCHEDULE | {"solver_order": 3})
    third.set_timesteps(STEPS)
    with pytest.raises(SlimdiffError, match="got solver_order=3 instead of 2"):
        plan.check(third)


def test_an_euler_table_is_honoured_by_euler_and_refused_by_ddim() -> None:
    model = build_tiny("tiny-unet").eval()
    full = sample(adapter_for(model), n=2, steps=STEPS, scheduler="euler", progress=False)
    skip.attach(model, _table(model, "euler").to_json())
    euler, ddim = make_scheduler("euler", DEFAULT_SCHEDULE), make_scheduler("ddim", DEFAULT_SCHEDULE)
    euler.set_timesteps(STEPS)
    ddim.set_timesteps(STEPS)
    sampling_plan(model).check(euler)
    with pytest.raises(SlimdiffError, match="got DDIMScheduler"):
        sampling_plan(model).check(ddim)
    skipped = sample(adapter_for(model), n=2, steps=STEPS, scheduler="euler", progress=False)
    assert torch.isfinite(skipped).all() and not torch.allclose(skipped, full)  # the table skipped work


def test_latency_and_memory_of_a_table_run_over_the_models_own_schedule(tmp_path: Path) -> None:
    from slimdiff.jobs.evaluation import EvalSettings, evaluate_model

    # SD-1.5's: its timesteps are offset by one from the default schedule's, so a run over the default is refused
    schedule = DEFAULT_SCHEDULE | {
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "steps_offset": 1,
        "timestep_spacing": "leading",
    }
    model = build_tiny("tiny-unet").eval()
    sched = make_scheduler("ddim", schedule)
    sched.set_timesteps(STEPS)
    units = skip.model_units(adapter_for(model), "block")
    table = skip.SkipTable.full("DDIMScheduler", sched.timesteps.tolist(), units, "block", sampler_settings(sched))
    table.compute[1] = [False] * len(units)
    path = save(model, tmp_path / "m", artifacts={"skip_table": table.to_json()}, scheduler_config=schedule)
    settings = EvalSettings(metrics=("latency", "memory"), steps=STEPS, batch_size=2)
    metrics = evaluate_model(path, settings, progress=False)["metrics"]  # timed with the table, not refused
    assert metrics["sampling_latency_ms"]["value"] > 0 and "sampling_peak_memory_bytes" in metrics


def test_a_table_saved_before_settings_were_recorded_loads_and_checks_class_and_timesteps(tmp_path: Path) -> None:
    model, path = _saved(tmp_path, recorded=False)
    payload = json.loads((path / "skip_table.json").read_text())
    del payload["sampler_settings"]  # exactly what an older slimdiff wrote
    save(model, path, artifacts={"skip_table": payload}, scheduler_config=dict(DEFAULT_SCHEDULE))
    loaded = load(path)
    assert skip.table_of(loaded).settings == {} and "settings" not in sampling_plan(loaded).sampler()
    # timesteps only (and the class): another clip_sample runs, another class does not
    assert np.isfinite(_run(DDIMPipeline(loaded, DDIMScheduler.from_config(DEFAULT_SCHEDULE, clip_sample=False)))).all()
    with pytest.raises(SlimdiffError, match="got DDPMScheduler"):
        _run(DDPMPipeline(load(path), DDPMScheduler.from_config(DEFAULT_SCHEDULE)))


def test_sample_and_eval_refuse_another_sampler_before_starting(tmp_path: Path, capsys) -> None:
    from slimdiff.jobs.evaluation import EvalSettings, evaluate_model
    from slimdiff.jobs.sampling import sample_model

    _, path = _saved(tmp_path)
    capsys.readouterr()
    with pytest.raises(SlimdiffError, match=r"made for DDIMScheduler .*; got DDPMScheduler .*\(--no-artifacts"):
        sample_model(path, tmp_path / "g.png", SampleConfig(n=2, steps=STEPS, scheduler="ddpm"), progress=True)
    assert "sampling" not in capsys.readouterr().err  # refused before the progress bar
    with pytest.raises(SlimdiffError, match="got DDPMScheduler"):
        evaluate_model(path, EvalSettings(metrics=("macs",), steps=STEPS, scheduler="ddpm"), progress=False)
    # the table's own sampler runs, and without the table any sampler does
    sample_model(path, tmp_path / "ok.png", SampleConfig(n=2, steps=STEPS), progress=False)
    bare_config = SampleConfig(n=2, steps=3, scheduler="ddpm", artifacts=False)
    sample_model(path, tmp_path / "bare.png", bare_config, progress=False)
    bare = EvalSettings(metrics=("macs",), steps=3, scheduler="ddpm", artifacts=False)
    report = evaluate_model(path, bare, progress=False)
    assert report["metrics"]["sampling_macs"]["value"] == 3 * report["metrics"]["macs"]["value"]


def test_structure_changing_engine_refuses_a_model_carrying_a_table(tmp_path: Path) -> None:
    from slimdiff.engines.channels import ChannelPruningConfig
    from slimdiff.jobs.compression import compress_model

    _, path = _saved(tmp_path)
    config = ChannelPruningConfig(importance="magnitude", target_macs=0.5)
    with pytest.raises(SlimdiffError, match="carries skip_table, made for that model as it is; `compress channels`"):
        compress_model("channels", path, "digits", tmp_path / "out", config)
    assert not (tmp_path / "out").exists()  # refused before any work


def _identical(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_a_table_on_an_unchanged_model_hard_links_the_weights(tmp_path: Path) -> None:
    model = build_tiny("tiny-unet").eval()
    source = save(model, tmp_path / "source")
    os.chmod(source / WEIGHTS_NAME, 0o640)  # a mode no umask gives: linking must not re-mode the shared file
    previous = os.umask(0o077)
    try:
        out = save(model, tmp_path / "table", artifacts={"skip_table": _table(model).to_json()}, weights_from=source)
    finally:
        os.umask(previous)
    assert os.stat(out / WEIGHTS_NAME).st_ino == os.stat(source / WEIGHTS_NAME).st_ino
    assert os.stat(source / WEIGHTS_NAME).st_mode & 0o777 == 0o640
    assert "weights_reference" not in json.loads((out / SPEC_NAME).read_text())
    loaded = load(out)
    assert _identical(loaded, model) and skip.table_of(loaded) is not None


def test_where_links_fail_the_weights_are_a_checksummed_reference(tmp_path: Path, monkeypatch) -> None:
    model = build_tiny("tiny-unet").eval()
    source = save(model, tmp_path / "source")

    def no_links(*args: object) -> None:
        raise OSError("links not supported here")

    monkeypatch.setattr(os, "link", no_links)
    out = save(model, tmp_path / "table", artifacts={"skip_table": _table(model).to_json()}, weights_from=source)
    spec = json.loads((out / SPEC_NAME).read_text())
    reference = spec["weights_reference"]
    assert not (out / WEIGHTS_NAME).exists() and spec["format_version"] == 2
    assert reference["path"] == str((source / WEIGHTS_NAME).resolve())
    assert sum(f.stat().st_size for f in out.iterdir()) < (source / WEIGHTS_NAME).stat().st_size / 10
    assert _identical(load(out), model)

    other = model.state_dict()
    other["conv_out.bias"] = other["conv_out.bias"] + 1
    changed = build_tiny("tiny-unet").eval()
    changed.load_state_dict(other)
    save(changed, source)  # the source changed (an atomic save: a new file at the same path)
    with pytest.raises(SlimdiffError, match=f"has changed since \\(its sha256 is no longer {reference['sha256']}\\)"):
        load(out)
    (source / WEIGHTS_NAME).rename(tmp_path / "moved.safetensors")
    with pytest.raises(SlimdiffError, match=f"sha256 {reference['sha256']}\\), which is gone"):
        load(out, weights=False)


def test_changed_weights_are_saved_in_full_despite_weights_from(tmp_path: Path) -> None:
    model = build_tiny("tiny-unet").eval()
    source = save(model, tmp_path / "source")
    with torch.no_grad():
        model.conv_out.bias.add_(1)
    out = save(model, tmp_path / "tuned", weights_from=source)
    assert os.stat(out / WEIGHTS_NAME).st_ino != os.stat(source / WEIGHTS_NAME).st_ino
    assert _identical(load(out), model)
