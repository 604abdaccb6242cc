"""The main job on the embedded default: a digits teacher, every engine at a comparable budget, one report.

1. the teacher (tiny-unet, 1500 steps on digits; seeded, cached in the output directory, resumable);
2. one shipped recipe per engine (`slimdiff/recipes/digits-*.yaml`), each on the teacher or on another row's
   model (channels × skip starts from the channel-pruned model), each step resumable;
3. one evaluation of every model with the same settings, and the teacher sampled with fewer steps at the same
   sampling MACs as each compressed model — the free alternative every row is read against;
4. one HTML report (`slimdiff compare`) and a short table.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from slimdiff.export import read_provenance
from slimdiff.jobs.evaluation import EvalSettings, compare_models
from slimdiff.jobs.info import model_info
from slimdiff.jobs.recipe_runner import run_recipe
from slimdiff.jobs.sampling import sample_model
from slimdiff.jobs.training import new_model, train_model
from slimdiff.recipe_spec import EvalStep, FinetuneStep, load_recipe
from slimdiff.report import markdown_table
from slimdiff.settings import SampleConfig, TrainConfig

#: The digits teacher: tiny-unet, 16² grayscale, 1500 steps of batch 64.
TEACHER_MODEL = "tiny-unet"
TEACHER_CONFIG = TrainConfig(
    steps=1500, batch_size=64, lr=1e-3, warmup_steps=100, ema_decay=0.995, checkpoint_every=250, seed=0
)
RECIPES = Path(__file__).parents[1] / "recipes"
#: The Diff-Pruning recipe (also runnable alone: `slimdiff run slimdiff/recipes/digits-diff-pruning.yaml`).
RECIPE = RECIPES / "digits-diff-pruning.yaml"
#: How every model is measured (the skip tables are made for this sampler).
EVALUATION = EvalSettings(
    data="digits", metrics=("fid", "kid", "macs", "latency"), n=500, steps=20, scheduler="ddim", batch_size=64
)


@dataclass(frozen=True)
class DemoRow:
    """One compressed model of the demo: a shipped recipe run on the teacher, or on another row's model."""

    name: str
    recipe: str
    base: str | None = None


ROWS: tuple[DemoRow, ...] = (
    DemoRow("channels", "digits-diff-pruning.yaml"),
    DemoRow("layers", "digits-layers.yaml"),
    DemoRow("ofa", "digits-ofa.yaml"),
    DemoRow("skip", "digits-skip.yaml"),
    DemoRow("channels-skip", "digits-channels-skip.yaml", base="channels"),
)


def teacher_is_ready(teacher_dir: Path) -> bool:
    """Whether a finished teacher with exactly the demo's settings is cached in `teacher_dir`."""
    if not (teacher_dir / "slimdiff.json").is_file():
        return False
    history = read_provenance(teacher_dir).history
    return bool(history) and history[-1].get("steps") == TEACHER_CONFIG.steps


def ensure_teacher(out: Path, echo: Callable[[str], None] = print) -> Path:
    """Train the digits teacher unless it is cached; returns its directory."""
    teacher_dir = out / "teacher"
    if teacher_is_ready(teacher_dir):
        echo(f"[1/4] teacher: cached in {teacher_dir}")
        return teacher_dir
    echo(f"[1/4] teacher: training {TEACHER_MODEL} on digits for {TEACHER_CONFIG.steps} steps (resumable)")
    torch.manual_seed(TEACHER_CONFIG.seed)
    result = train_model(
        new_model(TEACHER_MODEL), "digits", teacher_dir, TEACHER_CONFIG, source=f"scratch:{TEACHER_MODEL}", resume=True
    )
    echo(f"      trained in {result.seconds:.0f} s, last step's loss {result.describe_loss()}")
    return teacher_dir


def products(model_dir: Path) -> dict[str, Path]:
    """The models a recipe's last step left: the directory itself, or one per product (an OFA run's sizes)."""
    if (model_dir / "slimdiff.json").is_file():
        return {"": model_dir}
    return {p.name: p for p in sorted(model_dir.iterdir()) if (p / "slimdiff.json").is_file()}


