"""The latent teacher: a tiny text-to-image Stable Diffusion pipeline trained on the digits with plain diffusers.

`slimdiff demo --latent` trains it (or reuses it) and `benchmarks/latent_teacher.py` is its command line. The training
code is written the way a user outside the project trains a latent model (the style of diffusers'
`examples/text_to_image/train_text_to_image.py`): a small `AutoencoderKL`, then a `UNet2DConditionModel` on its
latents with ε-prediction, caption dropout for classifier-free guidance, torch AdamW with a constant learning rate
after a warm-up, and an EMA of the weights (`diffusers.training_utils.EMAModel`). The result is a complete
`StableDiffusionPipeline` folder (safetensors) that `StableDiffusionPipeline.from_pretrained(out)` loads.

Data: scikit-learn's bundled 8×8 digits (no download), upscaled to 32×32 (bilinear, antialiased), gray replicated to
RGB, in [-1, 1], captioned "a photo of the digit K". Both models train on the "train" part of the split slimdiff uses
(holdout = the first 20 % of `numpy.random.default_rng(0)`'s permutation), so FID against the holdout stays held out.

1. VAE: `AutoencoderKL` with block_out_channels (16, 32, 32), so latents are 4×8×8 (downscale 4); loss = pixel MSE +
   `--kl-weight` × KL (summed over the latent, averaged over the batch). Its `scaling_factor` is set, as Stable
   Diffusion's was, to 1 / std of the training latents (posterior samples), and stored in the VAE config.
2. Text: a tiny random CLIP text encoder and tokenizer (hidden size 32, 16 tokens), frozen as in Stable Diffusion.
   The one slimdiff import: `slimdiff.text.make_tiny_clip_text` builds them (a byte-level BPE vocabulary written
   locally, no download); everything else is diffusers / transformers / torch.
3. U-Net: `UNet2DConditionModel` (sample_size 8, in_channels 4, block_out_channels (32, 64, 64), two
   cross-attention levels and a plain lowest level as in SD, layers_per_block 2, cross-attention on the CLIP
   last hidden states), trained on VAE posterior samples × scaling_factor with Stable Diffusion's noise schedule
   (scaled-linear betas 0.00085..0.012, 1000 steps); `--caption-dropout` of the captions are replaced by the empty
   prompt. The saved scheduler is a `DDIMScheduler` with that schedule (SD's settings: no clipping,
   steps_offset 1, set_alpha_to_one False).

Reproducible and resumable: every draw comes from generators seeded by `--seed`. The U-Net run writes a checkpoint
(weights, EMA, optimiser state and RNG state as safetensors; step, schedule and loss log as JSON) every
`--checkpoint-every` steps into `<out>.partial/`, switched to by an atomic rename of `latest.json`; `--resume`
continues from it (the trained VAE is reused). The learning rate is constant after the warm-up, so `--resume` may
also change `--steps` (cut a run short or extend it). `--stop-at N` stops after the checkpoint at step N, as an
interruption would. The output folder appears atomically (written beside it, then renamed) and holds the pipeline,
`samples.png` (guidance 3, DDIM 25 (--smoke: 2), one column per digit) and `training.json` (settings, losses,
reconstruction MSE, times).

`--evaluate N` samples N images of the finished pipeline (guidance 3, DDIM 25; prompts cycle through the digits)
and measures class agreement (the fraction that slimdiff's digits classifier reads as the prompted digit; this mode
imports `slimdiff.metrics`), written to `<out>/agreement.json`. The defaults are the settings of the teacher that
docs/latent.md measures (class agreement 0.985 at guidance 3, DDIM 25).

    OMP_NUM_THREADS=1 nice python benchmarks/latent_teacher.py --out runs/latent-teacher
    OMP_NUM_THREADS=1 nice python benchmarks/latent_teacher.py --out runs/latent-teacher --evaluate 200

`write_captioned_digits` writes the same digits as a captioned image folder (diffusers' `imagefolder` convention), the
data the demo and `benchmarks/latent.py` hand to slimdiff.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from diffusers.optimization import get_constant_schedule_with_warmup
from diffusers.training_utils import EMAModel
from PIL import Image
from safetensors.torch import load_file, save_file

from slimdiff.io import atomic_dir
from slimdiff.text import make_tiny_clip_text

if TYPE_CHECKING:  # diffusers' SD pipeline module loads transformers' image processors: imported where used
    from diffusers import StableDiffusionPipeline

SIZE = 32
NUM_DIGITS = 10
TEXT_HIDDEN_SIZE = 32
TEXT_MAX_LENGTH = 16
VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "block_out_channels": (16, 32, 32),
    "down_block_types": ("DownEncoderBlock2D",) * 3,
    "up_block_types": ("UpDecoderBlock2D",) * 3,
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "sample_size": SIZE,
}
UNET_CONFIG: dict[str, Any] = {
    "sample_size": SIZE // 4,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (32, 64, 64),
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "layers_per_block": 2,
    "norm_num_groups": 8,
    "attention_head_dim": 8,
    "cross_attention_dim": TEXT_HIDDEN_SIZE,
}
SCHEDULE: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "prediction_type": "epsilon",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
}
SMOKE_IMAGES = 64
GUIDANCE = 3.0
SAMPLING_STEPS = 25
# Settings a resumed run must share with the run it continues (the rest may change: steps, checkpoints, logging).
RUN_KEYS = (
    "seed",
    "vae_steps",
    "vae_batch_size",
    "vae_lr",
    "kl_weight",
    "batch_size",
    "lr",
    "warmup_steps",
    "weight_decay",
    "caption_dropout",
    "ema_max_decay",
)


def caption(digit: int) -> str:
    """The caption of digit `digit`."""
    return f"a photo of the digit {digit}"


def digits_split(holdout_fraction: float = 0.2, split_seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """scikit-learn's digits as `{"train"|"holdout": (images [N, 3, 32, 32] in [-1, 1], labels [N])}`."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images).float().div_(16.0).unsqueeze(1)
    images = F.interpolate(images, size=(SIZE, SIZE), mode="bilinear", antialias=True, align_corners=False)
    images = images.clamp_(0.0, 1.0).mul_(2.0).sub_(1.0).expand(-1, 3, -1, -1).contiguous()
    labels = torch.from_numpy(digits.target).long()
    order = np.random.default_rng(split_seed).permutation(len(images))
    cut = round(len(images) * holdout_fraction)
    parts = {"holdout": sorted(order[:cut].tolist()), "train": sorted(order[cut:].tolist())}
    return {name: (images[idx], labels[idx]) for name, idx in parts.items()}


