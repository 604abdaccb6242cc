"""Every engine on the latent teacher (a tiny Stable Diffusion pipeline on the digits, docs/latent.md), one table.

Rows (`slimdiff.demo.latent.LATENT_ROWS`, each a shipped latent recipe `slimdiff/recipes/latent-*.yaml`, fine-tuned for
15 % of the teacher's 1750 steps with KD where the engine fine-tunes): channels at 0.5 MACs, layers at 0.6 params,
OFA 0.3 / 0.5 / 0.75, skip at 0.5 and 0.25 of the sampling MACs, channels × skip. Every model is sampled with guidance
3 (prompts "a photo of the digit K", K in turn, seed 0) at DDIM 25, DDIM 13 and DPM-Solver++ 10 and measured by FID
(digits features, against the digits train split at 32 px) and class agreement (the digits classifier reads the
prompted digit), beside the teacher sampled with fewer steps of the same sampler at equal sampling MACs. Sampling
MACs are one image's: the guided U-Net calls plus the VAE decoder once (the text encoder's cost is left out). A skip
table is made for one sampler (DDIM 25); the other samplers are "n/a" for its rows.

Encoding cost: the captioned digits are encoded by the teacher's VAE once and cached beside the data; each run of the
command records (`encoding` in the JSON) how long loading the latent training set took and what the cache reused, so
the second run of the same command shows that nothing is encoded.

Rows append to `--out` as they finish; a rerun skips finished rows. An engine that fails records its one-line error
in its row and the next row runs. The same code runs `slimdiff demo --latent` (slimdiff/demo/latent.py).

    OMP_NUM_THREADS=1 nice python benchmarks/latent.py --teacher runs/latent-teacher \\
        --work runs/latent-bench --out benchmarks/results/latent.json --table benchmarks/results/latent.md --n 500
"""

from __future__ import annotations

import argparse
from pathlib import Path

from slimdiff.demo.latent import LATENT_ROWS, LatentBenchSettings, run_latent_bench
from slimdiff.io import atomic_write_bytes
from slimdiff.report import markdown_table


def main(argv: list[str] | None = None) -> None:
    keys = [row.key for row in LATENT_ROWS]
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", type=Path, required=True, help="the latent teacher (StableDiffusionPipeline folder)")
    p.add_argument("--work", type=Path, default=Path("runs/latent-bench"), help="the rows' models, data and grids")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/latent.json"))
    p.add_argument("--table", type=Path, default=None, help="also write the Markdown table here")
    p.add_argument("--n", type=int, default=500, help="samples per measurement")
    p.add_argument("--rows", nargs="+", default=keys, choices=keys, help="rows to run (in this order)")
    args = p.parse_args(argv)
    settings = LatentBenchSettings(
        teacher=args.teacher, data=args.work / "digits-captioned", work=args.work, out=args.out, n=args.n
    )
    lines = run_latent_bench(settings, args.rows)
    if args.table is not None:
        atomic_write_bytes(args.table, (markdown_table(lines) + "\n").encode())


if __name__ == "__main__":
    main()
