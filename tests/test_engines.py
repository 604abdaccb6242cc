"""The engine contract: the toy engine of docs/architecture.md gets a CLI command, a recipe step, provenance and a
loadable model with no other change; artifacts travel with the model; unknown engines are refused by name."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from helpers import register_docs_toy_engine, run_cli

import slimdiff
from slimdiff import artifacts
from slimdiff.artifacts import SamplingPlan, register_artifact, set_sampling_plan
from slimdiff.engines import Calibration, Engine, EngineConfig, Result, get_engine, register
from slimdiff.engines import base as engines_base
from slimdiff.errors import SlimdiffError
from slimdiff.export import Provenance, read_artifact, read_spec, save
from slimdiff.jobs.evaluation import EvalSettings, evaluate_model
from slimdiff.jobs.recipe_runner import run_recipe
from slimdiff.models import adapter_for, build_tiny
from slimdiff.recipe_spec import load_recipe


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """A registry the test may add engines and artifacts to; restored afterwards. The built-in engines are
    imported first, so that none registers itself into the copy only."""
    for name in engines_base.BUILTIN_ENGINES:
        get_engine(name)
    monkeypatch.setattr(engines_base, "_engines", dict(engines_base._engines))
    monkeypatch.setattr(artifacts, "_artifacts", dict(artifacts._artifacts))


@pytest.fixture
def toy(registry: None) -> Engine:
    """The toy engine exactly as docs/architecture.md shows it."""
    register_docs_toy_engine()
    return get_engine("toy")


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save(build_tiny("tiny-unet").eval(), tmp_path_factory.mktemp("teacher") / "teacher")


def _outputs(model: torch.nn.Module) -> torch.Tensor:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        inputs = adapter_for(model).example_inputs(2)
    with torch.no_grad():
        return model(**inputs).sample


def test_toy_engine_gets_a_command_with_help(toy: Engine, monkeypatch, capsys) -> None:
    code, out, _ = run_cli(monkeypatch, capsys, "compress", "--help")
    assert code == 0 and "toy" in out and "channels" in out
    code, out, _ = run_cli(monkeypatch, capsys, "compress", "toy", "--help")
    assert code == 0 and "--factor" in out and "Multiply the output layer by this." in out and "--out" in out


def test_toy_engine_through_the_cli_saves_provenance_and_a_model_that_loads(
    toy: Engine, teacher_dir: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    code, out, err = run_cli(
        monkeypatch, capsys, "compress", "toy", teacher_dir, "--out", tmp_path / "t", "--factor", 0.25
    )
    assert code == 0, err
    assert "scaled conv_out by 0.25" in out and "scaled in" in out
    spec = read_spec(tmp_path / "t")
    assert spec["provenance"]["engine"] == "toy"
    entry = spec["provenance"]["history"][-1]
    assert entry["job"] == "compress toy" and entry["config"] == {"factor": 0.25} and entry["factor"] == 0.25
    assert entry["achieved"] == {"params": 1.0}
    # what the engine says it computes: the teacher's output scaled by the factor (conv_out is the last layer)
    expected = 0.25 * _outputs(slimdiff.load(teacher_dir))
    torch.testing.assert_close(_outputs(slimdiff.load(tmp_path / "t")), expected, rtol=1e-5, atol=1e-6)


def test_toy_engine_refuses_bad_settings_in_one_line(
    toy: Engine, teacher_dir: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    code, _, err = run_cli(monkeypatch, capsys, "compress", "toy", teacher_dir, "--out", tmp_path / "t", "--factor", 2)
    assert code == 2 and err.strip() == "slimdiff: error: factor must be in (0, 1], got 2.0"
    code, _, err = run_cli(
        monkeypatch, capsys, "compress", "toy", teacher_dir, "--out", tmp_path / "t", "--factor", "x"
    )
    assert code == 2 and len(err.strip().splitlines()) == 1 and "'x' is not a valid float" in err


def test_toy_engine_as_a_recipe_step(toy: Engine, teacher_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(
        f"model: {teacher_dir}\nout: {tmp_path / 'out'}\nsteps:\n"
        "  - compress: {engine: toy, factor: 0.5}\n  - compress: {engine: toy, factor: 0.5}\n"
    )
    summaries = run_recipe(load_recipe(path), progress=False)
    assert [s["engine"] for s in summaries] == ["toy", "toy"]
    history = read_spec(tmp_path / "out" / "01-compress")["provenance"]["history"]
    assert [h["job"] for h in history] == ["compress toy", "compress toy"]  # the chain of engines
    expected = 0.25 * _outputs(slimdiff.load(teacher_dir))
    torch.testing.assert_close(_outputs(slimdiff.load(tmp_path / "out" / "01-compress")), expected)


def test_recipe_refuses_a_bad_toy_field_by_its_path(toy: Engine, tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("model: m\nsteps:\n  - compress: {engine: toy, factor: 3}\n")
    with pytest.raises(SlimdiffError, match=r"r\.yaml\.steps\[0\]\.compress: factor must be in"):
        load_recipe(path)
    path.write_text("model: m\nsteps:\n  - compress: {engine: toy, scale: 3}\n")
    with pytest.raises(SlimdiffError, match=r"r\.yaml\.steps\[0\]\.compress\.scale: unknown field; valid: factor"):
        load_recipe(path)


def test_unknown_engine_is_refused_listing_the_engines(tmp_path: Path, monkeypatch, capsys) -> None:
    code, _, err = run_cli(monkeypatch, capsys, "compress", "nope", tmp_path)
    assert code == 2 and err.strip().startswith("slimdiff: error: unknown engine 'nope'; valid: channels")
    with pytest.raises(SlimdiffError, match="unknown engine 'nope'; valid: channels"):
        get_engine("nope")
    path = tmp_path / "r.yaml"
    path.write_text("model: m\nsteps:\n  - compress: {engine: nope}\n")
    with pytest.raises(SlimdiffError, match=r"steps\[0\]\.compress\.engine: unknown engine 'nope'"):
        load_recipe(path)


@dataclass
class _NoteConfig(EngineConfig):
    text: str = "hello"


def _note(adapter, config: _NoteConfig, data: Calibration, *, log) -> Result:
    return Result(model=copy.deepcopy(adapter.model), achieved={}, artifacts={"toy_note": {"text": config.text}})


def test_an_artifact_is_saved_checksummed_and_reattached_on_load(
    registry: None, teacher_dir: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    register(Engine("note", _NoteConfig, _note))
    register_artifact("toy_note", lambda model, payload: setattr(model, "toy_note", payload["text"]))
    code, _, err = run_cli(
        monkeypatch, capsys, "compress", "note", teacher_dir, "--out", tmp_path / "n", "--text", "hi"
    )
    assert code == 0, err
    assert read_spec(tmp_path / "n")["artifacts"] == ["toy_note"]
    assert read_artifact(tmp_path / "n", "toy_note") == {"text": "hi"}
    assert slimdiff.load(tmp_path / "n").toy_note == "hi"
    assert not hasattr(slimdiff.load(tmp_path / "n", artifacts=False), "toy_note")
    (tmp_path / "n" / "toy_note.json").write_text(json.dumps({"text": "changed"}))
    with pytest.raises(SlimdiffError, match="does not match its checksum"):
        slimdiff.load(tmp_path / "n")


def test_an_artifact_nothing_can_attach_is_refused_by_name(registry: None, teacher_dir: Path, tmp_path: Path) -> None:
    register(Engine("note", _NoteConfig, _note))
    get_engine("note").compress(adapter_for(slimdiff.load(teacher_dir)), _NoteConfig(), None, log=print).save(
        tmp_path / "n"
    )
    with pytest.raises(SlimdiffError, match="artifact 'toy_note' this slimdiff cannot attach"):
        slimdiff.load(tmp_path / "n")


def test_an_artifacts_sampling_plan_is_what_info_and_evaluation_count(
    registry: None, teacher_dir: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    """A toy artifact (no engine behind it) declares: every step after step 0 computes half of a denoiser call."""
    timed: list[torch.nn.Module] = []

    @contextmanager
    def everything(model: torch.nn.Module) -> Iterator[None]:
        timed.append(model)
        yield

    def attach(model: torch.nn.Module, payload: dict) -> None:
        timesteps = tuple(float(t) for t in payload["timesteps"])
        half = (1.0,) + (0.5,) * (len(timesteps) - 1)
        plan = SamplingPlan("half plan", "DDIMScheduler", timesteps, half, everything, {"half_after_step": 0})
        set_sampling_plan(model, lambda _: plan)

    register_artifact("half_plan", attach)
    save(slimdiff.load(teacher_dir), tmp_path / "h", artifacts={"half_plan": {"timesteps": [750, 500, 250, 0]}})
    code, out, err = run_cli(monkeypatch, capsys, "info", tmp_path / "h", "--json")
    assert code == 0, err
    info = json.loads(out)
    macs = info["macs"]
    assert info["sampling_macs"] == round(2.5 * macs) and info["sampling_macs_full"] == 4 * macs
    assert info["sampling_macs_fraction"] == 0.625
    assert info["sampler"] == {"scheduler": "DDIMScheduler", "steps": 4, "timesteps": [750, 500, 250, 0]}
    assert info["half_after_step"] == 0 and "skip_granularity" not in info
    code, out, _ = run_cli(monkeypatch, capsys, "info", teacher_dir, "--json")
    assert code == 0 and "sampling_macs" not in json.loads(out)  # no artifact, no plan

    settings = EvalSettings(metrics=("macs", "latency"), steps=4, batch_size=1)
    report = evaluate_model(tmp_path / "h", settings, progress=False)["metrics"]
    assert report["macs"]["value"] == macs and report["sampling_macs"]["value"] == round(2.5 * macs)
    assert report["sampling_macs"]["counts"].endswith(", with its half plan")
    assert timed  # the one denoiser call was timed (and counted) with everything computed
    with pytest.raises(SlimdiffError) as refused:
        evaluate_model(tmp_path / "h", EvalSettings(metrics=("macs",), steps=5), progress=False)
    assert str(refused.value) == (
        "the model's half plan was made for DDIMScheduler with 4 steps (timesteps 750, 500, 250, …, 0); got 5 steps "
        "— sample with that sampler and step count, or without the half plan (--no-artifacts on the command line, "
        "slimdiff.load(..., artifacts=False) in Python)"
    )


def test_a_rerun_recipe_resumes_after_its_finished_steps(toy: Engine, teacher_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    steps = "steps:\n  - compress: {engine: toy, factor: 0.5}\n  - compress: {engine: toy, factor: %s}\n"
    path.write_text(f"model: {teacher_dir}\nout: {tmp_path / 'out'}\n" + steps % 0.5)
    first = run_recipe(load_recipe(path), progress=False)
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("*/slimdiff.json")}
    rerun = run_recipe(load_recipe(path), progress=False)
    assert [s["reused"] for s in first] == [False, False] and [s["reused"] for s in rerun] == [True, True]
    assert [s | {"reused": False} for s in rerun] == first  # nothing ran again, and each reused step says so
    assert stamps == {p: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("*/slimdiff.json")}
    path.write_text(f"model: {teacher_dir}\nout: {tmp_path / 'out'}\n" + steps % 0.25)
    run_recipe(load_recipe(path), progress=False)  # the second step's settings changed: it alone runs again
    assert (tmp_path / "out" / "00-compress" / "slimdiff.json").stat().st_mtime_ns == stamps[
        tmp_path / "out" / "00-compress" / "slimdiff.json"
    ]
    expected = 0.125 * _outputs(slimdiff.load(teacher_dir))
    torch.testing.assert_close(_outputs(slimdiff.load(tmp_path / "out" / "01-compress")), expected)


def test_the_chain_reads_every_kind_of_budget() -> None:
    history = [
        {"job": "train", "steps": 1500},
        {"job": "compress channels", "target": {"macs": 0.5}, "achieved": {"macs": 0.4912, "params": 0.55}},
        {"job": "compress ofa", "target": {"macs": [0.3, 0.5]}, "achieved": {"macs": 0.301}},  # one product's
    ]
    assert Provenance(history=history).chain() == [
        "train 1500 steps",
        "compress channels: macs 0.5 → 0.491, params 0.55",
        "compress ofa: macs 0.3/0.5 → 0.301",
    ]
