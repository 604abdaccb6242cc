"""The latent teacher script (benchmarks/latent_teacher.py) in its --smoke mode: output, loading, resuming."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from PIL import Image
from safetensors.torch import load_file

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "latent_teacher.py"


def _script():
    spec = importlib.util.spec_from_file_location("latent_teacher", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


latent_teacher = _script()


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One uninterrupted --smoke run."""
    out = tmp_path_factory.mktemp("teacher") / "pipe"
    latent_teacher.main(["--smoke", "--out", str(out)])
    return out


def test_smoke_run_saves_a_loadable_pipeline(smoke_run: Path) -> None:
    assert not smoke_run.with_name(smoke_run.name + ".partial").exists()
    assert not list(smoke_run.rglob("*.bin")) and not list(smoke_run.rglob("*.pt"))
    pipe = StableDiffusionPipeline.from_pretrained(smoke_run)
    assert isinstance(pipe.scheduler, DDIMScheduler)
    assert pipe.scheduler.config.beta_schedule == "scaled_linear"
    assert pipe.unet.config.in_channels == 4 and pipe.unet.config.sample_size == 8
    pipe.set_progress_bar_config(disable=True)
    images = pipe(
        ["a photo of the digit 3", "a photo of the digit 7"],
        num_inference_steps=3,
        guidance_scale=3.0,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert images.shape == (2, 3, 32, 32) and images.isfinite().all()

    record = json.loads((smoke_run / "training.json").read_text())
    vae = record["vae"]
    assert pipe.vae.config.scaling_factor == pytest.approx(vae["scaling_factor"])
    assert vae["scaling_factor"] == pytest.approx(1.0 / vae["latent_std"])
    assert 0.0 < vae["recon_mse_holdout"] < 4.0
    assert [e["step"] for e in record["unet"]["log"]] == list(range(1, 7))
    assert record["unet"]["resumed_from"] is None
    with Image.open(smoke_run / "samples.png") as grid:
        assert grid.size == (2 * 32 * 10, 2 * 32)


def test_resumed_run_continues_from_its_checkpoint(smoke_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "pipe"
    latent_teacher.main(["--smoke", "--out", str(out), "--stop-at", "3"])
    partial = out.with_name("pipe.partial")
    assert not out.exists()
    assert json.loads((partial / "latest.json").read_text()) == {"checkpoint": "checkpoint-3"}

    latent_teacher.main(["--smoke", "--out", str(out), "--resume"])
    record = json.loads((out / "training.json").read_text())
    assert record["unet"]["resumed_from"] == 3
    assert [e["step"] for e in record["unet"]["log"]] == list(range(1, 7))
    # Same seed and settings: the interrupted-and-resumed run ends with the uninterrupted run's EMA weights.
    resumed = load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))
    straight = load_file(str(smoke_run / "unet" / "diffusion_pytorch_model.safetensors"))
    assert resumed.keys() == straight.keys()
    for name, tensor in straight.items():
        torch.testing.assert_close(resumed[name], tensor, msg=name)


def test_resume_refuses_other_settings(tmp_path: Path) -> None:
    out = tmp_path / "pipe"
    latent_teacher.main(["--smoke", "--out", str(out), "--stop-at", "1", "--vae-steps", "1"])
    with pytest.raises(SystemExit, match="--seed 1234 \\(given 5\\)"):
        latent_teacher.main(["--smoke", "--out", str(out), "--resume", "--seed", "5", "--vae-steps", "1"])
