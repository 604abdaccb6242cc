"""Sample grids, tables, and the HTML comparison report (table, quality-vs-cost plots, sample grids)."""

from __future__ import annotations

import html
import math
import numbers
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from slimdiff.errors import SlimdiffError
from slimdiff.io import atomic_path, atomic_write_bytes


def grid_image(images: torch.Tensor, nrow: int | None = None, pad: int = 2) -> Image.Image:
    """Tile images `(n, C, H, W)` in [-1, 1] into one PIL image (`nrow` per row; default: square-ish)."""
    n, channels, height, width = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    canvas = np.zeros((rows * (height + pad) + pad, nrow * (width + pad) + pad, channels), dtype=np.uint8)
    for index, image in enumerate(pixels):
        r, c = divmod(index, nrow)
        top, left = pad + r * (height + pad), pad + c * (width + pad)
        canvas[top : top + height, left : left + width] = image
    return Image.fromarray(canvas[..., 0] if channels == 1 else canvas, mode="L" if channels == 1 else "RGB")


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None, scale: int = 1) -> Path:
    """Write a PNG sample grid atomically; `scale` enlarges small images (nearest neighbour)."""
    image = grid_image(images, nrow)
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    path = Path(path)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return path


def markdown_table(rows: list[dict[str, object]]) -> str:
    """A Markdown table from a list of dicts with the same keys."""
    if not rows:
        return ""
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(_fmt(row.get(k)) for k in keys) + " |" for row in rows]
    return "\n".join(lines)


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


# -- the comparison report --------------------------------------------------------------------------------------

#: Colour of the plotted points (distinctive, so a screenshot test can find the plots).
MARKER_COLOR = "#e6007e"

#: What the standard row keys count; shown under the table for the keys a report's rows carry.
COLUMN_NOTES: dict[str, str] = {
    "model": "model name",
    "params": "parameters (shared tensors counted once)",
    "macs": "multiply-accumulates of one denoiser call on one image (conv, linear and attention matmuls)",
    "sampling_macs": "MACs of one whole sampling run per image (all steps; ×2 per step with guidance)",
    "latency_ms": "median wall-clock time of one denoiser call (batch as measured), milliseconds",
    "sampling_latency_ms": "median wall-clock time of one whole sampling run, milliseconds",
    "peak_memory_bytes": "peak memory of one denoiser call beyond weights and inputs",
    "sampling_peak_memory_bytes": "peak memory of one whole sampling run beyond the weights",
}

#: Axis labels for the plotted keys (MAC axes get their unit, MMAC/GMAC/TMAC, from the data).
AXIS_LABELS: dict[str, str] = {
    "macs": "MACs per denoiser call, one image",
    "sampling_macs": "MACs per sampling run, one image",
    "latency_ms": "latency per denoiser call, median (ms)",
    "sampling_latency_ms": "latency per sampling run, median (ms)",
}

