"""Tests for slimdiff.text: tiny CLIP build, save/load round trip, encoding, errors, diffusers compatibility."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from slimdiff.errors import SlimdiffError
from slimdiff.text import TextEncoder, make_tiny_clip_text

PROMPTS = ["a photo of the digit 3", "a drawing of the number 7"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny_clip")
    make_tiny_clip_text(path, hidden_size=32, seed=0, max_length=16)
    return path


def test_tokenizer_works(tiny_dir: Path) -> None:
    encoder = TextEncoder.from_dir(tiny_dir)
    tok = encoder.tokenizer
    ids = tok("a photo of the digit 3").input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.unk_token_id not in ids[1:-1]
    assert tok.decode(ids, skip_special_tokens=True) == "a photo of the digit 3"
    assert tok(PROMPTS[0]).input_ids != tok(PROMPTS[1]).input_ids
    assert tok("Ünïcode € ✓!").input_ids[1:-1]  # any text maps to byte-level tokens
    assert (tiny_dir / "tokenizer" / "vocab.json").is_file() and (tiny_dir / "tokenizer" / "merges.txt").is_file()


def test_round_trip_and_shape(tiny_dir: Path, tmp_path: Path) -> None:
    built = make_tiny_clip_text(tmp_path / "a", hidden_size=32, seed=0, max_length=16)
    loaded = TextEncoder.from_dir(tiny_dir)
    assert (loaded.hidden_size, loaded.max_length) == (32, 16)
    assert not loaded.text_model.training
    assert not any(p.requires_grad for p in loaded.text_model.parameters())
    emb = loaded.encode(PROMPTS)
    assert emb.shape == (2, 16, 32) and not emb.requires_grad
    assert torch.equal(built.encode(PROMPTS), emb)
    loaded.save(tmp_path / "b")
    assert list((tmp_path / "b" / "text_encoder").glob("*.bin")) == []
    assert torch.equal(TextEncoder.from_dir(tmp_path / "b").encode(PROMPTS, device="cpu"), emb)


def test_deterministic_per_seed(tmp_path: Path) -> None:
    state = torch.random.get_rng_state()
    a = make_tiny_clip_text(tmp_path / "a", seed=1, max_length=8)
    b = make_tiny_clip_text(tmp_path / "b", seed=1, max_length=8)
    make_tiny_clip_text(tmp_path / "c", seed=2, max_length=8)
    assert torch.equal(torch.random.get_rng_state(), state)
    weights = [load_file(tmp_path / name / "text_encoder" / "model.safetensors") for name in "abc"]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert not all(torch.equal(weights[0][k], weights[2][k]) for k in weights[0])
    assert torch.equal(a.encode(PROMPTS), b.encode(PROMPTS))
    assert a.hidden_size == 32 and a.max_length == 8


def test_different_prompts_differ(tiny_dir: Path) -> None:
    emb = TextEncoder.from_dir(tiny_dir).encode(PROMPTS + [PROMPTS[0]])
    assert not torch.allclose(emb[0], emb[1])
    assert torch.equal(emb[0], emb[2])


def test_truncates_long_prompts(tiny_dir: Path) -> None:
    emb = TextEncoder.from_dir(tiny_dir).encode(["the digit " * 50])
    assert emb.shape == (1, 16, 32)


@pytest.mark.parametrize("missing", ["tokenizer", "text_encoder"])
def test_missing_subfolder(tiny_dir: Path, tmp_path: Path, missing: str) -> None:
    shutil.copytree(tiny_dir, tmp_path / "m")
    shutil.rmtree(tmp_path / "m" / missing)
    with pytest.raises(SlimdiffError, match=f"no {missing}/ subfolder"):
        TextEncoder.from_dir(tmp_path / "m")


def test_not_a_directory(tmp_path: Path) -> None:
    with pytest.raises(SlimdiffError, match="not a directory"):
        TextEncoder.from_dir(tmp_path / "nope")


def test_bin_only_weights_refused(tiny_dir: Path, tmp_path: Path) -> None:
    shutil.copytree(tiny_dir, tmp_path / "m")
    weights = tmp_path / "m" / "text_encoder" / "model.safetensors"
    torch.save(load_file(weights), weights.with_name("pytorch_model.bin"))
    weights.unlink()
    with pytest.raises(SlimdiffError, match=r"only pickled weights \(pytorch_model\.bin\).*safetensors"):
        TextEncoder.from_dir(tmp_path / "m")


def test_bad_prompts(tiny_dir: Path) -> None:
    encoder = TextEncoder.from_dir(tiny_dir)
    for bad in ("a photo", [], [1, 2]):
        with pytest.raises(SlimdiffError, match="non-empty list of strings"):
            encoder.encode(bad)  # type: ignore[arg-type]


def test_bad_tiny_arguments(tmp_path: Path) -> None:
    with pytest.raises(SlimdiffError, match="hidden_size"):
        make_tiny_clip_text(tmp_path, hidden_size=31)
    with pytest.raises(SlimdiffError, match="max_length"):
        make_tiny_clip_text(tmp_path, max_length=2)


def test_works_in_stable_diffusion_pipeline(tiny_dir: Path, tmp_path: Path) -> None:
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=1,
        norm_num_groups=8,
        cross_attention_dim=32,
        attention_head_dim=4,
    )
    vae = AutoencoderKL(
        block_out_channels=(32,),
        norm_num_groups=8,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
    )
    # Plain transformers loading of the saved subfolders, as diffusers' from_pretrained would do.
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=CLIPTextModel.from_pretrained(tiny_dir / "text_encoder", local_files_only=True),
        tokenizer=CLIPTokenizer.from_pretrained(tiny_dir / "tokenizer", local_files_only=True),
        unet=unet,
        scheduler=DDIMScheduler(steps_offset=1, clip_sample=False),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    ours = TextEncoder.from_dir(tiny_dir).encode(PROMPTS)
    theirs, _ = pipe.encode_prompt(PROMPTS, torch.device("cpu"), 1, False)
    assert torch.equal(ours, theirs)

    image = pipe(
        PROMPTS[0],
        height=8,
        width=8,
        num_inference_steps=2,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert image.shape == (1, 8, 8, 3) and np.isfinite(image).all()

    pipe.save_pretrained(tmp_path / "pipe", safe_serialization=True)
    assert torch.equal(TextEncoder.from_dir(tmp_path / "pipe").encode(PROMPTS), ours)
    reloaded = StableDiffusionPipeline.from_pretrained(tmp_path / "pipe", local_files_only=True)
    assert torch.equal(reloaded.encode_prompt(PROMPTS, torch.device("cpu"), 1, False)[0], ours)
