"""Train the external benchmark teacher: a digits U-Net made by a plain diffusers script, not by slimdiff.

This is deliberately written the way a user outside the project would train a model (the style of diffusers'
`examples/unconditional_image_generation/train_unconditional.py`): `UNet2DModel` + `DDPMScheduler` + torch AdamW
with a warm-up/cosine schedule from `diffusers.optimization`, an EMA of the weights (`diffusers.training_utils.
EMAModel`), ε-prediction with the DDPM linear betas 1e-4..0.02, and the EMA weights saved with
`save_pretrained(..., safe_serialization=True)` plus the scheduler's `scheduler_config.json`, so that the output
directory is a plain diffusers model directory. It imports nothing from slimdiff.

Data: scikit-learn's 8×8 digits, upscaled to 16×16 (bilinear, antialiased), 1 channel, in [-1, 1]. The model trains
on the "train" part of the same split slimdiff uses (holdout = the first 20 % of `numpy.random.default_rng(0)`'s
permutation), so that slimdiff's FID against the holdout stays a held-out measurement.

Architecture (differs from slimdiff's `tiny-unet`): block_out_channels (32, 64, 64), down blocks
DownBlock2D, DownBlock2D, AttnDownBlock2D (attention at the lowest resolution, 4×4), up blocks AttnUpBlock2D,
UpBlock2D, UpBlock2D, layers_per_block 2, norm_num_groups 8, attention_head_dim 16.

Reproducible: everything is drawn from generators seeded by `--seed`; the same command gives the same weights
(on the same torch build and thread count). The output directory appears atomically (written to a temporary
sibling, then renamed). `--resume` continues from the checkpoint saved every `--checkpoint-every` steps.

    OMP_NUM_THREADS=1 python benchmarks/external_teacher.py --out runs/external-teacher

The benchmark teacher in runs/external-teacher is `--steps 2000 --stop-after 1250`: the EMA weights after
1250 steps of a 2000-step schedule (a user would train 3000; on the shared 2-core machine one step took
0.5-9 s at one thread, so the run was stopped at its step-1250 checkpoint and finished with `--resume`, which
restores the weights, EMA, optimiser, schedule and RNG state, so it continues the same run).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel
from diffusers.optimization import get_cosine_schedule_with_warmup
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file, save_file

UNET_CONFIG = {
    "sample_size": 16,
    "in_channels": 1,
    "out_channels": 1,
    "block_out_channels": (32, 64, 64),
    "down_block_types": ("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
    "up_block_types": ("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    "layers_per_block": 2,
    "norm_num_groups": 8,
    "attention_head_dim": 16,
}


def digits_train_images(size: int = 16, holdout_fraction: float = 0.2, split_seed: int = 0) -> torch.Tensor:
    """The training part of scikit-learn's digits as `[N, 1, size, size]` float32 in [-1, 1]."""
    from sklearn.datasets import load_digits

    images = torch.from_numpy(load_digits().images).float().div_(16.0).unsqueeze(1)
    images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    images = images.clamp_(0.0, 1.0).mul_(2.0).sub_(1.0)
    order = np.random.default_rng(split_seed).permutation(len(images))
    train = sorted(order[round(len(images) * holdout_fraction) :].tolist())
    return images[train].contiguous()


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output directory (a plain diffusers model dir)")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup-steps", type=int, default=150)
    p.add_argument("--weight-decay", type=float, default=1e-2)
    p.add_argument("--ema-max-decay", type=float, default=0.999)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--checkpoint-every", type=int, default=250)
    p.add_argument(
        "--stop-after", type=int, default=None, help="save the EMA weights after this step (schedule still --steps)"
    )
    p.add_argument("--resume", action="store_true", help="continue from <out>.partial/checkpoint if present")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args()


