"""How trustworthy is the digits FID? Sanity checks for both digits feature networks, and sample-count variance.

    python benchmarks/metric_fid.py --teachers runs/demo/teacher runs/external-teacher \
        --out benchmarks/results/metric_fid.json

For each feature network (`digits` = digits-v1 and `digits-ms` = digits-ms-v1), against the digits train split:

1. real holdout vs train (FID, KID, precision/recall);
2. corrupted holdout images, each at several strengths: speckle (salt-and-pepper: a fraction of the pixels set to
   white or black, the sparse impulse noise of badly fine-tuned pruned models), Gaussian noise, blur;
3. mode collapse (holdout restricted to two digit classes);
4. each teacher's samples (DDIM `--steps`) at the holdout's own count over three sampling seeds — the fair
   comparison with (1), since FID falls with n — and, with `--variance`, at 500 / 1000 / 2000 samples.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from slimdiff.data import load_data
from slimdiff.export import load, load_scheduler_config
from slimdiff.io import atomic_write_json
from slimdiff.metrics.features import DIGITS_FEATURES, feature_extractor
from slimdiff.metrics.quality import compute_quality, reference_features
from slimdiff.models import adapter_for
from slimdiff.training.diffusion import sample

SPECKLE = (0.002, 0.005, 0.01, 0.02, 0.05)
NOISE = (0.05, 0.1, 0.2, 0.4, 0.8)
BLUR = (0.5, 1.0, 2.0)


def blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur with reflected borders."""
    radius = max(1, int(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    c = images.shape[1]
    out = F.conv2d(
        F.pad(images, (radius, radius, 0, 0), mode="reflect"), kernel.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c
    )
    return F.conv2d(
        F.pad(out, (0, 0, radius, radius), mode="reflect"), kernel.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c
    )


def speckle(images: torch.Tensor, fraction: float, generator: torch.Generator) -> torch.Tensor:
    """Salt-and-pepper noise: each pixel, with probability `fraction`, becomes white (+1) or black (-1)."""
    hit = torch.rand(images.shape, generator=generator) < fraction
    value = torch.where(torch.rand(images.shape, generator=generator) < 0.5, 1.0, -1.0)
    return torch.where(hit, value, images)


def gaussian(images: torch.Tensor, sigma: float, generator: torch.Generator) -> torch.Tensor:
    return (images + sigma * torch.randn(images.shape, generator=generator)).clamp(-1, 1)


def teacher_samples(teacher: Path, n: int, steps: int, seed: int) -> torch.Tensor:
    adapter = adapter_for(load(teacher))
    schedule = load_scheduler_config(teacher)
    return sample(adapter, n=n, steps=steps, schedule=schedule, seed=seed, batch_size=250, progress=False)


def mean_std(values: list[float]) -> dict[str, float | list[float]]:
    return {"values": values, "mean": statistics.mean(values), "std": statistics.stdev(values)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teachers", type=Path, nargs="*", default=[Path("runs/demo/teacher")])
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps for the teacher samples")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variance", action="store_true", help="also FID of 500 / 1000 / 2000 teacher samples")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/metric_fid.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    train = load_data("digits", size=16, split="train")
    holdout = load_data("digits", size=16, split="holdout")
    images = torch.stack([holdout[i][0] for i in range(len(holdout))])
    labels = torch.tensor([holdout[i][1] for i in range(len(holdout))])
    n_holdout = len(images)

    sizes = [n_holdout, *((500, 1000, 2000) if args.variance else ())]
    samples = {
        str(t): {seed: teacher_samples(t, max(sizes), args.steps, seed) for seed in args.seeds} for t in args.teachers
    }
    result = {
        "what": "quality of corrupted real digits and of teacher samples against the digits train split "
        f"({len(train)} images, 16² gray), by both digits feature networks; holdout = {n_holdout} images",
        "speckle": "salt-and-pepper: each pixel with probability p set to +1 or -1",
        "networks": {},
    }
    for feature in DIGITS_FEATURES:
        extractor = feature_extractor(feature)
        real = reference_features(train, extractor, split="train")

        def quality(fake: torch.Tensor, extractor=extractor, real=real) -> dict[str, float]:
            size = min(len(fake), 300)
            return compute_quality(fake, real, extractor, metrics=("fid", "kid", "pr"), kid_subset_size=size)

        generator = torch.Generator().manual_seed(0)
        clean = quality(images)
        rows = {
            "holdout_vs_train": clean,
            "speckle": [{"p": p} | quality(speckle(images, p, generator)) for p in SPECKLE],
            "gaussian": [{"sigma": s} | quality(gaussian(images, s, generator)) for s in NOISE],
            "blur": [{"sigma": s} | quality(blur(images, s)) for s in BLUR],
            "mode_collapse_two_classes": quality(images[(labels == 0) | (labels == 1)]),
        }
        for kind in ("speckle", "gaussian", "blur"):
            fids = [clean["fid"], *(r["fid"] for r in rows[kind])]
            rows[f"{kind}_monotonic"] = all(a < b for a, b in zip(fids, fids[1:]))
        rows["teachers"] = {}
        for teacher, by_seed in samples.items():
            fid_at = {
                str(n): mean_std([quality(s[:n])["fid"] for s in by_seed.values()]) for n in sizes if len(by_seed) > 1
            }
            at_holdout_n = [quality(s[:n_holdout]) for s in by_seed.values()]
            rows["teachers"][teacher] = {
                "steps": args.steps,
                "scheduler": "ddim",
                "at_holdout_n": at_holdout_n,
                "fid_by_n": fid_at,
                "fid_over_holdout": statistics.mean(q["fid"] for q in at_holdout_n) / clean["fid"],
            }
        result["networks"][feature] = {"name": extractor.name, "holdout_accuracy": extractor.info["holdout_accuracy"]}
        result["networks"][feature] |= rows
        print(feature, {k: v for k, v in rows.items() if k != "teachers"}, flush=True)
        print(feature, "teachers", {t: v["fid_over_holdout"] for t, v in rows["teachers"].items()}, flush=True)
    result["seconds"] = round(time.perf_counter() - start, 1)
    atomic_write_json(args.out, result)


if __name__ == "__main__":
    main()
