"""Engines compose: any weight-changing engine's output is any engine's input, and a skip table learned on the
compressed model goes last — for every family, saved, loaded, in the family's diffusers pipeline, with the whole
chain in `slimdiff info`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMPipeline, DDIMScheduler, DiTPipeline
from helpers import FAMILIES, run_cli, tiny_sd_pipeline, tiny_vae

import slimdiff
from slimdiff.engines import get_engine
from slimdiff.export import read_provenance, save
from slimdiff.jobs.compression import compress_model
from slimdiff.jobs.conditioning import load_text_encoder
from slimdiff.jobs.info import model_info
from slimdiff.models import adapter_for, build_tiny
from slimdiff.text import make_tiny_clip_text
from slimdiff.training.diffusion import DEFAULT_SCHEDULE

STEPS = 4  # the sampler every skip table here is made for: DDIM, 4 steps
#: The teachers' noise schedule; steps_offset=1 and clip_sample=False as in SD-1.5's own scheduler config
#: (StableDiffusionPipeline forces both), so that the tables are made for the sampler the pipelines run.
SCHEDULE = DEFAULT_SCHEDULE | {"steps_offset": 1, "clip_sample": False}


def _engine(name: str, **values):
    return get_engine(name).make_config(**values)


CHANNELS = {"importance": "magnitude", "target_macs": 0.6, "calibration_size": 4}
LAYERS = {"criterion": "output-loss", "target_params": 0.85, "calibration_size": 8, "batch_size": 8}
SKIP = {"method": "step-reuse", "target_macs": 0.5, "steps": STEPS, "scheduler": "ddim"}


@pytest.fixture(scope="module", params=FAMILIES)
def teacher(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    name = request.param
    path = tmp_path_factory.mktemp(name) / "teacher"
    model = build_tiny(name).eval()
    conditioning = {"classes": [str(i) for i in range(10)]} if name == "tiny-dit" else None
    save(model, path, conditioning=conditioning, scheduler_config=SCHEDULE)
    if name == "tiny-sd":  # a text-conditioned model carries its text encoder
        make_tiny_clip_text(path, hidden_size=adapter_for(model).cross_attention_dim, seed=0).save(path)
    return path


def _chain(teacher: Path, tmp_path: Path, engines: list[tuple[str, dict]]) -> Path:
    current = teacher
    for index, (name, values) in enumerate(engines):
        out = tmp_path / f"{index}-{name}"
        compress_model(name, current, "digits", out, _engine(name, **values))
        current = out
    return current


def _run_in_pipeline(model_dir: Path, artifacts: bool = True) -> np.ndarray:
    """The family's diffusers pipeline with the loaded model (and its skip table), DDIM at the table's steps."""
    model = slimdiff.load(model_dir, artifacts=artifacts)
    family = adapter_for(model).family
    generator = torch.Generator().manual_seed(0)
    scheduler = DDIMScheduler.from_config(SCHEDULE)
    if family == "unet":
        pipeline = DDIMPipeline(unet=model, scheduler=scheduler)
        return pipeline(batch_size=2, num_inference_steps=STEPS, generator=generator, output_type="np").images
    if family == "dit":
        pipeline = DiTPipeline(transformer=model, vae=tiny_vae(model.config.in_channels), scheduler=scheduler)
        return pipeline(class_labels=[1, 2], num_inference_steps=STEPS, generator=generator, output_type="np").images
    pipeline = tiny_sd_pipeline(model, load_text_encoder(model_dir, adapter_for(model)), scheduler)
    return pipeline(["a digit"], num_inference_steps=STEPS, generator=generator, output_type="np").images


def test_channels_then_skip(teacher: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    final = _chain(teacher, tmp_path, [("channels", CHANNELS), ("skip", SKIP)])
    history = read_provenance(final).history
    assert [entry["job"] for entry in history] == ["compress channels", "compress skip"]
    info = model_info(final)
    achieved = history[0]["achieved"]
    assert info["chain"][1] == f"compress channels: macs 0.6 → {achieved['macs']:.3g}, params {achieved['params']:.3g}"
    assert info["chain"][2].startswith("compress skip: sampling_macs 0.5 → ")
    # the table keeps half the sampling MACs of the channel-pruned model, which has 0.6 of the teacher's
    pruned_macs = model_info(tmp_path / "0-channels")["macs"]
    assert 0.5 * pruned_macs * STEPS * 0.98 <= info["sampling_macs"] <= 0.5 * pruned_macs * STEPS * 1.02
    images = _run_in_pipeline(final)
    assert images.shape[0] >= 1 and not np.allclose(images, _run_in_pipeline(final, artifacts=False), atol=1e-4)
    code, out, err = run_cli(monkeypatch, capsys, "info", final)
    assert code == 0, err
    assert "made by:" in out and "compress channels" in out and "compress skip" in out


def test_layers_then_channels_then_skip(teacher: Path, tmp_path: Path) -> None:
    final = _chain(teacher, tmp_path, [("layers", LAYERS), ("channels", CHANNELS), ("skip", SKIP)])
    jobs = [entry["job"] for entry in read_provenance(final).history]
    assert jobs == ["compress layers", "compress channels", "compress skip"]
    # the skip table only reuses outputs: with it off, the loaded model is exactly the channel-pruned one
    bare, pruned = slimdiff.load(final, artifacts=False), slimdiff.load(tmp_path / "1-channels")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        inputs = adapter_for(bare).example_inputs(2)
    with torch.no_grad():
        assert torch.equal(bare(**inputs)[0], pruned(**inputs)[0])
    images = _run_in_pipeline(final)  # the pipeline samples with the table: not what the bare model samples
    assert np.isfinite(images).all() and not np.allclose(images, _run_in_pipeline(final, artifacts=False), atol=1e-4)
