"""The main job on the embedded default: a digits teacher, its samples, and what it costs.

The teacher is trained once by `slimdiff train` settings fixed here (seeded, so reproducible) and cached in the
demo's output directory; an interrupted run resumes from its last checkpoint.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch

from slimdiff.export import read_provenance
from slimdiff.jobs.evaluation import evaluate_model
from slimdiff.jobs.info import model_info
from slimdiff.jobs.recipes import eval_settings, run_recipe
from slimdiff.jobs.sampling import sample_model
from slimdiff.jobs.training import new_model, train_model
from slimdiff.recipe import CompressStep, EvalStep, FinetuneStep, Recipe, load_recipe
from slimdiff.report import markdown_table
from slimdiff.train import TrainConfig

#: The digits teacher: tiny-unet, 16² grayscale, 1500 steps of batch 64 (about 9 minutes on 2 CPU cores).
TEACHER_MODEL = "tiny-unet"
TEACHER_CONFIG = TrainConfig(
    steps=1500, batch_size=64, lr=1e-3, warmup_steps=100, ema_decay=0.995, checkpoint_every=250, seed=0
)
SAMPLE_STEPS = 50
SAMPLE_COUNT = 64
#: The compression recipe the demo runs on its teacher.
RECIPE = Path(__file__).parent / "recipes" / "digits-diff-pruning.yaml"


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
    echo(f"      trained in {result.seconds:.0f} s, final loss {result.final_loss:.4f}")
    return teacher_dir


def recipe_label(recipe: Recipe) -> str:
    """A one-line name for what a compress → fine-tune recipe made, e.g. for a comparison table."""
    compress = next(step.config for step in recipe.steps if isinstance(step, CompressStep))
    finetune = next(step.finetune for step in recipe.steps if isinstance(step, FinetuneStep))
    distilled = " with output KD" if finetune.teacher and finetune.kd_output_weight > 0 else ""
    return (
        f"{compress.importance} {compress.target:.0%} {'MACs' if compress.unit == 'macs' else 'params'} + "
        f"{finetune.steps}-step fine-tune{distilled}"
    )


def run_demo(out: str | Path, echo: Callable[[str], None] = print) -> None:
    """Teacher → sample grid → cost report → Diff-Pruning recipe (prune, fine-tune, eval) → comparison."""
    out = Path(out)
    teacher_dir = ensure_teacher(out, echo)
    grid = out / "teacher_samples.png"
    echo(f"[2/4] sampling {SAMPLE_COUNT} digits (DDIM, {SAMPLE_STEPS} steps)")
    start = time.perf_counter()
    sample_model(teacher_dir, grid, n=SAMPLE_COUNT, steps=SAMPLE_STEPS, scheduler="ddim", seed=0)
    seconds = time.perf_counter() - start
    echo(f"      wrote {grid} in {seconds:.1f} s")
    info = model_info(teacher_dir)
    echo("[3/4] cost of the teacher")
    echo(f"      params: {info['params']:,}")
    echo(
        f"      MACs per denoiser call (batch 1, {info['sample_size']}²): {info['macs'] / 1e6:.1f} M incl. attention, "
        f"{info['macs_no_attn'] / 1e6:.1f} M without"
    )
    echo(
        f"      one {SAMPLE_STEPS}-step sampling run: {info['macs'] * SAMPLE_STEPS / 1e9:.2f} G MACs per image; "
        f"{SAMPLE_COUNT} images took {seconds:.1f} s on this machine ({torch.get_num_threads()} threads)"
    )

    recipe = load_recipe(RECIPE)
    recipe.model, recipe.out = str(teacher_dir), str(out / "diff-pruning")
    echo(
        f"[4/4] recipe {RECIPE.name}: "
        + " → ".join(type(step).__name__.removesuffix("Step").lower() for step in recipe.steps)
    )
    summaries = run_recipe(recipe)
    for summary in summaries:
        echo(f"      {summary['step']}: {summary['out']}")
    evaluation = next(step for step in recipe.steps if isinstance(step, EvalStep)).eval
    settings = eval_settings(evaluation, recipe.data)
    teacher_report = evaluate_model(teacher_dir, settings, progress=False)
    pruned = summaries[-1]["metrics"]
    teacher = {k: v["value"] for k, v in teacher_report["metrics"].items()}
    rows = [{"model": "teacher", **teacher}, {"model": recipe_label(recipe), **pruned}]
    echo(markdown_table([{k: row.get(k) for k in ("model", "fid", "kid_mean", "macs", "latency_ms")} for row in rows]))
    echo(
        f"      MACs ratio {teacher['macs'] / pruned['macs']:.2f}×, measured speed-up "
        f"{teacher['latency_ms'] / pruned['latency_ms']:.2f}× (denoiser call, batch {settings.batch_size}); "
        f"FID {pruned['fid'] / teacher['fid']:.2f}× the teacher's ({settings.n} samples, {settings.steps} DDIM steps, "
        "digits-v1 features)"
    )
