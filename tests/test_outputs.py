"""Outputs: the one `--out` policy (refuse, resume, overwrite swapped in), file modes under the umask, and resumes
that extend a run's schedule."""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from diffusers.optimization import get_scheduler
from helpers import run_cli
from safetensors.torch import save_file

from slimdiff.data import class_prompts, load_data
from slimdiff.errors import SlimdiffError
from slimdiff.export import save
from slimdiff.io import atomic_dir, atomic_write_json, check_output_file, output_dir
from slimdiff.models import adapter_for, build_tiny
from slimdiff.report import write_compare_report
from slimdiff.settings import TrainConfig
from slimdiff.text import make_tiny_clip_text
from slimdiff.training.diffusion import DEFAULT_SCHEDULE
from slimdiff.training.loop import LOG_NAME, _resume, _setup, train


@pytest.fixture(scope="module")
def digits():
    return load_data("digits", size=16)


def _leftovers(folder: Path) -> list[str]:
    """Hidden siblings an overwrite could leave beside `folder`."""
    return sorted(p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}."))


# -- the --out policy ------------------------------------------------------------------------------------------------
def test_an_absent_or_empty_output_is_used_as_it_is(tmp_path: Path) -> None:
    with output_dir(tmp_path / "new") as work:
        assert work == tmp_path / "new" and work.is_dir()
    (tmp_path / "empty").mkdir()
    with output_dir(tmp_path / "empty") as work:
        assert work == tmp_path / "empty"


def test_an_output_that_holds_anything_is_refused_unless_resumed_or_overwritten(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / ".hidden").write_text("old")
    with pytest.raises(SlimdiffError, match="out already holds files; pass --resume .* or --overwrite"):
        with output_dir(out):
            pass
    with output_dir(out, resume=True) as work:  # the run there goes on, in place
        assert work == out and (work / ".hidden").read_text() == "old"
    with pytest.raises(SlimdiffError, match="choose one"):
        with output_dir(out, resume=True, overwrite=True):
            pass
    (tmp_path / "file").write_text("x")
    with pytest.raises(SlimdiffError, match="not a directory"):
        with output_dir(tmp_path / "file", overwrite=True):
            pass
    assert (out / ".hidden").read_text() == "old"


def test_overwrite_builds_beside_and_swaps_in_only_on_success(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.json").write_text("old")
    with pytest.raises(RuntimeError):
        with output_dir(out, overwrite=True) as work:
            (work / "new.json").write_text("half")
            raise RuntimeError("the new run fails")
    assert sorted(p.name for p in out.iterdir()) == ["old.json"] and _leftovers(out) == []
    with output_dir(out, overwrite=True) as work:
        assert work != out and work.parent == out.parent
        (work / "new.json").write_text("new")
        assert (out / "old.json").read_text() == "old"  # the old result stays until the new one is complete
    assert sorted(p.name for p in out.iterdir()) == ["new.json"] and _leftovers(out) == []


def test_an_existing_output_file_needs_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "grid.png"
    assert check_output_file(path) == path
    path.write_bytes(b"png")
    with pytest.raises(SlimdiffError, match="grid.png already holds a file; pass --overwrite"):
        check_output_file(path)
    assert check_output_file(path, overwrite=True) == path
    with pytest.raises(SlimdiffError, match="is a directory"):
        check_output_file(tmp_path, overwrite=True)


# -- modes -----------------------------------------------------------------------------------------------------------
@pytest.fixture(params=[0o022, 0o077], ids=["umask022", "umask077"])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def _modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mode & 0o777 for p in [root, *root.rglob("*")]}


def _expect_as_created(root: Path, umask: int) -> None:
    modes = _modes(root)
    wrong = {
        name: oct(mode) for name, mode in modes.items() if mode != (0o777 if (root / name).is_dir() else 0o666) & ~umask
    }
    assert not wrong, f"not as the umask {umask:03o} gives: {wrong}"


def test_every_writer_gives_the_modes_of_the_umask(tmp_path: Path, umask: int, digits) -> None:
    root = tmp_path / "written"
    root.mkdir()
    atomic_write_json(root / "a.json", {"a": 1})
    with atomic_dir(root / "folder") as tmp:  # mkdtemp's 0700 and safetensors' 0600, widened
        save_file({"x": torch.zeros(2)}, tmp / "t.safetensors")
        (tmp / "sub").mkdir()
    save(build_tiny("tiny-dit"), root / "model")
    write_compare_report([{"model": "a", "macs": 1.0, "fid": 2.0}], root / "report", quality_key="fid")
    train(build_tiny("tiny-dit"), digits, root / "run", TrainConfig(steps=1, batch_size=4), progress=False)
    assert (root / "run" / "checkpoints" / "step-00000001" / "model.safetensors").is_file()
    with output_dir(root / "model", overwrite=True) as work:
        atomic_write_json(work / "b.json", {})
    _expect_as_created(root, umask)


