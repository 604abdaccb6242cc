"""Every benchmark script still runs: its imports resolve and its arguments parse (`--help`), as documented
(`python benchmarks/NAME.py`), so a rename in the package cannot silently break a benchmark nobody reran."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

#: Runs each script as `python benchmarks/NAME.py --help` would — its folder first on sys.path, as `__main__` —
#: in one interpreter (torch and diffusers are imported once); prints the scripts that did not exit with 0.
HELP_ALL = """
import contextlib, io, runpy, sys
sys.path = [entry for entry in sys.path if entry not in ("", ".")]  # as for a script: its own folder, not the cwd
failed = []
for path in sys.argv[1:]:
    sys.argv = [path, "--help"]
    sys.path.insert(0, path.rsplit("/", 1)[0])
    try:
        with contextlib.redirect_stdout(io.StringIO()) as out:
            runpy.run_path(path, run_name="__main__")
        failed.append(f"{path}: no --help")
    except SystemExit as done:
        if done.code not in (0, None) or "usage" not in out.getvalue():
            failed.append(f"{path}: exit {done.code}")
    except Exception as error:
        failed.append(f"{path}: {type(error).__name__}: {error}")
print("\\n".join(failed))
"""


def test_every_benchmark_script_imports_and_parses_its_arguments(tmp_path: Path) -> None:
    scripts = sorted(str(path) for path in BENCHMARKS.glob("*.py"))
    assert len(scripts) >= 15
    command = [sys.executable, "-c", HELP_ALL, *scripts]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "", result.stdout