def write_captioned_digits(folder: str | Path, split: str = "train") -> Path:
    """The digits of `split` as a captioned image folder at 32 px (RGB PNGs + `metadata.jsonl` with `file_name` and
    `text`); an existing complete folder is reused as it is (its files keep their mtimes, so cached latents stay
    valid). Written atomically."""
    folder = Path(folder)
    if (folder / "metadata.jsonl").is_file():
        return folder
    images, labels = digits_split()[split]
    pixels = images.add(1.0).mul(127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
    with atomic_dir(folder) as tmp:
        rows = []
        for index, (image, label) in enumerate(zip(pixels, labels.tolist())):
            name = f"{index:04d}.png"
            Image.fromarray(image).save(tmp / name)
            rows.append(json.dumps({"file_name": name, "text": caption(label)}))
        (tmp / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return folder


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output folder: a StableDiffusionPipeline (must not exist yet)")
    p.add_argument("--steps", type=int, default=None, help="U-Net steps (default 1750; --smoke: 6)")
    p.add_argument("--batch-size", type=int, default=None, help="U-Net batch (default 32; --smoke: 8)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup-steps", type=int, default=None, help="default 200; --smoke: 2")
    p.add_argument("--weight-decay", type=float, default=1e-2)
    p.add_argument("--caption-dropout", type=float, default=0.1, help="fraction of captions replaced by ''")
    p.add_argument("--ema-max-decay", type=float, default=0.999)
    p.add_argument("--vae-steps", type=int, default=None, help="VAE steps (default 500; --smoke: 4)")
    p.add_argument("--vae-batch-size", type=int, default=None, help="default 32; --smoke: 8")
    p.add_argument("--vae-lr", type=float, default=1e-3)
    p.add_argument("--kl-weight", type=float, default=1e-6)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--checkpoint-every", type=int, default=None, help="default 250; --smoke: 3")
    p.add_argument("--stop-at", type=int, default=None, help="stop after the checkpoint at this step (as if killed)")
    p.add_argument("--resume", action="store_true", help="continue from <out>.partial/ if it holds a checkpoint")
    p.add_argument("--log-every", type=int, default=None, help="default 100; --smoke: 1")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--smoke", action="store_true", help="a few steps of everything on 64 images, for tests")
    p.add_argument("--evaluate", type=int, default=None, metavar="N", help="measure class agreement of N samples")
    args = p.parse_args(argv)
    defaults = {
        "steps": (1750, 6),
        "batch_size": (32, 8),
        "warmup_steps": (200, 2),
        "vae_steps": (500, 4),
        "vae_batch_size": (32, 8),
        "checkpoint_every": (250, 3),
        "log_every": (100, 1),
    }
    for name, (full, smoke) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, smoke if args.smoke else full)
    positive = [*defaults, "threads"] + (["evaluate"] if args.evaluate is not None else [])
    for name in positive:
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    if not 0.0 <= args.caption_dropout < 1.0:
        p.error(f"--caption-dropout must lie in [0, 1), got {args.caption_dropout}")
    if args.stop_at is not None and not 0 < args.stop_at <= args.steps:
        p.error(f"--stop-at must lie in 1..--steps ({args.steps}), got {args.stop_at}")
    return args


def write_json(path: Path, obj: Any) -> None:
    """Write `obj` as JSON to `path` atomically (temporary file in the same folder, then rename)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def log_entry(log: list[dict[str, Any]], entry: dict[str, Any]) -> None:
    """Append `entry` to `log` and print it as one JSON line."""
    log.append(entry)
    print(json.dumps(entry), flush=True)


# --- VAE ----------------------------------------------------------------------------------------------------------


def train_vae(args: argparse.Namespace, train: torch.Tensor, holdout: torch.Tensor) -> tuple[AutoencoderKL, dict]:
    """Train the VAE, set its `scaling_factor`, and return it with its training record."""
    torch.manual_seed(args.seed)
    vae = AutoencoderKL(**VAE_CONFIG)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    rng = torch.Generator().manual_seed(args.seed)
    log: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    sums = torch.zeros(2)
    for step in range(args.vae_steps):
        x = train[torch.randint(0, len(train), (args.vae_batch_size,), generator=rng)]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=rng)).sample
        mse, kl = F.mse_loss(recon, x), posterior.kl().mean()
        loss = mse + args.kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        sums += torch.tensor([mse.item(), kl.item()])
        done = step + 1
        if done % args.log_every == 0 or done == args.vae_steps:
            n = done - (log[-1]["vae_step"] if log else 0)
            mse_avg, kl_avg = (sums / n).tolist()
            log_entry(log, {"vae_step": done, "mse": mse_avg, "kl": kl_avg, "seconds": _since(t0)})
            sums.zero_()
    vae.eval().requires_grad_(False)
    mean, std = encode(vae, train)
    samples = mean + std * torch.randn(mean.shape, generator=torch.Generator().manual_seed(args.seed))
    vae.register_to_config(scaling_factor=float(1.0 / samples.std()))
    record = {
        "steps": args.vae_steps,
        "log": log,
        "recon_mse_train": reconstruction_mse(vae, train),
        "recon_mse_holdout": reconstruction_mse(vae, holdout),
        "latent_std": float(samples.std()),
        "posterior_std_mean": float(std.mean()),
        "scaling_factor": vae.config.scaling_factor,
        "seconds": _since(t0),
    }
    return vae, record


@torch.no_grad()
def encode(vae: AutoencoderKL, images: torch.Tensor, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior means and standard deviations of `images` (unscaled latents)."""
    parts = [vae.encode(images[i : i + batch]).latent_dist for i in range(0, len(images), batch)]
    return torch.cat([p.mean for p in parts]), torch.cat([p.std for p in parts])


@torch.no_grad()
def reconstruction_mse(vae: AutoencoderKL, images: torch.Tensor, batch: int = 256) -> float:
    """Mean squared error in [-1, 1] pixels of decoding the posterior means of `images`."""
    total = 0.0
    for i in range(0, len(images), batch):
        x = images[i : i + batch]
        recon = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1.0, 1.0)
        total += F.mse_loss(recon, x, reduction="sum").item()
    return total / images.numel()


