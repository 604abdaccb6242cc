"""The training loop: exact resume after SIGKILL, 2-process agreement, KD losses, guardrails."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from slimdiff.data import load_data
from slimdiff.errors import SlimdiffError
from slimdiff.models import adapter_for, build_tiny
from slimdiff.settings import KDConfig, TrainConfig
from slimdiff.training.distill import capture, feature_kd_terms, output_kd_loss
from slimdiff.training.loop import batch_indices, train

HERE = Path(__file__).resolve().parent
CLI = [sys.executable, "-m", "slimdiff"]


@pytest.fixture(scope="module")
def digits():
    return load_data("digits", size=16)


def _train_cmd(out: Path, steps: int, *extra: str) -> list[str]:
    return [
        *CLI,
        "train",
        "--model",
        "tiny-dit",
        "--steps",
        str(steps),
        "--batch-size",
        "16",
        "--checkpoint-every",
        "3",
        "--seed",
        "3",
        "--out",
        str(out),
        *extra,
    ]


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path)


#: `python -c` this, then the `slimdiff` arguments: the command kills itself (SIGKILL) right after the checkpoint of
#: step KILL_AT is on disk — a known point, with no timer to race.
KILL_AT = 6
KILL_AFTER_CHECKPOINT = f"""
import os, signal, sys
import slimdiff.training.loop as loop
from slimdiff.cli import main

save = loop._save_checkpoint

def save_then_die(out_dir, step, *args, **kwargs):
    save(out_dir, step, *args, **kwargs)
    if step == {KILL_AT}:
        os.kill(os.getpid(), signal.SIGKILL)

