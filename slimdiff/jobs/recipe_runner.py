"""Run a recipe: each step in order, dispatched by its kind, each writing to `out/<index>-<kind>/`."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slimdiff.errors import SlimdiffError
from slimdiff.io import atomic_write_json, read_json
from slimdiff.jobs.compression import compress_model
from slimdiff.jobs.evaluation import evaluate_model
from slimdiff.jobs.sampling import sample_model
from slimdiff.jobs.training import finetune_model, new_model, train_model
from slimdiff.models import TINY_CONFIGS
from slimdiff.recipe_spec import (
    STEP_KINDS,
    CompressStep,
    EvalStep,
    FinetuneStep,
    Recipe,
    SampleStep,
    TrainStep,
)


@dataclass
class StepContext:
    """What a step runner gets: the recipe, the model so far, where the step writes, whether to show progress."""

    recipe: Recipe
    current: str
    out: Path
    progress: bool


#: A step runner returns the step's summary; a `"model"` entry hands a new model directory to the next step.
StepRunner = Callable[[Any, StepContext], dict[str, Any]]


def _train(step: TrainStep, ctx: StepContext) -> dict[str, Any]:
    result = train_model(
        new_model(ctx.current),
        ctx.recipe.data,
        ctx.out,
        step.train,
        source=ctx.current,
        resume=True,
        progress=ctx.progress,
    )
    return {"model": str(ctx.out), "final_loss": result.final_loss}


def _finetune(step: FinetuneStep, ctx: StepContext) -> dict[str, Any]:
    config = dataclasses.replace(step.finetune, teacher=_recipe_teacher(ctx.recipe, step.finetune.teacher))
    result = finetune_model(
        _model_dir(ctx.current),
        ctx.recipe.data,
        ctx.out,
        config.training(),
        teacher_dir=config.teacher,
        kd=config.distillation(),
        resume=True,
        progress=ctx.progress,
    )
    return {"model": str(ctx.out), "final_loss": result.final_loss}


def _compress(step: CompressStep, ctx: StepContext) -> dict[str, Any]:
    model_dir = _model_dir(ctx.current)
    result = compress_model(step.engine, model_dir, ctx.recipe.data, ctx.out, step.config, resume=True)
    return {"model": str(ctx.out), "engine": step.engine, "achieved": result.achieved, "seconds": result.seconds}


def _eval(step: EvalStep, ctx: StepContext) -> dict[str, Any]:
    settings = dataclasses.replace(step.eval, data=ctx.recipe.data)
    report = evaluate_model(_model_dir(ctx.current), settings, grid=ctx.out / "samples.png", progress=ctx.progress)
    atomic_write_json(ctx.out / "eval.json", report)
    return {"out": str(ctx.out / "eval.json"), "metrics": {k: v["value"] for k, v in report["metrics"].items()}}


def _sample(step: SampleStep, ctx: StepContext) -> dict[str, Any]:
    grid = ctx.out / "samples.png"
    sample_model(_model_dir(ctx.current), grid, step.sample, overwrite=True, progress=ctx.progress)
    return {"out": str(grid)}


#: Step class → its runner; every kind in `recipe.STEP_KINDS` has one.
STEP_RUNNERS: dict[type, StepRunner] = {
    TrainStep: _train,
    FinetuneStep: _finetune,
    CompressStep: _compress,
    EvalStep: _eval,
    SampleStep: _sample,
}
assert set(STEP_RUNNERS) == set(STEP_KINDS.values()), "every recipe step kind needs a runner"
_KIND_OF = {cls: kind for kind, cls in STEP_KINDS.items()}


#: Written into a step's directory when the step has finished: its settings and summary (how a rerun resumes).
DONE_NAME = "step.json"


def run_recipe(recipe: Recipe, *, progress: bool = True) -> list[dict[str, Any]]:
    """Run every step of a recipe in order; returns one summary per step (`step`, `reused`, `out`, and what it
    measured).

    A rerun resumes: a step whose directory records that it finished with the same settings, on the same input,
    is not run again (its summary is reused, with `reused: true`) unless a step before it ran again; an
    interrupted training step continues from its last checkpoint. A step that runs again from scratch (its
    settings or its input changed) first moves its old directory aside to `<dir>.superseded-<k>`, so nothing it
    made is lost or resumed from.
    """
    for step in recipe.steps:  # refuse a bad teacher before any step has run
        if isinstance(step, FinetuneStep):
            _recipe_teacher(recipe, step.finetune.teacher)
    current = recipe.model
    summaries: list[dict[str, Any]] = []
    reran = False  # once a step runs again, every later step must too: its input changed
    for index, step in enumerate(recipe.steps):
        kind = _KIND_OF[type(step)]
        ctx = StepContext(recipe, current, Path(recipe.out) / f"{index:02d}-{kind}", progress)
        fields = dataclasses.asdict(step)
        if isinstance(step, FinetuneStep) and step.finetune.teacher:
            fields["finetune"]["teacher"] = _located(step.finetune.teacher)
        settings = json.loads(json.dumps({"input": _located(current), "data": _located(recipe.data), **fields}))
        done = None if reran else _finished(ctx.out, settings)
        reused = done is not None
        if done is None:
            if reran or (ctx.out / DONE_NAME).is_file():  # made from another input or with other settings
                _set_aside(ctx.out)
            reran = True
            done = STEP_RUNNERS[type(step)](step, ctx)
            atomic_write_json(ctx.out / DONE_NAME, {"settings": settings, "summary": done})
        summary = dict(done)
        current = summary.pop("model", current)
        summaries.append({"step": kind, "reused": reused, "out": summary.pop("out", current), **summary})
    return summaries


def _located(name: str) -> str:
    """A path that exists, made absolute (so `runs/x` and `/home/u/runs/x` are one input); a preset name as it is."""
    return os.path.abspath(name) if Path(name).exists() else name


def _set_aside(step_dir: Path) -> None:
    """Rename a stale step directory to the first free `<name>.superseded-<k>` (a no-op if there is none)."""
    if not step_dir.exists():
        return
    k = 1
    while (aside := step_dir.with_name(f"{step_dir.name}.superseded-{k}")).exists():
        k += 1
    step_dir.rename(aside)


def _finished(step_dir: Path, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The summary of a step that already finished in `step_dir` with exactly these settings, else None."""
    path = step_dir / DONE_NAME
    if not path.is_file():
        return None
    record = read_json(path, "recipe step record")
    return record["summary"] if isinstance(record, dict) and record.get("settings") == settings else None


def _recipe_teacher(recipe: Recipe, teacher: str | None) -> str | None:
    """A fine-tune's teacher: a model directory, or `model` for the recipe's own (trained) input model."""
    if teacher != "model":
        return teacher
    if recipe.model in TINY_CONFIGS or Path(recipe.model).is_file():
        raise SlimdiffError(
            f"finetune.teacher: 'model' names the recipe's input model, but '{recipe.model}' is a config, not a "
            "trained model; give the teacher's directory instead"
        )
    return recipe.model


def _model_dir(current: str) -> str:
    if current in TINY_CONFIGS or Path(current).is_file():
        raise SlimdiffError(f"'{current}' is not a trained model yet: start the recipe with a train step")
    return current
