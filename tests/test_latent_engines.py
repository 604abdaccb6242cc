"""Every engine, `finetune --teacher`, `eval` and `sample` on the three tiny latent pipelines (SD-2.1-like,
SDXL-like, latent DiT), each product run inside its own diffusers pipeline class (docs/latent.md)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DiffusionPipeline,
    DiTPipeline,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)
from helpers import CAPTIONS, captioned_folder, class_folders, dit_pipeline, run_cli, sd21_pipeline, sdxl_pipeline

import slimdiff
from slimdiff.errors import SlimdiffError

KINDS = ("sd21", "sdxl", "dit")
BUILDERS = {"sd21": sd21_pipeline, "sdxl": sdxl_pipeline, "dit": dit_pipeline}
PIPELINES = {"sd21": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline, "dit": DiTPipeline}

#: Each engine at its cheapest: few calibration samples, few search iterations, few steps.
CHANNELS = "--target-macs 0.6 --tolerance 0.3 --calibration 2 --stride 500".split()
ENGINES = {
    "layers": "--target-params 0.8 --tolerance 0.3 --calibration 2 --batch-size 2".split(),
    "ofa": "--sizes 0.5 --steps 2 --batch-size 2 --importance-samples 1 --warmup 0 --tolerance 0.3".split(),
}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("latent-engines")


@pytest.fixture(scope="module")
def pipelines(root: Path) -> dict[str, Path]:
    made = {}
    for kind, build in BUILDERS.items():
        (root / kind).mkdir()
        made[kind] = build(root / kind)
    return made


@pytest.fixture(scope="module")
def data(root: Path) -> dict[str, Path]:
    captioned = captioned_folder(root / "captioned")
    return {"sd21": captioned, "sdxl": captioned, "dit": class_folders(root / "classes")}


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> Callable[..., str]:
    """Runs `slimdiff ARGS` in-process, asserts it succeeded and returns its stdout."""

    def run(*args: object) -> str:
        code, stdout, stderr = run_cli(monkeypatch, capsys, *args)
        assert code == 0, stderr
        return stdout

    return run


@pytest.fixture
def compress(cli: Callable[..., str], pipelines: dict[str, Path], data: dict[str, Path]) -> Callable[..., Path]:
    """`compress(kind, engine, out, *settings)`: the engine on that pipeline and its data; the output folder."""

    def run(kind: str, engine: str, out: Path, *settings: object) -> Path:
        cli("compress", engine, pipelines[kind], "--data", data[kind], "--out", out, *settings)
        return out

    return run


def _pipeline(kind: str, pipe_dir: Path, model: torch.nn.Module, scheduler: object = None) -> DiffusionPipeline:
    """The source pipeline's own class, built from its components with the product as its denoiser."""
    slot = "transformer" if kind == "dit" else "unet"
    extra = {"scheduler": scheduler} if scheduler is not None else {}
    if kind == "sd21":
        extra |= {"safety_checker": None, "requires_safety_checker": False}
    return PIPELINES[kind].from_pretrained(pipe_dir, **{slot: model}, **extra)


def _images(kind: str, pipe: DiffusionPipeline, steps: int = 2) -> np.ndarray:
    """Sample two images; they are finite and at the pipeline's resolution."""
    if kind == "dit":
        images = pipe(class_labels=[0, 1], num_inference_steps=steps, output_type="np").images
    else:
        images = pipe(list(CAPTIONS[:2]), num_inference_steps=steps, output_type="np", height=16, width=16).images
    assert images.shape == (2, 16, 16, 3) and np.isfinite(images).all()
    return images


@pytest.mark.parametrize("engine", sorted(ENGINES))
@pytest.mark.parametrize("kind", KINDS)
def test_engine_product_runs_in_its_pipeline(
    kind: str, engine: str, pipelines: dict[str, Path], compress: Callable[..., Path], tmp_path: Path
) -> None:
    out = compress(kind, engine, tmp_path / engine, *ENGINES[engine])
    product = next(out.glob("*/slimdiff.json")).parent if engine == "ofa" else out
    model = slimdiff.load(product)
    teacher = slimdiff.load(pipelines[kind])
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in teacher.parameters())
    _images(kind, _pipeline(kind, pipelines[kind], model))


#: The sampler each skip table is made for: each pipeline's own (DDIM, Euler, DPM-Solver++).
SKIP_SAMPLER = {
    "sd21": ("ddim", DDIMScheduler),
    "sdxl": ("euler", EulerDiscreteScheduler),
    "dit": ("dpm", DPMSolverMultistepScheduler),
}
SKIP = {
    "dip-go": "--iterations 2 --noises 2 --batch-size 2 --lr 0.1 --fallback none --checkpointing none".split(),
    "step-reuse": [],
}


