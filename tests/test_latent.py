"""Latent pipelines end to end: captioned data, the latent and embedding cache, SD-2.1/SDXL/DiT fine-tuning and
calibration, each product run inside its own diffusers pipeline class."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, DiTPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
from helpers import (
    CAPTIONS,
    captioned_folder,
    class_folders,
    dit_pipeline,
    run_cli,
    sd21_pipeline,
    sdxl_pipeline,
)

import slimdiff
from slimdiff.data import DataConfig
from slimdiff.data import cache as data_cache
from slimdiff.errors import SlimdiffError
from slimdiff.jobs.conditioning import load_text_encoder, training_data
from slimdiff.models import adapter_for
from slimdiff.models.unet import TIME_IDS


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("latent")


@pytest.fixture(scope="module")
def sd21(root: Path) -> Path:
    (root / "sd21").mkdir()
    return sd21_pipeline(root / "sd21")


@pytest.fixture(scope="module")
def sdxl(root: Path) -> Path:
    (root / "sdxl").mkdir()
    return sdxl_pipeline(root / "sdxl")


@pytest.fixture(scope="module")
def captioned(root: Path) -> Path:
    return captioned_folder(root / "captioned")


@pytest.fixture
def vae_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the images every `AutoencoderKL.encode` call encodes."""
    calls: list[int] = []
    encode = AutoencoderKL.encode

    def counted(self: AutoencoderKL, x: torch.Tensor, *args: object, **kwargs: object) -> object:
        calls.append(x.shape[0])
        return encode(self, x, *args, **kwargs)

    monkeypatch.setattr(AutoencoderKL, "encode", counted)
    return calls


# ----------------------------------------------------------------------------------------------------------------
# captioned data for latent pipelines (the data layer alone: tests/test_data.py)
# ----------------------------------------------------------------------------------------------------------------
def test_text_pipeline_needs_captions(sd21: Path, tmp_path: Path) -> None:
    adapter = adapter_for(slimdiff.load(sd21))
    with pytest.raises(SlimdiffError, match="no captions.*metadata.jsonl or metadata.csv"):
        training_data(adapter, str(class_folders(tmp_path / "classes")), 0, sd21)


def test_missing_vae_and_second_encoder(sd21: Path, sdxl: Path, tmp_path: Path, captioned: Path) -> None:
    no_vae = tmp_path / "no-vae"
    shutil.copytree(sd21, no_vae)
    shutil.rmtree(no_vae / "vae")
    adapter = adapter_for(slimdiff.load(no_vae))
    with pytest.raises(SlimdiffError, match="has no vae/"):
        training_data(adapter, str(captioned), 0, no_vae)
    one_encoder = tmp_path / "one-encoder"
    shutil.copytree(sdxl, one_encoder, ignore=shutil.ignore_patterns("text_encoder_2", "tokenizer_2"))
    with pytest.raises(SlimdiffError, match="without text_encoder_2/"):
        load_text_encoder(one_encoder, adapter_for(slimdiff.load(one_encoder)))


# ----------------------------------------------------------------------------------------------------------------
# the cache
# ----------------------------------------------------------------------------------------------------------------
def test_cache_reuses_resumes_and_keys(
    sd21: Path, captioned: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, vae_calls: list[int]
) -> None:
    monkeypatch.setattr(data_cache, "SHARD_ITEMS", 2)
    monkeypatch.setattr(data_cache, "ENCODE_BATCH", 1)
    adapter = adapter_for(slimdiff.load(sd21))
    config = DataConfig(str(captioned), cache_dir=str(tmp_path / "cache"))
    messages: list[str] = []
    first = training_data(adapter, config, 0, sd21, purpose="calibrate", log=messages.append)
    assert len(vae_calls) == 3 and first[0][0].shape == (4, 8, 8)  # the train split: 3 images, one per call
    again = training_data(adapter, config, 0, sd21, purpose="calibrate", log=messages.append)
    assert len(vae_calls) == 3, "a second run on the same data encodes nothing"
    assert "3 reused" in messages[-1] and torch.equal(first[0][0], again[0][0])

    # an interrupted run resumes at the first missing shard
    shutil.rmtree(tmp_path / "cache")
    vae_calls.clear()
    encode = AutoencoderKL.encode

    def fails_third(self: AutoencoderKL, x: torch.Tensor, *args: object, **kwargs: object) -> object:
        if len(vae_calls) == 2:  # the first shard (two images) is written, the second is interrupted
            raise KeyboardInterrupt
        return encode(self, x, *args, **kwargs)

    monkeypatch.setattr(AutoencoderKL, "encode", fails_third)
    with pytest.raises(KeyboardInterrupt):
        training_data(adapter, config, 0, sd21, purpose="calibrate")
    monkeypatch.setattr(AutoencoderKL, "encode", encode)
    resumed = training_data(adapter, config, 0, sd21, purpose="calibrate", log=messages.append)
    assert "2 reused" in messages[-1] and "1 encoded" in messages[-1]
    assert torch.equal(resumed[2][0], first[2][0])
    assert not list((tmp_path / "cache").rglob("*.tmp")), "no half-written shard is left"

    # the key follows crop, flip, resolution and the VAE's weights
    def folders() -> set[str]:
        return {p.name for p in (tmp_path / "cache").glob("latents-*")}

    seen = folders()
    for variant in (DataConfig(config.data, random_flip=True, cache_dir=config.cache_dir), config):
        training_data(adapter, variant, 0, sd21, purpose="train")
        assert len(folders()) == len(seen) + 1
        seen = folders()
    small = adapter_for(slimdiff.load(sd21))
    small.model.register_to_config(sample_size=4)
    training_data(small, config, 0, sd21, purpose="calibrate")
    assert len(folders()) == len(seen) + 1
    seen = folders()
    changed = tmp_path / "changed"
    shutil.copytree(sd21, changed)
    vae = AutoencoderKL.from_pretrained(changed / "vae")
    with torch.no_grad():
        vae.encoder.conv_in.bias.add_(0.1)
    vae.save_pretrained(changed / "vae")
    training_data(adapter, config, 0, changed, purpose="calibrate")
    assert len(folders()) == len(seen) + 1


