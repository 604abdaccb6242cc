"""`slimdiff` — the command line (click). Thin: parse, call `slimdiff.jobs`, print.

`slimdiff compress ENGINE` has one subcommand per registered engine, built from the engine's `Config` dataclass
(`slimdiff.cli_config`): a new engine gets its command without touching this file.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import click

from slimdiff.cli_config import OVERWRITE_HELP, RESUME_HELP, CommaSeparated
from slimdiff.errors import SlimdiffError

PathArg = click.Path(path_type=Path)
steps_option = click.option("--steps", type=click.IntRange(min=1), help="Number of optimizer steps.")
seed_option = click.option("--seed", type=int, default=0, show_default=True, help="Random seed.")
batch_option = click.option(
    "--batch-size", type=click.IntRange(min=1), default=64, show_default=True, help="Global batch size."
)
resume_option = click.option("--resume", is_flag=True, help=RESUME_HELP)
overwrite_option = click.option("--overwrite", is_flag=True, help=OVERWRITE_HELP)
data_option = click.option(
    "--data", default="digits", show_default=True, help="'digits' (bundled) or an image folder (class subfolders)."
)
accumulation_option = click.option(
    "--grad-accumulation", type=click.IntRange(min=1), default=1, show_default=True, help="Micro-batches per step."
)
snr_gamma_option = click.option(
    "--snr-gamma",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Min-SNR-γ weighting of the denoising loss (e.g. 5); default: plain MSE over uniform timesteps.",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def app() -> None:
    """Make trained diffusion models (diffusers U-Nets and DiTs) smaller and faster."""


@app.command()
@click.argument("model_dir", type=PathArg)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a summary.")
def info(model_dir: Path, as_json: bool) -> None:
    """Family, params, MACs, blocks and layers of a model — without loading its weights."""
    from slimdiff.jobs.info import model_info

    report = model_info(model_dir)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    click.echo(
        f"{report['class']} ({report['family']}), {report['sample_size']}² × {report['in_channels']} ch, "
        f"conditioning: {report['conditioning']}"
    )
    click.echo(f"params: {report['params']:,}")
    click.echo(
        f"MACs:   {report['macs'] / 1e9:.3f} G incl. attention matmuls, "
        f"{report['macs_no_attn'] / 1e9:.3f} G without ({report['macs_counts']})"
    )
    click.echo(f"blocks ({len(report['blocks'])}): " + ", ".join(b["name"] for b in report["blocks"]))
    removable = sum(layer["removable"] for layer in report["layers"])
    click.echo(f"layers: {len(report['layers'])} residual layers, {removable} removable")
    if len(report["chain"]) > 1:
        click.echo("made by: " + " → ".join(report["chain"]))


@app.command()
@click.argument("model_dir", type=PathArg)
@click.option("--out", type=PathArg, required=True, help="PNG grid to write.")
@click.option("--n", type=click.IntRange(min=1), default=64, show_default=True, help="Number of samples.")
@click.option("--steps", type=click.IntRange(min=1), default=50, show_default=True, help="Sampling steps.")
@click.option("--scheduler", default="ddim", show_default=True, help="ddpm, ddim or dpm.")
@seed_option
@batch_option
@click.option("--guidance", type=float, default=1.0, show_default=True, help="Classifier-free guidance (1 = off).")
@click.option("--labels", help="Class labels, comma-separated.")
@click.option("--prompts", type=PathArg, help="Prompts file, one per line.")
@overwrite_option
def sample(
    model_dir: Path,
    out: Path,
    n: int,
    steps: int,
    scheduler: str,
    seed: int,
    batch_size: int,
    guidance: float,
    labels: str | None,
    prompts: Path | None,
    overwrite: bool,
) -> None:
    """Sample a seeded, batched grid of images."""
    from slimdiff.data import load_prompts
    from slimdiff.jobs.sampling import sample_model

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
        overwrite=overwrite,
    )
    click.echo(f"wrote {out} ({n} samples, {scheduler} {steps} steps, {time.perf_counter() - start:.1f} s)")


def _parse_labels(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise SlimdiffError(f"--labels must be comma-separated integers, got '{text}'") from None


@app.command()
@click.option("--out", type=PathArg, required=True, help="Output directory (model, checkpoints, log.jsonl).")
@click.option("--model", default="tiny-unet", show_default=True, help="tiny-unet, tiny-sd, tiny-dit or a config.json.")
@data_option
@click.option("--steps", type=click.IntRange(min=1), default=1500, show_default=True, help="Optimizer steps.")
@batch_option
@click.option("--lr", type=float, default=1e-3, show_default=True, help="Peak learning rate (AdamW).")
@click.option("--warmup", type=click.IntRange(min=0), default=100, show_default=True, help="Linear warm-up steps.")
@click.option("--ema-decay", type=float, default=0.995, show_default=True, help="EMA decay of the saved weights.")
@click.option("--checkpoint-every", type=click.IntRange(min=1), default=250, show_default=True)
@accumulation_option
@snr_gamma_option
@seed_option
@resume_option
@overwrite_option
def train(
    out: Path,
    model: str,
    data: str,
    steps: int,
    batch_size: int,
    lr: float,
    warmup: int,
    ema_decay: float,
    checkpoint_every: int,
    grad_accumulation: int,
    snr_gamma: float | None,
    seed: int,
    resume: bool,
    overwrite: bool,
) -> None:
    """Train a model from scratch (e.g. a teacher on digits); the final EMA weights land in --out."""
    import torch

    from slimdiff.jobs.training import new_model, train_model
    from slimdiff.train import TrainConfig

    torch.manual_seed(seed)
    config = TrainConfig(
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        warmup_steps=warmup,
        ema_decay=ema_decay,
        checkpoint_every=checkpoint_every,
        grad_accumulation=grad_accumulation,
        snr_gamma=snr_gamma,
        seed=seed,
    )
    result = train_model(
        new_model(model), data, out, config, source=f"scratch:{model}", resume=resume, overwrite=overwrite
    )
    click.echo(f"trained {steps} steps in {result.seconds:.0f} s, final loss {result.final_loss:.4f} → {out}")


@app.command()
@click.argument("model_dir", type=PathArg)
@click.option("--out", type=PathArg, required=True, help="Output directory.")
@data_option
@click.option("--steps", type=click.IntRange(min=1), default=500, show_default=True, help="Optimizer steps.")
@batch_option
@click.option("--lr", type=float, default=5e-4, show_default=True)
@click.option("--warmup", type=click.IntRange(min=0), default=20, show_default=True, help="Linear warm-up steps.")
@click.option("--ema-decay", type=float, default=0.995, show_default=True)
@click.option("--checkpoint-every", type=click.IntRange(min=1), default=250, show_default=True)
@click.option("--teacher", type=PathArg, help="Teacher model for distillation.")
@click.option(
    "--kd", default="normalized", show_default=True, help="Feature KD: plain (BK-SDM) or normalized (LAPTOP)."
)
@click.option("--kd-output-weight", type=float, default=1.0, show_default=True, help="Weight of output KD.")
@click.option(
    "--kd-feature-weight",
    type=float,
    default=1.0,
    show_default=True,
    help="Weight of feature KD (a channel-pruned student is compared at the channels it kept).",
)
@accumulation_option
@snr_gamma_option
@seed_option
@resume_option
@overwrite_option
def finetune(
    model_dir: Path,
    out: Path,
    data: str,
    steps: int,
    batch_size: int,
    lr: float,
    warmup: int,
    ema_decay: float,
    checkpoint_every: int,
    teacher: Path | None,
    kd: str,
    kd_output_weight: float,
    kd_feature_weight: float,
    grad_accumulation: int,
    snr_gamma: float | None,
    seed: int,
    resume: bool,
    overwrite: bool,
) -> None:
    """Fine-tune a (compressed) model, optionally distilling from a teacher."""
    from slimdiff.distill import KDConfig
    from slimdiff.jobs.training import finetune_model
    from slimdiff.train import TrainConfig

    config = TrainConfig(
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        warmup_steps=warmup,
        ema_decay=ema_decay,
        checkpoint_every=checkpoint_every,
        grad_accumulation=grad_accumulation,
        snr_gamma=snr_gamma,
        seed=seed,
    )
    kd_config = KDConfig(kd, kd_output_weight, kd_feature_weight) if teacher is not None else None
    result = finetune_model(
        model_dir, data, out, config, teacher_dir=teacher, kd=kd_config, resume=resume, overwrite=overwrite
    )
    click.echo(f"fine-tuned {steps} steps in {result.seconds:.0f} s, final loss {result.final_loss:.4f} → {out}")


def eval_options(default_n: int) -> Any:
    """The options `eval` and `compare` share (one evaluation's settings)."""

    def decorate(command: Any) -> Any:
        options = [
            data_option,
            click.option(
                "--metrics",
                default="fid,kid,macs,latency",
                show_default=True,
                help="Comma-separated: fid,kid,is,pr,clip,macs,latency.",
            ),
            click.option("--n", type=click.IntRange(min=1), default=default_n, show_default=True, help="Samples."),
            click.option("--steps", type=click.IntRange(min=1), default=50, show_default=True, help="Sampling steps."),
            click.option("--scheduler", default="ddim", show_default=True, help="ddpm, ddim or dpm."),
            seed_option,
            batch_option,
            click.option("--guidance", type=float, default=1.0, show_default=True, help="Classifier-free guidance."),
            click.option(
                "--feature",
                default="digits",
                show_default=True,
                help="'digits' or 'digits-ms' (our two digits networks) or the FID Inception TorchScript file.",
            ),
            click.option("--clip-dir", type=PathArg, help="Local CLIP folder for the clip metric."),
            click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:N or mps (if present)."),
        ]
        for option in reversed(options):
            command = option(command)
        return command

    return decorate


def _eval_settings(options: dict[str, Any]) -> Any:
    from slimdiff.jobs.evaluation import EvalSettings

    return EvalSettings(
        data=options["data"],
        metrics=tuple(m.strip() for m in options["metrics"].split(",") if m.strip()),
        n=options["n"],
        steps=options["steps"],
        scheduler=options["scheduler"],
        seed=options["seed"],
        batch_size=options["batch_size"],
        guidance_scale=options["guidance"],
        feature=options["feature"],
        clip_dir=str(options["clip_dir"]) if options["clip_dir"] else None,
        device=options["device"],
    )


@app.command("eval")
@click.argument("model_dir", type=PathArg)
@eval_options(default_n=1000)
@click.option("--json", "json_out", type=PathArg, help="Write the results as JSON here.")
@click.option("--overwrite", is_flag=True, help="Replace the --json file if it exists.")
def evaluate(model_dir: Path, json_out: Path | None, overwrite: bool, **options: Any) -> None:
    """Measure quality (FID/KID/IS/precision-recall/CLIP), MACs and latency; print a table, write JSON."""
    from slimdiff.io import atomic_write_json, check_output_file
    from slimdiff.jobs.evaluation import eval_table, evaluate_model

    if json_out is not None:
        check_output_file(json_out, overwrite=overwrite)
    report = evaluate_model(model_dir, _eval_settings(options))
    click.echo(eval_table(report))
    if json_out is not None:
        atomic_write_json(json_out, report)
        click.echo(f"wrote {json_out}")


@app.command()
@click.argument("model_dirs", type=PathArg, nargs=-1, required=True)
@click.option("--out", type=PathArg, required=True, help="Report directory (index.html, plots, grids).")
@eval_options(default_n=500)
@click.option(
    "--curve-steps",
    type=CommaSeparated(click.INT),
    default="",
    help="Also evaluate the first model (the teacher) at these sampler step counts, e.g. 4,6,8,13,25,50,100: "
    "the curve every other model is read against.",
)
@click.option(
    "--curve-schedulers",
    type=CommaSeparated(click.STRING),
    default="ddim,dpm",
    show_default=True,
    help="Samplers of the teacher's curve.",
)
@click.option("--resume", is_flag=True, help="Reuse the evaluations already in --out (same models and settings).")
@overwrite_option
def compare(
    model_dirs: tuple[Path, ...],
    out: Path,
    curve_steps: tuple[int, ...],
    curve_schedulers: tuple[str, ...],
    resume: bool,
    overwrite: bool,
    **options: Any,
) -> None:
    """Evaluate several models alike and write one HTML report: table with each model's chain, quality vs sampling
    MACs and vs sampling time (Pareto front, the teacher's step curve), MACs per block, sample grids."""
    from slimdiff.jobs.evaluation import compare_models

    index = compare_models(
        list(model_dirs),
        out,
        _eval_settings(options),
        curve_steps=curve_steps,
        curve_schedulers=curve_schedulers,
        resume=resume,
        overwrite=overwrite,
    )
    click.echo(f"wrote {index}")


class EngineGroup(click.Group):
    """`slimdiff compress`: one subcommand per registered engine, built on first use from its config."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        from slimdiff.engines import engine_names

        return engine_names()

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        from slimdiff.cli_config import engine_command
        from slimdiff.engines import engine_names, get_engine

        if name not in engine_names():
            return None
        return engine_command(get_engine(name))

    def resolve_command(
        self, ctx: click.Context, args: list[str]
    ) -> tuple[str | None, click.Command | None, list[str]]:
        from slimdiff.engines import engine_names

        if args and not args[0].startswith("-") and args[0] not in engine_names():
            raise click.UsageError(f"unknown engine '{args[0]}'; valid: {', '.join(engine_names())}", ctx)
        return super().resolve_command(ctx, args)


@app.group(cls=EngineGroup)
def compress() -> None:
    """Compress a model with one of the engines (`slimdiff compress ENGINE --help` for its settings)."""


@app.command()
@click.argument("recipe", type=PathArg)
def run(recipe: Path) -> None:
    """Run a multi-step recipe (train → compress → fine-tune → eval …)."""
    from slimdiff.jobs.recipes import run_recipe
    from slimdiff.recipe import load_recipe

    for summary in run_recipe(load_recipe(recipe)):
        click.echo(json.dumps(summary))


@app.command()
@click.option(
    "--out", type=PathArg, default=Path("runs/demo"), show_default=True, help="Where the demo writes (teacher cached)."
)
def demo(out: Path) -> None:
    """The main job on the bundled digits: train (or reuse) a teacher, sample a grid, print its cost, compress it."""
    from slimdiff.demo import run_demo

    run_demo(out, echo=click.echo)


def main() -> None:
    """Entry point: bad input ends with one line on stderr and exit code 2, never a traceback."""
    try:
        app.main(standalone_mode=False)
    except SlimdiffError as error:
        click.echo(f"slimdiff: error: {error}", err=True)
        sys.exit(2)
    except click.exceptions.NoArgsIsHelpError as error:  # a bare group: its help is the answer
        error.show()
        sys.exit(0)
    except click.ClickException as error:
        context = getattr(error, "ctx", None)
        hint = f" (see '{context.command_path} --help')" if isinstance(error, click.UsageError) and context else ""
        click.echo(f"slimdiff: error: {error.format_message()}{hint}", err=True)
        sys.exit(error.exit_code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
