"""Atomic file and directory writes, and the output policy of every command.

A reader never sees a half-written file, a crash never loses the old one, and what is written gets the modes a
plain `open` would give under the current umask (0644 files, 0755 folders under umask 022) — `mkstemp`'s 0600 and
`mkdtemp`'s 0700 are widened to those. `output_dir` / `check_output_file`: an output that holds anything is
refused unless the caller resumes the same run or overwrites it (built beside it, swapped in atomically).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slimdiff.errors import SlimdiffError

if TYPE_CHECKING:
    import torch


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def current_umask() -> int:
    """The process's umask (read from /proc where it exists, so that no other thread sees a changed umask)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _as_created(path: Path) -> None:
    """Give `path`, and all a folder holds, the modes `open`/`mkdir` would have given them under the current umask
    (writers such as `mkstemp`, `mkdtemp` and safetensors' `save_file` make them private)."""
    umask = current_umask()
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)
    if path.is_dir():
        for root, folders, files in os.walk(path):
            for name in folders:
                os.chmod(os.path.join(root, name), 0o777 & ~umask)
            for name in files:
                os.chmod(os.path.join(root, name), 0o666 & ~umask)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; whatever the block writes there replaces `path` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        _as_created(tmp)
        with tmp.open("rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` via a temporary file in the same directory and an atomic rename."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Write `obj` as indented JSON, atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


@contextmanager
def atomic_dir(path: str | Path, *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a fresh temporary directory that replaces `path` only if the block completes.

    On an exception the temporary directory is removed and any existing `path` is left untouched.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise SlimdiffError(f"output path {path} exists and is not a directory")
    if path.exists() and not overwrite:
        raise SlimdiffError(f"output directory {path} already exists")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        _as_created(tmp)
        _swap_in(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _swap_in(tmp: Path, path: Path) -> None:
    """Rename the finished folder `tmp` to `path`; an old `path` is moved aside first and removed only after."""
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    if old is not None:
        shutil.rmtree(old)


def _holds_something(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def _refusal(path: Path, what: str, flags: str) -> SlimdiffError:
    return SlimdiffError(f"{path} already holds {what}; pass {flags}, or choose another output")


@contextmanager
def output_dir(path: str | Path, *, resume: bool = False, overwrite: bool = False) -> Iterator[Path]:
    """The folder a command writes its result into; the one policy for every command's `--out`.

    An absent or empty `path` is used as it is. One that holds anything is refused unless `resume` (the block
    continues the run already there: it is yielded as it is) or `overwrite` (the sibling `.<name>.overwrite` is
    yielded, fresh, and swapped in for `path` only once the block completes; the old folder is removed after the
    swap, and on an error the old one is left untouched). Under `accelerate launch` every process gets the same
    folder; the main process creates, swaps and removes.
    """
    from accelerate import PartialState

    path, state = Path(path), PartialState()
    if resume and overwrite:
        raise SlimdiffError("--resume continues the run in the output and --overwrite replaces it: choose one")
    if path.exists() and not path.is_dir():
        raise SlimdiffError(f"output path {path} exists and is not a directory")
    replace = _holds_something(path) and not resume
    if replace and not overwrite:
        raise _refusal(path, "files", "--resume to continue the run there or --overwrite to replace it")
    state.wait_for_everyone()  # every process has looked before any writes
    work = path.with_name(f".{path.name}.overwrite") if replace else path
    created = not path.exists()
    if state.is_main_process:
        if replace:
            shutil.rmtree(work, ignore_errors=True)  # what an interrupted --overwrite left
        work.mkdir(parents=True, exist_ok=True)
    state.wait_for_everyone()
    try:
        yield work
        state.wait_for_everyone()
        if replace and state.is_main_process:
            _swap_in(work, path)
    except BaseException:
        if replace and state.is_main_process:
            shutil.rmtree(work, ignore_errors=True)
        elif created and state.is_main_process and not _holds_something(path):
            path.rmdir()  # a run that failed before writing anything leaves no empty folder behind
        raise
    state.wait_for_everyone()


def check_output_file(path: str | Path, *, overwrite: bool = False) -> Path:
    """Refuse, before any work, to replace an existing output file unless `overwrite` (writers then replace it
    atomically); refuse a folder in its place."""
    path = Path(path)
    if path.is_dir():
        raise SlimdiffError(f"output path {path} is a directory; give a file name")
    if path.exists() and not overwrite:
        raise _refusal(path, "a file", "--overwrite to replace it")
    return path


def sha256_file(path: str | Path) -> str:
    """SHA-256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_json(path: str | Path, what: str = "file") -> Any:
    """Read a JSON file, turning a missing or malformed file into a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise SlimdiffError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise SlimdiffError(f"{what} {path} is not valid JSON: {error}") from None


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """An optimizer's state as flat tensors (`"<param index>.<name>"`, for safetensors) and its param groups (JSON)."""
    state = optimizer.state_dict()
    tensors = {
        f"{index}.{key}": value.detach().cpu().contiguous()
        for index, per_param in state["state"].items()
        for key, value in per_param.items()
    }
    return tensors, state["param_groups"]


def load_optimizer_tensors(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], param_groups: list[dict[str, Any]]
) -> None:
    """Restore what `optimizer_tensors` returned."""
    per_param: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        per_param.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": per_param, "param_groups": param_groups})