# --- U-Net checkpoints --------------------------------------------------------------------------------------------


def save_checkpoint(partial: Path, step: int, unet, ema: EMAModel, optimizer, lr_sched, rng, state: dict) -> None:
    """Write `checkpoint-<step>/` and switch `latest.json` to it atomically; older checkpoints are then removed."""
    name = f"checkpoint-{step}"
    tmp = partial / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, str(tmp / "unet.safetensors"))
    save_file({f"ema.{i}": p.contiguous() for i, p in enumerate(ema.shadow_params)}, str(tmp / "ema.safetensors"))
    opt_state = optimizer.state_dict()
    tensors = {f"{i}.{k}": v for i, s in opt_state["state"].items() for k, v in s.items()}
    tensors["rng"] = rng.get_state()
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    meta = {
        **state,
        "step": step,
        "ema_optimization_step": ema.optimization_step,
        "param_groups": opt_state["param_groups"],
        "lr_sched": lr_sched.state_dict(),
    }
    write_json(tmp / "state.json", meta)
    shutil.rmtree(partial / name, ignore_errors=True)
    os.replace(tmp, partial / name)
    write_json(partial / "latest.json", {"checkpoint": name})
    for old in partial.glob("checkpoint-*"):
        if old.name != name:
            shutil.rmtree(old)


