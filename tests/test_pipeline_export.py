"""`slimdiff export MODEL --pipeline SRC --out DIR`: a pipeline folder `DiffusionPipeline.from_pretrained` loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import DDIMPipeline, DDIMScheduler, DiffusionPipeline, DiTPipeline, UNet2DConditionModel
from helpers import cache_repo, run_cli, tiny_sd_pipeline, tiny_vae

import slimdiff.pipeline  # noqa: F401  (what a user imports: diffusers then finds slimdiff's loader)
from slimdiff.engines import skip
from slimdiff.engines.channel_surgery import prune_copy
from slimdiff.errors import SlimdiffError
from slimdiff.export import load, save
from slimdiff.models import adapter_for, build_tiny
from slimdiff.pipeline import LOADER_ENTRY, export_pipeline
from slimdiff.text import make_tiny_clip_text


def _sample(pipeline: DiffusionPipeline, **call: Any) -> np.ndarray:
    pipeline.set_progress_bar_config(disable=True)
    images = pipeline(num_inference_steps=2, output_type="np", generator=torch.manual_seed(0), **call).images
    assert np.isfinite(images).all()
    return images


def _export(teacher_pipeline: DiffusionPipeline, pruned: torch.nn.Module, tmp_path: Path, **save_kwargs: Any) -> Path:
    """Save the teacher pipeline and the pruned denoiser, export them into one pipeline folder."""
    teacher_pipeline.save_pretrained(tmp_path / "src")
    save(pruned, tmp_path / "pruned", **save_kwargs)
    return export_pipeline(tmp_path / "pruned", tmp_path / "src", tmp_path / "out")


def _same_file(a: Path, b: Path) -> bool:
    return a.stat().st_ino == b.stat().st_ino and a.stat().st_dev == b.stat().st_dev


def test_stable_diffusion_pipeline_with_a_pruned_unet(tmp_path: Path) -> None:
    teacher = build_tiny("tiny-sd", in_channels=4, out_channels=4).eval()
    pruned = prune_copy(teacher, 0.5, "magnitude").model
    teacher_pipeline = tiny_sd_pipeline(teacher, make_tiny_clip_text(tmp_path / "clip", hidden_size=32, max_length=16))
    out = _export(teacher_pipeline, pruned, tmp_path)

    assert json.loads((out / "model_index.json").read_text())["unet"] == list(LOADER_ENTRY)
    loaded = DiffusionPipeline.from_pretrained(out)
    assert type(loaded).__name__ == "StableDiffusionPipeline" and type(loaded.unet) is UNet2DConditionModel
    assert [p.shape for p in loaded.unet.parameters()] == [p.shape for p in pruned.parameters()]
    in_memory = type(teacher_pipeline)(**(teacher_pipeline.components | {"unet": pruned}))
    call = {"prompt": ["a photo of the digit 3"], "height": 16, "width": 16}
    np.testing.assert_allclose(_sample(loaded, **call), _sample(in_memory, **call), atol=1e-5)
    # shared, not copied: the VAE from the source pipeline, the U-Net's weights from the pruned model's folder
    weights = "diffusion_pytorch_model.safetensors"
    assert _same_file(out / "vae" / weights, tmp_path / "src" / "vae" / weights)
    assert _same_file(out / "unet" / weights, tmp_path / "pruned" / weights)
    # the trap: plain diffusers reads the U-Net folder's config, whose widths are the teacher's
    with pytest.raises((ValueError, RuntimeError), match="ignore_mismatched_sizes|size mismatch|shape"):
        UNet2DConditionModel.from_pretrained(out / "unet")


def test_ddim_pipeline_carries_the_skip_table(tmp_path: Path) -> None:
    teacher = build_tiny("tiny-unet").eval()
    pruned = prune_copy(teacher, 0.5, "magnitude").model
    scheduler = DDIMScheduler()
    scheduler.set_timesteps(2)
    units = skip.model_units(adapter_for(pruned), "block")
    table = skip.SkipTable.full("DDIMScheduler", scheduler.timesteps.tolist(), units, "block")
    table.compute[1] = [i % 2 == 0 for i in range(len(units))]
    out = _export(DDIMPipeline(teacher, DDIMScheduler()), pruned, tmp_path, artifacts={"skip_table": table.to_json()})

    loaded = DiffusionPipeline.from_pretrained(out)
    assert type(loaded) is DDIMPipeline and skip.table_of(loaded.unet).to_json() == table.to_json()
    in_memory = DDIMPipeline(load(tmp_path / "pruned"), DDIMScheduler())
    bare = DDIMPipeline(load(tmp_path / "pruned", artifacts=False), DDIMScheduler())
    images = _sample(loaded, batch_size=2)
    np.testing.assert_array_equal(images, _sample(in_memory, batch_size=2))
    assert not np.allclose(images, _sample(bare, batch_size=2), atol=1e-4)  # the table changes what is computed


def test_dit_pipeline_from_a_hub_id_through_the_command(
    tmp_path: Path, hf_cache: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    teacher = build_tiny("tiny-dit", in_channels=4, out_channels=4).eval()
    pruned = prune_copy(teacher, 0.5, "magnitude").model
    teacher_pipeline = DiTPipeline(transformer=teacher, vae=tiny_vae(4), scheduler=DDIMScheduler())
    teacher_pipeline.save_pretrained(tmp_path / "src")
    snapshot = cache_repo(hf_cache, "org/tiny-dit", tmp_path / "src")
    save(pruned, tmp_path / "pruned")
    code, stdout, stderr = run_cli(
        monkeypatch, capsys, "export", tmp_path / "pruned", "--pipeline", "org/tiny-dit", "--out", tmp_path / "out"
    )
    assert code == 0 and "DiffusionPipeline.from_pretrained" in stdout, stderr

    loaded = DiffusionPipeline.from_pretrained(tmp_path / "out")
    assert type(loaded) is DiTPipeline
    in_memory = DiTPipeline(transformer=pruned, vae=teacher_pipeline.vae, scheduler=DDIMScheduler())
    call = {"class_labels": [1, 7], "guidance_scale": 2.0}
    np.testing.assert_allclose(_sample(loaded, **call), _sample(in_memory, **call), atol=1e-5)
    vae = "vae/diffusion_pytorch_model.safetensors"
    assert not (tmp_path / "out" / vae).is_symlink() and _same_file(tmp_path / "out" / vae, snapshot / vae)


def test_bad_exports_are_one_line_each(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    teacher = build_tiny("tiny-unet").eval()
    DDIMPipeline(teacher, DDIMScheduler()).save_pretrained(tmp_path / "src")
    save(build_tiny("tiny-unet", block_out_channels=[16, 32, 32]), tmp_path / "other")
    save(prune_copy(teacher, 0.5, "magnitude").model, tmp_path / "pruned")
    teacher.save_pretrained(tmp_path / "plain")
    cases = {
        ("other", "src", "out"): "was not made from this pipeline's unet: its config has block_out_channels",
        ("pruned", "pruned", "out"): "is not a diffusers pipeline folder (no model_index.json)",
        ("plain", "src", "out"): "was not written by slimdiff (no slimdiff.json)",
        ("pruned", "src", "src"): "would replace",
        ("pruned", "src", "."): "would replace",
    }
    for (model, source, out), expected in cases.items():
        code, stdout, stderr = run_cli(
            monkeypatch, capsys, "export", tmp_path / model, "--pipeline", tmp_path / source, "--out", tmp_path / out
        )
        assert code == 2 and stderr.count("\n") == 1 and expected in stderr, (model, source, out, stderr)
    assert (tmp_path / "src" / "unet" / "config.json").is_file()  # nothing was replaced
    with pytest.raises(SlimdiffError, match="cannot be loaded with device_map"):
        slimdiff.pipeline.SlimdiffModel.from_pretrained(tmp_path / "pruned", device_map="auto")


@pytest.mark.subprocess
def test_importing_slimdiff_pipeline_is_what_loading_needs(tmp_path: Path) -> None:
    """A fresh process: diffusers refuses the folder until `slimdiff.pipeline` is imported, then loads it."""
    teacher = build_tiny("tiny-unet").eval()
    out = _export(DDIMPipeline(teacher, DDIMScheduler()), prune_copy(teacher, 0.5, "magnitude").model, tmp_path)
    load_it = f"from diffusers import DiffusionPipeline; print(type(DiffusionPipeline.from_pretrained({str(out)!r})))"
    env = os.environ | {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    runs = [
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
        for code in (load_it, "import slimdiff.pipeline; " + load_it)
    ]
    assert runs[0].returncode != 0 and "import slimdiff.pipeline before calling `from_pretrained`" in runs[0].stderr
    assert runs[1].returncode == 0 and "DDIMPipeline" in runs[1].stdout, runs[1].stderr


def test_files_are_copied_where_hard_links_cannot_be_made(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_links(source: object, target: object) -> None:
        raise OSError(18, "Invalid cross-device link")

    teacher = build_tiny("tiny-unet").eval()
    pruned = prune_copy(teacher, 0.5, "magnitude").model
    monkeypatch.setattr(os, "link", no_links)
    out = _export(DDIMPipeline(teacher, DDIMScheduler()), pruned, tmp_path)
    weights = "diffusion_pytorch_model.safetensors"
    assert not _same_file(out / "unet" / weights, tmp_path / "pruned" / weights)
    loaded = DiffusionPipeline.from_pretrained(out)
    np.testing.assert_array_equal(
        _sample(loaded, batch_size=1), _sample(DDIMPipeline(pruned, DDIMScheduler()), batch_size=1)
    )


def test_sdxl_pipeline_with_a_pruned_unet(tmp_path: Path) -> None:
    from diffusers import StableDiffusionXLPipeline
    from helpers import sdxl_pipeline

    source = sdxl_pipeline(tmp_path)
    teacher_pipeline = StableDiffusionXLPipeline.from_pretrained(source)
    pruned = prune_copy(teacher_pipeline.unet.eval(), 0.5, "magnitude").model
    save(pruned, tmp_path / "pruned")
    out = export_pipeline(tmp_path / "pruned", source, tmp_path / "out")

    loaded = DiffusionPipeline.from_pretrained(out)
    assert type(loaded) is StableDiffusionXLPipeline and type(loaded.unet) is UNet2DConditionModel
    assert [p.shape for p in loaded.unet.parameters()] == [p.shape for p in pruned.parameters()]
    in_memory = StableDiffusionXLPipeline(**(teacher_pipeline.components | {"unet": pruned}))
    call = {"prompt": ["a photo of a red cat"], "height": 16, "width": 16}
    np.testing.assert_allclose(_sample(loaded, **call), _sample(in_memory, **call), atol=1e-5)
    weights = "diffusion_pytorch_model.safetensors"
    assert _same_file(out / "text_encoder_2" / "model.safetensors", source / "text_encoder_2" / "model.safetensors")
    assert _same_file(out / "unet" / weights, tmp_path / "pruned" / weights)
