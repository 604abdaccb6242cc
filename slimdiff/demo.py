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
from slimdiff.jobs import model_info, new_model, sample_model, train_model
from slimdiff.train import TrainConfig

#: The digits teacher: tiny-unet, 16² grayscale, 1500 steps of batch 64 (about 9 minutes on 2 CPU cores).
TEACHER_MODEL = "tiny-unet"
TEACHER_CONFIG = TrainConfig(
    steps=1500, batch_size=64, lr=1e-3, warmup_steps=100, ema_decay=0.995, checkpoint_every=250, seed=0
)
SAMPLE_STEPS = 50
SAMPLE_COUNT = 64


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
        echo(f"[1/3] teacher: cached in {teacher_dir}")
        return teacher_dir
    echo(f"[1/3] teacher: training {TEACHER_MODEL} on digits for {TEACHER_CONFIG.steps} steps (resumable)")
    torch.manual_seed(TEACHER_CONFIG.seed)
    result = train_model(
        new_model(TEACHER_MODEL), "digits", teacher_dir, TEACHER_CONFIG, source=f"scratch:{TEACHER_MODEL}", resume=True
    )
    echo(f"      trained in {result.seconds:.0f} s, final loss {result.final_loss:.4f}")
    return teacher_dir


def run_demo(out: str | Path, echo: Callable[[str], None] = print) -> None:
    """Teacher → sample grid → cost report."""
    out = Path(out)
    teacher_dir = ensure_teacher(out, echo)
    grid = out / "teacher_samples.png"
    echo(f"[2/3] sampling {SAMPLE_COUNT} digits (DDIM, {SAMPLE_STEPS} steps)")
    start = time.perf_counter()
    sample_model(teacher_dir, grid, n=SAMPLE_COUNT, steps=SAMPLE_STEPS, scheduler="ddim", seed=0)
    seconds = time.perf_counter() - start
    echo(f"      wrote {grid} in {seconds:.1f} s")
    info = model_info(teacher_dir)
    echo("[3/3] cost of the teacher")
    echo(f"      params: {info['params']:,}")
    echo(
        f"      MACs per denoiser call (batch 1, {info['sample_size']}²): {info['macs'] / 1e6:.1f} M incl. attention, "
        f"{info['macs_no_attn'] / 1e6:.1f} M without"
    )
    echo(
        f"      one {SAMPLE_STEPS}-step sampling run: {info['macs'] * SAMPLE_STEPS / 1e9:.2f} G MACs per image; "
        f"{SAMPLE_COUNT} images took {seconds:.1f} s on this machine ({torch.get_num_threads()} threads)"
    )
