"""The engine contract, checked on every registered engine — the built-in ones and the toy engine of
docs/architecture.md, which this module registers exactly as a newcomer would: the source model is untouched (every
tensor, no hooks), save → load computes the same, the product in its diffusers pipeline samples the same images as
in memory, a budget is met from both sides, `compress NAME --help` lists every setting, a recipe step validates, a
latency budget is met and one it cannot reach is refused in one line."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import DDIMPipeline, DiffusionPipeline
from helpers import register_docs_toy_engine, run_cli

import slimdiff.pipeline  # noqa: F401  (diffusers finds slimdiff's loader for exported pipelines)
from slimdiff.artifacts import attach_artifact, full_compute, sampling_plan
from slimdiff.engines import Result, engine_names, get_engine
from slimdiff.engines import base as engines_base
from slimdiff.engines.base import no_log
from slimdiff.engines.budgets import LatencyBudget
from slimdiff.errors import SlimdiffError
from slimdiff.export import load, load_scheduler_config, read_artifact, read_provenance, save
from slimdiff.jobs.compression import calibration_for, compress_model
from slimdiff.metrics.cost import count_macs
from slimdiff.models import adapter_for, build_tiny
from slimdiff.pipeline import export_pipeline
from slimdiff.recipe_spec import load_recipe
from slimdiff.training.diffusion import DEFAULT_SCHEDULE, make_scheduler

RECIPES = Path(__file__).resolve().parents[1] / "slimdiff" / "recipes"
#: Every engine the registry knows, and the toy engine this module registers.
ENGINES = sorted({*engine_names(), "toy"})
#: Settings that make a built-in engine quick on the tiny U-Net, each with a budget of half its MACs.
QUICK: dict[str, dict[str, Any]] = {
    "channels": {"importance": "magnitude", "calibration_size": 4, "timestep_stride": 100, "target_macs": 0.5},
    "layers": {"criterion": "magnitude", "calibration_size": 4, "batch_size": 4, "target_macs": 0.5},
    "skip": {"method": "step-reuse", "steps": 8, "target_macs": 0.5},
    "ofa": {"sizes": (0.5,), "steps": 2, "importance_samples": 2, "batch_size": 4},
}


def settings_for(name: str) -> dict[str, Any]:
    """The settings an engine runs with here: its quick ones, or for any other engine its defaults, with half the
    MACs as its budget where it takes `target_macs`."""
    if name in QUICK:
        return QUICK[name]
    fields = {f.name for f in dataclasses.fields(get_engine(name).config)}
    return {"target_macs": 0.5} if "target_macs" in fields else {}


#: The engines run with a budget (the toy engine, registered by this module, has none).
BUDGETED = [name for name in engine_names() if settings_for(name)]
#: The budgeted engines whose settings take a measured latency budget.
LATENCY_ENGINES = [name for name in BUDGETED if issubclass(get_engine(name).config, LatencyBudget)]


@pytest.fixture(scope="module", autouse=True)
def _toy_registered() -> Any:
    """The toy engine of docs/architecture.md in the registry for this module; the registry restored afterwards."""
    for name in engines_base.BUILTIN_ENGINES:  # registered before the copy is taken, so they stay registered
        get_engine(name)
    saved = dict(engines_base._engines)
    register_docs_toy_engine()
    yield
    engines_base._engines.clear()
    engines_base._engines.update(saved)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save(build_tiny("tiny-unet").eval(), tmp_path_factory.mktemp("teacher") / "teacher")


@pytest.fixture(scope="module")
def source_pipeline(teacher_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The teacher as a user's diffusers pipeline folder, with the sampler it was trained for."""
    schedule = load_scheduler_config(teacher_dir) or DEFAULT_SCHEDULE
    folder = tmp_path_factory.mktemp("pipeline") / "src"
    DDIMPipeline(load(teacher_dir), make_scheduler("ddim", schedule)).save_pretrained(folder)
    return folder


@dataclass
class Made:
    """One engine run on the teacher: its source model, that model's state before the run, the config, products."""

    source: torch.nn.Module
    before: dict[str, torch.Tensor]
    modules: list[tuple[str, type]]
    config: Any
    products: dict[str, Result]


def _structure(model: torch.nn.Module) -> list[tuple[str, type]]:
    return [(name, type(module)) for name, module in model.named_modules()]


@pytest.fixture(scope="module")
def made(teacher_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Made]:
    """Run an engine once per module (in memory, as its contract says: adapter, config, calibration → Result). A
    product that needs training gets its products made from the untrained model: the contract is the engine's."""
    runs: dict[str, Made] = {}

    def run(name: str) -> Made:
        if name not in runs:
            engine = get_engine(name)
            source = load(teacher_dir)
            before = {k: v.clone() for k, v in source.state_dict().items()}
            modules = _structure(source)
            adapter = adapter_for(source)
            work = tmp_path_factory.mktemp(f"work-{name}")
            calibration, _, _ = calibration_for(teacher_dir, adapter, "digits", work, seed=0)
            config = engine.make_config(**settings_for(name))
            result = engine.compress(adapter, config, calibration, log=no_log)
            products = {name: result} if result.training is None else result.training.finish(result.training.model)
            runs[name] = Made(source, before, modules, config, products)
        return runs[name]

    return run


