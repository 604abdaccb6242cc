"""`slimdiff` — the command line. Thin: parse, call `slimdiff.jobs`, print."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import click
import typer

from slimdiff.errors import SlimdiffError

app = typer.Typer(
    help="Make trained diffusion models (diffusers U-Nets and DiTs) smaller and faster.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

Steps = Annotated[int, typer.Option("--steps", help="Number of optimizer steps.", min=1)]
Seed = Annotated[int, typer.Option("--seed", help="Random seed (data order, noise, init).")]
BatchSize = Annotated[int, typer.Option("--batch-size", help="Global batch size.", min=1)]
Resume = Annotated[bool, typer.Option("--resume", help="Continue from the latest checkpoint in --out.")]
Data = Annotated[str, typer.Option("--data", help="'digits' (bundled) or an image folder (class subfolders).")]
Accumulation = Annotated[int, typer.Option("--grad-accumulation", help="Micro-batches per optimizer step.", min=1)]


@app.command()
def info(
    model_dir: Annotated[Path, typer.Argument(help="A diffusers model or pipeline directory (weights optional).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a summary.")] = False,
) -> None:
    """Family, params, MACs, blocks and layers of a model — without loading its weights."""
    from slimdiff.jobs import model_info

    report = model_info(model_dir)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    typer.echo(
        f"{report['class']} ({report['family']}), {report['sample_size']}² × {report['in_channels']} ch, "
        f"conditioning: {report['conditioning']}"
    )
    typer.echo(f"params: {report['params']:,}")
    typer.echo(
        f"MACs:   {report['macs'] / 1e9:.3f} G incl. attention matmuls, "
        f"{report['macs_no_attn'] / 1e9:.3f} G without ({report['macs_counts']})"
    )
    typer.echo(f"blocks ({len(report['blocks'])}): " + ", ".join(b["name"] for b in report["blocks"]))
    removable = sum(layer["removable"] for layer in report["layers"])
    typer.echo(f"layers: {len(report['layers'])} residual layers, {removable} removable")


@app.command()
def sample(
    model_dir: Annotated[Path, typer.Argument(help="Model or pipeline directory.")],
    out: Annotated[Path, typer.Option("--out", help="PNG grid to write.")],
    n: Annotated[int, typer.Option("--n", help="Number of samples.", min=1)] = 64,
    steps: Annotated[int, typer.Option("--steps", help="Sampling steps.", min=1)] = 50,
    scheduler: Annotated[str, typer.Option("--scheduler", help="ddpm, ddim or dpm.")] = "ddim",
    seed: Seed = 0,
    batch_size: BatchSize = 64,
    guidance: Annotated[float, typer.Option("--guidance", help="Classifier-free guidance scale (1 = off).")] = 1.0,
    labels: Annotated[Optional[str], typer.Option("--labels", help="Class labels, comma-separated.")] = None,
    prompts: Annotated[Optional[Path], typer.Option("--prompts", help="Prompts file, one per line.")] = None,
) -> None:
    """Sample a seeded, batched grid of images."""
    from slimdiff.data import load_prompts
    from slimdiff.jobs import sample_model

    label_list = _parse_labels(labels) if labels else None
    prompt_list = load_prompts(prompts) if prompts else None
    start = time.perf_counter()
    sample_model(
        model_dir,
        out,
        n=n,
        steps=steps,
        scheduler=scheduler,
        seed=seed,
        batch_size=batch_size,
        guidance_scale=guidance,
        labels=label_list,
        prompts=prompt_list,
    )
    typer.echo(f"wrote {out} ({n} samples, {scheduler} {steps} steps, {time.perf_counter() - start:.1f} s)")


def _parse_labels(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise SlimdiffError(f"--labels must be comma-separated integers, got '{text}'") from None


@app.command()
def train(
    out: Annotated[Path, typer.Option("--out", help="Output directory (model, checkpoints, log.jsonl).")],
    model: Annotated[str, typer.Option("--model", help="tiny-unet, tiny-sd, tiny-dit or a config.json.")] = "tiny-unet",
    data: Data = "digits",
    steps: Steps = 1500,
    batch_size: BatchSize = 64,
    lr: Annotated[float, typer.Option("--lr", help="Peak learning rate (AdamW).")] = 1e-3,
    warmup: Annotated[int, typer.Option("--warmup", help="Linear warm-up steps.")] = 100,
    ema_decay: Annotated[float, typer.Option("--ema-decay", help="EMA decay of the saved weights.")] = 0.995,
    checkpoint_every: Annotated[int, typer.Option("--checkpoint-every", min=1)] = 250,
    grad_accumulation: Accumulation = 1,
    seed: Seed = 0,
    resume: Resume = False,
) -> None:
    """Train a model from scratch (e.g. a teacher on digits); the final EMA weights land in --out."""
    import torch

    from slimdiff.jobs import new_model, train_model
    from slimdiff.train import TrainConfig

    torch.manual_seed(seed)
    config = TrainConfig(
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        warmup_steps=min(warmup, steps),
        ema_decay=ema_decay,
        checkpoint_every=checkpoint_every,
        grad_accumulation=grad_accumulation,
        seed=seed,
    )
    result = train_model(new_model(model), data, out, config, source=f"scratch:{model}", resume=resume)
    typer.echo(f"trained {steps} steps in {result.seconds:.0f} s, final loss {result.final_loss:.4f} → {out}")


@app.command()
def finetune(
    model_dir: Annotated[Path, typer.Argument(help="The model to continue training.")],
    out: Annotated[Path, typer.Option("--out", help="Output directory.")],
    data: Data = "digits",
    steps: Steps = 500,
    batch_size: BatchSize = 64,
    lr: Annotated[float, typer.Option("--lr")] = 2e-4,
    ema_decay: Annotated[float, typer.Option("--ema-decay")] = 0.995,
    checkpoint_every: Annotated[int, typer.Option("--checkpoint-every", min=1)] = 250,
    teacher: Annotated[Optional[Path], typer.Option("--teacher", help="Teacher model for distillation.")] = None,
    kd: Annotated[str, typer.Option("--kd", help="Feature-KD: plain (BK-SDM) or normalized (LAPTOP).")] = "normalized",
    kd_output_weight: Annotated[float, typer.Option("--kd-output-weight", help="Weight of output KD.")] = 1.0,
    kd_feature_weight: Annotated[
        float, typer.Option("--kd-feature-weight", help="Weight of feature KD (0 for channel-pruned students).")
    ] = 1.0,
    grad_accumulation: Accumulation = 1,
    seed: Seed = 0,
    resume: Resume = False,
) -> None:
    """Fine-tune a (compressed) model, optionally distilling from a teacher."""
    from slimdiff.distill import KDConfig
    from slimdiff.jobs import finetune_model
    from slimdiff.train import TrainConfig

    config = TrainConfig(
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        ema_decay=ema_decay,
        checkpoint_every=checkpoint_every,
        grad_accumulation=grad_accumulation,
        seed=seed,
    )
    kd_config = KDConfig(kd, kd_output_weight, kd_feature_weight) if teacher is not None else None
    result = finetune_model(model_dir, data, out, config, teacher_dir=teacher, kd=kd_config, resume=resume)
    typer.echo(f"fine-tuned {steps} steps in {result.seconds:.0f} s, final loss {result.final_loss:.4f} → {out}")


Metrics = Annotated[str, typer.Option("--metrics", help="Comma-separated: fid,kid,is,pr,clip,macs,latency.")]
Feature = Annotated[
    str, typer.Option("--feature", help="'digits' (our digits network) or the FID Inception TorchScript file.")
]


def _eval_settings(
    data: str,
    metrics: str,
    n: int,
    steps: int,
    scheduler: str,
    seed: int,
    batch_size: int,
    guidance: float,
    feature: str,
    clip_dir: Optional[Path],
    device: str,
):
    from slimdiff.jobs import EvalSettings

    return EvalSettings(
        data=data,
        metrics=tuple(m.strip() for m in metrics.split(",") if m.strip()),
        n=n,
        steps=steps,
        scheduler=scheduler,
        seed=seed,
        batch_size=batch_size,
        guidance_scale=guidance,
        feature=feature,
        clip_dir=str(clip_dir) if clip_dir else None,
        device=device,
    )


@app.command("eval")
def evaluate(
    model_dir: Annotated[Path, typer.Argument(help="The model to measure.")],
    data: Data = "digits",
    metrics: Metrics = "fid,kid,macs,latency",
    n: Annotated[int, typer.Option("--n", help="Samples for the quality metrics.", min=1)] = 1000,
    steps: Annotated[int, typer.Option("--steps", help="Sampling steps.", min=1)] = 50,
    scheduler: Annotated[str, typer.Option("--scheduler", help="ddpm, ddim or dpm.")] = "ddim",
    seed: Seed = 0,
    batch_size: BatchSize = 64,
    guidance: Annotated[float, typer.Option("--guidance", help="Classifier-free guidance scale.")] = 1.0,
    feature: Feature = "digits",
    clip_dir: Annotated[
        Optional[Path], typer.Option("--clip-dir", help="Local CLIP folder for the clip metric.")
    ] = None,
    device: Annotated[str, typer.Option("--device", help="cpu or cuda.")] = "cpu",
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the results as JSON here.")] = None,
) -> None:
    """Measure quality (FID/KID/IS/precision-recall/CLIP), MACs and latency; print a table, write JSON."""
    from slimdiff.io import atomic_write_json
    from slimdiff.jobs import eval_table, evaluate_model

    settings = _eval_settings(data, metrics, n, steps, scheduler, seed, batch_size, guidance, feature, clip_dir, device)
    report = evaluate_model(model_dir, settings)
    typer.echo(eval_table(report))
    if json_out is not None:
        atomic_write_json(json_out, report)
        typer.echo(f"wrote {json_out}")


@app.command()
def compare(
    model_dirs: Annotated[list[Path], typer.Argument(help="Models to compare (same settings for all).")],
    out: Annotated[Path, typer.Option("--out", help="Report directory (index.html, plots, grids).")],
    data: Data = "digits",
    metrics: Metrics = "fid,kid,macs,latency",
    n: Annotated[int, typer.Option("--n", min=1)] = 500,
    steps: Annotated[int, typer.Option("--steps", min=1)] = 50,
    scheduler: Annotated[str, typer.Option("--scheduler")] = "ddim",
    seed: Seed = 0,
    batch_size: BatchSize = 64,
    guidance: Annotated[float, typer.Option("--guidance")] = 1.0,
    feature: Feature = "digits",
    clip_dir: Annotated[Optional[Path], typer.Option("--clip-dir")] = None,
    device: Annotated[str, typer.Option("--device")] = "cpu",
) -> None:
    """Evaluate several models alike and write one HTML report: table, quality-vs-MACs and -latency plots, grids."""
    from slimdiff.jobs import compare_models

    settings = _eval_settings(data, metrics, n, steps, scheduler, seed, batch_size, guidance, feature, clip_dir, device)
    index = compare_models(model_dirs, out, settings)
    typer.echo(f"wrote {index}")


compress_app = typer.Typer(help="Compress a model with one of the engines.", no_args_is_help=True)
app.add_typer(compress_app, name="compress")


@compress_app.command("channels")
def compress_channels(
    model_dir: Annotated[Path, typer.Argument(help="The model to prune.")],
    out: Annotated[Path, typer.Option("--out", help="Output directory for the pruned model.")],
    importance: Annotated[
        str, typer.Option("--importance", help="diff-pruning, taylor, magnitude or random.")
    ] = "diff-pruning",
    target_macs: Annotated[Optional[float], typer.Option("--target-macs", help="Keep this fraction of MACs.")] = None,
    target_params: Annotated[
        Optional[float], typer.Option("--target-params", help="Keep this fraction of params.")
    ] = None,
    thr: Annotated[float, typer.Option("--thr", help="Diff-Pruning early stop: drop t once L_t < thr·max L.")] = 0.05,
    stride: Annotated[int, typer.Option("--stride", help="Timestep stride of the importance sweep.", min=1)] = 10,
    calibration: Annotated[int, typer.Option("--calibration", help="Calibration images.", min=1)] = 32,
    attention: Annotated[str, typer.Option("--attention", help="head-dim (keep heads) or heads.")] = "head-dim",
    data: Data = "digits",
    seed: Seed = 0,
) -> None:
    """Structural channel pruning (Diff-Pruning or a baseline importance) to a MACs or params budget."""
    from slimdiff.engines.channels import ChannelPruningConfig
    from slimdiff.jobs import compress_channels as run_compress

    config = ChannelPruningConfig(
        importance=importance,
        target_macs=target_macs,
        target_params=target_params,
        thr=thr,
        timestep_stride=stride,
        calibration_size=calibration,
        attention=attention,
        seed=seed,
    )
    result = run_compress(model_dir, data, out, config, log=typer.echo)
    typer.echo(
        f"pruned at ratio {result.ratio:.3f}: {result.achieved['macs']:.3f} of the MACs "
        f"({result.pruned['macs'] / 1e6:.1f} M), {result.achieved['params']:.3f} of the params "
        f"({result.pruned['params']:,}) in {result.seconds:.0f} s → {out}"
    )


@app.command()
def run(recipe: Annotated[Path, typer.Argument(help="A YAML recipe.")]) -> None:
    """Run a multi-step recipe (train → fine-tune → sample …)."""
    from slimdiff.jobs import run_recipe
    from slimdiff.recipe import load_recipe

    for summary in run_recipe(load_recipe(recipe)):
        typer.echo(json.dumps(summary))


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", help="Where the demo writes (the teacher is cached here).")] = Path(
        "runs/demo"
    ),
) -> None:
    """The main job on the bundled digits: train (or reuse) a teacher, sample a grid, print its cost."""
    from slimdiff.demo import run_demo

    run_demo(out, echo=typer.echo)


def main() -> None:
    """Entry point: bad input ends with one line on stderr and exit code 2, never a traceback."""
    try:
        app(standalone_mode=False)
    except SlimdiffError as error:
        typer.echo(f"slimdiff: error: {error}", err=True)
        sys.exit(2)
    except click.ClickException as error:
        error.show()
        sys.exit(error.exit_code)
    except click.exceptions.Abort:
        typer.echo("aborted", err=True)
        sys.exit(130)
