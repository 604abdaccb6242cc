"""Every benchmark script still runs: its imports resolve and its arguments parse (`--help`), as documented
(`python benchmarks/NAME.py`), so a rename in the package cannot silently break a benchmark nobody reran."""

from __future__ import annotations

import json
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


def test_skipping_report_puts_tables_and_diffusers_hooks_under_their_reference_sampler(tmp_path: Path) -> None:
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import skipping
    finally:
        sys.path.remove(str(BENCHMARKS))
    quality = {"fid": 1.0, "kid_mean": 0.01}
    sampler = lambda name, steps: {"key": f"{name}-{steps}", "kind": "sampler", "scheduler": name, "steps": steps}  # noqa: E731
    tables = [
        sampler("dpm", 20) | quality | {"sampling_macs": 20e9},
        sampler("dpm", 10) | quality | {"sampling_macs": 10e9},
        {"key": "dpm20-step-reuse-block-0.5-order2", "kind": "table", "ref_scheduler": "dpm", "ref_steps": 20}
        | {"fraction": 0.5, "method": "step-reuse", "granularity": "block", "forecast_order": 2}
        | {"kept_sampling_macs": 0.5, "fid": 2.5, "kid_mean": 0.02},
    ]
    hooks = [
        {"key": "dpm20-magcache-0.5", "kind": "hook", "hook": "magcache", "ref_scheduler": "dpm", "ref_steps": 20}
        | {"fraction": 0.5, "knob": "threshold", "value": 0.1234, "reached": False, "kept_sampling_macs": 0.61}
        | {"fid": 3.5, "kid_mean": 0.03},
        {"key": "first-block-refused", "kind": "hook", "hook": "first-block", "refused": "no transformer blocks"},
    ]
    paths = [tmp_path / "tables.json", tmp_path / "hooks.json"]
    for path, rows in zip(paths, (tables, hooks)):
        path.write_text(json.dumps({"rows": rows}))
    report = skipping.markdown(paths)
    assert "diffusers first-block: refused — no transformer blocks" in report
    section = report.split("### From DPM-Solver++-20 (FID 1.000)")[1]
    lines = [line for line in section.splitlines() if line.startswith("| 0.5")]
    assert [line.split("|")[2].strip() for line in lines] == [
        "dpm 10 steps",
        "step-reuse (block, forecast order 2)",
        "diffusers magcache (threshold = 0.123, cheapest found: target missed)",
    ]
    assert "| 3.5 |" in lines[2] and "not measured" not in lines[2]
