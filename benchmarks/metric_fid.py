"""How trustworthy is FID with the digits feature network? Sanity checks and sample-count variance.

    python benchmarks/metric_fid.py --teacher runs/demo/teacher --out benchmarks/results/metric_fid.json

1. FID(real holdout vs train) is small;
2. FID grows monotonically with Gaussian noise and with blur added to the holdout images;
3. mode collapse (holdout restricted to two digit classes) is penalised;
4. FID of teacher samples at 500 / 1000 / 2000 samples over 3 seeds (mean ± std), so the docs can say which
   differences are real.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from slimdiff.data import load_data
from slimdiff.diffusion import sample
from slimdiff.export import load, load_scheduler_config
from slimdiff.metrics.features import digits_feature_extractor
from slimdiff.metrics.quality import compute_quality, reference_features
from slimdiff.models import adapter_for


def blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", type=Path, default=Path("runs/demo/teacher"))
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps for the teacher samples")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/metric_fid.json"))
    args = parser.parse_args()
    start = time.perf_counter()
    extractor = digits_feature_extractor()
    train = load_data("digits", size=16, split="train")
    holdout = load_data("digits", size=16, split="holdout")
    real = reference_features(train, extractor, split="train")
    images = torch.stack([holdout[i][0] for i in range(len(holdout))])
    labels = torch.tensor([holdout[i][1] for i in range(len(holdout))])

    def fid(fake: torch.Tensor) -> float:
        return compute_quality(fake, real, extractor, metrics=("fid",))["fid"]

    generator = torch.Generator().manual_seed(0)
    noise = [
        {"sigma": s, "fid": fid((images + s * torch.randn(images.shape, generator=generator)).clamp(-1, 1))}
        for s in (0.0, 0.1, 0.2, 0.4, 0.8)
    ]
    blurs = [{"sigma": s, "fid": fid(blur(images, s) if s > 0 else images)} for s in (0.0, 0.5, 1.0, 2.0)]
    two = images[(labels == 0) | (labels == 1)]
    collapse = {"holdout_all_classes": fid(images), "holdout_two_classes": fid(two), "n_two_classes": len(two)}

    model = load(args.teacher)
    adapter = adapter_for(model)
    schedule = load_scheduler_config(args.teacher)
    variance = {500: [], 1000: [], 2000: []}
    for seed in (0, 1, 2):
        samples = sample(
            adapter,
            n=2000,
            steps=args.steps,
            scheduler="ddim",
            schedule=schedule,
            seed=seed,
            batch_size=250,
            progress=False,
        )
        for n in variance:
            variance[n].append(fid(samples[:n]))
    result = {
        "what": "FID with the digits-v1 feature network against the digits train split (1438 images), 16² gray",
        "extractor": {"name": extractor.name, "holdout_accuracy": extractor.info["holdout_accuracy"]},
        "holdout_vs_train": fid(images),
        "noise": noise,
        "noise_monotonic": all(a["fid"] < b["fid"] for a, b in zip(noise, noise[1:])),
        "blur": blurs,
        "blur_monotonic": all(a["fid"] < b["fid"] for a, b in zip(blurs, blurs[1:])),
        "mode_collapse": collapse,
        "teacher_samples": {
            "teacher": str(args.teacher),
            "steps": args.steps,
            "scheduler": "ddim",
            "by_n": {
                str(n): {"seeds": v, "mean": statistics.mean(v), "std": statistics.stdev(v)}
                for n, v in variance.items()
            },
        },
        "seconds": round(time.perf_counter() - start, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
