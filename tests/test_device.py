"""Device and precision of compress / eval / sample, the half-precision teacher, gradient checkpointing with feature
KD, and peak memory in the training log and `eval --metrics memory` — all on the CPU."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from slimdiff.data import load_data
from slimdiff.devices import available_devices, half_dtype, resolve_device
from slimdiff.engines import get_engine
from slimdiff.errors import SlimdiffError
from slimdiff.export import load, read_provenance, save
from slimdiff.jobs.compression import compress_model
from slimdiff.jobs.evaluation import evaluate_model
from slimdiff.jobs.sampling import sample_model
from slimdiff.models import adapter_for, build_tiny
from slimdiff.settings import DeviceConfig, EvalSettings, KDConfig, SampleConfig, TrainConfig
from slimdiff.training.diffusion import DEFAULT_SCHEDULE
from slimdiff.training.loop import train
from tests.helpers import run_cli, sd21_pipeline


@pytest.fixture(scope="module")
def digits():
    return load_data("digits", size=16)


def _saved(tmp_path: Path, name: str = "tiny-unet") -> Path:
    return save(build_tiny(name).eval(), tmp_path / name, scheduler_config=dict(DEFAULT_SCHEDULE))


def test_teacher_is_held_in_bf16_on_a_gpu_that_has_it_fp16_on_another_fp32_on_cpu() -> None:
    cuda = torch.device("cuda")
    assert half_dtype(cuda, bf16_supported=True) == torch.bfloat16
    assert half_dtype(cuda, bf16_supported=False) == torch.float16
    assert half_dtype(torch.device("cpu")) == torch.float32


def test_an_unavailable_or_unknown_device_is_one_line_listing_what_the_machine_has() -> None:
    have = ", ".join(available_devices())
    with pytest.raises(SlimdiffError, match=rf"device 'cuda:7' is not available here; this machine has: {have}$"):
        SampleConfig(device="cuda:7").validate()
    with pytest.raises(SlimdiffError, match=rf"unknown device 'gpu0'; this machine has: {have}$"):
        EvalSettings(device="gpu0").validate()
    with pytest.raises(SlimdiffError, match=r"invalid device setting dtype \('--dtype'\): must be one of fp32"):
        DeviceConfig(dtype="fp8").validate()
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")


def test_cli_refuses_an_absent_device_in_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    model_dir, absent = _saved(tmp_path), f"cuda:{torch.cuda.device_count()}"  # one past the last GPU
    refusal = f"slimdiff: error: device '{absent}' is not available here; this machine has: "
    for command in (["sample", model_dir, "--out", tmp_path / "g.png"], ["eval", model_dir]):
        code, out, err = run_cli(monkeypatch, capsys, *command, "--device", absent)
        assert code != 0 and out == ""
        assert err.strip().splitlines() == [refusal + ", ".join(available_devices())]
    code, _, err = run_cli(
        monkeypatch, capsys, "compress", "channels", model_dir, "--out", tmp_path / "c", "--target-macs", "0.5",
        "--device", absent,
    )  # fmt: skip
    assert code != 0 and err.strip().splitlines() == [refusal + ", ".join(available_devices())]
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("kind", ["pixels", "latents and prompts"])
def test_sampling_in_bf16_on_cpu_matches_fp32_to_bf16_precision(tmp_path: Path, kind: str) -> None:
    prompts = None
    if kind == "pixels":
        model_dir = _saved(tmp_path)
    else:  # prompt embeddings and the VAE follow the denoiser's device and dtype
        model_dir = sd21_pipeline(tmp_path)
        prompts = tmp_path / "prompts.txt"
        prompts.write_text("a red square\na blue circle\n")
    runs = {
        dtype: sample_model(
            model_dir,
            tmp_path / f"{dtype}.png",
            SampleConfig(n=4, steps=4, device="cpu", dtype=dtype, prompts=None if prompts is None else str(prompts)),
            progress=False,
        )
        for dtype in ("fp32", "bf16")
    }
    fp32, bf16 = runs["fp32"].images, runs["bf16"].images
    assert bf16.dtype == torch.float32 and torch.isfinite(bf16).all()
    assert not torch.equal(fp32, bf16)  # it really ran in bf16
    assert (fp32 - bf16).abs().mean() < 0.05  # … to bf16's precision
    assert runs["bf16"].memory.bytes > 0 and "CPU tensor memory" in runs["bf16"].memory.counts


def test_eval_in_bf16_records_device_and_dtype(tmp_path: Path) -> None:
    settings = EvalSettings(metrics=("latency",), n=2, steps=2, batch_size=2, device="cpu", dtype="bf16")
    report = evaluate_model(_saved(tmp_path), settings, progress=False)
    latency = report["metrics"]["latency_ms"]
    assert latency["device"] == "cpu" and latency["dtype"] == "bf16" and latency["value"] > 0


def test_eval_memory_metric_is_positive_and_grows_with_the_batch(tmp_path: Path) -> None:
    model_dir = _saved(tmp_path)

    def memory(batch: int) -> dict:
        settings = EvalSettings(metrics=("memory",), n=2, steps=2, batch_size=batch, device="cpu")
        return evaluate_model(model_dir, settings, progress=False)["metrics"]

    small, large = memory(1), memory(8)
    for key in ("peak_memory_bytes", "sampling_peak_memory_bytes"):
        assert 0 < small[key]["value"] < large[key]["value"], key
        assert small[key]["measures"].startswith("CPU tensor memory")
    # a batch-1 call of the tiny U-Net holds at least its 16×16 input and output in fp32
    assert small["peak_memory_bytes"]["value"] >= 2 * 3 * 16 * 16 * 4


def test_compress_on_a_device_in_bf16_keeps_fp32_weights_and_records_where(tmp_path: Path) -> None:
    model_dir = _saved(tmp_path)
    engine = get_engine("channels")
    config = engine.make_config(target_macs=0.6, importance="taylor", calibration_size=8)
    out = tmp_path / "pruned"
    compress_model("channels", model_dir, "digits", out, config, place=DeviceConfig("cpu", "bf16"), progress=False)
    entry = read_provenance(out).history[-1]
    assert (entry["device"], entry["dtype"]) == ("cpu", "bf16")
    assert abs(entry["achieved"]["macs"] - 0.6) <= 0.6 * config.tolerance
    assert {p.dtype for p in load(out).parameters()} == {torch.float32}


def _kd_run(out: Path, digits, *, checkpointing: bool, name: str) -> tuple[list[dict], int]:
    """Two fine-tune steps of a layer-removed student with output and feature KD; the log and how many forward
    calls the student's modules made."""
    torch.manual_seed(0)
    teacher = build_tiny(name).eval()
    student = copy.deepcopy(teacher)
    removable = [layer.name for layer in adapter_for(student).layers() if layer.removable]
    adapter_for(student).remove_layer(removable[-1])
    calls = [0]
    for module in student.modules():  # count forward calls (hooks may not run when checkpointing recomputes)

        def counted(*args, _forward=module.forward, **kwargs):
            calls[0] += 1
            return _forward(*args, **kwargs)

        module.forward = counted
    config = TrainConfig(
        steps=2, batch_size=4, log_every=1, warmup_steps=0, label_dropout=0.0, gradient_checkpointing=checkpointing
    )
    kd = KDConfig(mode="normalized", output_weight=1.0, feature_weight=1.0)
    train(student, digits, out, config, teacher=teacher, kd=kd, progress=False)
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()], calls[0]


