"""`slimdiff` — the command line (click). Thin: parse, call `slimdiff.jobs`, print.

Each job's options are derived from its settings dataclass (`slimdiff.settings`, through `slimdiff.cli_config`),
so a flag is its field spelled with dashes. `slimdiff compress ENGINE` has one subcommand per registered engine,
built the same way from the engine's `Config` dataclass: a new engine gets its command without touching this file.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from slimdiff import __version__
from slimdiff.cli_config import overwrite_option, resume_option, settings_command
from slimdiff.data.config import DataConfig
from slimdiff.errors import SlimdiffError
from slimdiff.settings import CompareSettings, EvalSettings, FinetuneConfig, SampleConfig, TrainConfig

PathArg = click.Path(path_type=Path)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="slimdiff")
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


def _sample(config: SampleConfig, model_dir: Path, out: Path, overwrite: bool) -> None:
    """Sample a seeded, batched grid of images."""
    from slimdiff.jobs.sampling import sample_model

    start = time.perf_counter()
    memory = sample_model(model_dir, out, config, overwrite=overwrite).memory
    click.echo(
        f"wrote {out} ({config.n} samples, {config.scheduler} {config.steps} steps, "
        f"{time.perf_counter() - start:.1f} s, peak memory {memory.bytes / 2**20:.1f} MiB: {memory.counts})"
    )


def _train(config: TrainConfig, out: Path, model: str, resume: bool, overwrite: bool, data: DataConfig) -> None:
    import torch

    from slimdiff.jobs.training import new_model, train_model

    torch.manual_seed(config.seed)
    result = train_model(
        new_model(model),
        data,
        out,
        config,
        source=f"scratch:{model}",
        resume=resume,
        overwrite=overwrite,
        log=click.echo,
    )
    click.echo(
        f"trained {config.steps} steps in {result.seconds:.0f} s, last step's loss {result.describe_loss()} → {out}"
    )


def _finetune(
    config: FinetuneConfig, model_dir: Path, out: Path, resume: bool, overwrite: bool, data: DataConfig
) -> None:
    from slimdiff.jobs import training

    result = training.finetune_model(
        model_dir,
        data,
        out,
        config.training(),
        teacher_dir=config.teacher,
        kd=config.distillation(),
        resume=resume,
        overwrite=overwrite,
        log=click.echo,
    )
    click.echo(
        f"fine-tuned {config.steps} steps in {result.seconds:.0f} s, last step's loss {result.describe_loss()} → {out}"
    )


def _evaluate(settings: EvalSettings, model_dir: Path, json_out: Path | None, overwrite: bool) -> None:
    from slimdiff.io import atomic_write_json, check_output_file
    from slimdiff.jobs.evaluation import eval_table, evaluate_model

    if json_out is not None:
        check_output_file(json_out, overwrite=overwrite)
    report = evaluate_model(model_dir, settings)
    click.echo(eval_table(report))
    if json_out is not None:
        atomic_write_json(json_out, report)
        click.echo(f"wrote {json_out}")


def _compare(settings: CompareSettings, model_dirs: tuple[Path, ...], out: Path, resume: bool, overwrite: bool) -> None:
    from slimdiff.jobs.evaluation import compare_models
    from slimdiff.report import markdown_table

    comparison = compare_models(
        list(model_dirs),
        out,
        settings.evaluation(),
        curve_steps=settings.curve_steps,
        curve_schedulers=settings.curve_schedulers,
        resume=resume,
        overwrite=overwrite,
    )
    click.echo(markdown_table(comparison.rows))
    click.echo(f"wrote {comparison.index}")


def _model_dir() -> click.Argument:
    return click.Argument(["model_dir"], type=PathArg)


def _out(what: str) -> click.Option:
    return click.Option(["--out"], type=PathArg, required=True, help=what)


app.add_command(
    settings_command(
        "sample",
        SampleConfig,
        _sample,
        [_model_dir(), _out("PNG grid to write."), overwrite_option()],
        help="Sample a seeded, batched grid of images.",
    )
)
app.add_command(
    settings_command(
        "train",
        TrainConfig,
        _train,
        [
            _out("Output directory (model, checkpoints, log.jsonl)."),
            click.Option(
                ["--model"],
                default="tiny-unet",
                show_default=True,
                help="tiny-unet, tiny-sd, tiny-dit or a config.json.",
            ),
            resume_option(),
            overwrite_option(),
        ],
        groups={"data": DataConfig},
        help="Train a model from scratch (e.g. a teacher on digits); the final EMA weights land in --out.",
    )
)
app.add_command(
    settings_command(
        "finetune",
        FinetuneConfig,
        _finetune,
        [_model_dir(), _out("Output directory."), resume_option(), overwrite_option()],
        groups={"data": DataConfig},
        help="Fine-tune a (compressed) model, optionally distilling from a teacher.",
    )
)
app.add_command(
    settings_command(
        "eval",
        EvalSettings,
        _evaluate,
        [
            _model_dir(),
            click.Option(["--json", "json_out"], type=PathArg, help="Write the results as JSON here."),
            overwrite_option(),
        ],
        help="Measure quality (FID/KID/IS/precision-recall/CLIP), MACs and latency; print a table, write JSON.",
    )
)
app.add_command(
    settings_command(
        "compare",
        CompareSettings,
        _compare,
        [
            click.Argument(["model_dirs"], type=PathArg, nargs=-1, required=True),
            _out("Report directory (index.html, plots, grids)."),
            resume_option(),
            overwrite_option(),
        ],
        help="Evaluate several models alike and write one HTML report: table with each model's chain, quality vs "
        "sampling MACs and vs sampling time (Pareto front, the teacher's step curve), MACs per block, sample grids.",
    )
)


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


@app.command("export")
@click.argument("model_dir", type=PathArg)
@click.option("--pipeline", "pipeline_dir", type=PathArg, required=True, help="Source pipeline: a folder or a Hub id.")
@click.option("--out", type=PathArg, required=True, help="Pipeline folder to write (replaced if it exists).")
def export_command(model_dir: Path, pipeline_dir: Path, out: Path) -> None:
    """Write a complete diffusers pipeline folder: the source pipeline with MODEL_DIR as its denoiser."""
    from slimdiff.pipeline import export_pipeline

    export_pipeline(model_dir, pipeline_dir, out)
    click.echo(f"wrote {out}; load it with `import slimdiff.pipeline` and `DiffusionPipeline.from_pretrained('{out}')`")


@app.command()
@click.argument("recipe", type=PathArg)
def run(recipe: Path) -> None:
    """Run a multi-step recipe (train → compress → fine-tune → eval …); one JSON line per step, `"reused": true`
    where a rerun found the step finished with the same settings and input."""
    from slimdiff.jobs.recipe_runner import run_recipe
    from slimdiff.recipe_spec import load_recipe

    for summary in run_recipe(load_recipe(recipe)):
        click.echo(json.dumps(summary))


@app.command()
@click.option(
    "--out", type=PathArg, default=Path("runs/demo"), show_default=True, help="Where the demo writes (teacher cached)."
)
@click.option("--latent", is_flag=True, help="On a tiny latent text-to-image pipeline (VAE + CLIP + U-Net) instead.")
def demo(out: Path, latent: bool) -> None:
    """The main job on the bundled digits: train (or reuse) a teacher, sample a grid, print its cost, compress it."""
    from slimdiff.demo.latent import run_latent_demo
    from slimdiff.demo.pixel import run_demo

    (run_latent_demo if latent else run_demo)(out, echo=click.echo)


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