def run_rows(teacher_dir: Path, out: Path, echo: Callable[[str], None]) -> dict[str, Path]:
    """Run every row's recipe (without its eval steps: the demo evaluates all models alike); name → model dir."""
    made: dict[str, Path] = {}
    for index, row in enumerate(ROWS, start=1):
        recipe = load_recipe(RECIPES / row.recipe)
        base = teacher_dir if row.base is None else made[row.base]
        recipe.model, recipe.out = str(base), str(out / row.name)
        recipe.steps = [step for step in recipe.steps if not isinstance(step, EvalStep)]
        for step in recipe.steps:
            if isinstance(step, FinetuneStep) and step.finetune.teacher == "model":
                step.finetune.teacher = str(teacher_dir)  # distil from the teacher, also on a derived base
        start = time.perf_counter()
        echo(f"      ({index}/{len(ROWS)}) {row.name}: {row.recipe} on {base.name}")
        summaries = run_recipe(recipe, progress=False)
        for product, path in products(Path(summaries[-1]["out"])).items():
            made[f"{row.name} {product}".strip()] = path
        reused = all(summary["reused"] for summary in summaries)
        echo(f"            {'reused (finished earlier)' if reused else 'done'} in {time.perf_counter() - start:.0f} s")
    return made


def equal_macs_steps(teacher_macs: int, sampling_macs: float) -> int:
    """The teacher's step count whose sampling run costs about `sampling_macs` (at least 1 step)."""
    return max(1, round(sampling_macs / teacher_macs))


def run_demo(out: str | Path, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Teacher → every engine → one evaluation and report; returns the printed rows."""
    out = Path(out)
    teacher_dir = ensure_teacher(out, echo)
    echo(f"[2/4] teacher samples: DDIM {EVALUATION.steps} steps")
    grid = out / "teacher_samples.png"
    sample_model(teacher_dir, grid, SampleConfig(n=64, steps=EVALUATION.steps), overwrite=True, progress=False)
    echo(f"[3/4] {len(ROWS)} recipes, one per engine (resumable)")
    made = run_rows(teacher_dir, out, echo)

    teacher_macs = model_info(teacher_dir)["macs"]
    sampling = {name: _sampling_macs(path) for name, path in made.items()}
    curve_steps = tuple(sorted({equal_macs_steps(teacher_macs, macs) for macs in sampling.values()}))
    echo(
        f"[4/4] evaluating {1 + len(made)} models alike ({EVALUATION.n} samples, {EVALUATION.scheduler} "
        f"{EVALUATION.steps} steps) and the teacher at {', '.join(map(str, curve_steps))} steps (DDIM and DPM-Solver)"
    )
    comparison = compare_models(
        [teacher_dir, *made.values()],
        out / "report",
        EVALUATION,
        names=["teacher", *made],
        curve_steps=curve_steps,
        resume=True,
        progress=False,
    )
    rows = _table(out / "report", ["teacher", *made], teacher_macs)
    echo(markdown_table(rows))
    echo(
        f"      FID/KID: {EVALUATION.n} samples, digits-v1 features; sampling: {EVALUATION.scheduler} "
        f"{EVALUATION.steps} steps, time of one run at batch {EVALUATION.batch_size} on this machine "
        f"({torch.get_num_threads()} threads); 'teacher at equal MACs' samples the teacher with that many DDIM steps"
    )
    echo(f"      report: {comparison.index}")
    return {"rows": rows, "report": str(comparison.index)}


def _sampling_macs(model_dir: Path) -> float:
    """MACs of one sampling run with the demo's sampler (the sampling plan's, when the model carries one)."""
    info = model_info(model_dir)
    return info.get("sampling_macs", info["macs"] * EVALUATION.steps)


def _table(report_dir: Path, names: list[str], teacher_macs: int) -> list[dict[str, Any]]:
    """The printed table: each model's quality and cost, beside the teacher sampled at equal sampling MACs."""
    evals = [json.loads((report_dir / f"eval-{i}.json").read_text())["metrics"] for i in range(len(names))]
    curves = json.loads((report_dir / "curves.json").read_text())
    ddim = next(curve for name, curve in curves.items() if "ddim" in name)
    fid_at = {int(point["label"]): point["fid"] for point in ddim}
    teacher_time = evals[0]["sampling_latency_ms"]["value"]
    rows = []
    for name, metrics in zip(names, evals):
        steps = equal_macs_steps(teacher_macs, metrics["sampling_macs"]["value"])
        rows.append(
            {
                "model": name,
                "FID": metrics["fid"]["value"],
                "KID": metrics["kid_mean"]["value"],
                "sampling MACs": f"{metrics['sampling_macs']['value'] / 1e9:.2f} G",
                "sampling time (ms)": round(metrics["sampling_latency_ms"]["value"]),
                "speed-up": f"{teacher_time / metrics['sampling_latency_ms']['value']:.2f}×",
                "teacher at equal MACs": "" if name == "teacher" else f"DDIM-{steps}: FID {fid_at[steps]:.3g}",
            }
        )
    return rows