@pytest.mark.parametrize("name", ["tiny-unet", "tiny-dit"])
def test_gradient_checkpointing_with_feature_kd_gives_the_same_losses(tmp_path: Path, digits, name: str) -> None:
    plain, plain_calls = _kd_run(tmp_path / "plain", digits, checkpointing=False, name=name)
    checked, checked_calls = _kd_run(tmp_path / "checked", digits, checkpointing=True, name=name)
    assert len(plain) == len(checked) == 2
    for before, after in zip(plain, checked, strict=True):
        for key in ("task", "out_kd", "feat_kd", "loss"):
            assert after[key] == pytest.approx(before[key], rel=1e-4, abs=1e-6), key
        assert after["feat_kd_terms"] == pytest.approx(before["feat_kd_terms"], rel=1e-4, abs=1e-6)
    assert checked_calls > plain_calls  # checkpointing was on: blocks ran again in each backward
    for record in checked:
        assert record["peak_memory_bytes"] > 0 and record["peak_memory_counts"]


def test_a_model_without_gradient_checkpointing_is_refused(tmp_path: Path, digits) -> None:
    class Plain(torch.nn.Module):
        """Not a diffusers model: no checkpointing of its own."""

    from slimdiff.training.loop import enable_gradient_checkpointing

    with pytest.raises(SlimdiffError, match="^Plain does not support gradient checkpointing; train it without"):
        enable_gradient_checkpointing(Plain())


def test_paused_feature_capture_records_nothing() -> None:
    from slimdiff.training.distill import FeatureCapture

    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    capture = FeatureCapture(model, ["0"])
    with capture.paused():  # as during a backward that recomputes checkpointed blocks
        model(torch.zeros(1, 2))
    assert capture.features == {}
    model(torch.ones(1, 2))
    assert [f.shape for f in capture.take()] == [torch.Size([1, 2])]
