"""The layers hold: the exporter and the artifact layer import nothing of the engines, slimdiff's import graph has
no cycle (function-level imports included), and loading a model with a skip table imports the runtime only."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

from slimdiff.engines import skip
from slimdiff.export import save
from slimdiff.models import adapter_for, build_tiny
from slimdiff.training.diffusion import make_scheduler

ROOT = Path(__file__).resolve().parents[1]


def _modules() -> dict[str, Path]:
    """Every module of the slimdiff package: dotted name → file."""
    modules = {}
    for path in (ROOT / "slimdiff").rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The slimdiff modules a file imports anywhere in it (module level, in functions, under TYPE_CHECKING)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("slimdiff")}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("slimdiff"):
            for alias in node.names:  # `from package import module` imports the module, else the package
                found.add(f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module)
    return found


def test_the_exporter_and_the_artifact_layer_import_nothing_of_the_engines() -> None:
    modules = _modules()
    for name in ("slimdiff.export", "slimdiff.artifacts"):
        above = sorted(m for m in _imports(modules[name], modules) if m.split(".")[:2] == ["slimdiff", "engines"])
        assert above == [], f"{name} imports {above}"


def test_the_import_graph_has_no_cycle() -> None:
    modules = _modules()
    graph = {name: _imports(path, modules) & set(modules) for name, path in modules.items()}
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        if name in path:
            raise AssertionError("import cycle: " + " → ".join([*path[path.index(name) :], name]))
        if name in done:
            return
        for target in sorted(graph[name]):
            visit(target, [*path, name])
        done.add(name)

    for name in sorted(graph):
        visit(name, [])
    assert "slimdiff.artifacts" in graph["slimdiff.export"]  # the walk sees the imports it checks


def test_loading_a_model_with_a_skip_table_imports_the_runtime_only(tmp_path: Path) -> None:
    model = build_tiny("tiny-unet").eval()
    sched = make_scheduler("ddim")
    sched.set_timesteps(4)
    units = skip.model_units(adapter_for(model), "block")
    table = skip.SkipTable.full("DDIMScheduler", sched.timesteps.tolist(), units, "block")
    table.compute[2] = [False] * len(units)
    save(model, tmp_path / "m", artifacts={skip.ARTIFACT: table.to_json()})
    code = (
        "import json, sys, slimdiff\n"
        f"model = slimdiff.load({str(tmp_path / 'm')!r})\n"
        "from slimdiff.engines.skip import table_of\n"
        "print(json.dumps({'table': table_of(model).compute, 'modules': sorted(sys.modules)}))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    assert loaded["table"] == table.compute  # the table was attached on load
    skip_modules = sorted(m for m in loaded["modules"] if m.startswith("slimdiff.engines.skip."))
    assert skip_modules == ["slimdiff.engines.skip.runtime", "slimdiff.engines.skip.table"]
    engines = {m for m in loaded["modules"] if m.startswith("slimdiff.engines")}
    assert engines <= {"slimdiff.engines", "slimdiff.engines.base", "slimdiff.engines.skip", *skip_modules}
    assert not any(m.split(".")[0] == "torchmetrics" for m in loaded["modules"])  # the search's SSIM
