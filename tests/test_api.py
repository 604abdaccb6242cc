"""The top-level API: the names resolve, `dir` lists them, and compress / finetune / evaluate work on in-memory
models as on folders, on the same settings dataclasses as the command line."""

import pytest
import torch

import slimdiff
from slimdiff.engines.channels import ChannelPruningConfig
from slimdiff.errors import SlimdiffError
from slimdiff.export import load, save
from slimdiff.metrics.cost import count_macs
from slimdiff.models import build_tiny
from slimdiff.models.base import count_params


def test_public_names_resolve() -> None:
    assert slimdiff.load is load
    for name in slimdiff.__all__:
        assert getattr(slimdiff, name) is not None
    with pytest.raises(AttributeError):
        slimdiff.compress_everything  # noqa: B018


def test_dir_lists_the_api() -> None:
    listed = dir(slimdiff)
    for name in ("compress", "finetune", "evaluate", "TrainConfig", "FinetuneConfig", "EvalSettings", "load"):
        assert name in listed and name in slimdiff.__all__


def _outputs(model: torch.nn.Module) -> torch.Tensor:
    x = torch.randn(2, model.config.in_channels, model.config.sample_size, model.config.sample_size)
    with torch.no_grad():
        return model(x, torch.tensor([10, 500])).sample


def test_compress_in_memory_and_from_a_folder_agree(tmp_path) -> None:
    teacher = build_tiny("tiny-unet").eval()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    config = ChannelPruningConfig(importance="magnitude", target_macs=0.5)
    in_memory = slimdiff.compress(teacher, config)
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())  # the source is untouched
    assert count_params(in_memory.model) < count_params(teacher)
    assert in_memory.achieved["macs"] == pytest.approx(0.5, rel=0.02)
    save(teacher, tmp_path / "teacher")
    saved = slimdiff.compress(tmp_path / "teacher", config, "digits", out=tmp_path / "pruned")
    torch.manual_seed(1)
    expected = _outputs(in_memory.model.eval())
    torch.manual_seed(1)
    assert torch.equal(_outputs(load(tmp_path / "pruned")), expected)  # magnitude: the same channels either way
    torch.manual_seed(1)
    assert torch.equal(_outputs(saved.model.eval()), expected)


def test_compress_refuses_a_config_of_no_engine() -> None:
    with pytest.raises(SlimdiffError, match="FinetuneConfig is no engine's settings; give one of .*ChannelPruning"):
        slimdiff.compress(build_tiny("tiny-unet"), slimdiff.FinetuneConfig())
    with pytest.raises(SlimdiffError, match="expected a model folder or a diffusers model"):
        slimdiff.compress(42, ChannelPruningConfig(target_macs=0.5))


def test_finetune_distils_an_in_memory_teacher(tmp_path) -> None:
    teacher = build_tiny("tiny-unet")
    student = slimdiff.compress(teacher, ChannelPruningConfig(importance="magnitude", target_macs=0.6)).model
    config = slimdiff.FinetuneConfig(steps=2, batch_size=8, log_every=1)
    result = slimdiff.finetune(student, config, teacher=teacher, out=tmp_path / "tuned")
    assert result.steps == 2 and "out_kd" in result.history[-1]  # output KD at the default weight
    assert count_params(load(tmp_path / "tuned")) == count_params(student)
    with pytest.raises(SlimdiffError, match="give the teacher once"):
        slimdiff.finetune(student, slimdiff.FinetuneConfig(teacher="somewhere"), teacher=teacher)
    with pytest.raises(SlimdiffError, match=r"invalid training setting kd_output_weight \('--kd-output-weight'\)"):
        slimdiff.finetune(student, slimdiff.FinetuneConfig(kd_output_weight=-1))


def test_evaluate_an_in_memory_model() -> None:
    model = build_tiny("tiny-unet")
    report = slimdiff.evaluate(model, slimdiff.EvalSettings(metrics=("macs",), steps=4))
    assert report["model"] == "(in memory)"
    assert report["metrics"]["macs"]["value"] == count_macs(model).total
    assert "4 ddim steps" in report["metrics"]["sampling_macs"]["counts"]