@pytest.mark.parametrize("method", sorted(SKIP))
@pytest.mark.parametrize("kind", KINDS)
def test_skip_table_is_honoured_or_refused_by_the_pipelines_scheduler(
    kind: str, method: str, pipelines: dict[str, Path], compress: Callable[..., Path], tmp_path: Path
) -> None:
    sampler, scheduler_class = SKIP_SAMPLER[kind]
    settings = ["--method", method, "--steps", 3, "--scheduler", sampler, "--target-macs", 0.7, "--tolerance", 0.4]
    out = compress(kind, "skip", tmp_path / "skip", *settings, *SKIP[method])
    assert json.loads((out / "skip_table.json").read_text())["scheduler"] == scheduler_class.__name__
    model = slimdiff.load(out)
    pipe = _pipeline(kind, pipelines[kind], model)
    scheduler = scheduler_class.from_config(pipe.scheduler.config)
    honoured = _images(kind, _pipeline(kind, pipelines[kind], model, scheduler), steps=3)
    with pytest.raises(SlimdiffError, match="skip table"):
        _images(kind, _pipeline(kind, pipelines[kind], model, scheduler), steps=2)  # other timesteps
    assert type(pipe.scheduler) is scheduler_class  # the pipeline's own sampler, as the user runs it
    other = DDPMScheduler.from_config(pipe.scheduler.config)
    with pytest.raises(SlimdiffError, match="skip table"):
        _images(kind, _pipeline(kind, pipelines[kind], model, other), steps=3)  # another sampler
    full = _images(kind, _pipeline(kind, pipelines[kind], slimdiff.load(out, artifacts=False), scheduler), steps=3)
    assert not np.allclose(honoured, full), "the table skips work, so its images differ from full compute"


@pytest.fixture(scope="module")
def clip_folder(root: Path) -> Path:
    """A tiny random CLIPModel and its CLIPProcessor (tokenizer + image processor) saved in one folder."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from slimdiff.text import make_tiny_clip_text

    text = make_tiny_clip_text(root / "clip-text")
    layers = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    text_config = {k: v for k, v in text.text_model.config.to_dict().items() if k not in layers} | layers
    config = CLIPConfig(
        text_config=text_config, vision_config=layers | {"image_size": 32, "patch_size": 8}, projection_dim=16
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(root / "clip")
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size=32, crop_size=32), tokenizer=text.tokenizer)
    processor.save_pretrained(root / "clip")
    return root / "clip"


@pytest.mark.parametrize("kind", KINDS)
def test_channels_finetune_with_teacher_eval_and_sample(
    kind: str,
    pipelines: dict[str, Path],
    data: dict[str, Path],
    clip_folder: Path,
    compress: Callable[..., Path],
    cli: Callable[..., str],
    tmp_path: Path,
) -> None:
    """Diff-Pruning (Taylor over timesteps, in latent space), then output + feature KD from the pipeline's own
    denoiser; eval (FID/KID on decoded images, CLIP score, MACs with the fixed cost) and sample read the pipeline."""
    pipe_dir, images = pipelines[kind], data[kind]
    pruned = compress(kind, "channels", tmp_path / "ch", *CHANNELS)
    assert json.loads((pruned / "slimdiff.json").read_text())["provenance"]["history"][-1]["importance"] == (
        "diff-pruning"
    )
    tuned = tmp_path / "kd"
    cli("finetune", pruned, "--data", images, "--out", tuned, "--steps", 2, "--batch-size", 2, "--teacher", pipe_dir)
    _images(kind, _pipeline(kind, pipe_dir, slimdiff.load(tuned)))

    metrics = "fid,kid,macs" + ("" if kind == "dit" else ",clip")
    record = tmp_path / "eval.json"
    cli("eval", tuned, "--data", images, "--metrics", metrics, "--n", 4, "--steps", 2,
        "--batch-size", 4, "--clip-dir", clip_folder, "--json", record)  # fmt: skip
    report = json.loads(record.read_text())["metrics"]
    assert np.isfinite([report["fid"]["value"], report["kid_mean"]["value"]]).all()
    assert kind == "dit" or 0 <= report["clip"]["value"] <= 100
    fixed = report["fixed_macs"]
    encoders = {"sd21": ["text_encoder"], "sdxl": ["text_encoder", "text_encoder_2"], "dit": []}[kind]
    assert fixed["value"] == fixed["vae_decoder"] + sum(fixed[name] for name in encoders) and fixed["vae_decoder"] > 0
    assert all(fixed[name] > 0 for name in encoders)
    cli("eval", pipe_dir, "--metrics", "macs", "--steps", 2, "--json", tmp_path / "teacher.json")
    teacher = json.loads((tmp_path / "teacher.json").read_text())["metrics"]
    assert teacher["fixed_macs"]["value"] == fixed["value"], "compressing the denoiser leaves the fixed cost"
    assert report["sampling_macs"]["value"] < teacher["sampling_macs"]["value"]

    grid = tmp_path / "grid.png"
    cli("sample", tuned, "--out", grid, "--n", 2, "--steps", 2, "--batch-size", 2)
    assert grid.stat().st_size > 0


def test_fixed_cost_is_the_decoder_and_encoders_of_the_pipeline(pipelines: dict[str, Path]) -> None:
    """The meta-device count from the configs equals a count of the real modules (whose CPU attention kernel the
    counter cannot see, hence the comparison without attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    from slimdiff.metrics.cost import pipeline_fixed_macs

    fixed = pipeline_fixed_macs(pipelines["sdxl"], (4, 8, 8))
    pipe = StableDiffusionXLPipeline.from_pretrained(pipelines["sdxl"])
    calls = {
        "vae_decoder": lambda: pipe.vae.decode(torch.zeros(1, 4, 8, 8)),
        "text_encoder": lambda: pipe.text_encoder(torch.zeros(1, 77, dtype=torch.long)),
        "text_encoder_2": lambda: pipe.text_encoder_2(torch.zeros(1, 77, dtype=torch.long)),
    }
    counts = {"vae_decoder": fixed.vae_decoder} | fixed.text_encoders
    for name, call in calls.items():
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            call()
        assert counter.get_total_flops() // 2 == counts[name].without_attention, name
    assert fixed.total == sum(count.total for count in counts.values())
