"""Hub ids (`org/name[/subfolder][@revision]`) resolved through a laid-out Hugging Face cache, offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import cache_repo, run_cli
from huggingface_hub.utils import filter_repo_objects

from slimdiff.errors import SlimdiffError
from slimdiff.export import load, save
from slimdiff.hub import ALLOW_PATTERNS, HubId, parse_hub_id
from slimdiff.models import build_tiny


def _pipeline_repo(tmp_path: Path, name: str, seed: int) -> tuple[Path, torch.nn.Module]:
    """A folder laid out as a pipeline repo: `unet/` holding a saved tiny U-Net (random weights of `seed`)."""
    torch.manual_seed(seed)
    model = build_tiny("tiny-unet").eval()
    save(model, tmp_path / name / "unet")
    return tmp_path / name, model


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    theirs = b.state_dict()
    return all(torch.equal(value, theirs[key]) for key, value in a.state_dict().items())


def test_hub_ids_parse_repo_subfolder_and_revision() -> None:
    assert parse_hub_id("org/name") == HubId("org/name")
    assert parse_hub_id("org/name@v1.0") == HubId("org/name", "v1.0")
    assert parse_hub_id("org/name/unet@refs/pr/3") == HubId("org/name", "refs/pr/3", "unet")
    for not_an_id in ("/abs/path", "./org/name", "name", "org/", "~/org/name", "org/na me", "org/name/../x"):
        assert parse_hub_id(not_an_id) is None, not_an_id


def test_load_reads_a_hub_id_from_the_cache_at_each_revision(tmp_path: Path, hf_cache: Path) -> None:
    main_dir, main_model = _pipeline_repo(tmp_path, "main", seed=0)
    v1_dir, v1_model = _pipeline_repo(tmp_path, "v1", seed=1)
    cache_repo(hf_cache, "org/tiny", main_dir)
    cache_repo(hf_cache, "org/tiny", v1_dir, revision="v1", commit="1" * 40)
    assert _same_weights(load("org/tiny"), main_model)  # the pipeline repo's unet/, found as in a local folder
    assert _same_weights(load("org/tiny/unet"), main_model)
    assert _same_weights(load("org/tiny@v1"), v1_model)
    assert _same_weights(load(f"org/tiny/unet@{'1' * 40}"), v1_model)
    assert not _same_weights(main_model, v1_model)


def test_a_local_folder_wins_over_the_hub_id_it_spells(
    tmp_path: Path, hf_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cached, _ = _pipeline_repo(tmp_path, "cached", seed=0)
    cache_repo(hf_cache, "org/tiny", cached)
    local, local_model = _pipeline_repo(tmp_path / "work" / "org", "tiny", seed=1)
    monkeypatch.chdir(tmp_path / "work")
    assert _same_weights(load("org/tiny"), local_model)


def test_a_missing_id_says_how_to_fetch_it_in_one_line(
    tmp_path: Path, hf_cache: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    cache_repo(hf_cache, "org/tiny", _pipeline_repo(tmp_path, "main", seed=0)[0])
    cases = {
        "org/missing": "neither a folder nor in the Hugging Face cache",
        "org/tiny@v9": "fetch it with `hf download org/tiny --revision v9`",
        "org/tiny/vae": "org/tiny has no folder 'vae' (it has: unet)",
    }
    for model_id, expected in cases.items():
        code, out, err = run_cli(monkeypatch, capsys, "info", model_id)
        assert code == 2 and out == "", model_id
        assert err.count("\n") == 1 and err.startswith("slimdiff: error: ") and expected in err, err
    code, _, err = run_cli(monkeypatch, capsys, "info", "org/missing")
    assert f"({hf_cache})" in err and "hf download org/missing`" in err and "HF_HUB_OFFLINE=1" in err
    with pytest.raises(SlimdiffError, match="model directory not found"):
        load(tmp_path / "nope")  # a path that cannot be a Hub id keeps the folder message


def test_downloads_fetch_configs_tokenizers_and_safetensors_never_pickles() -> None:
    files = [
        "model_index.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "unet/diffusion_pytorch_model-00001-of-00002.safetensors",
        "unet/diffusion_pytorch_model.safetensors.index.json",
        "text_encoder/model.safetensors",
        "tokenizer/vocab.json",
        "tokenizer/merges.txt",
        "tokenizer_2/spiece.model",
        "unet/diffusion_pytorch_model.bin",
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "unet/diffusion_pytorch_model.non_ema.safetensors",
        "text_encoder/pytorch_model.bin",
        "v1-5-pruned-emaonly.safetensors",
        "v1-5-pruned.ckpt",
        "unet/diffusion_flax_model.msgpack",
    ]
    kept = list(filter_repo_objects(files, allow_patterns=list(ALLOW_PATTERNS)))
    assert kept == files[:9]


def test_commands_take_a_hub_id(
    tmp_path: Path, hf_cache: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    repo, model = _pipeline_repo(tmp_path, "main", seed=0)
    cache_repo(hf_cache, "org/tiny", repo)
    grid = tmp_path / "grid.png"
    code, out, err = run_cli(monkeypatch, capsys, "sample", "org/tiny", "--n", "2", "--steps", "2", "--out", grid)
    assert code == 0 and grid.is_file(), err
    finetuned = tmp_path / "finetuned"
    args = ("finetune", "org/tiny@main", "--steps", "1", "--batch-size", "4", "--out", finetuned)
    code, out, err = run_cli(monkeypatch, capsys, *args, "--teacher", "org/tiny/unet")
    assert code == 0, err
    code, out, err = run_cli(
        monkeypatch, capsys, "compress", "layers", "org/tiny", "--target-params", "0.9", "--criterion", "magnitude",
        "--out", tmp_path / "layers",
    )  # fmt: skip
    assert code == 0, err
    assert json.loads((tmp_path / "layers" / "slimdiff.json").read_text())["provenance"]["history"][-1]["source"] == (
        "org/tiny"
    )
    assert json.loads((finetuned / "slimdiff.json").read_text())["provenance"]["history"][-1]["teacher"] == (
        "org/tiny/unet"
    )


@pytest.mark.subprocess
def test_the_console_script_reads_the_cache_named_by_the_environment(tmp_path: Path, hf_cache: Path) -> None:
    """HF_HUB_CACHE and HF_HUB_OFFLINE as a user sets them, read by a fresh process."""
    repo, model = _pipeline_repo(tmp_path, "main", seed=0)
    cache_repo(hf_cache, "org/tiny", repo)
    env = os.environ | {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    run = subprocess.run(
        [sys.executable, "-m", "slimdiff", "info", "org/tiny", "--json"], capture_output=True, text=True, env=env
    )
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["params"] == sum(p.numel() for p in model.parameters())