def save_checkpoint(path: Path, step: int, unet: UNet2DModel, ema: EMAModel, optimizer, lr_sched, rng) -> None:
    """Weights as safetensors, optimiser/schedule/RNG state as a torch file of plain tensors and numbers."""
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, str(path / "model.safetensors"))
    save_file({f"ema.{i}": p.contiguous() for i, p in enumerate(ema.shadow_params)}, str(path / "ema.safetensors"))
    torch.save(
        {"optimizer": optimizer.state_dict(), "lr_sched": lr_sched.state_dict(), "rng": rng.get_state()},
        path / "state.pt",
    )
    (path / "step.json").write_text(json.dumps({"step": step, "ema_optimization_step": ema.optimization_step}))


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    partial = out.with_name(out.name + ".partial")
    if out.exists():
        raise SystemExit(f"{out} already exists; remove it or pick another --out")
    if partial.exists() and not args.resume:
        shutil.rmtree(partial)
    partial.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(args.seed)
    images = digits_train_images()
    unet = UNet2DModel(**UNET_CONFIG)
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02, prediction_type="epsilon"
    )
    optimizer = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    lr_sched = get_cosine_schedule_with_warmup(optimizer, args.warmup_steps, args.steps)
    ema = EMAModel(unet.parameters(), decay=args.ema_max_decay, use_ema_warmup=True, inv_gamma=1.0, power=3 / 4)
    rng = torch.Generator().manual_seed(args.seed)

    start = 0
    ckpt = partial / "checkpoint"
    if args.resume and (ckpt / "step.json").is_file():
        meta = json.loads((ckpt / "step.json").read_text())
        unet.load_state_dict(load_file(str(ckpt / "model.safetensors")))
        shadow = load_file(str(ckpt / "ema.safetensors"))
        ema.shadow_params = [shadow[f"ema.{i}"] for i in range(len(shadow))]
        ema.optimization_step = meta["ema_optimization_step"]
        state = torch.load(ckpt / "state.pt", weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        lr_sched.load_state_dict(state["lr_sched"])
        rng.set_state(state["rng"])
        start = meta["step"]
        print(f"resumed at step {start}", flush=True)

    unet.train()
    log = []
    t0 = time.perf_counter()
    running = 0.0
    stop = args.steps if args.stop_after is None else min(args.stop_after, args.steps)
    for step in range(start, stop):
        idx = torch.randint(0, len(images), (args.batch_size,), generator=rng)
        clean = images[idx]
        noise = torch.randn(clean.shape, generator=rng)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (args.batch_size,), generator=rng)
        noisy = scheduler.add_noise(clean, noise, timesteps)
        loss = F.mse_loss(unet(noisy, timesteps).sample, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        lr_sched.step()
        ema.step(unet.parameters())
        running += loss.item()
        done = step + 1
        if done % args.log_every == 0 or done == stop:
            n = args.log_every if done % args.log_every == 0 else done % args.log_every
            entry = {
                "step": done,
                "loss": running / n,
                "lr": lr_sched.get_last_lr()[0],
                "ema_decay": ema.cur_decay_value,
                "seconds": round(time.perf_counter() - t0, 1),
            }
            log.append(entry)
            print(json.dumps(entry), flush=True)
            running = 0.0
        if done % args.checkpoint_every == 0 and done < stop:
            save_checkpoint(ckpt, done, unet, ema, optimizer, lr_sched, rng)

    ema.copy_to(unet.parameters())
    unet.eval()
    final = partial / "final"
    if final.exists():
        shutil.rmtree(final)
    unet.save_pretrained(final, safe_serialization=True)
    scheduler.save_config(final)
    train_info = {
        "script": "benchmarks/external_teacher.py",
        "args": vars(args),
        "unet_config": UNET_CONFIG,
        "scheduler": "DDPMScheduler linear betas 1e-4..0.02, 1000 steps, epsilon",
        "weights": "EMA",
        "n_train_images": len(images),
        "torch": torch.__version__,
        "log": log,
        "train_seconds": round(time.perf_counter() - t0, 1),
    }
    (final / "training.json").write_text(json.dumps(train_info, indent=2))
    os.replace(final, out)
    shutil.rmtree(partial)
    print(f"saved {out}", flush=True)


if __name__ == "__main__":
    main()
