"""The second digits feature network (`digits-ms`): seeded training, cache, and a FID that penalises speckle."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from slimdiff.cli import main
from slimdiff.data import load_data
from slimdiff.export import save
from slimdiff.metrics.features import (
    DigitsMultiscaleNet,
    digits_feature_extractor,
    digits_multiscale_feature_extractor,
    feature_extractor,
)
from slimdiff.metrics.quality import compute_quality, reference_features
from slimdiff.models import build_tiny
from slimdiff.training.loop import TrainResult


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def multiscale(cache: Path) -> DigitsMultiscaleNet:
    return digits_multiscale_feature_extractor(cache)


@pytest.fixture(scope="module")
def holdout() -> torch.Tensor:
    return torch.stack([image for image, _ in load_data("digits", size=16, split="holdout")])


def speckle(images: torch.Tensor, fraction: float, seed: int = 0) -> torch.Tensor:
    """Salt-and-pepper noise: each pixel, with probability `fraction`, becomes white or black."""
    generator = torch.Generator().manual_seed(seed)
    hit = torch.rand(images.shape, generator=generator) < fraction
    value = torch.where(torch.rand(images.shape, generator=generator) < 0.5, 1.0, -1.0)
    return torch.where(hit, value, images)


def test_multiscale_network_trains_caches_and_is_accurate(multiscale: DigitsMultiscaleNet, cache: Path) -> None:
    assert not multiscale.info["from_cache"] and multiscale.info["holdout_accuracy"] >= 0.95
    assert (cache / "features" / "digits-ms-v1" / "weights.safetensors").is_file()
    again = feature_extractor("digits-ms", cache)
    assert isinstance(again, DigitsMultiscaleNet) and again.info["from_cache"]
    assert all(torch.equal(a, b) for a, b in zip(multiscale.state_dict().values(), again.state_dict().values()))
    x = torch.rand(5, 3, 24, 24) * 2 - 1  # RGB, another size: converted internally
    assert multiscale(x).shape == (5, 112) and multiscale.logits(x).shape == (5, 10)
    assert not any(p.requires_grad for p in multiscale.parameters())


def test_multiscale_fid_ranks_speckle_and_noise_worse_than_clean_holdout(
    multiscale: DigitsMultiscaleNet, cache: Path, holdout: torch.Tensor
) -> None:
    train = load_data("digits", size=16, split="train")
    real = reference_features(train, multiscale, split="train", cache_dir=cache)
    assert real.mean(0).abs().max() < 1e-4  # centred on the training split
    per_part = [real[:, lo:hi].var(0).mean().item() for lo, hi in DigitsMultiscaleNet._parts]
    assert per_part == pytest.approx([1.0, 1.0, 1.0], rel=1e-3)

    def fid(images: torch.Tensor) -> float:
        return compute_quality(images, real, multiscale, metrics=("fid",))["fid"]

    clean = fid(holdout)
    speckled = [fid(speckle(holdout, p)) for p in (0.005, 0.01, 0.02)]
    assert clean < 5
    assert speckled[0] > 3 * clean and speckled[0] < speckled[1] < speckled[2]
    generator = torch.Generator().manual_seed(0)
    noisy = (holdout + 0.1 * torch.randn(holdout.shape, generator=generator)).clamp(-1, 1)
    assert fid(noisy) > 1.5 * clean

    # the first network ranks the same speckle worse too, only by much less
    first = digits_feature_extractor()  # the run's one digits network (tests/conftest.py)
    real_first = reference_features(train, first, split="train", cache_dir=cache)
    before, after = (
        compute_quality(x, real_first, first, metrics=("fid",))["fid"] for x in (holdout, speckle(holdout, 0.02))
    )
    assert after > before and after / before < speckled[2] / clean


def test_eval_cli_reads_the_second_network(cache: Path, multiscale, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("SLIMDIFF_CACHE", str(cache))
    save(build_tiny("tiny-unet"), tmp_path / "model")
    out = tmp_path / "eval.json"
    args = ["slimdiff", "eval", str(tmp_path / "model"), "--metrics", "fid,kid", "--n", "16", "--steps", "2"]
    monkeypatch.setattr(sys, "argv", [*args, "--feature", "digits-ms", "--json", str(out)])
    main()
    report = json.loads(out.read_text())
    assert report["metrics"]["fid"]["extractor"] == "digits-ms-v1" and report["metrics"]["fid"]["value"] > 0
    capsys.readouterr()


def test_finetune_cli_defaults_are_the_measured_recipe(tmp_path: Path, monkeypatch, capsys) -> None:
    """lr 5e-4 with 20 warm-up steps: docs/pruning.md's fine-tune study. The setting is passed as given, also past
    --steps (the schedule caps it at the run's length: tests/test_outputs.py::test_a_warm_up_longer_than_the_run…)."""
    from slimdiff.jobs import training

    seen = []
    monkeypatch.setattr(training, "finetune_model", lambda *a, **kw: seen.append(a[3]) or TrainResult(None, 0, 0.0, 0))
    for steps, warmup in (("300", 20), ("3", 20)):
        monkeypatch.setattr(
            sys, "argv", ["slimdiff", "finetune", str(tmp_path), "--out", str(tmp_path / "ft"), "--steps", steps]
        )
        main()
        assert seen[-1].lr == 5e-4 and seen[-1].warmup_steps == warmup
    capsys.readouterr()
