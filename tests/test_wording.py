"""Printed output says what it counts: the channel search's log, the sampling progress bar, the loss lines of
`train` and `finetune`, a recipe rerun's reused steps."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from helpers import run_cli

from slimdiff.data import load_data
from slimdiff.engines import Calibration
from slimdiff.engines.channels import ChannelPruningConfig, compress
from slimdiff.export import save
from slimdiff.models import adapter_for, build_tiny
from slimdiff.training.diffusion import DEFAULT_SCHEDULE, sample
from slimdiff.training.loop import TrainResult


def test_channel_search_log_names_the_ratio_tried_and_the_fraction_kept() -> None:
    adapter = adapter_for(build_tiny("tiny-unet"))
    data = Calibration(load_data("digits", size=16), lambda labels: labels, DEFAULT_SCHEDULE)
    config = ChannelPruningConfig(calibration_size=4, timestep_stride=100, importance="magnitude", target_macs=0.5)
    lines: list[str] = []
    compress(adapter, config, data, log=lines.append)
    trials = [line for line in lines if "pruning ratio" in line]
    assert trials, lines
    pattern = r"uniform pruning ratio (0\.\d{3}) tried → (0\.\d{3}) of the original MACs kept"
    for line in trials:
        tried, kept = map(float, re.fullmatch(pattern, line).groups())
        assert 0 < tried <= 0.7 and 0 < kept < 1


def test_sampling_progress_counts_image_steps(capsys: pytest.CaptureFixture) -> None:
    sample(adapter_for(build_tiny("tiny-unet")), n=4, steps=2, batch_size=2, progress=True)
    err = capsys.readouterr().err
    assert "sampling 4 images × 2 ddim steps" in err and "8/8" in err and "image-step" in err


def test_loss_line_names_the_terms_it_sums() -> None:
    history = [{"step": 5, "loss": 0.05, "task": 0.03, "out_kd": 0.015, "feat_kd": 0.005}]
    result = TrainResult(model=None, steps=5, final_loss=0.05, seconds=1.0, history=history)
    assert result.describe_loss() == "0.0500 (task 0.0300 + output KD 0.0150 + feature KD 0.0050)"
    plain = TrainResult(model=None, steps=5, final_loss=0.03, seconds=1.0, history=[{"task": 0.03}])
    assert plain.describe_loss() == "0.0300 (task 0.0300)"


def test_train_and_finetune_print_the_loss_terms(tmp_path: Path, monkeypatch, capsys) -> None:
    teacher = tmp_path / "teacher"
    code, out, err = run_cli(
        monkeypatch, capsys, "train", "--data", "digits", "--steps", "2", "--batch-size", "8", "--out", teacher
    )
    assert code == 0, err
    assert re.search(r"trained 2 steps in \d+ s, last step's loss \d\.\d{4} \(task \d\.\d{4}\) → ", out), out
    code, out, err = run_cli(
        monkeypatch,
        capsys,
        *("finetune", teacher, "--data", "digits", "--steps", "2", "--batch-size", "8"),
        *("--teacher", teacher, "--kd-feature-weight", "0", "--out", tmp_path / "student"),
    )
    assert code == 0, err
    line = r"fine-tuned 2 steps in \d+ s, last step's loss \d\.\d{4} \(task \d\.\d{4} \+ output KD \d\.\d{4}\) → "
    assert re.search(line, out), out


def test_compare_fills_the_peak_memory_column_the_report_describes(tmp_path: Path, monkeypatch, capsys) -> None:
    model = tmp_path / "model"
    save(build_tiny("tiny-unet"), model)
    out = tmp_path / "report"
    args = ("--n", "2", "--steps", "1", "--batch-size", "2", "--metrics", "macs,memory", "--device", "cpu")
    code, printed, err = run_cli(monkeypatch, capsys, "compare", model, "--out", out, *args)
    assert code == 0, err
    header, _, row, wrote = printed.splitlines()
    columns = [c.strip() for c in header.strip("|").split("|")]
    values = dict(zip(columns, (c.strip() for c in row.strip("|").split("|"))))
    assert float(values["peak_memory_bytes"]) > 0 and float(values["sampling_peak_memory_bytes"]) > 0
    assert wrote == f"wrote {out / 'index.html'}"
    page = (out / "index.html").read_text()
    assert "peak memory of one denoiser call beyond weights and inputs" in page
