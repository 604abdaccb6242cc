"""`slimdiff eval` and `slimdiff compare`: every metric with its settings, JSON out, one HTML report."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from slimdiff.cli import main
from slimdiff.errors import SlimdiffError
from slimdiff.export import save
from slimdiff.jobs.evaluation import EvalSettings, evaluate_model
from slimdiff.models import build_tiny


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("m") / "tiny"
    save(build_tiny("tiny-unet"), path)
    return path


def test_eval_reports_each_metric_with_its_settings(model_dir: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    out = tmp_path / "eval.json"
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "slimdiff",
            "eval",
            str(model_dir),
            "--n",
            "24",
            "--steps",
            "2",
            "--batch-size",
            "8",
            "--metrics",
            "fid,kid,is,pr,macs,latency",
            "--json",
            str(out),
        ],
    )
    main()
    table = capsys.readouterr().out
    report = json.loads(out.read_text())
    metrics = report["metrics"]
    assert {
        "fid",
        "kid_mean",
        "kid_std",
        "is_mean",
        "precision",
        "recall",
        "macs",
        "macs_no_attn",
        "sampling_macs",
        "latency_ms",
        "sampling_latency_ms",
    } <= set(metrics)
    fid = metrics["fid"]
    assert fid["extractor"] == "digits-v1" and fid["n"] == 24 and fid["steps"] == 2 and fid["scheduler"] == "ddim"
    assert fid["batch_size"] == 8 and fid["device"] == "cpu" and "digits train split" in fid["reference"]
    assert fid["value"] > 0  # an untrained model is far from the data
    assert metrics["sampling_macs"]["value"] == 2 * metrics["macs"]["value"]
    assert metrics["latency_ms"]["p10"] <= metrics["latency_ms"]["value"] <= metrics["latency_ms"]["p90"]
    assert "| fid |" in table and "extractor=digits-v1" in table


def test_clip_metric_needs_a_text_model(model_dir: Path) -> None:
    with pytest.raises(SlimdiffError, match="clip metric needs a text-conditioned model"):
        evaluate_model(model_dir, EvalSettings(metrics=("clip",), n=2, steps=1), progress=False)


def test_unknown_metric(model_dir: Path) -> None:
    with pytest.raises(SlimdiffError, match="unknown metric ssim; valid: fid, kid"):
        evaluate_model(model_dir, EvalSettings(metrics=("ssim",)), progress=False)


def test_compare_writes_one_report(model_dir: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    other = tmp_path / "other"
    save(build_tiny("tiny-unet", block_out_channels=[16, 32, 32]), other)
    out = tmp_path / "report"
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "slimdiff",
            "compare",
            str(model_dir),
            str(other),
            "--out",
            str(out),
            "--n",
            "16",
            "--steps",
            "2",
            "--batch-size",
            "8",
            "--metrics",
            "fid,macs,latency",
            "--curve-steps",
            "1,3",
            "--curve-schedulers",
            "ddim",
        ],
    )
    main()
    printed = capsys.readouterr().out.splitlines()  # the report's table, then where the report is
    assert printed[0].startswith("| model | params |") and "sampling_macs" in printed[0]
    assert [row.split(" | ")[0] for row in printed[2:4]] == ["| 0:tiny", "| 1:other"]
    assert printed[-1] == f"wrote {out / 'index.html'}"
    page = (out / "index.html").read_text()
    assert "0:tiny" in page and "1:other" in page
    assert len(list(out.glob("*.png"))) >= 4  # two plots and two sample grids
    assert json.loads((out / "eval-1.json").read_text())["metrics"]["macs"]["value"] > 0
    # the teacher's own curve over step counts: sampling MACs grow with the steps, one point per step count
    (curve,) = json.loads((out / "curves.json").read_text()).values()
    assert [point["label"] for point in curve] == ["1", "3"]
    assert curve[1]["sampling_macs"] == 3 * curve[0]["sampling_macs"]
    assert "tiny, ddim over steps" in page and 'id="breakdown"' in page and "mid_block" in page
