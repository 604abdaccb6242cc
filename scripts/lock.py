"""Write constraints.txt: the exact versions of slimdiff's dependency closure (with the test extra) installed here.

    python scripts/lock.py            # after the suite passed in this environment

Starts from the requirements in `pyproject.toml` (not the installed metadata, which may predate an edit), walks
the installed distributions' requirements honouring environment markers, and pins each to its installed version.
Local version labels (`2.13.0+cpu`) are dropped so that the pin resolves on PyPI too.
"""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
EXTRAS = {"test"}


def _key(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _project_requirements() -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return project["dependencies"] + [r for extra in EXTRAS for r in project["optional-dependencies"][extra]]


def closure(requirements: list[str]) -> dict[str, str]:
    """Installed name → version for everything `requirements` need, transitively."""
    found: dict[str, str] = {}
    todo: list[tuple[list[str], set[str]]] = [(requirements, set())]
    while todo:
        lines, wanted = todo.pop()
        for line in lines:
            req = Requirement(line)
            environments = [{"extra": e} for e in wanted] or [{"extra": ""}]
            if req.marker is not None and not any(req.marker.evaluate(env) for env in environments):
                continue
            key = _key(req.name)
            if key in found:
                continue
            try:
                found[key] = metadata.version(req.name)
            except metadata.PackageNotFoundError:
                continue  # an optional dependency not installed here
            todo.append((metadata.distribution(req.name).requires or [], set(req.extras)))
    return found


def main() -> None:
    pins = closure(_project_requirements())
    lines = [f"{name}=={version.split('+')[0]}" for name, version in sorted(pins.items())]
    header = "# Tested versions (python scripts/lock.py). Install with: pip install -c constraints.txt -e .[test]\n"
    (ROOT / "constraints.txt").write_text(header + "\n".join(lines) + "\n")
    print(f"{len(lines)} pins written to {ROOT / 'constraints.txt'}")


if __name__ == "__main__":
    main()
