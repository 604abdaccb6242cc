"""The `slimdiff` command line: info on the reference configs, sample, recipes, and one-line errors."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
from helpers import class_folders, reference_config, run_cli
from PIL import Image

from slimdiff import __version__
from slimdiff.demo.pixel import RECIPE
from slimdiff.errors import SlimdiffError
from slimdiff.export import save
from slimdiff.models import build_tiny
from slimdiff.recipe_spec import load_recipe
from slimdiff.settings import (
    CompareSettings,
    EvalSettings,
    FinetuneConfig,
    KDConfig,
    SampleConfig,
    TrainConfig,
    flag_of,
)
from slimdiff.training.loop import TrainResult

REFERENCE_PARAMS = {
    "ddpm-cifar10-32.unet.json": 35_746_307,
    "sd-1.5.unet.json": 859_520_964,
    "dit-xl-2-256.transformer.json": 749_826_464,
}


@pytest.mark.parametrize("name", sorted(REFERENCE_PARAMS))
def test_info_on_reference_configs(name: str, tmp_path: Path, monkeypatch, capsys) -> None:
    shutil.copy(reference_config(name), tmp_path / "config.json")
    code, out, _ = run_cli(monkeypatch, capsys, "info", tmp_path, "--json")
    assert code == 0
    report = json.loads(out)
    assert report["params"] == REFERENCE_PARAMS[name]
    assert isinstance(report["macs"], int) and report["macs_no_attn"] < report["macs"]
    assert report["blocks"] and report["layers"]
    assert {"name", "kind", "inputs"} <= set(report["blocks"][0])


def test_info_summary_says_what_macs_count(tmp_path: Path, monkeypatch, capsys) -> None:
    save(build_tiny("tiny-sd"), tmp_path / "m")
    code, out, _ = run_cli(monkeypatch, capsys, "info", tmp_path / "m")
    assert code == 0
    assert "incl. attention matmuls" in out and "77 text tokens" in out and "params: 791,233" in out


@pytest.mark.parametrize("name", ["tiny-unet", "tiny-dit"])
def test_sample_writes_grid(name: str, tmp_path: Path, monkeypatch, capsys) -> None:
    save(build_tiny(name), tmp_path / "m", conditioning={"classes": ["0", "1"]} if name == "tiny-dit" else None)
    code, out, err = run_cli(
        monkeypatch,
        capsys,
        "sample",
        tmp_path / "m",
        "--n",
        "4",
        "--steps",
        "2",
        "--scheduler",
        "dpm",
        "--out",
        tmp_path / "grid.png",
    )
    assert code == 0, err
    image = Image.open(tmp_path / "grid.png")
    assert image.size == ((2 * (16 + 2) + 2) * 8,) * 2  # 2×2 grid of 16 px images, 2 px padding, scaled 8×


def test_every_command_has_help(monkeypatch, capsys) -> None:
    for command in ("info", "sample", "train", "finetune", "run", "demo"):
        code, out, _ = run_cli(monkeypatch, capsys, command, "--help")
        assert code == 0 and "Usage" in out


def _one_line_error(code: int, err: str, expected: str) -> None:
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("slimdiff: error:"), err
    assert expected in lines[0]


def test_error_missing_dir(tmp_path: Path, monkeypatch, capsys) -> None:
    _one_line_error(*run_cli(monkeypatch, capsys, "info", tmp_path / "nope")[::2], "model directory not found")


def test_error_unknown_family(tmp_path: Path, monkeypatch, capsys) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "UNet3DConditionModel"}))
    _one_line_error(
        *run_cli(monkeypatch, capsys, "info", tmp_path)[::2], "unsupported model family 'UNet3DConditionModel'"
    )


def test_error_corrupt_safetensors(tmp_path: Path, monkeypatch, capsys) -> None:
    save(build_tiny("tiny-unet"), tmp_path / "m")
    (tmp_path / "m" / "diffusion_pytorch_model.safetensors").write_bytes(b"not safetensors")
    code, _, err = run_cli(monkeypatch, capsys, "sample", tmp_path / "m", "--out", tmp_path / "g.png")
    _one_line_error(code, err, "corrupt or truncated")


def test_error_bad_recipe_field(recipe_cli) -> None:
    code, _, err = recipe_cli("model: tiny-unet\nsteps:\n  - train: {steps: 10, batch_size: many}\n")
    _one_line_error(code, err, "r.yaml.steps[0].train.batch_size: expected an integer, got 'many'")


def test_error_bad_data_folder(tmp_path: Path, monkeypatch, capsys) -> None:
    code, _, err = run_cli(
        monkeypatch, capsys, "train", "--data", tmp_path / "no-images", "--steps", "1", "--out", tmp_path / "o"
    )
    _one_line_error(code, err, "no-images")


def test_error_bad_labels(tmp_path: Path, monkeypatch, capsys) -> None:
    save(build_tiny("tiny-dit"), tmp_path / "m")
    code, _, err = run_cli(
        monkeypatch, capsys, "sample", tmp_path / "m", "--labels", "1,x", "--out", tmp_path / "g.png"
    )
    _one_line_error(code, err, "--labels must be comma-separated integers")


def test_recipe_trains_then_samples(tmp_path: Path, recipe_cli) -> None:
    code, out, err = recipe_cli(
        f"model: tiny-dit\ndata: digits\nout: {tmp_path / 'out'}\nsteps:\n"
        "  - train: {steps: 3, batch_size: 8, checkpoint_every: 2}\n"
        "  - finetune: {steps: 2, batch_size: 8, lr: 1.0e-4}\n"
        "  - sample: {n: 4, steps: 2}\n",
    )
    assert code == 0, err
    summaries = [json.loads(line) for line in out.splitlines()]
    assert [s["step"] for s in summaries] == ["train", "finetune", "sample"]
    assert (tmp_path / "out" / "02-sample" / "samples.png").is_file()
    spec = json.loads((tmp_path / "out" / "01-finetune" / "slimdiff.json").read_text())
    assert [h["job"] for h in spec["provenance"]["history"]] == ["train", "finetune"]
    assert spec["conditioning"]["classes"] == [str(i) for i in range(10)]


def test_recipe_rerun_with_changed_settings_starts_that_step_and_the_next_afresh(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    def write(train_steps: int) -> Path:
        recipe = tmp_path / "r.yaml"
        recipe.write_text(
            f"model: tiny-dit\ndata: digits\nout: {tmp_path / 'out'}\nsteps:\n"
            f"  - train: {{steps: {train_steps}, batch_size: 8, checkpoint_every: 1}}\n"
            "  - finetune: {steps: 2, batch_size: 8, checkpoint_every: 1}\n"
        )
        return recipe

    assert run_cli(monkeypatch, capsys, "run", write(2))[0] == 0
    first = (tmp_path / "out" / "01-finetune" / "diffusion_pytorch_model.safetensors").read_bytes()
    code, _, err = run_cli(monkeypatch, capsys, "run", write(3))  # the train step changed: both steps rerun
    assert code == 0, err
    for step in ("00-train", "01-finetune"):
        assert (tmp_path / "out" / f"{step}.superseded-1" / "step.json").is_file()  # the old run, kept
    history = json.loads((tmp_path / "out" / "01-finetune" / "slimdiff.json").read_text())["provenance"]["history"]
    assert [h["steps"] for h in history] == [3, 2]  # fine-tuned afresh from the new teacher, not resumed
    assert (tmp_path / "out" / "01-finetune" / "diffusion_pytorch_model.safetensors").read_bytes() != first


def test_recipe_rerun_from_another_directory_finds_its_finished_steps(tmp_path: Path, monkeypatch, capsys) -> None:
    class_folders(tmp_path / "data")

    def write(root: str) -> Path:
        recipe = tmp_path / "r.yaml"
        recipe.write_text(
            f"model: tiny-dit\ndata: {root}data\nout: {root}out\nsteps:\n"
            "  - train: {steps: 2, batch_size: 8}\n"
            f"  - finetune: {{steps: 1, batch_size: 8, teacher: {root}out/00-train}}\n"
        )
        return recipe

    assert run_cli(monkeypatch, capsys, "run", write(f"{tmp_path}/"))[0] == 0
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(monkeypatch, capsys, "run", write(""))  # the same folders, named relatively
    assert code == 0, err
    assert not list((tmp_path / "out").glob("*.superseded-*"))  # nothing reran


def test_recipe_compresses_finetunes_with_kd_and_evaluates(tmp_path: Path, recipe_cli) -> None:
    save(build_tiny("tiny-unet"), tmp_path / "teacher")
    code, out, err = recipe_cli(
        f"model: {tmp_path / 'teacher'}\nout: {tmp_path / 'out'}\nsteps:\n"
        "  - compress: {engine: channels, importance: magnitude, target_macs: 0.6}\n"
        "  - finetune: {steps: 2, batch_size: 8, teacher: model, kd_feature_weight: 0}\n"  # model: the recipe's input
        "  - eval: {n: 16, steps: 2, batch_size: 8, metrics: [fid, macs]}\n",
    )
    assert code == 0, err
    summaries = [json.loads(line) for line in out.splitlines()]
    assert [s["step"] for s in summaries] == ["compress", "finetune", "eval"]
    assert summaries[0]["achieved"]["macs"] == pytest.approx(0.6, rel=0.02)
    history = json.loads((tmp_path / "out" / "01-finetune" / "slimdiff.json").read_text())["provenance"]["history"]
    assert [h["job"] for h in history] == ["compress channels", "finetune"]
    assert history[1]["kd"]["feature_weight"] == 0 and history[1]["kd"]["output_weight"] == 10  # the default
    assert history[1]["teacher"] == str(tmp_path / "teacher")
    report = json.loads((tmp_path / "out" / "02-eval" / "eval.json").read_text())
    assert summaries[2]["metrics"]["fid"] == pytest.approx(report["metrics"]["fid"]["value"])  # what was measured
    assert report["metrics"]["fid"]["n"] == 16 and report["metrics"]["fid"]["steps"] == 2


def test_recipe_teacher_model_needs_a_trained_input(tmp_path: Path, recipe_cli) -> None:
    code, _, err = recipe_cli(
        f"model: tiny-unet\nout: {tmp_path / 'out'}\nsteps:\n"
        "  - train: {steps: 1, batch_size: 4}\n"
        "  - finetune: {steps: 1, batch_size: 4, teacher: model}\n",
    )
    _one_line_error(code, err, "finetune.teacher: 'model' names the recipe's input model, but 'tiny-unet' is a config")


def test_recipe_compress_field_is_validated(recipe_cli) -> None:
    code, _, err = recipe_cli(
        "model: x\nsteps:\n  - compress: {engine: channels, importance: l2, target_macs: 0.5}\n",
    )
    _one_line_error(code, err, "r.yaml.steps[0].compress.importance: expected one of")


def test_shipped_recipe_prunes_distils_and_evaluates() -> None:
    recipe = load_recipe(RECIPE)
    assert [type(step).__name__ for step in recipe.steps] == ["CompressStep", "FinetuneStep", "EvalStep"]
    compress, finetune = recipe.steps[0].config, recipe.steps[1].finetune
    assert (compress.importance, compress.unit, compress.target, finetune.steps) == ("diff-pruning", "macs", 0.5, 225)
    assert finetune.teacher and finetune.kd_output_weight > 0  # fine-tuned with output KD


@pytest.mark.parametrize(
    ("command", "settings"),
    [("train", TrainConfig), ("finetune", FinetuneConfig), ("sample", SampleConfig), ("eval", EvalSettings)]
    + [("compare", CompareSettings)],
)
def test_every_setting_is_a_flag_spelled_as_its_field(command: str, settings: type, monkeypatch, capsys) -> None:
    code, out, _ = run_cli(monkeypatch, capsys, command, "--help")
    assert code == 0
    flags = {line.split()[0].rstrip(",") for line in out.splitlines() if line.strip().startswith("--")}
    assert {flag_of(f) for f in dataclasses.fields(settings)} <= flags
    defaults = settings()
    assert f"[default: {defaults.steps}]" in out.replace("\n", " ").split(f"{flag_of(_field(settings, 'steps'))}")[1]


def _field(settings: type, name: str) -> dataclasses.Field:
    return next(f for f in dataclasses.fields(settings) if f.name == name)


def test_a_bad_setting_is_refused_alike_from_the_cli_and_a_recipe(
    tmp_path: Path, monkeypatch, capsys, recipe_cli
) -> None:
    expected = "invalid training setting lr ('--lr'): must be > 0, got -1.0"
    code, _, err = run_cli(monkeypatch, capsys, "finetune", tmp_path, "--out", tmp_path / "o", "--lr", "-1")
    _one_line_error(code, err, expected)
    code, _, err = recipe_cli(f"model: {tmp_path}\nsteps:\n  - finetune: {{lr: -1}}\n")
    _one_line_error(code, err, f"r.yaml.steps[0].finetune: {expected}")
    code, _, err = run_cli(monkeypatch, capsys, "sample", tmp_path, "--out", tmp_path / "g.png", "--n", "0")
    _one_line_error(code, err, "invalid sample setting n ('--n'): must be ≥ 1, got 0")


def test_settings_are_recorded_as_given(tmp_path: Path, monkeypatch, capsys) -> None:
    """A warm-up longer than the run is kept (the run ends before the peak lr); older flag spellings still work."""
    from slimdiff.jobs import training

    seen = []
    monkeypatch.setattr(training, "finetune_model", lambda *a, **kw: seen.append((a[3], kw)) or _done())
    args = ("finetune", tmp_path, "--out", tmp_path / "ft", "--steps", "5", "--warmup", "50", "--teacher", tmp_path)
    code, _, err = run_cli(monkeypatch, capsys, *args)
    assert code == 0, err
    config, kwargs = seen[-1]
    assert (config.steps, config.warmup_steps, config.lr, config.ema_decay) == (5, 50, 5e-4, 0.995)
    assert kwargs["kd"] == KDConfig("normalized", 10.0, 0.0) and kwargs["teacher_dir"] == str(tmp_path)


def _done() -> TrainResult:
    return TrainResult(model=None, steps=0, final_loss=0.0, seconds=0)


def test_version(monkeypatch, capsys) -> None:
    code, out, _ = run_cli(monkeypatch, capsys, "--version")
    assert code == 0 and out.strip() == f"slimdiff, version {__version__}"


def test_recipe_steps_take_the_settings_dataclasses(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "model: tiny-unet\nsteps:\n  - train: {steps: 3, warmup_steps: 10}\n"
        "  - sample: {n: 4, guidance_scale: 2, labels: [1, 2]}\n  - eval: {n: 8, metrics: [macs]}\n"
    )
    train, sample, evaluation = (
        vars(step)[kind] for step, kind in zip(load_recipe(recipe).steps, "train sample eval".split())
    )
    assert train == TrainConfig(steps=3, warmup_steps=10)
    assert sample == SampleConfig(n=4, guidance_scale=2.0, labels=(1, 2))
    assert evaluation == EvalSettings(n=8, metrics=("macs",))
    recipe.write_text("model: tiny-unet\nsteps:\n  - eval: {data: elsewhere}\n")
    with pytest.raises(SlimdiffError, match=r"r.yaml.steps\[0\].eval.data: an eval step measures against the recipe's"):
        load_recipe(recipe)


def test_the_defaults_are_the_shipped_recipes_tuned_settings() -> None:
    """The settings every measurement used (docs/training.md, "Defaults") are what a user gets without flags."""
    from slimdiff.engines.ofa import OFAConfig
    from slimdiff.recipe_spec import EvalStep, FinetuneStep

    ofa, default_ofa = load_recipe(RECIPE.parent / "digits-ofa.yaml").steps[0].config, OFAConfig()
    assert (ofa.lr, ofa.warmup, ofa.teacher_kd) == (default_ofa.lr, default_ofa.warmup, default_ofa.teacher_kd)
    steps = load_recipe(RECIPE).steps
    finetune = next(step.finetune for step in steps if isinstance(step, FinetuneStep))
    tuned = ("lr", "warmup_steps", "ema_decay", "kd", "kd_output_weight", "kd_feature_weight")
    assert {k: getattr(finetune, k) for k in tuned} == {k: getattr(FinetuneConfig(), k) for k in tuned}
    assert next(step.eval for step in steps if isinstance(step, EvalStep)).n == EvalSettings().n
