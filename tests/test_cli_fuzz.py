"""Every command, through the installed entry point in a subprocess, over compressed models of every family.

Each call must either succeed or end with exactly one stderr line `slimdiff: error: …` (exit code ≠ 0) — never a
traceback. The compressed variants are built once for the module: channel-pruned (uniform ratio, head-dim and
heads attention modes, odd head counts), layer-removed, and a residual-pruned DiT of 3 heads pruned to 50 % MACs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from slimdiff.data import class_prompts, load_data
from slimdiff.engines import Calibration
from slimdiff.engines.channel_surgery import prune_copy
from slimdiff.engines.channels import ChannelPruningConfig, compress
from slimdiff.export import save
from slimdiff.models import adapter_for, build_tiny
from slimdiff.text import make_tiny_clip_text
from slimdiff.training.diffusion import DEFAULT_SCHEDULE

pytestmark = pytest.mark.subprocess

ROOT = Path(__file__).resolve().parents[1]
CLASSES = [str(i) for i in range(10)]


def _save_variant(model: torch.nn.Module, out: Path) -> Path:
    """Save with the conditioning a sampler needs (classes; prompts and a text encoder for text models)."""
    adapter = adapter_for(model)
    conditioning = {} if adapter.cond_kind == "none" else {"classes": CLASSES}
    if adapter.cond_kind == "text":
        make_tiny_clip_text(out, hidden_size=adapter.cross_attention_dim).save(out)
        conditioning["prompts"] = class_prompts(CLASSES)
    return save(model.eval(), out, conditioning=conditioning, scheduler_config=dict(DEFAULT_SCHEDULE))


def _layer_removed(name: str) -> torch.nn.Module:
    model = build_tiny(name).eval()
    adapter = adapter_for(model)
    adapter.remove_layer([layer.name for layer in adapter.layers() if layer.removable][-1])
    return model


@pytest.fixture(scope="module")
def variants(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("variants")
    odd_dit = build_tiny("tiny-dit", num_attention_heads=3).eval()  # 3 heads of 16: width 48
    residual = compress(
        adapter_for(odd_dit),
        ChannelPruningConfig(importance="magnitude", target_macs=0.5),
        Calibration(load_data("digits", size=16), lambda labels: labels, DEFAULT_SCHEDULE),
    ).model
    models = {
        "unet-channels": prune_copy(build_tiny("tiny-unet").eval(), 0.4, "magnitude").model,
        "unet-heads": prune_copy(build_tiny("tiny-unet").eval(), 0.5, "magnitude", attention="heads").model,
        "sd-channels": prune_copy(build_tiny("tiny-sd").eval(), 0.3, "magnitude").model,
        "sd-heads": prune_copy(build_tiny("tiny-sd").eval(), 0.5, "magnitude", attention="heads").model,
        "dit-residual-odd-heads": residual,
        "dit-heads": prune_copy(odd_dit, 0.5, "magnitude", attention="heads").model,
        "unet-layer-removed": _layer_removed("tiny-unet"),
        "sd-layer-removed": _layer_removed("tiny-sd"),
        "dit-layer-removed": _layer_removed("tiny-dit"),
        "unet-teacher": build_tiny("tiny-unet"),
        "dit-odd-heads-teacher": odd_dit,
    }
    assert residual.pos_embed.proj.out_channels < 48
    return {name: _save_variant(model, root / name) for name, model in models.items()}


def slimdiff(*args: object) -> subprocess.CompletedProcess:
    """Run `python -m slimdiff ARGS` (the console script's `main`) in a fresh process from the repository root."""
    return subprocess.run(
        [sys.executable, "-m", "slimdiff", *map(str, args)],
        cwd=ROOT,
        env=os.environ | {"OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )


def slimdiff_many(*calls: tuple[object, ...]) -> list[subprocess.CompletedProcess]:
    """Several independent calls at once (each is mostly the ~5 s CPU import of torch and diffusers)."""
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        return list(pool.map(lambda args: slimdiff(*args), calls))


def succeeds(result: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    assert result.returncode == 0, result.stderr
    return result.stdout


def fails_in_one_line(result: subprocess.CompletedProcess, expected: str) -> None:
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode != 0 and len(lines) == 1, result.stderr
    assert lines[0].startswith("slimdiff: error:") and expected in lines[0], lines[0]


def test_main_module_is_the_console_script() -> None:
    source = (ROOT / "slimdiff" / "__main__.py").read_text()
    assert "from slimdiff.cli import main" in source and "main()" in source


def test_info_on_every_variant(variants: dict[str, Path]) -> None:
    names = [name for name in variants if not name.endswith("teacher")]
    for name, result in zip(names, slimdiff_many(*(("info", variants[name], "--json") for name in names)), strict=True):
        report = json.loads(succeeds(result))
        assert report["params"] > 0 and report["macs"] > 0, name


def test_compare_samples_and_evaluates_every_variant(variants: dict[str, Path], tmp_path: Path) -> None:
    dirs = [path for name, path in variants.items() if not name.endswith("teacher")]
    out = succeeds(
        slimdiff("compare", *dirs, "--out", tmp_path / "report", "--metrics", "macs", "--n", "2", "--steps", "2")
    )
    assert (tmp_path / "report" / "index.html").is_file(), out
    assert len(list((tmp_path / "report").glob("samples-*.png"))) == len(dirs)


def test_sample_with_guidance_labels_and_prompts(variants: dict[str, Path], tmp_path: Path) -> None:
    succeeds(
        slimdiff(
            "sample", variants["dit-residual-odd-heads"], "--n", "3", "--steps", "2", "--guidance", "2",
            "--labels", "1,7", "--scheduler", "dpm", "--out", tmp_path / "dit.png",
        )
    )  # fmt: skip
    (tmp_path / "prompts.txt").write_text("a photo of the digit 3\na photo of the digit 8\n")
    succeeds(
        slimdiff(
            "sample", variants["sd-layer-removed"], "--n", "2", "--steps", "2", "--guidance", "3",
            "--prompts", tmp_path / "prompts.txt", "--scheduler", "ddpm", "--out", tmp_path / "sd.png",
        )
    )  # fmt: skip
    assert (tmp_path / "dit.png").is_file() and (tmp_path / "sd.png").is_file()


def test_eval_measures_fid_on_a_pruned_model(variants: dict[str, Path], tmp_path: Path) -> None:
    succeeds(
        slimdiff(
            "eval", variants["unet-heads"], "--metrics", "fid,macs", "--n", "8", "--steps", "2",
            "--json", tmp_path / "eval.json",
        )
    )  # fmt: skip
    assert (tmp_path / "eval.json").is_file()


def test_compress_channels_on_odd_heads_and_finetune_with_a_teacher(variants: dict[str, Path], tmp_path: Path) -> None:
    teacher = variants["dit-odd-heads-teacher"]
    out = succeeds(
        slimdiff(
            "compress", "channels", teacher, "--importance", "taylor", "--target-macs", "0.5", "--attention",
            "heads", "--calibration", "4", "--out", tmp_path / "pruned",
        )
    )  # fmt: skip
    assert "of the MACs" in out
    succeeds(
        slimdiff(
            "finetune", tmp_path / "pruned", "--teacher", teacher, "--steps", "2", "--batch-size", "4",
            "--out", tmp_path / "tuned",
        )
    )  # fmt: skip
    assert (tmp_path / "tuned" / "slimdiff.json").is_file()


def test_recipe_compresses_and_evaluates_a_text_model(variants: dict[str, Path], tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"model: {variants['sd-layer-removed']}\nout: {tmp_path / 'out'}\nsteps:\n"
        "  - compress: {engine: channels, importance: random, target_params: 0.7}\n"
        "  - sample: {n: 2, steps: 2}\n"
    )
    out = succeeds(slimdiff("run", recipe))
    assert '"step": "compress"' in out and '"step": "sample"' in out


# -- bad input: one line, never a traceback ------------------------------------------------------------------------
def test_unknown_commands_engines_and_missing_arguments(variants: dict[str, Path], tmp_path: Path) -> None:
    model = variants["unet-channels"]
    cases = {
        ("foo",): "No such command 'foo'",
        ("compress", "nope", model): "unknown engine 'nope'; valid: channels, layers, ofa, skip",
        ("compress", "channels"): "Missing argument 'MODEL_DIR'",
        ("compress", "channels", model): "Missing option '--out'",
        ("info",): "Missing argument 'MODEL_DIR'",
        ("sample", model): "Missing option '--out'",
        ("finetune", model): "Missing option '--out'",
        ("compare", "--out", tmp_path / "r"): "Missing argument 'MODEL_DIRS...'",
        ("run",): "Missing argument 'RECIPE'",
        ("info", model, "--bogus"): "No such option '--bogus'",
        ("sample", model, "--n", "0", "--out", tmp_path / "g.png"): "'--n'",
        ("compress", "channels", model, "--out", tmp_path / "o", "--target-macs", "half"): "half",
    }
    for result, expected in zip(slimdiff_many(*cases), cases.values(), strict=True):
        fails_in_one_line(result, expected)


def test_bad_values_are_named(variants: dict[str, Path], tmp_path: Path) -> None:
    model = variants["dit-residual-odd-heads"]
    sample = ("sample", model, "--n", "2", "--steps", "2", "--out", tmp_path / "g.png")
    absent = "cuda" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"  # one GPU too many
    grid, other = tmp_path / "g-old.png", variants["unet-channels"]
    grid.write_bytes(b"a picture")
    cases = {
        ("info", tmp_path / "nope"): "model directory not found",
        ("compress", "channels", model, "--importance", "l2", "--target-macs", "0.5", "--out", tmp_path / "o"): (
            "invalid setting importance ('--importance'): must be one of diff-pruning"
        ),
        ("compress", "channels", model, "--target-macs", "1.5", "--out", tmp_path / "o"): "budget 1.5",
        (*sample, "--scheduler", "heun"): "heun",
        (*sample, "--labels", "5000"): "labels [5000] out of range",
        ("eval", model, "--metrics", "fid,bogus", "--n", "2"): "bogus",
        ("finetune", model, "--steps", "1", "--out", model): "--out must differ",
        ("run", tmp_path / "missing.yaml"): "missing.yaml",
        ("eval", model, "--metrics", "macs", "--device", "gpu"): "unknown device 'gpu'; this machine has: cpu",
        ("eval", model, "--metrics", "macs", "--device", absent): f"device '{absent}' is not available here; this "
        "machine has: cpu",
        ("compare", model, "--out", tmp_path / "r", "--device", "gpu"): "unknown device 'gpu'; this machine has: cpu",
        # an output that holds something: refused unless resumed or overwritten (tests/test_outputs.py runs both)
        (*sample[:-1], grid): "g-old.png already holds a file; pass --overwrite to replace it",
        ("eval", model, "--metrics", "macs", "--json", grid): "g-old.png already holds a file; pass --overwrite",
        ("compress", "channels", model, "--target-macs", "0.5", "--out", other): (
            f"{other} already holds files; pass --resume to continue the run there or --overwrite to replace it"
        ),
        ("train", "--steps", "1", "--out", other): f"{other} already holds files; pass --resume",
        ("finetune", model, "--steps", "1", "--out", other, "--resume", "--overwrite"): "choose one",
        ("compare", model, "--metrics", "macs", "--out", other): f"{other} already holds files; pass --resume",
    }
    for result, expected in zip(slimdiff_many(*cases), cases.values(), strict=True):
        fails_in_one_line(result, expected)


# -- broken weights and skip tables (issue 27) ---------------------------------------------------------------------
def test_a_nan_in_the_weights_is_named_by_every_command(tmp_path: Path) -> None:
    model = build_tiny("tiny-unet").eval()
    with torch.no_grad():
        model.conv_in.weight[0, 0, 0, 0] = float("nan")
    broken = _save_variant(model, tmp_path / "nan")
    cases = {
        ("info", broken): "info",
        ("sample", broken, "--n", "2", "--steps", "2", "--out", tmp_path / "g.png"): "sample",
        ("compress", "channels", broken, "--target-macs", "0.5", "--out", tmp_path / "p"): "compress",
        ("finetune", broken, "--steps", "1", "--out", tmp_path / "f"): "finetune",
        ("eval", broken, "--metrics", "macs", "--n", "2", "--steps", "2"): "eval",
    }
    for result, command in zip(slimdiff_many(*cases), cases.values(), strict=True):
        fails_in_one_line(result, "NaN or Inf in 1 of ")
        assert "the first 'conv_in.weight' (1 NaN, 0 Inf" in result.stderr, command
    assert not (tmp_path / "g.png").exists() and not (tmp_path / "p").exists() and not (tmp_path / "f").exists()


def test_a_skip_table_is_kept_true_from_the_command_line(variants: dict[str, Path], tmp_path: Path) -> None:
    teacher, table = variants["unet-teacher"], tmp_path / "table"
    succeeds(
        slimdiff(
            "compress", "skip", teacher, "--method", "step-reuse", "--target-macs", "0.6", "--steps", "4",
            "--out", table,
        )
    )  # fmt: skip
    weights = "diffusion_pytorch_model.safetensors"
    assert (table / weights).samefile(teacher / weights)  # the table's model shares the teacher's weights file
    sampler = json.loads(succeeds(slimdiff("info", table, "--json")))["sampler"]
    assert sampler["scheduler"] == "DDIMScheduler" and sampler["settings"]["timestep_spacing"] == "leading"

    def sample_to(name: str) -> tuple[object, ...]:
        return ("sample", table, "--n", "2", "--out", tmp_path / name)

    sample = sample_to("g.png")
    refused = {
        (*sample, "--steps", "4", "--scheduler", "ddpm"): "; got DDPMScheduler — sample with that sampler",
        (*sample, "--steps", "5"): "got 5 steps",
        ("eval", table, "--metrics", "macs", "--steps", "4", "--scheduler", "ddpm"): "got DDPMScheduler",
        ("compress", "channels", table, "--target-macs", "0.5", "--out", tmp_path / "p"): (
            f"carries skip_table, made for that model as it is; `compress channels` changes the model, so it would "
            f"no longer hold: compress the model it was made from ({teacher})"
        ),
    }
    results = slimdiff_many(
        *refused,
        (*sample_to("kept.png"), "--steps", "4"),  # the samples run side by side: each writes its own file
        (*sample_to("bare.png"), "--steps", "5", "--scheduler", "ddpm", "--no-artifacts"),
        ("eval", table, "--metrics", "macs", "--steps", "3", "--scheduler", "dpm", "--no-artifacts"),
    )
    for result, expected in zip(results[: len(refused)], refused.values(), strict=True):
        fails_in_one_line(result, expected)  # one line: refused before any progress bar
        assert "made for DDIMScheduler with 4 steps" in result.stderr or "carries" in result.stderr
    assert "--no-artifacts on the command line" in results[0].stderr
    for result in results[len(refused) :]:
        succeeds(result)
    assert (tmp_path / "kept.png").is_file() and (tmp_path / "bare.png").is_file() and not (tmp_path / "p").exists()