def test_read_only_data_folder_caches_elsewhere(
    sd21: Path, captioned: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "ro"
    shutil.copytree(captioned, data)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(data_cache.os, "access", lambda path, mode: Path(path) != data)  # root writes anywhere
    training_data(adapter_for(slimdiff.load(sd21)), str(data), 0, sd21, purpose="calibrate")
    assert list((tmp_path / "xdg" / "slimdiff").glob("latents-*"))
    assert not (data / ".slimdiff-cache").exists()


# ----------------------------------------------------------------------------------------------------------------
# text as the pipeline encodes it
# ----------------------------------------------------------------------------------------------------------------
def test_text_embeddings_equal_the_pipelines_own(sd21: Path, sdxl: Path) -> None:
    prompts = list(CAPTIONS[:2])
    sd = StableDiffusionPipeline.from_pretrained(sd21, safety_checker=None, requires_safety_checker=False)
    expected, _ = sd.encode_prompt(prompts, "cpu", 1, False)
    assert torch.equal(load_text_encoder(sd21, adapter_for(sd.unet)).encode(prompts), expected)

    xl = StableDiffusionXLPipeline.from_pretrained(sdxl)
    adapter = adapter_for(xl.unet)
    encoder = load_text_encoder(sdxl, adapter)
    embeds, _, pooled, _ = xl.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False)
    hidden, added = adapter._unpack(encoder.encode(prompts))
    assert torch.equal(hidden, embeds) and torch.equal(added["text_embeds"], pooled)
    assert added["time_ids"].tolist() == [[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]] * 2
    null_hidden, null_added = adapter._unpack(encoder.uncond())  # force_zeros_for_empty_prompt, as the pipeline
    assert not null_hidden.any() and not null_added["text_embeds"].any()
    assert adapter.model(**adapter.example_inputs(2)).sample.shape == (2, 4, 8, 8)


# ----------------------------------------------------------------------------------------------------------------
# fine-tuning and calibration, each product inside its own pipeline class
# ----------------------------------------------------------------------------------------------------------------
def _finetune(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, pipe: Path, data: Path, out: Path, *extra: object
) -> str:
    code, stdout, stderr = run_cli(
        monkeypatch, capsys, "finetune", pipe, "--data", data, "--out", out, "--steps", 2, "--batch-size", 2, *extra
    )
    assert code == 0, stderr
    return stdout


def _run_sd21(pipe_dir: Path, product: Path) -> None:
    """Two steps of the product inside StableDiffusionPipeline, with the pipeline's VAE, text encoder, scheduler."""
    pipe = StableDiffusionPipeline.from_pretrained(
        pipe_dir, unet=slimdiff.load(product), safety_checker=None, requires_safety_checker=False
    )
    images = pipe(CAPTIONS[0], num_inference_steps=2, output_type="np", height=16, width=16).images
    assert images.shape == (1, 16, 16, 3) and torch.isfinite(torch.from_numpy(images)).all()