_LOWER_IS_BETTER = {"fid", "kid", "lpips", "mse", "loss"}
_HIGHER_IS_BETTER = {"clip", "psnr", "ssim", "is", "precision", "recall", "accuracy"}

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #222; }
table { border-collapse: collapse; margin: 12px 0; }
th, td { border: 1px solid #ccc; padding: 4px 10px; }
th { background: #f0f0f0; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.note { color: #8a4b00; }
.plots img { display: block; margin: 8px 0; }
.grids { display: flex; flex-wrap: wrap; gap: 16px; }
.grids figure { margin: 0; }
.grids img { width: 256px; image-rendering: pixelated; border: 1px solid #ccc; }
figcaption { text-align: center; font-size: 14px; }
dl { font-size: 14px; } dt { font-weight: bold; float: left; margin-right: 6px; }
"""

# Records whether each image loaded and where it was drawn (page pixels), so that a headless browser's DOM dump
# can be checked against its screenshot.
_SCRIPT = """
window.addEventListener("load", () => {
  for (const img of document.images) {
    const box = img.getBoundingClientRect();
    img.dataset.loaded = img.complete && img.naturalWidth > 0 ? "yes" : "no";
    img.dataset.naturalWidth = img.naturalWidth;
    img.dataset.box = [box.left + scrollX, box.top + scrollY, box.width, box.height].map(Math.round).join(",");
  }
});
"""


def _scalar(value: object) -> object:
    """Unwrap cost objects a row may carry: a `MacCount` is its total, a `LatencyStats` its median."""
    if hasattr(value, "median_ms"):
        return value.median_ms
    if hasattr(value, "total") and hasattr(value, "attention"):
        return value.total
    return value


def _number(value: object) -> float | None:
    """The value as a finite float, or None when it is missing, not a number, or NaN/inf."""
    value = _scalar(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    return float(value) if math.isfinite(value) else None


def _si(value: float) -> str:
    for factor, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.3g} {suffix}"
    return f"{value:.4g}"


def _format_cell(key: str, value: object) -> tuple[str, bool]:
    """A cell's display text and whether it is numeric."""
    value = _scalar(value)
    number = _number(value)
    if value is None or (number is None and isinstance(value, float)):
        return "—", False
    if isinstance(value, bool):
        return ("yes" if value else "no"), False
    if number is None:
        return str(value), False
    lowered = key.lower()
    if lowered.endswith("_bytes") or lowered.endswith("memory"):
        return f"{number / 2**20:.1f} MiB", True
    if lowered.endswith("_ms"):
        return f"{number:.1f}" if number >= 100 else f"{number:.3g}", True
    if "params" in lowered or "macs" in lowered:
        return _si(number), True
    return (str(int(value)) if isinstance(value, numbers.Integral) else f"{number:.4g}"), True


def _direction(key: str) -> int:
    """-1 where lower values of the metric are better, +1 where higher are, 0 when unknown."""
    words = set(re.split(r"[^a-z0-9]+", key.lower()))
    return -1 if words & _LOWER_IS_BETTER else 1 if words & _HIGHER_IS_BETTER else 0


def _quality_label(key: str) -> str:
    direction = _direction(key)
    return f"{key} (lower is better)" if direction < 0 else f"{key} (higher is better)" if direction > 0 else key


def pareto_front(points: list[tuple[str, float, float]], direction: int) -> list[tuple[str, float, float]]:
    """The (name, cost, quality) points that no other point beats on both: lower cost, and quality better in
    `direction` (-1: lower is better, +1: higher is better); ordered by cost."""
    front: list[tuple[str, float, float]] = []
    for point in sorted(points, key=lambda p: (p[1], -direction * p[2])):
        if not front or direction * point[2] > direction * front[-1][2]:
            front.append(point)
    return front


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.")[:40] or "grid"


#: Colours of the reference curves (e.g. the teacher over sampler step counts); none is `MARKER_COLOR`.
CURVE_COLORS = ("#1f77b4", "#2ca02c", "#9467bd", "#8c564b")


def _scatter(
    points: list[tuple[str, float, float]],
    x_label: str,
    y_label: str,
    title: str,
    path: Path,
    *,
    log_x: bool,
    curves: Mapping[str, list[tuple[str, float, float]]],
    direction: int,
) -> None:
    """Labelled model points, their Pareto front and the reference curves, written atomically as PNG
    (matplotlib's Agg canvas; no pyplot global state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for (name, curve), color in zip(curves.items(), CURVE_COLORS * 4):
        ax.plot([x for _, x, _ in curve], [y for _, _, y in curve], "o-", color=color, ms=4, lw=1.2, label=name)
        for label, x, y in curve:
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(3, -10), fontsize=7, color=color)
    front = pareto_front(points, direction) if direction else []
    if len(front) > 1:
        xs, ys = [x for _, x, _ in front], [y for _, _, y in front]
        ax.step(xs, ys, where="post", ls="--", color="#888888", lw=1, label="Pareto front of the models")
    ax.scatter([x for _, x, _ in points], [y for _, _, y in points], s=60, color=MARKER_COLOR, zorder=3)
    for name, x, y in points:
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(6, 6), fontsize=9)
    if log_x:
        ax.set_xscale("log")
    if curves or len(front) > 1:
        ax.legend(fontsize=8, loc="best")
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.margins(0.15)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


def _points(rows: list[Mapping[str, Any]], names: list[str], x_key: str, y_key: str) -> list[tuple[str, float, float]]:
    """(name, x, y) of the rows that have both numbers."""
    pairs = ((name, _number(row.get(x_key)), _number(row.get(y_key))) for name, row in zip(names, rows))
    return [(name, x, y) for name, x, y in pairs if x is not None and y is not None]


def _plot_section(
    rows: list[dict[str, Any]],
    name_key: str,
    x_key: str,
    quality_key: str,
    out_dir: Path,
    filename: str,
    what: str,
    curves: Mapping[str, list[Mapping[str, Any]]],
) -> str:
    """Plot `quality_key` against `x_key` for the rows that have both, over the reference curves; the HTML for it,
    noting rows left out."""
    names = [str(row.get(name_key, f"row {i + 1}")) for i, row in enumerate(rows)]
    points = _points(rows, names, x_key, quality_key)
    plotted = {name for name, _, _ in points}
    missing = [
        f"{name} (no {' and '.join(k for k in (x_key, quality_key) if _number(row.get(k)) is None)})"
        for name, row in zip(names, rows)
        if name not in plotted
    ]
    curve_points = {
        name: _points(curve, [str(point.get("label", "")) for point in curve], x_key, quality_key)
        for name, curve in curves.items()
    }
    curve_points = {name: found for name, found in curve_points.items() if found}
    parts = [f"<h2>{html.escape(_quality_label(quality_key))} vs {html.escape(what)}</h2>"]
    if points:
        label, scale = AXIS_LABELS.get(x_key, x_key), 1.0
        xs = [x for _, x, _ in points] + [x for curve in curve_points.values() for _, x, _ in curve]
        if "macs" in x_key.lower():
            scale, unit = next(((f, u) for f, u in ((1e12, "T"), (1e9, "G"), (1e6, "M")) if max(xs) >= f), (1.0, ""))
            label = f"{label} ({unit}MAC)"
        log_x = min(xs) > 0 and max(xs) / min(xs) > 20

        def scaled(found: list[tuple[str, float, float]]) -> list[tuple[str, float, float]]:
            return [(name, x / scale, y) for name, x, y in found]

        _scatter(
            scaled(points),
            label,
            _quality_label(quality_key),
            f"{quality_key} vs {what}",
            out_dir / filename,
            log_x=log_x,
            curves={name: scaled(curve) for name, curve in curve_points.items()},
            direction=_direction(quality_key),
        )
        alt = f"{quality_key} vs {what}"
        parts.append(f'<img class="plot" src="{html.escape(filename)}" alt="{html.escape(alt)}">')
        if curve_points:
            parts.append(
                '<p class="curve-note">Lines: '
                + html.escape("; ".join(curve_points))
                + ", each point labelled by its number of sampler steps. A compressed model is worth shipping only"
                " where it beats that curve at its own cost.</p>"
            )
    else:
        parts.append(
            f'<p class="note">No row has both {html.escape(x_key)} and {html.escape(quality_key)}: no plot.</p>'
        )
    if missing:
        parts.append(f'<p class="note">Not plotted: {html.escape(", ".join(missing))}.</p>')
    return "\n".join(parts)


def _breakdown_table(breakdown: Mapping[str, Mapping[str, float]]) -> str:
    """MACs per block: one row per block, one column per model (a block a model lacks shows —)."""
    models = list(breakdown)
    blocks = list(dict.fromkeys(block for per_model in breakdown.values() for block in per_model))
    header = "<th>block</th>" + "".join(f"<th>{html.escape(model)}</th>" for model in models)
    body = []
    for block in blocks:
        cells = [f"<td>{html.escape(block)}</td>"]
        for model in models:
            text, numeric = _format_cell("macs", breakdown[model].get(block))
            cells.append(f"<td{' class=num' if numeric else ''}>{html.escape(text)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    rows = "\n".join(body)
    table = f'<table id="breakdown">\n<thead><tr>{header}</tr></thead>\n<tbody>\n{rows}\n</tbody>\n</table>'
    return f"<h2>MACs per block</h2>\n{table}"


def write_compare_report(
    rows: list[dict[str, Any]],
    out_dir: str | Path,
    *,
    quality_key: str,
    grids: Mapping[str, str | Path] | None = None,
    title: str = "slimdiff model comparison",
    name_key: str = "model",
    macs_key: str = "macs",
    latency_key: str = "latency_ms",
    notes: Mapping[str, str] | None = None,
    curves: Mapping[str, list[Mapping[str, Any]]] | None = None,
    breakdown: Mapping[str, Mapping[str, float]] | None = None,
) -> Path:
    """Write `out_dir/index.html`: a table of `rows`, quality-vs-MACs and quality-vs-latency plots, sample grids.

    Each row is one model: `name_key` names it, `macs_key` and `latency_key` hold its cost (see `COLUMN_NOTES`
    for what the standard keys count), `quality_key` its quality metric; every key any row has becomes a column.
    Rows missing a value are tabulated and left out of the plot that needs it, and the page says so. Each plot
    draws the models' Pareto front. `curves` are reference lines in both plots — e.g. `{"teacher, DDIM": [{"label":
    "13", "sampling_macs": …, "fid": …}, …]}`, the teacher over sampler step counts — with the same keys as the
    rows. `breakdown` maps model names to MACs per block (a table). `grids` maps captions to sample-grid images,
    copied beside the page. `notes` adds or overrides column descriptions. Every file is written atomically (the
    page last); other files in `out_dir` are left alone.
    """
    if not rows:
        raise SlimdiffError("write_compare_report needs at least one row (one per model)")
    if not all(isinstance(row, Mapping) for row in rows):
        raise SlimdiffError("write_compare_report rows must be dicts (column name → value)")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise SlimdiffError(f"report output path {out_dir} exists and is not a directory")
    grid_sources = {str(caption): Path(path) for caption, path in (grids or {}).items()}
    for caption, path in grid_sources.items():
        if not path.is_file():
            raise SlimdiffError(f"sample grid for '{caption}' not found: {path}")
    if not any(quality_key in row for row in rows):
        keys = sorted({key for row in rows for key in row})
        raise SlimdiffError(f"no row has quality_key '{quality_key}'; row keys: {', '.join(keys)}")
    out_dir.mkdir(parents=True, exist_ok=True)

    columns = list(dict.fromkeys(key for row in rows for key in row))
    header = "".join(f"<th>{html.escape(str(key))}</th>" for key in columns)
    body = []
    for row in rows:
        cells = []
        for key in columns:
            text, numeric = _format_cell(key, row.get(key))
            raw = _scalar(row.get(key))
            tip = f' title="{html.escape(str(raw))}"' if numeric and text != str(raw) else ""
            cells.append(f"<td{' class=num' if numeric else ''}{tip}>{html.escape(text)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    descriptions = {**COLUMN_NOTES, **(notes or {})}
    definitions = "".join(
        f"<dt>{html.escape(key)}</dt><dd>{html.escape(descriptions[key])}</dd>"
        for key in columns
        if key in descriptions
    )

    curves = curves or {}
    plots = [
        _plot_section(rows, name_key, macs_key, quality_key, out_dir, "quality_vs_macs.png", "MACs", curves),
        _plot_section(rows, name_key, latency_key, quality_key, out_dir, "quality_vs_latency.png", "latency", curves),
    ]

    figures = []
    for index, (caption, source) in enumerate(grid_sources.items(), start=1):
        name = f"grid-{index}-{_slug(caption)}{source.suffix.lower() or '.png'}"
        with atomic_path(out_dir / name) as tmp:
            shutil.copyfile(source, tmp)
        src = html.escape(name)
        figures.append(
            f'<figure><a href="{src}"><img src="{src}" alt="{html.escape(caption)}"></a>'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        )

    page = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{html.escape(title)}</title>
<style>{_STYLE}</style>
<script>{_SCRIPT}</script>
</head>
<body>
<h1>{html.escape(title)}</h1>
<table id="models">
<thead><tr>{header}</tr></thead>
<tbody>
{chr(10).join(body)}
</tbody>
</table>
<dl>{definitions}</dl>
<div class="plots">
{chr(10).join(plots)}
</div>
{_breakdown_table(breakdown) if breakdown else ""}
{"<h2>Samples</h2>" + chr(10) + '<div class="grids">' + "".join(figures) + "</div>" if figures else ""}
</body>
</html>
"""
    index_path = out_dir / "index.html"
    atomic_write_bytes(index_path, page.encode("utf-8"))
    return index_path
