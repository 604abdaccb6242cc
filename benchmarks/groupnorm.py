"""Whole-group GroupNorm pruning on a small-group U-Net, against a 32-group U-Net pruned to the same fractions.

    nice python benchmarks/groupnorm.py --work runs/bench-groupnorm --out benchmarks/results/groupnorm.json

Two `UNet2DModel`s at 24 px, 3 channels, two attention levels (digits at 24 px in RGB): the small-group model
(`norm_num_groups=16`, widths 32/48/64: groups of 2, 3 and 4 channels, and of 5 and 7 over two skip
concatenations) and a 32-group one (widths 32/64/64 — 48 does not split into 32 groups). Each is trained from
scratch for `--teacher-steps`, pruned by `slimdiff compress channels` (Diff-Pruning importance) to every
`--targets` fraction of its MACs, fine-tuned for `--finetune-steps` and read by `slimdiff eval` (FID and KID on the
digits feature network, `--n` samples, DDIM `--steps`), all through the console script, so each pruned model is
loaded and sampled exactly as a user would; each fine-tune distils the model's own teacher (`--teacher`, with the
fine-tune's default settings). The JSON records each row's achieved MACs fraction, its miss against the target, the
norms that were regrouped and the wall times.

A rerun resumes: a step whose output is finished (recorded in `--work`/steps.json with its wall time) is reused, and
an interrupted training or fine-tune continues from its last checkpoint (`--resume`).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from slimdiff.io import atomic_write_json

MODELS: dict[str, dict[str, Any]] = {
    "groups16": {"norm_num_groups": 16, "block_out_channels": [32, 48, 64]},
    "groups32": {"norm_num_groups": 32, "block_out_channels": [32, 64, 64]},
}


def model_config(norm: dict[str, Any]) -> dict[str, Any]:
    """A diffusers `UNet2DModel` config at 24 px, 3 channels, attention at the two lower resolutions."""
    return {
        "_class_name": "UNet2DModel",
        "sample_size": 24,
        "in_channels": 3,
        "out_channels": 3,
        "layers_per_block": 2,
        "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
        "up_block_types": ["AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
        "attention_head_dim": 8,
        **norm,
    }


def slimdiff(work: Path, out: Path, *args: object) -> float:
    """Run the console script (this interpreter's `slimdiff`) to make `out`, failing loudly; its wall time in seconds.

    A step finished by an earlier run (its wall time recorded in `work`/steps.json) is not run again.
    """
    record = work / "steps.json"
    done = json.loads(record.read_text()) if record.exists() else {}
    if str(out) in done:
        return done[str(out)]
    command = [sys.executable, "-m", "slimdiff", *map(str, args)]
    print("$", " ".join(command[2:]), flush=True)
    start = time.perf_counter()
    subprocess.run(command, check=True)
    done[str(out)] = round(time.perf_counter() - start, 1)
    atomic_write_json(record, done)
    return done[str(out)]


def evaluate(model_dir: Path, out: Path, args: argparse.Namespace) -> tuple[dict[str, Any], float]:
    seconds = slimdiff(
        args.work, out, "eval", model_dir, "--data", "digits", "--metrics", "fid,kid,macs", "--n", args.n,
        "--steps", args.steps, "--json", out, "--overwrite",
    )  # fmt: skip
    return json.loads(out.read_text()), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("runs/bench-groupnorm"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/groupnorm.json"))
    parser.add_argument("--targets", type=float, nargs="+", default=[0.5, 0.3])
    parser.add_argument("--teacher-steps", type=int, default=300)
    parser.add_argument("--finetune-steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--calibration", type=int, default=8, help="Diff-Pruning's calibration images")
    parser.add_argument("--stride", type=int, default=100, help="Diff-Pruning's timestep stride")
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--steps", type=int, default=25)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for name, norm in MODELS.items():
        config = args.work / f"{name}.json"
        config.write_text(json.dumps(model_config(norm), indent=2))
        teacher = args.work / name / "teacher"
        train_s = slimdiff(
            args.work, teacher, "train", "--model", config, "--data", "digits", "--steps", args.teacher_steps,
            "--batch-size", args.batch_size, "--seed", 0, "--out", teacher, "--resume",
        )  # fmt: skip
        quality, eval_s = evaluate(teacher, args.work / name / "teacher-eval.json", args)
        rows.append({"model": name, **norm, "target": 1.0, "train_s": train_s, "eval_s": eval_s, "eval": quality})
        for target in args.targets:
            pruned, tuned = args.work / name / f"pruned-{target}", args.work / name / f"tuned-{target}"
            prune_s = slimdiff(
                args.work, pruned, "compress", "channels", teacher, "--importance", "diff-pruning",
                "--target-macs", target, "--calibration", args.calibration, "--stride", args.stride,
                "--data", "digits", "--out", pruned, "--overwrite",
            )  # fmt: skip
            record = json.loads((pruned / "slimdiff.json").read_text())
            tune_s = slimdiff(
                args.work, tuned, "finetune", pruned, "--teacher", teacher, "--data", "digits",
                "--steps", args.finetune_steps, "--batch-size", args.batch_size, "--out", tuned, "--resume",
            )  # fmt: skip
            quality, eval_s = evaluate(tuned, args.work / name / f"tuned-{target}-eval.json", args)
            rows.append(
                {
                    "model": name,
                    **norm,
                    "target": target,
                    "provenance": record,
                    "compress_s": prune_s,
                    "finetune_s": tune_s,
                    "eval_s": eval_s,
                    "eval": quality,
                }
            )
            write(args, rows, start)  # every finished row is kept, even if a later one fails
    write(args, rows, start)


def write(args: argparse.Namespace, rows: list[dict[str, Any]], start: float) -> None:
    settings = {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()}
    atomic_write_json(args.out, {"settings": settings, "rows": rows, "wall_s": round(time.perf_counter() - start, 1)})


if __name__ == "__main__":
    main()
