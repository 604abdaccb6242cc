"""Reports: sample grids, Markdown tables, and the HTML comparison page (checked in headless Chromium)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from slimdiff.errors import SlimdiffError
from slimdiff.metrics.cost import LatencyStats, MacCount
from slimdiff.report import MARKER_COLOR, markdown_table, pareto_front, save_grid, write_compare_report

ROWS = [
    {"model": "teacher", "params": 1_234_567, "macs": 65_683_456, "latency_ms": 31.9, "fid": 12.3},
    {"model": "pruned-50", "params": 617_000, "macs": 33_000_000, "latency_ms": 17.2, "fid": 15.1},
    {"model": "layer-skip", "params": 900_000, "macs": 48_000_000, "latency_ms": None, "fid": 13.0},
    {"model": "tiny-student", "params": 300_000, "macs": 12_000_000, "latency_ms": 8.0},
]


def _grids(tmp_path: Path) -> dict[str, Path]:
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(8, 1, 16, 16, generator=generator) * 2 - 1
    return {
        "teacher (DDIM, 20 steps)": save_grid(images, tmp_path / "src" / "teacher.png", scale=2),
        "pruned-50": save_grid(-images, tmp_path / "src" / "pruned.png", scale=2),
    }


# -- existing helpers ------------------------------------------------------------------------------------------


def test_markdown_table_and_grid(tmp_path: Path) -> None:
    table = markdown_table([{"model": "a", "fid": 1.23456}, {"model": "b", "fid": None}])
    assert table.splitlines() == ["| model | fid |", "|---|---|", "| a | 1.235 |", "| b |  |"]
    path = save_grid(torch.zeros(4, 3, 8, 8), tmp_path / "g.png", scale=2)
    assert Image.open(path).size == (2 * (2 * 10 + 2), 2 * (2 * 10 + 2))


# -- HTML content, no browser ----------------------------------------------------------------------------------


def test_report_tabulates_every_row_and_key(tmp_path: Path) -> None:
    index = write_compare_report(ROWS, tmp_path / "report", quality_key="fid", grids=_grids(tmp_path))
    assert index == tmp_path / "report" / "index.html"
    page = index.read_text()
    rows = re.findall(r"<tr>(.*?)</tr>", page, re.S)
    assert len(rows) == 1 + len(ROWS)
    assert re.findall(r"<th>(.*?)</th>", rows[0]) == ["model", "params", "macs", "latency_ms", "fid"]
    teacher = re.sub(r"<[^>]+>", "|", rows[1])
    assert "teacher" in teacher and "1.23 M" in teacher and "65.7 M" in teacher and "31.9" in teacher
    assert "—" in rows[3] and "—" in rows[4]  # missing latency, missing fid
    assert "fid (lower is better)" in page
    names = sorted(p.name for p in index.parent.iterdir())
    assert names == [
        "grid-1-teacher-DDIM-20-steps.png",
        "grid-2-pruned-50.png",
        "index.html",
        "quality_vs_latency.png",
        "quality_vs_macs.png",
    ]
    assert not any(name.startswith(".") for name in names)  # no temporary files left behind


def test_pareto_front_keeps_the_points_nothing_beats() -> None:
    points = [("a", 1.0, 5.0), ("b", 2.0, 3.0), ("c", 3.0, 4.0), ("d", 4.0, 1.0), ("e", 2.0, 6.0)]
    assert [name for name, _, _ in pareto_front(points, direction=-1)] == ["a", "b", "d"]  # lower is better
    assert [name for name, _, _ in pareto_front(points, direction=1)] == ["a", "e"]  # higher is better


def test_report_draws_reference_curves_and_the_block_breakdown(tmp_path: Path) -> None:
    curve = [{"label": str(s), "macs": s * 1e6, "latency_ms": s * 2.0, "fid": 20.0 / s} for s in (2, 4, 8)]
    page = write_compare_report(
        ROWS,
        tmp_path,
        quality_key="fid",
        curves={"teacher, ddim over steps": curve},
        breakdown={"teacher": {"down": 2e6, "up": 3e6}, "pruned-50": {"down": 1e6}},
    ).read_text()
    assert page.count("teacher, ddim over steps") == 2  # noted under both plots
    breakdown = page.split('id="breakdown"')[1]
    assert "<td>down</td>" in breakdown and "2 M" in breakdown and "—" in breakdown  # pruned-50 has no 'up'


def test_report_says_which_rows_are_not_plotted(tmp_path: Path) -> None:
    page = write_compare_report(ROWS, tmp_path, quality_key="fid").read_text()
    assert "Not plotted: tiny-student (no fid)." in page
    assert "Not plotted: layer-skip (no latency_ms), tiny-student (no fid)." in page


def test_report_without_any_latency_skips_that_plot(tmp_path: Path) -> None:
    rows = [{k: v for k, v in row.items() if k != "latency_ms"} for row in ROWS]
    page = write_compare_report(rows, tmp_path, quality_key="fid").read_text()
    assert "No row has both latency_ms and fid: no plot." in page
    assert (tmp_path / "quality_vs_macs.png").is_file() and not (tmp_path / "quality_vs_latency.png").exists()
    assert "<h2>Samples</h2>" not in page


def test_report_escapes_html(tmp_path: Path) -> None:
    rows = [{"model": "<script>alert(1)</script>", "a&b": "<i>x</i>", "macs": 1e9, "clip_score": 0.3}]
    grids = {'"quoted" <caption>': _grids(tmp_path)["pruned-50"]}
    page = write_compare_report(rows, tmp_path / "r", quality_key="clip_score", grids=grids, title="A <b>").read_text()
    assert "<script>alert" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<th>a&amp;b</th>" in page and "&lt;i&gt;x&lt;/i&gt;" in page
    assert "<title>A &lt;b&gt;</title>" in page and "&quot;quoted&quot; &lt;caption&gt;" in page
    assert "clip_score (higher is better)" in page


def test_report_unwraps_cost_objects_and_odd_numbers(tmp_path: Path) -> None:
    stats = LatencyStats(12.5, 11.0, 14.0, 12.6, 0.5, 10, 3, 1, "cpu")
    rows = [
        {"model": "a", "macs": MacCount(2_000_000_000, 10), "latency_ms": stats, "fid": np.float64(3.5)},
        {"model": "b", "macs": np.int64(1_000_000_000), "latency_ms": float("nan"), "fid": True},
    ]
    page = write_compare_report(rows, tmp_path, quality_key="fid").read_text()
    assert "2 G" in page and "12.5" in page and "3.5" in page
    assert "b (no fid)" in page and "b (no latency_ms and fid)" in page


def test_report_leaves_other_files_alone_and_overwrites_itself(tmp_path: Path) -> None:
    keep = tmp_path / "model.safetensors"
    keep.write_bytes(b"weights")
    write_compare_report(ROWS, tmp_path, quality_key="fid")
    write_compare_report(ROWS[:2], tmp_path, quality_key="fid", title="second")
    assert keep.read_bytes() == b"weights"
    assert "<h1>second</h1>" in (tmp_path / "index.html").read_text()


def test_report_refuses_bad_input(tmp_path: Path) -> None:
    with pytest.raises(SlimdiffError, match="at least one row"):
        write_compare_report([], tmp_path, quality_key="fid")
    with pytest.raises(SlimdiffError, match="no row has quality_key 'kid'; row keys: fid, latency_ms, macs"):
        write_compare_report(ROWS, tmp_path, quality_key="kid")
    with pytest.raises(SlimdiffError, match="sample grid for 'x' not found"):
        write_compare_report(ROWS, tmp_path, quality_key="fid", grids={"x": tmp_path / "missing.png"})
    (tmp_path / "file").write_text("")
    with pytest.raises(SlimdiffError, match="not a directory"):
        write_compare_report(ROWS, tmp_path / "file", quality_key="fid")


# -- the page as a browser renders it --------------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _chromium(tmp_path: Path, *args: str) -> str:
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"
    command = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--window-size=1200,2000",
        *args,
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def _bands(mask: np.ndarray, gap: int) -> list[tuple[int, int]]:
    """Runs of indices where `mask` is true, merging runs closer than `gap`."""
    bands: list[tuple[int, int]] = []
    for index in np.flatnonzero(mask):
        if bands and index - bands[-1][1] <= gap:
            bands[-1] = (bands[-1][0], int(index))
        else:
            bands.append((int(index), int(index)))
    return bands


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (scripts/test.sh installs one)")
def test_report_renders_in_headless_chromium(tmp_path: Path) -> None:
    index = write_compare_report(ROWS, tmp_path / "report", quality_key="fid", grids=_grids(tmp_path))

    dom = _chromium(tmp_path, "--dump-dom", index.as_uri())
    cells = re.findall(r"<td[^>]*>(.*?)</td>", dom)
    for row in ROWS:
        assert row["model"] in cells
    images = {
        m["src"]: m for m in (dict(re.findall(r'([\w-]+)="([^"]*)"', tag)) for tag in re.findall(r"<img[^>]*>", dom))
    }
    assert set(images) >= {"quality_vs_macs.png", "quality_vs_latency.png", "grid-1-teacher-DDIM-20-steps.png"}
    for image in images.values():
        assert image.get("data-loaded") == "yes" and int(image["data-natural-width"]) > 0, image

    shot = tmp_path / "shot.png"
    _chromium(tmp_path, f"--screenshot={shot}", index.as_uri())
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert pixels.shape[:2] == (2000, 1200)
    marker = np.array([int(MARKER_COLOR[i : i + 2], 16) for i in (1, 3, 5)])
    is_marker = np.abs(pixels - marker).max(axis=2) <= 24
    boxes = {}
    for name, points in (("quality_vs_macs.png", 3), ("quality_vs_latency.png", 2)):
        left, top, width, height = map(int, images[name]["data-box"].split(","))
        assert width > 0 and height > 0 and top + height <= 2000 and left + width <= 1200, f"{name} off screen"
        boxes[name] = (left, top, width, height)
        # Every plotted row is a separate marker in this plot's box (their MACs and latencies all differ).
        inside = is_marker[top : top + height, left : left + width]
        assert len(_bands(inside.any(axis=0), gap=3)) == points, f"{name}: expected {points} markers"
    assert is_marker.sum() == sum(is_marker[t : t + h, x : x + w].sum() for x, t, w, h in boxes.values())
    assert boxes["quality_vs_latency.png"][1] >= sum(boxes["quality_vs_macs.png"][1::2])  # below, not overlapping
    # The table: its header row's grey background, above the first plot.
    header = np.all(pixels[: boxes["quality_vs_macs.png"][1]] == 240, axis=2)
    assert header.sum() > 2000, "table header not visible"
