"""Feature KD for channel-pruned students: the teacher's block outputs taken at the channels the student kept."""

from __future__ import annotations

from pathlib import Path

import torch

from slimdiff.engines.channel_surgery import prune_copy
from slimdiff.engines.channels import ChannelPruningConfig, block_channels
from slimdiff.export import read_provenance, save
from slimdiff.jobs.compression import compress_model
from slimdiff.jobs.training import finetune_model, kept_block_channels
from slimdiff.models import adapter_for, build_tiny
from slimdiff.settings import KDConfig, TrainConfig
from slimdiff.training.distill import KeptChannels, at_kept_channels, capture, default_feature_pairs


def test_kept_channels_pick_the_teacher_channels_the_student_computes() -> None:
    """Hand-checked case: only up_blocks.0's upsampler loses output channels, so everything before it is the
    teacher's own computation and the student's up_blocks.0 output must be the teacher's at the kept indices."""
    teacher = build_tiny("tiny-unet").eval()
    pruned = prune_copy(teacher, 0.0, "magnitude", boosted={"up_blocks.0.upsamplers.0.conv": 0.5})
    record = block_channels(teacher, pruned)
    assert list(record) == ["up_blocks.0"]
    kept = record["up_blocks.0"]["kept"]
    assert kept == pruned.kept[("up_blocks.0.upsamplers.0.conv", "out")] and record["up_blocks.0"]["of"] == 64
    assert len(kept) == 32 and kept != list(range(32))  # magnitude picked its own channels, not the first half
    inputs = adapter_for(teacher).example_inputs(2)
    features = []
    for model in (pruned.model, teacher):
        with capture(model, ["up_blocks.0"]) as cap, torch.no_grad():
            model(**inputs)
            features.append(cap.take()[0])
    student, full = features
    channels = {"up_blocks.0": KeptChannels(tuple(kept), 64)}
    sliced = at_kept_channels([full], ["up_blocks.0"], channels, dim=1)[0]
    assert torch.equal(sliced, full[:, kept]) and torch.allclose(student, sliced, atol=1e-6)
    assert not torch.allclose(student, full[:, :32], atol=1e-3)  # the first 32 channels would be the wrong ones
    pairs = default_feature_pairs(adapter_for(pruned.model), adapter_for(teacher), channels)
    assert ("up_blocks.0", "up_blocks.0") in pairs and len(pairs) == len(adapter_for(teacher).blocks())


def test_channel_pruned_student_distils_features_at_the_kept_channels(tmp_path: Path) -> None:
    save(build_tiny("tiny-unet"), tmp_path / "teacher")
    config = ChannelPruningConfig(importance="magnitude", target_macs=0.5)
    compress_model("channels", tmp_path / "teacher", "digits", tmp_path / "student", config)
    kept = kept_block_channels(read_provenance(tmp_path / "student"))
    assert kept and all(len(k.indices) < k.width for k in kept.values())
    train_config = TrainConfig(steps=8, batch_size=16, lr=1e-3, warmup_steps=0, log_every=1)
    result = finetune_model(
        tmp_path / "student", "digits", tmp_path / "tuned", train_config, teacher_dir=tmp_path / "teacher",
        kd=KDConfig(feature_weight=1.0), progress=False,
    )  # fmt: skip
    feature_kd = [record["feat_kd"] for record in result.history]
    assert all(torch.isfinite(torch.tensor(feature_kd)))
    assert sum(feature_kd[-3:]) < sum(feature_kd[:3])
