"""Train the latent teacher (a tiny text-to-image Stable Diffusion pipeline on the digits) or measure it.

The training code lives in `slimdiff/latent_teacher.py` (so `slimdiff demo --latent` can run it); it is plain
diffusers + transformers + torch, written as a user outside the project would. See that module for the options.

    OMP_NUM_THREADS=1 nice python benchmarks/latent_teacher.py --out runs/latent-teacher
    OMP_NUM_THREADS=1 nice python benchmarks/latent_teacher.py --out runs/latent-teacher --evaluate 200
"""

from __future__ import annotations

from slimdiff.latent_teacher import main

if __name__ == "__main__":
    main()