# -- resumes that extend -------------------------------------------------------------------------------------------
def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / LOG_NAME).read_text().splitlines()]


def _settings(**changes) -> dict:
    return {"batch_size": 4, "lr": 1e-3, "warmup_steps": 3, "checkpoint_every": 2, "log_every": 1, **changes}


def _run(out: Path, digits, steps: int, *, resume: bool = False, **changes) -> None:
    config = TrainConfig(steps=steps, **_settings(**changes))
    train(build_tiny("tiny-dit"), digits, out, config, resume=resume, progress=False)


def test_a_resume_extends_the_schedule_and_the_log_says_where(tmp_path: Path, digits) -> None:
    _run(tmp_path, digits, 4)
    shutil.copytree(tmp_path, tmp_path.with_name("copy"))
    copy, longer = tmp_path.with_name("copy"), TrainConfig(steps=8, **_settings())
    probe = _setup(build_tiny("tiny-dit"), digits, copy, longer, None, None, None, None, {})
    assert _resume(probe) == 4  # the first resumed step runs at the 8-step schedule's LR, not the 4-step one's end
    assert probe.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi / 5)), abs=1e-12)
    _run(tmp_path, digits, 8, resume=True)
    log = _log(tmp_path)
    event = next(record for record in log if record.get("event") == "resumed")
    assert event == {"event": "resumed", "step": 4, "steps_changed": {"from": 4, "to": 8}}
    assert [r["step"] for r in log if "loss" in r] == list(range(1, 9))

    def lrs(steps: int) -> list[float]:  # a fresh run's LR after each step
        optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
        scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=3, num_training_steps=steps)
        values = []
        for _ in range(steps):
            optimizer.step()
            scheduler.step()
            values.append(scheduler.get_last_lr()[0])
        return values

    logged = [r["lr"] for r in log if "loss" in r]
    assert logged[:4] == pytest.approx(lrs(4), abs=1e-12)  # the steps taken keep the LR they had
    assert logged[4:] == pytest.approx(lrs(8)[4:], abs=1e-12)  # from the resume on: the 8-step schedule
    state = json.loads((tmp_path / "checkpoints" / "step-00000008" / "state.json").read_text())
    assert state["steps"] == 8 and state["config"]["warmup_steps"] == 3


def test_a_warm_up_longer_than_the_run_is_recorded_as_given(tmp_path: Path, digits) -> None:
    _run(tmp_path, digits, 2, warmup_steps=100)
    _run(tmp_path, digits, 4, resume=True, warmup_steps=100)  # the same settings: nothing was clamped
    state = json.loads((tmp_path / "checkpoints" / "step-00000004" / "state.json").read_text())
    assert state["config"]["warmup_steps"] == 100
    assert [r["lr"] for r in _log(tmp_path) if "loss" in r][:2] == pytest.approx([5e-4, 1e-3])  # 2-step warm-up


def test_a_resume_with_another_setting_names_it_with_both_values(tmp_path: Path, digits) -> None:
    _run(tmp_path, digits, 2)
    with pytest.raises(SlimdiffError, match=r"its lr was 0\.001, this run's is 0\.002 \(only the number of steps"):
        _run(tmp_path, digits, 4, resume=True, lr=2e-3)
    with pytest.raises(SlimdiffError, match="its warmup_steps was 3, this run's is 5"):
        _run(tmp_path, digits, 4, resume=True, warmup_steps=5)


def test_a_resume_keeps_one_log_and_refuses_a_folder_without_checkpoints(tmp_path: Path, digits) -> None:
    _run(tmp_path / "run", digits, 4)
    for checkpoint in ("step-00000004",):  # as if killed after logging step 4, before its checkpoint
        for file in (tmp_path / "run" / "checkpoints" / checkpoint).iterdir():
            file.unlink()
        (tmp_path / "run" / "checkpoints" / checkpoint).rmdir()
    _run(tmp_path / "run", digits, 4, resume=True)
    steps = [r["step"] for r in _log(tmp_path / "run") if "loss" in r]
    assert steps == [1, 2, 3, 4]  # the records past the checkpoint were dropped, then written again
    save(build_tiny("tiny-dit"), tmp_path / "model")
    with pytest.raises(SlimdiffError, match="holds a saved model but no training checkpoint"):
        _run(tmp_path / "model", digits, 2, resume=True)


