"""Do the defaults give the tuned result? `finetune --teacher` with default flags against the shipped recipe.

    OMP_NUM_THREADS=1 nice python benchmarks/finetune_defaults.py --teacher runs/external-teacher \
        --work runs/bench-finetune-defaults --out benchmarks/results/finetune_defaults.json

On a teacher slimdiff did not train (`benchmarks/external_teacher.py`), through the console script as a user runs it:
- `recipe`: the shipped `digits-diff-pruning.yaml` with its `model`, `data` and `out` pointed at this teacher
  (compress to 50 % MACs, fine-tune with its tuned settings, its own evaluation);
- `defaults`: `compress channels --target-macs 0.5` and `finetune --teacher` with no flag but the step count
  (the recipe's, so both have the same training budget) and the folders.

Both fine-tuned models and the teacher are read by `slimdiff eval` (FID and KID on the digits feature network, `--n`
samples, DDIM at each `--curve` step count). A rerun resumes (finished steps are recorded in `--work`).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import yaml
from groupnorm import slimdiff

from slimdiff.io import atomic_write_json, read_json

RECIPE = Path(__file__).resolve().parents[1] / "slimdiff" / "recipes" / "digits-diff-pruning.yaml"


def evaluate(args: argparse.Namespace, model: Path, name: str) -> dict[str, Any]:
    """FID and KID of `model` at every step count of the curve."""
    curve = {}
    for steps in args.curve:
        out = args.work / f"{name}-eval-{steps}.json"
        seconds = slimdiff(
            args.work, out, "eval", model, "--data", "digits", "--metrics", "fid,kid", "--n", args.n,
            "--steps", steps, "--json", out, "--overwrite",
        )  # fmt: skip
        metrics = read_json(out)["metrics"]
        curve[f"ddim-{steps}"] = {"fid": metrics["fid"]["value"], "kid": metrics["kid_mean"]["value"], "s": seconds}
    return curve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path("runs/bench-finetune-defaults"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/finetune_defaults.json"))
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--curve", type=int, nargs="+", default=[13, 25])
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    teacher, start = args.teacher.resolve(), time.perf_counter()

    recipe = yaml.safe_load(RECIPE.read_text())
    recipe.update(model=str(teacher), data="digits", out=str((args.work / "recipe").resolve()))
    recipe_file = args.work / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(recipe, sort_keys=False))
    recipe_s = slimdiff(args.work, args.work / "recipe", "run", recipe_file)
    finetune = next(step["finetune"] for step in recipe["steps"] if "finetune" in step)

    pruned, tuned = args.work / "defaults-pruned", args.work / "defaults"
    prune_s = slimdiff(
        args.work, pruned, "compress", "channels", teacher, "--target-macs", 0.5, "--data", "digits",
        "--out", pruned, "--overwrite",
    )  # fmt: skip
    tune_s = slimdiff(
        args.work, tuned, "finetune", pruned, "--teacher", teacher, "--data", "digits",
        "--steps", finetune["steps"], "--out", tuned, "--resume",
    )  # fmt: skip
    rows = {
        "teacher": {"model": str(teacher), "curve": evaluate(args, teacher, "teacher")},
        "recipe": {"model": str(args.work / "recipe" / "01-finetune"), "seconds": recipe_s},
        "defaults": {"model": str(tuned), "compress_s": prune_s, "finetune_s": tune_s},
    }
    rows["recipe"]["curve"] = evaluate(args, args.work / "recipe" / "01-finetune", "recipe")
    rows["defaults"]["curve"] = evaluate(args, tuned, "defaults")
    ratio = {
        point: rows["defaults"]["curve"][point]["fid"] / rows["recipe"]["curve"][point]["fid"]
        for point in rows["recipe"]["curve"]
    }
    settings = {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()}
    atomic_write_json(
        args.out,
        {
            "settings": settings,
            "rows": rows,
            "defaults_fid_over_recipe_fid": ratio,
            "wall_s": round(time.perf_counter() - start, 1),
        },
    )
    print(json.dumps(ratio))


if __name__ == "__main__":
    main()