def test_sd21_finetune_and_kd(
    sd21: Path, captioned: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    first = _finetune(monkeypatch, capsys, sd21, captioned, tmp_path / "ft")
    assert "encoded" in first
    second = _finetune(monkeypatch, capsys, sd21, captioned, tmp_path / "kd", "--teacher", sd21)  # output + feature KD
    assert "3 reused" in second and "0 encoded" in second
    history = json.loads((tmp_path / "kd" / "slimdiff.json").read_text())["provenance"]["history"]
    assert history[-1]["teacher"] == str(sd21)
    _run_sd21(sd21, tmp_path / "ft")


def test_sd21_channels_calibration(
    sd21: Path, captioned: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    code, _, stderr = run_cli(
        monkeypatch, capsys, "compress", "channels", sd21, "--data", captioned, "--out", tmp_path / "ch",
        "--target-macs", 0.35, "--tolerance", 0.3, "--calibration", 3, "--stride", 250,
    )  # fmt: skip
    assert code == 0, stderr
    recorded = json.loads((tmp_path / "ch" / "slimdiff.json").read_text())["conditioning"]
    assert recorded["pipeline"] == str(sd21.resolve()) and recorded["prompts"][0] == CAPTIONS[0]
    _run_sd21(sd21, tmp_path / "ch")
    # sampling a product reads its pipeline's VAE and text encoder through the recorded folder
    code, _, stderr = run_cli(monkeypatch, capsys, "sample", tmp_path / "ch", "--out", tmp_path / "g.png", "--n", 2,
                              "--steps", 2)  # fmt: skip
    assert code == 0, stderr
    assert (tmp_path / "g.png").stat().st_size > 0


def test_sdxl_finetune(
    sdxl: Path, captioned: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    _finetune(monkeypatch, capsys, sdxl, captioned, tmp_path / "ft")
    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl, unet=slimdiff.load(tmp_path / "ft"))
    images = pipe(CAPTIONS[0], num_inference_steps=2, output_type="np", height=16, width=16).images
    assert images.shape == (1, 16, 16, 3) and torch.isfinite(torch.from_numpy(images)).all()


def test_sdxl_conditioning_keeps_each_images_time_ids(sdxl: Path, captioned: Path, tmp_path: Path) -> None:
    from slimdiff.jobs.conditioning import training_conditioning

    adapter = adapter_for(slimdiff.load(sdxl))
    config = DataConfig(str(captioned), center_crop=True, cache_dir=str(tmp_path / "cache"))
    dataset = training_data(adapter, config, 0, sdxl)
    conditioning, _ = training_conditioning(adapter, dataset, tmp_path / "out", sdxl, 0, config)
    labels = torch.arange(len(dataset))
    kept = conditioning(labels, torch.zeros(len(dataset), dtype=torch.bool))
    dropped = conditioning(labels, torch.ones(len(dataset), dtype=torch.bool))
    _, added = adapter._unpack(kept)
    _, added_dropped = adapter._unpack(dropped)
    assert added["time_ids"][:, :2].tolist() == [[23.0, 17.0], [16.0, 40.0], [19.0, 50.0]]  # original sizes
    assert added["time_ids"][1, 2:4].tolist() == [0.0, 12.0]  # the centered crop's offsets
    assert torch.equal(added["time_ids"], added_dropped["time_ids"]) and added["time_ids"].shape[1] == TIME_IDS
    assert not added_dropped["text_embeds"].any()


def test_dit_finetune_learned_sigma(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    (root / "dit").mkdir()
    pipe_dir = dit_pipeline(root / "dit")
    _finetune(monkeypatch, capsys, pipe_dir, class_folders(tmp_path / "classes"), tmp_path / "ft")
    model = slimdiff.load(tmp_path / "ft")
    assert model.config.out_channels == 8
    pipe = DiTPipeline.from_pretrained(pipe_dir, transformer=model)
    images = pipe(class_labels=[0, 1], num_inference_steps=2, output_type="np").images
    assert images.shape == (2, 16, 16, 3) and torch.isfinite(torch.from_numpy(images)).all()


def test_in_memory_images_are_keyed_by_content(sd21: Path, tmp_path: Path, vae_calls: list[int]) -> None:
    """Digits (held in memory) encode for a latent pipeline too, cached by each image's content."""
    from slimdiff.data import ImageDataset
    from slimdiff.data.cache import encode_images

    images = torch.rand(4, 3, 16, 16) * 2 - 1
    dataset = ImageDataset(source="digits", classes=["a", "b"], size=16, channels=3, labels=[0, 1, 0, 1], images=images)
    vae = AutoencoderKL.from_pretrained(sd21 / "vae")
    latents = encode_images(dataset, vae, sd21 / "vae", tmp_path)
    assert latents[3][0].shape == (4, 8, 8) and latents[3][1] == 1 and len(vae_calls) == 1
    expected = vae.encode(images[3:]).latent_dist.mean[0] * vae.config.scaling_factor
    assert torch.allclose(latents[3][0], expected, atol=1e-5)
    dataset.images[0] = 0.0  # a changed image re-encodes its shard only
    encode_images(dataset, vae, sd21 / "vae", tmp_path)
    assert len(vae_calls) == 3  # one re-encoding, + the reference call above