# -- the commands ----------------------------------------------------------------------------------------------------
def test_commands_replace_or_continue_only_when_asked(tmp_path: Path, monkeypatch, capsys) -> None:
    save(build_tiny("tiny-unet"), tmp_path / "m", scheduler_config=dict(DEFAULT_SCHEDULE))

    def cli(*args: object) -> tuple[int, str]:
        code, _, err = run_cli(monkeypatch, capsys, *args)
        assert "Traceback" not in err and (code == 0 or len(err.strip().splitlines()) == 1), err
        return code, err if code else ""  # a success's stderr is its progress bars

    compress = ("compress", "channels", tmp_path / "m", "--importance", "magnitude", "--target-params", "0.5")
    assert cli(*compress, "--out", tmp_path / "c") == (0, "")
    (tmp_path / "c" / "skip_table.json").write_text("{}")  # what a mixed folder would keep
    code, err = cli(*compress, "--target-params", "0.6", "--out", tmp_path / "c", "--resume")
    assert code == 2 and "started with other settings (target_params): 0.5 there, 0.6 now" in err
    assert cli(*compress, "--out", tmp_path / "c", "--overwrite") == (0, "")
    assert not (tmp_path / "c" / "skip_table.json").exists() and _leftovers(tmp_path / "c") == []

    train = ("train", "--model", "tiny-dit", "--batch-size", "4", "--checkpoint-every", "1", "--out", tmp_path / "t")
    assert cli(*train, "--steps", "2") == (0, "")
    assert cli(*train, "--steps", "3", "--resume") == (0, "")  # the default warm-up (100) is not rewritten
    assert {"event": "resumed", "step": 2, "steps_changed": {"from": 2, "to": 3}} in _log(tmp_path / "t")
    code, err = cli(*train, "--steps", "4", "--lr", "0.5", "--resume")
    assert code == 2 and "its lr was 0.001, this run's is 0.5 (only the number of steps may change)" in err
    assert cli(*train, "--steps", "1", "--overwrite") == (0, "")
    assert [r["step"] for r in _log(tmp_path / "t")] == [1]  # one run in the folder: the new one
    assert sorted(p.name for p in (tmp_path / "t" / "checkpoints").iterdir()) == ["step-00000001"]

    fast = ("--n", "2", "--steps", "2")
    assert cli("sample", tmp_path / "m", *fast, "--out", tmp_path / "g.png") == (0, "")
    assert cli("sample", tmp_path / "m", *fast, "--seed", "1", "--out", tmp_path / "g.png", "--overwrite") == (0, "")
    compare = ("compare", tmp_path / "m", "--metrics", "macs", *fast, "--out", tmp_path / "r")
    assert cli(*compare) == (0, "")
    recorded = (tmp_path / "r" / "eval-0.json").stat().st_mtime_ns
    assert cli(*compare, "--resume") == (0, "")
    assert (tmp_path / "r" / "eval-0.json").stat().st_mtime_ns == recorded  # reused, not measured again
    assert cli(*compare, "--overwrite") == (0, "")
    assert (tmp_path / "r" / "eval-0.json").stat().st_mtime_ns != recorded


def test_a_text_model_run_is_readable_by_others_under_umask_022(tmp_path: Path, monkeypatch, capsys) -> None:
    model = build_tiny("tiny-sd").eval()
    make_tiny_clip_text(tmp_path / "m", hidden_size=adapter_for(model).cross_attention_dim).save(tmp_path / "m")
    classes = [str(i) for i in range(10)]
    save(model, tmp_path / "m", conditioning={"classes": classes, "prompts": class_prompts(classes)})
    old = os.umask(0o022)
    try:
        code, _, err = run_cli(monkeypatch, capsys, "finetune", tmp_path / "m", "--steps", "1", "--batch-size", "4",
                               "--out", tmp_path / "out" / "f")  # fmt: skip
        assert code == 0, err
        code, _, err = run_cli(monkeypatch, capsys, "sample", tmp_path / "out" / "f", "--n", "2", "--steps", "2",
                               "--out", tmp_path / "out" / "g.png")  # fmt: skip
        assert code == 0, err
    finally:
        os.umask(old)
    assert (tmp_path / "out" / "f" / "text_encoder").is_dir()
    _expect_as_created(tmp_path / "out", 0o022)


def test_a_crash_mid_write_leaves_the_old_file(tmp_path: Path) -> None:
    """An atomic write that dies halfway leaves the previous file whole, and no temporary file beside it."""
    from slimdiff.io import atomic_path

    atomic_write_json(tmp_path / "a.json", {"a": 1})
    with pytest.raises(KeyboardInterrupt), atomic_path(tmp_path / "a.json") as tmp:
        tmp.write_text('{"a": 2, "trunc')
        raise KeyboardInterrupt
    assert json.loads((tmp_path / "a.json").read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]