def load_checkpoint(partial: Path, unet, ema: EMAModel, optimizer, lr_sched, rng) -> dict:
    """Restore the state `save_checkpoint` wrote; returns its JSON state."""
    ckpt = partial / json.loads((partial / "latest.json").read_text())["checkpoint"]
    meta = json.loads((ckpt / "state.json").read_text())
    unet.load_state_dict(load_file(str(ckpt / "unet.safetensors")))
    shadow = load_file(str(ckpt / "ema.safetensors"))
    ema.shadow_params = [shadow[f"ema.{i}"] for i in range(len(shadow))]
    ema.optimization_step = meta["ema_optimization_step"]
    tensors = load_file(str(ckpt / "optimizer.safetensors"))
    rng.set_state(tensors.pop("rng"))
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    lr_sched.load_state_dict(meta["lr_sched"])
    return meta


# --- the run ------------------------------------------------------------------------------------------------------


def _since(t0: float) -> float:
    return round(time.perf_counter() - t0, 1)


def prepare_partial(args: argparse.Namespace, out: Path) -> Path:
    """The working folder `<out>.partial/`, fresh unless resuming a run with the same settings."""
    partial = out.with_name(out.name + ".partial")
    run = {key: getattr(args, key) for key in RUN_KEYS}
    if args.resume and (partial / "run.json").is_file():
        saved = json.loads((partial / "run.json").read_text())
        differ = [f"--{k.replace('_', '-')} {saved[k]} (given {run[k]})" for k in RUN_KEYS if saved.get(k) != run[k]]
        if differ:
            raise SystemExit(f"cannot resume {partial}: it was started with {', '.join(differ)}; pass those values")
        return partial
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    write_json(partial / "run.json", run)
    return partial


def load_or_train_vae(args: argparse.Namespace, partial: Path, data: dict) -> tuple[AutoencoderKL, dict]:
    """The VAE of `partial/vae/` when resuming, else a newly trained one saved there."""
    if (partial / "vae.json").is_file():
        print(f"reusing the VAE in {partial / 'vae'}", flush=True)
        vae = AutoencoderKL.from_pretrained(partial / "vae", use_safetensors=True).eval().requires_grad_(False)
        return vae, json.loads((partial / "vae.json").read_text())
    vae, record = train_vae(args, data["train"][0], data["holdout"][0])
    tmp = partial / ".vae.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    vae.save_pretrained(tmp, safe_serialization=True)
    shutil.rmtree(partial / "vae", ignore_errors=True)
    os.replace(tmp, partial / "vae")
    write_json(partial / "vae.json", record)
    return vae, record


