"""Sample grids, tables and plots."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from slimdiff.io import atomic_path


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