def _in_memory(product: Result) -> torch.nn.Module:
    """The product as the engine made it, its artifacts attached in memory (what `load` does from disk)."""
    model = copy.deepcopy(product.model).eval()
    for name, payload in product.artifacts.items():
        attach_artifact(model, name, payload)
    return model


def _outputs(model: torch.nn.Module) -> torch.Tensor:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        inputs = adapter_for(model).example_inputs(2)
    with torch.no_grad(), full_compute(model):
        return model(**inputs).sample


def _hooks(model: torch.nn.Module) -> list[str]:
    """Where `model` carries hooks or a patched forward: torch hooks, diffusers' hook registry, a sampling plan."""
    found = []
    for name, module in model.named_modules():
        for kind in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"):
            if getattr(module, kind, None):
                found.append(f"{name}.{kind}")
        registry = getattr(module, "_diffusers_hook", None)
        if registry is not None and registry.hooks:
            found.append(f"{name}: diffusers hooks {list(registry.hooks)}")
        if "forward" in vars(module):
            found.append(f"{name}: forward patched")
    return found + (["a sampling plan"] if sampling_plan(model) is not None else [])


def _images(pipeline: DiffusionPipeline, steps: int) -> np.ndarray:
    pipeline.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    return pipeline(batch_size=2, num_inference_steps=steps, generator=generator, output_type="np").images


# -- the model ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ENGINES)
def test_the_source_model_is_untouched(name: str, made: Callable[[str], Made]) -> None:
    run = made(name)
    after = run.source.state_dict()
    assert set(after) == set(run.before)
    assert all(torch.equal(run.before[k], v) for k, v in after.items()), "a tensor of the source changed"
    assert _structure(run.source) == run.modules, "the source's modules changed"
    assert _hooks(run.source) == []


@pytest.mark.parametrize("name", ENGINES)
def test_save_then_load_computes_the_same(name: str, made: Callable[[str], Made], tmp_path: Path) -> None:
    for product_name, product in made(name).products.items():
        saved = product.save(tmp_path / product_name)
        loaded = load(saved)
        assert [p.shape for p in loaded.parameters()] == [p.shape for p in product.model.parameters()]
        assert all(read_artifact(saved, key) == payload for key, payload in product.artifacts.items())
        torch.testing.assert_close(_outputs(loaded), _outputs(_in_memory(product)), rtol=0, atol=0)


@pytest.mark.parametrize("name", ENGINES)
def test_the_product_in_its_diffusers_pipeline_samples_what_it_samples_in_memory(
    name: str, made: Callable[[str], Made], source_pipeline: Path, tmp_path: Path
) -> None:
    for product_name, product in made(name).products.items():
        saved = product.save(tmp_path / product_name)
        pipeline_dir = export_pipeline(saved, source_pipeline, tmp_path / f"{product_name}-pipeline")
        exported = DiffusionPipeline.from_pretrained(pipeline_dir)
        model = _in_memory(product)
        in_memory = DDIMPipeline(model, exported.scheduler)
        plan = sampling_plan(model)
        steps = plan.steps if plan is not None else 3
        np.testing.assert_allclose(_images(exported, steps), _images(in_memory, steps), rtol=0, atol=1e-6)


# -- the budget --------------------------------------------------------------------------------------------------
def _check_budget(config: Any, products: dict[str, Result]) -> None:
    """Each product within the engine's tolerance of its budget, above and below."""
    budget = config.budget()
    assert len(budget) == 1, budget
    ((unit, target),) = budget.items()
    targets = sorted(target) if isinstance(target, list) else [target]
    reached = sorted(product.achieved[unit] for product in products.values())
    assert len(reached) == len(targets)
    for asked, got in zip(targets, reached, strict=True):
        assert asked * (1 - config.tolerance) <= got <= asked * (1 + config.tolerance), (unit, asked, got)


@pytest.mark.parametrize("name", BUDGETED)
def test_the_budget_is_met_from_both_sides(name: str, made: Callable[[str], Made]) -> None:
    """Within the engine's tolerance above and below: a product that computes nothing fails, as one that keeps
    everything does."""
    run = made(name)
    _check_budget(run.config, run.products)
    for fraction in (0.0, 1.0):
        changed = {
            k: dataclasses.replace(p, achieved=dict.fromkeys(p.achieved, fraction)) for k, p in run.products.items()
        }
        with pytest.raises(AssertionError):
            _check_budget(run.config, changed)