loop._save_checkpoint = save_then_die
sys.argv = ["slimdiff", *sys.argv[1:]]
main()
"""


def test_sigkill_then_resume_is_bit_identical(tmp_path: Path) -> None:
    steps = 15
    subprocess.run(_train_cmd(tmp_path / "straight", steps), check=True, capture_output=True)

    killed = tmp_path / "killed"
    args = _train_cmd(killed, steps)[len(CLI) :]
    died = subprocess.run([sys.executable, "-c", KILL_AFTER_CHECKPOINT, *args], capture_output=True, text=True)
    assert died.returncode == -signal.SIGKILL, died.stderr
    assert sorted(p.name for p in (killed / "checkpoints").iterdir()) == ["step-00000003", "step-00000006"]
    assert not (killed / "slimdiff.json").exists()  # it really died mid-run
    subprocess.run(_train_cmd(killed, steps, "--resume"), check=True, capture_output=True)

    for name in (
        "diffusion_pytorch_model.safetensors",
        f"checkpoints/step-{steps:08d}/model.safetensors",
        f"checkpoints/step-{steps:08d}/optimizer.safetensors",
        f"checkpoints/step-{steps:08d}/ema.safetensors",
    ):
        a, b = _tensors(tmp_path / "straight" / name), _tensors(killed / name)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), f"{name} differs after resume"
    kept = sorted(p.name for p in (killed / "checkpoints").iterdir())
    assert kept == ["step-00000009", "step-00000012", "step-00000015"]  # the last three are kept


def test_two_gloo_processes_agree_and_resume(tmp_path: Path) -> None:
    command = ["torchrun", "--standalone", "--nproc_per_node", "2", str(HERE / "ddp_train_script.py"), str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([*command, "4"], check=True, capture_output=True, env=env, timeout=300)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world"] == 2 and r["type"] == "DistributedType.MULTI_CPU" for r in ranks)
    assert ranks[0]["digest"] == ranks[1]["digest"]
    assert {"task", "out_kd", "feat_kd"} <= set(ranks[0]["history"][-1])  # feature hooks survived DDP wrapping
    subprocess.run([*command, "6"], check=True, capture_output=True, env=env, timeout=300)
    resumed = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert resumed[0]["digest"] == resumed[1]["digest"] != ranks[0]["digest"]
    assert [h["step"] for h in resumed[0]["history"]] == [5, 6]  # continued, did not restart


def test_normalized_feature_kd_weighs_stages_equally() -> None:
    teacher = [torch.randn(4, 8, 4, 4), 1000 * torch.randn(4, 8, 4, 4)]
    student = [t * 1.1 for t in teacher]  # the same 10 % relative error at both scales
    normalized = feature_kd_terms(student, teacher, "normalized")
    plain = feature_kd_terms(student, teacher, "plain")
    assert normalized[0] == pytest.approx(normalized[1].item(), rel=1e-5)
    assert normalized[0] == pytest.approx(0.01, rel=1e-5)
    assert plain[1] / plain[0] == pytest.approx(1e6, rel=0.2)
    assert normalized == [feature_kd_terms([s], [t], "normalized")[0] for s, t in zip(student, teacher)]  # per stage
    assert output_kd_loss(torch.ones(2), torch.zeros(2)) == pytest.approx(1.0)
    with pytest.raises(SlimdiffError, match="matched, non-empty"):
        feature_kd_terms(student, teacher[:1], "plain")


def test_feature_capture_sees_block_outputs() -> None:
    model = build_tiny("tiny-unet").eval()
    adapter = adapter_for(model)
    with capture(model, ["module.down_blocks.1", "mid_block"]) as cap:  # a DDP-style prefix is accepted
        with torch.no_grad():
            model(**adapter.example_inputs(2))
        down, mid = cap.take()
    assert down.shape == (2, 64, 4, 4) and mid.shape == (2, 64, 4, 4)
    with pytest.raises(SlimdiffError, match="not found"):
        capture(model, ["up_blocks.7"]).__enter__()


def _poisoned_run(tmp_path: Path, digits, at_step: int) -> None:
    model = build_tiny("tiny-dit")

    def poison(step: int, _record: dict) -> None:
        if step == at_step:
            with torch.no_grad():
                next(model.parameters()).fill_(float("nan"))

    train(
        model,
        digits,
        tmp_path,
        TrainConfig(steps=8, batch_size=8, checkpoint_every=2, log_every=1),
        on_step=poison,
        progress=False,
    )


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path: Path, digits) -> None:
    with pytest.raises(
        SlimdiffError, match=r"loss became NaN/inf at step 4; .* last good checkpoint is .*step-00000002"
    ):
        _poisoned_run(tmp_path, digits, at_step=3)
    good = load_file(tmp_path / "checkpoints" / "step-00000002" / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in good.values())
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000002"]


def test_nan_parameters_are_never_checkpointed(tmp_path: Path, digits) -> None:
    with pytest.raises(SlimdiffError, match=r"a parameter became NaN/inf at step 4; .*step-00000002"):
        _poisoned_run(tmp_path, digits, at_step=4)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000002"]


def test_unwritable_output_is_reported_before_training(tmp_path: Path, digits) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(SlimdiffError, match="is not writable"):
        train(build_tiny("tiny-dit"), digits, blocker / "out", TrainConfig(steps=1), progress=False)


def test_too_little_disk_is_reported_before_training(tmp_path: Path, digits, monkeypatch) -> None:
    import shutil

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda _path: usage._replace(free=1 << 20))
    with pytest.raises(SlimdiffError, match="too little disk"):
        train(build_tiny("tiny-dit"), digits, tmp_path, TrainConfig(steps=1), progress=False)
    assert not (tmp_path / "checkpoints").exists()


def test_resume_with_other_settings_is_refused(tmp_path: Path, digits) -> None:
    train(build_tiny("tiny-dit"), digits, tmp_path, TrainConfig(steps=2, batch_size=8), progress=False)
    with pytest.raises(SlimdiffError, match="cannot resume .* its batch_size was 8, this run's is 4"):
        train(build_tiny("tiny-dit"), digits, tmp_path, TrainConfig(steps=4, batch_size=4), resume=True, progress=False)


def test_resume_refuses_another_lr_data_or_process_count(tmp_path: Path, digits) -> None:
    """Only the number of steps may change on resume: the lr, the data and the number of processes may not."""
    import copy

    config = TrainConfig(steps=2, batch_size=8)
    train(build_tiny("tiny-dit"), digits, tmp_path, config, progress=False)
    longer = dataclasses.replace(config, steps=4)
    faster = dataclasses.replace(longer, lr=config.lr * 2)
    with pytest.raises(SlimdiffError, match=f"cannot resume .* its lr was {config.lr!r}, this run's is {faster.lr!r}"):
        train(build_tiny("tiny-dit"), digits, tmp_path, faster, resume=True, progress=False)
    other = copy.copy(digits)
    other.source = "another dataset"
    with pytest.raises(SlimdiffError, match=f"its data was {digits.source!r}, this run's is 'another dataset'"):
        train(build_tiny("tiny-dit"), other, tmp_path, longer, resume=True, progress=False)
    (state_file,) = tmp_path.glob("checkpoints/*/state.json")
    state = json.loads(state_file.read_text())
    assert state["world"] == 1
    state_file.write_text(json.dumps(state | {"world": 2}))  # as a 2-process run would have recorded it
    with pytest.raises(SlimdiffError, match="its number of processes was 2, this run's is 1") as refused:
        train(build_tiny("tiny-dit"), digits, tmp_path, longer, resume=True, progress=False)
    assert "\n" not in str(refused.value)


def test_min_snr_setting_is_part_of_what_a_resume_must_share(tmp_path: Path, digits) -> None:
    train(build_tiny("tiny-dit"), digits, tmp_path, TrainConfig(steps=2, batch_size=8), progress=False)
    weighted = TrainConfig(steps=4, batch_size=8, snr_gamma=5.0)
    with pytest.raises(SlimdiffError, match="cannot resume .* its snr_gamma was None, this run's is 5.0"):
        train(build_tiny("tiny-dit"), digits, tmp_path, weighted, resume=True, progress=False)
    with pytest.raises(SlimdiffError, match="invalid training setting snr_gamma"):
        TrainConfig(steps=1, snr_gamma=0.0).validate()


def test_data_order_covers_every_item_once_per_epoch() -> None:
    first_epoch = batch_indices(10, 10, seed=0, first=0)
    assert sorted(first_epoch) == list(range(10))
    assert batch_indices(10, 4, seed=0, first=8) == first_epoch[8:] + batch_indices(10, 2, seed=0, first=10)
    assert batch_indices(10, 10, seed=0, first=10) != first_epoch  # reshuffled each epoch


def test_text_model_trains_with_its_own_text_encoder_and_samples(tmp_path: Path, monkeypatch, capsys) -> None:
    from slimdiff.cli import main

    out = tmp_path / "sd"
    monkeypatch.setattr(
        sys, "argv", ["slimdiff", "train", "--model", "tiny-sd", "--steps", "2", "--batch-size", "4", "--out", str(out)]
    )
    main()
    assert (out / "text_encoder").is_dir() and (out / "tokenizer").is_dir()
    spec = json.loads((out / "slimdiff.json").read_text())
    assert spec["conditioning"]["prompts"][3] == "a photo of the digit 3"
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "slimdiff",
            "sample",
            str(out),
            "--n",
            "2",
            "--steps",
            "2",
            "--guidance",
            "2",
            "--out",
            str(tmp_path / "g.png"),
        ],
    )
    main()
    assert (tmp_path / "g.png").is_file()


def _feature_gap(student: torch.nn.Module, teacher: torch.nn.Module, names: list[str]) -> float:
    """Normalized feature-KD between two models on one fixed batch."""
    inputs = adapter_for(teacher).example_inputs(8)
    inputs["timestep"] = torch.linspace(50, 950, 8).long()
    with capture(student, names) as s_cap, capture(teacher, names) as t_cap, torch.no_grad():
        student.eval()(**inputs)
        teacher(**inputs)
        return sum(feature_kd_terms(s_cap.take(), t_cap.take(), "normalized")).item()


def test_distillation_lowers_the_gap_to_the_teacher(tmp_path: Path, digits) -> None:
    teacher = build_tiny("tiny-unet").eval()
    student = build_tiny("tiny-unet")
    student.load_state_dict(teacher.state_dict())
    adapter_for(student).remove_layer("mid_block.resnets.1")
    names = [block.name for block in adapter_for(teacher).blocks()]
    before = _feature_gap(student, teacher, names)
    config = TrainConfig(steps=12, batch_size=16, lr=1e-4, warmup_steps=0, log_every=1, label_dropout=0.0)
    kd = KDConfig(mode="normalized", output_weight=10.0, feature_weight=100.0)  # KD dominates the task loss
    result = train(student, digits, tmp_path, config, teacher=teacher, kd=kd, progress=False)
    assert {"task", "out_kd", "feat_kd"} <= set(result.history[0])
    assert _feature_gap(result.model, teacher, names) < 0.8 * before


def test_channel_pruned_student_distils_from_same_shaped_blocks_only(tmp_path: Path, digits) -> None:
    from slimdiff.engines.channel_surgery import prune_copy
    from slimdiff.training.distill import default_feature_pairs

    teacher = build_tiny("tiny-unet").eval()
    # prune only the channels of up_blocks.0's upsampler: that block's output narrows, every other block's stays
    student = prune_copy(teacher, 0.0, "magnitude", boosted={"up_blocks.0.upsamplers.0.conv": 0.5}).model
    pairs = default_feature_pairs(adapter_for(student), adapter_for(teacher))
    all_blocks = [b.name for b in adapter_for(teacher).blocks()]
    assert [name for name, _ in pairs] == [name for name in all_blocks if name != "up_blocks.0"]
    result = train(
        student,
        digits,
        tmp_path,
        TrainConfig(steps=2, batch_size=8, log_every=1),
        teacher=teacher,
        kd=KDConfig(feature_weight=1.0),
        progress=False,
    )
    assert "feat_kd" in result.history[-1]
    with pytest.raises(SlimdiffError, match="student shape .* but teacher shape"):
        feature_kd_terms([torch.zeros(1, 2)], [torch.zeros(1, 3)], "plain")
