"""The repository stands alone: nothing in its code, docs, recipes or install files points outside it."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: What points outside a user's clone: the workplace's shared folder and its files.
OUTSIDE = ("../shared", "METHODS.md", "DESIGN.md")
#: One machine's folders: code and docs name run folders relative to the project (benchmark results, which record
#: where each measurement ran, are data and may name them).
MACHINE = ("/work/", "/tmp/")


def test_no_tracked_file_points_outside_the_repository() -> None:
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    offenders = []
    for name in tracked:
        path = ROOT / name
        if path.suffix not in {".py", ".md", ".yaml", ".toml", ".sh", ".txt", ".json"} or path == Path(__file__):
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        needles = OUTSIDE if name.startswith("benchmarks/results/") else OUTSIDE + MACHINE
        offenders += [f"{name}: {needle}" for needle in needles if needle in text]
    assert offenders == []