@pytest.mark.parametrize("name", LATENCY_ENGINES)
def test_each_engine_meets_a_latency_target_and_records_it(
    name: str, fake_timer: None, teacher_dir: Path, tmp_path: Path
) -> None:
    model = build_tiny("tiny-unet").eval()
    batch = 4
    per_call = count_macs(model).total * batch / 1e6
    engine = get_engine(name)
    steps = settings_for(name).get("steps", 0)
    teacher_ms = steps * (0.5 + per_call) if engine.keeps_model else 2 + per_call  # a sampling run, or one call
    target = round(0.6 * teacher_ms, 2)
    settings = {k: v for k, v in settings_for(name).items() if not k.startswith("target_")}
    config = engine.make_config(target_latency_ms=target, latency_batch=batch, **settings)
    assert config.budget() == {"latency_ms": target, "batch": batch}
    result = compress_model(name, teacher_dir, "digits", tmp_path / "out", config, progress=False)
    record = result.record["latency"]
    assert record["within_tolerance"] and abs(record["achieved_ms"] - target) <= 0.05 * target, record
    assert record["teacher_ms"] == pytest.approx(teacher_ms, rel=1e-6) and record["batch"] == batch
    assert record["trials"] and record["device"].startswith("cpu (")
    assert result.achieved["latency"] == pytest.approx(record["achieved_ms"] / record["teacher_ms"], rel=1e-4)
    assert f"ms at batch {batch}" in result.summary
    entry = read_provenance(tmp_path / "out").history[-1]
    assert entry["target"] == {"latency_ms": target, "batch": batch} and entry["latency"] == record
    assert read_provenance(tmp_path / "out").metrics["latency_fraction"] == result.achieved["latency"]


@pytest.mark.parametrize("name", LATENCY_ENGINES)
def test_a_latency_it_cannot_reach_is_refused_in_one_line(
    name: str, fake_timer: None, teacher_dir: Path, tmp_path: Path
) -> None:
    """The stand-in timer has a fixed overhead per call no product removes: 0.01 ms is out of reach. (Channels
    and skip name the latency they cannot reach; layers refuses the MACs fraction the search asks for.)"""
    settings = {k: v for k, v in settings_for(name).items() if not k.startswith("target_")}
    config = get_engine(name).make_config(target_latency_ms=0.01, latency_batch=4, **settings)
    with pytest.raises(SlimdiffError, match="cannot reach 0.01 ms|less than the .* required") as refused:
        compress_model(name, teacher_dir, "digits", tmp_path / "out", config, progress=False)
    assert "\n" not in str(refused.value)
    assert not (tmp_path / "out").exists()  # a failed run leaves no --out


# -- the surfaces derived from the config ------------------------------------------------------------------------
@pytest.mark.parametrize("name", ENGINES)
def test_compress_help_lists_every_setting(name: str, monkeypatch, capsys) -> None:
    code, out, _ = run_cli(monkeypatch, capsys, "compress", name, "--help")
    assert code == 0 and "--out" in out and "--data" in out
    for setting in dataclasses.fields(get_engine(name).config):
        flag = "--" + setting.name.replace("_", "-")
        assert flag in out or setting.metadata.get("flag", flag) in out, f"{name}: no flag for {setting.name}"
        help_text = setting.metadata.get("help")
        if help_text:
            assert " ".join(help_text.split()[:3]) in " ".join(out.split()), f"{name}: no help for {setting.name}"


@pytest.mark.parametrize("name", ENGINES)
def test_a_recipe_step_is_validated_by_the_engines_config(name: str, tmp_path: Path) -> None:
    settings = settings_for(name)
    options = ", ".join(f"{k}: {list(v) if isinstance(v, tuple) else v}" for k, v in settings.items())
    path = tmp_path / "r.yaml"
    path.write_text(f"model: m\nsteps:\n  - compress: {{engine: {name}{', ' if options else ''}{options}}}\n")
    (step,) = load_recipe(path).steps
    assert step.engine == name and step.config == get_engine(name).make_config(**settings)
    path.write_text(f"model: m\nsteps:\n  - compress: {{engine: {name}, no_such_setting: 1}}\n")
    with pytest.raises(SlimdiffError, match=r"steps\[0\]\.compress\.no_such_setting: unknown field; valid: ") as bad:
        load_recipe(path)
    assert "\n" not in str(bad.value)


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.yaml")), ids=lambda path: path.name)
def test_every_shipped_recipe_loads(path: Path) -> None:
    recipe = load_recipe(path)
    compress_steps = [step for step in recipe.steps if hasattr(step, "engine")]
    assert compress_steps and all(step.engine in engine_names() for step in compress_steps)


def test_every_built_in_engine_has_a_shipped_recipe() -> None:
    shipped = {
        step.engine for path in RECIPES.glob("*.yaml") for step in load_recipe(path).steps if hasattr(step, "engine")
    }
    assert set(engines_base.BUILTIN_ENGINES) <= shipped