def train(args: argparse.Namespace) -> None:
    """Train the VAE and the U-Net, save the pipeline, its sample grid and `training.json` into `--out`."""
    from diffusers import StableDiffusionPipeline

    out = Path(args.out)
    if out.exists():
        raise SystemExit(f"{out} already exists; remove it or pick another --out")
    torch.set_num_threads(args.threads)
    partial = prepare_partial(args, out)
    data = digits_split()
    if args.smoke:  # a slice of the data keeps the encoding passes (latents, reconstruction MSE) quick
        data = {name: (images[:SMOKE_IMAGES], labels[:SMOKE_IMAGES]) for name, (images, labels) in data.items()}
    vae, vae_record = load_or_train_vae(args, partial, data)
    text = make_tiny_clip_text(
        partial / "text", hidden_size=TEXT_HIDDEN_SIZE, seed=args.seed, max_length=TEXT_MAX_LENGTH
    )

    torch.manual_seed(args.seed + 1)
    unet = UNet2DConditionModel(**UNET_CONFIG)
    scheduler = DDIMScheduler(**SCHEDULE)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text.text_model,
        tokenizer=text.tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():  # row k: caption(k) for the digits, row 10: the empty prompt (caption dropout)
        prompts = [caption(k) for k in range(NUM_DIGITS)] + [""]
        embeddings = pipe.encode_prompt(prompts, torch.device("cpu"), 1, False)[0]
    images, labels = data["train"]
    means, stds = encode(vae, images)
    scaling = vae.config.scaling_factor

    optimizer = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    lr_sched = get_constant_schedule_with_warmup(optimizer, args.warmup_steps)
    ema = EMAModel(unet.parameters(), decay=args.ema_max_decay, use_ema_warmup=True, inv_gamma=1.0, power=3 / 4)
    rng = torch.Generator().manual_seed(args.seed + 2)
    state: dict[str, Any] = {"log": [], "seconds": 0.0}
    resumed_from = None
    if args.resume and (partial / "latest.json").is_file():
        state = load_checkpoint(partial, unet, ema, optimizer, lr_sched, rng)
        resumed_from = state["step"]
        print(f"resumed at step {resumed_from}", flush=True)
    start = state.get("step", 0)
    stop = args.steps if args.stop_at is None else args.stop_at

    unet.train()
    t0 = time.perf_counter() - state["seconds"]
    running = 0.0
    for step in range(start, stop):
        idx = torch.randint(0, len(images), (args.batch_size,), generator=rng)
        dropped = torch.rand(args.batch_size, generator=rng) < args.caption_dropout
        context = embeddings[torch.where(dropped, NUM_DIGITS, labels[idx])]
        latents = (means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=rng)) * scaling
        noise = torch.randn(latents.shape, generator=rng)
        timesteps = torch.randint(0, SCHEDULE["num_train_timesteps"], (args.batch_size,), generator=rng)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        loss = F.mse_loss(unet(noisy, timesteps, encoder_hidden_states=context).sample, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        lr_sched.step()
        ema.step(unet.parameters())
        running += loss.item()
        done = step + 1
        if done % args.log_every == 0 or done == stop:
            n = done - max(start, state["log"][-1]["step"] if state["log"] else 0)
            entry = {"step": done, "loss": running / n, "lr": lr_sched.get_last_lr()[0], "seconds": _since(t0)}
            log_entry(state["log"], {**entry, "ema_decay": ema.cur_decay_value})
            running = 0.0
        if done % args.checkpoint_every == 0 or done == args.stop_at:
            state["seconds"] = _since(t0)
            save_checkpoint(partial, done, unet, ema, optimizer, lr_sched, rng, state)
    if args.stop_at is not None and stop < args.steps:
        print(f"stopped at step {stop}; continue with --resume", flush=True)
        return
    unet_seconds = _since(t0)

    ema.copy_to(unet.parameters())
    unet.eval()
    final = partial / "final"
    shutil.rmtree(final, ignore_errors=True)
    pipe.save_pretrained(final, safe_serialization=True)
    shutil.copytree(partial / "text" / "tokenizer", final / "tokenizer", dirs_exist_ok=True)  # + vocab/merges
    t1 = time.perf_counter()
    rows, steps = (1, 2) if args.smoke else (4, SAMPLING_STEPS)
    sample_grid(StableDiffusionPipeline.from_pretrained(final), rows, steps, args.seed).save(final / "samples.png")
    record = {
        "script": "slimdiff/latent_teacher.py",
        "args": vars(args),
        "captions": caption(0).replace("0", "K"),
        "n_train_images": len(images),
        "vae": {"config": VAE_CONFIG, **vae_record},
        "text_encoder": {"hidden_size": TEXT_HIDDEN_SIZE, "max_length": TEXT_MAX_LENGTH, "trained": False},
        "unet": {
            "config": UNET_CONFIG,
            "parameters": sum(p.numel() for p in unet.parameters()),
            "weights": "EMA",
            "steps": stop,
            "resumed_from": resumed_from,
            "log": state["log"],
            "seconds": unet_seconds,
        },
        "scheduler": SCHEDULE,
        "samples": {"file": "samples.png", "guidance": GUIDANCE, "ddim_steps": steps},
        "sample_seconds": _since(t1),
        "torch": torch.__version__,
    }
    write_json(final / "training.json", record)
    os.replace(final, out)
    shutil.rmtree(partial)
    print(f"saved {out}", flush=True)


def sample(
    pipe: StableDiffusionPipeline, digits: list[int], seed: int, guidance: float = GUIDANCE, steps: int = SAMPLING_STEPS
) -> torch.Tensor:
    """Images `[N, 3, 32, 32]` in [-1, 1] for the captions of `digits` (DDIM `steps`, batches of 100)."""
    pipe.set_progress_bar_config(disable=True)
    rng = torch.Generator().manual_seed(seed)
    parts = []
    for i in range(0, len(digits), 100):
        prompts = [caption(k) for k in digits[i : i + 100]]
        kwargs = {"num_inference_steps": steps, "guidance_scale": guidance, "output_type": "pt"}
        parts.append(pipe(prompts, generator=rng, **kwargs).images)
    return torch.cat(parts).mul(2.0).sub(1.0)


def sample_grid(pipe: StableDiffusionPipeline, rows: int, steps: int, seed: int) -> Image.Image:
    """A grid of samples (guidance 3, DDIM `steps`): column k holds `rows` samples of digit k, scaled up 2×."""
    images = sample(pipe, [k for _ in range(rows) for k in range(NUM_DIGITS)], seed, steps=steps)
    grid = images.add(1.0).mul(127.5).round().clamp(0, 255).byte()
    grid = grid.view(rows, NUM_DIGITS, 3, SIZE, SIZE).permute(0, 3, 1, 4, 2).reshape(rows * SIZE, NUM_DIGITS * SIZE, 3)
    image = Image.fromarray(grid.numpy())
    return image.resize((image.width * 2, image.height * 2), Image.NEAREST)


def evaluate(args: argparse.Namespace) -> None:
    """Class agreement of `--evaluate` samples of the pipeline in `--out`, beside real and reconstructed digits."""
    from diffusers import StableDiffusionPipeline

    from slimdiff.metrics.features import digits_feature_extractor
    from slimdiff.metrics.quality import class_agreement

    out = Path(args.out)
    if not (out / "model_index.json").is_file():
        raise SystemExit(f"{out} holds no pipeline (no model_index.json); train it first without --evaluate")
    torch.set_num_threads(args.threads)
    pipe = StableDiffusionPipeline.from_pretrained(out)
    classifier = digits_feature_extractor()
    holdout, holdout_labels = digits_split()["holdout"]
    with torch.no_grad():
        recon = pipe.vae.decode(pipe.vae.encode(holdout).latent_dist.mean).sample.clamp(-1.0, 1.0)
    digits = [i % NUM_DIGITS for i in range(args.evaluate)]
    labels = torch.tensor(digits)
    result: dict[str, Any] = {"n": args.evaluate, "ddim_steps": SAMPLING_STEPS, "seed": args.seed}
    for guidance in (GUIDANCE, 1.0):
        t0 = time.perf_counter()
        images = sample(pipe, digits, args.seed, guidance)
        result[f"guidance_{guidance:g}"] = {
            "class_agreement": class_agreement(images, labels, classifier),
            "finite": bool(images.isfinite().all()),
            "seconds": _since(t0),
        }
    result["holdout_real"] = class_agreement(holdout, holdout_labels, classifier)
    result["holdout_vae_reconstruction"] = class_agreement(recon, holdout_labels, classifier)
    result["classifier"] = {"name": classifier.name, **classifier.info}
    write_json(out / "agreement.json", result)
    print(json.dumps(result, indent=2), flush=True)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.evaluate is not None:
        evaluate(args)
    else:
        train(args)


if __name__ == "__main__":
    main()
