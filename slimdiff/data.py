"""The data layer: labelled image datasets (scikit-learn digits or a folder of images) and prompt files.

Every dataset yields `(image, label)` with `image` a float32 `[C, H, W]` tensor in [-1, 1]. Splits are
deterministic: they depend only on `seed` and the sorted item list, never on global RNG state.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from slimdiff.errors import SlimdiffError

Split = Literal["train", "holdout", "all"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif")
_SPLITS = ("train", "holdout", "all")
_DIGITS_SIZES = (8, 32)
_FOLDER_SIZES = (8, 1024)
_PIL_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


class ImageDataset(Dataset[tuple[torch.Tensor, int]]):
    """Labelled square images, held in memory (`images`) or loaded lazily from files (`paths`)."""

    classes: list[str]
    size: int
    channels: int
    source: str

    def __init__(
        self,
        *,
        source: str,
        classes: list[str],
        size: int,
        channels: int,
        labels: list[int],
        images: torch.Tensor | None = None,
        paths: list[Path] | None = None,
    ) -> None:
        if (images is None) == (paths is None):
            raise TypeError("ImageDataset needs exactly one of images= or paths=")
        n = len(images) if images is not None else len(paths or [])
        if n != len(labels):
            raise TypeError(f"ImageDataset got {n} images but {len(labels)} labels")
        self.source = source
        self.classes = classes
        self.size = size
        self.channels = channels
        self._labels = labels
        self._images = images
        self._paths = paths

    def __len__(self) -> int:
        return len(self._labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        label = self._labels[index]
        if self._images is not None:
            return self._images[index], label
        assert self._paths is not None
        return _load_image(self._paths[index], self.size, self.channels), label

    def subset(self, indices: list[int]) -> ImageDataset:
        """A dataset with the items at `indices`, in that order."""
        return ImageDataset(
            source=self.source,
            classes=self.classes,
            size=self.size,
            channels=self.channels,
            labels=[self._labels[i] for i in indices],
            images=self._images[indices] if self._images is not None else None,
            paths=[self._paths[i] for i in indices] if self._paths is not None else None,
        )


def load_data(
    source: str,
    *,
    size: int = 16,
    channels: int = 1,
    split: Split = "train",
    holdout_fraction: float = 0.2,
    seed: int = 0,
) -> ImageDataset:
    """Load `source` ("digits" or a folder of images) as `size`x`size` images with `channels` channels.

    `split` picks the "train" part, the "holdout" part (the first `round(n * holdout_fraction)` items of a
    permutation drawn from `numpy.random.default_rng(seed)`), or "all" items.
    """
    if not isinstance(channels, int) or isinstance(channels, bool) or channels not in (1, 3):
        raise SlimdiffError(f"channels={channels!r} is not supported; use 1 (grayscale) or 3 (RGB)")
    if split not in _SPLITS:
        raise SlimdiffError(f"split={split!r} is not valid; use 'train', 'holdout' or 'all'")
    if (
        not isinstance(holdout_fraction, (int, float))
        or isinstance(holdout_fraction, bool)
        or not 0 <= holdout_fraction < 1
    ):
        raise SlimdiffError(f"holdout_fraction={holdout_fraction!r} is out of range; use a number in [0, 1)")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise SlimdiffError(f"seed={seed!r} is not valid; use a non-negative integer")

    dataset = _load_digits(size, channels) if source == "digits" else _load_folder(source, size, channels)
    if split == "all":
        return dataset

    n = len(dataset)
    order = np.random.default_rng(seed).permutation(n)
    n_holdout = round(n * holdout_fraction)
    chosen = order[:n_holdout] if split == "holdout" else order[n_holdout:]
    if len(chosen) == 0:
        raise SlimdiffError(
            f"the {split!r} split of {source!r} is empty ({n} images, holdout_fraction={holdout_fraction}); "
            "use split='all', change holdout_fraction, or add images"
        )
    return dataset.subset(sorted(chosen.tolist()))


def check_fits(dataset: ImageDataset, *, sample_size: int, in_channels: int) -> None:
    """Raise SlimdiffError unless the dataset's image size and channels match the model's."""
    if dataset.size != sample_size or dataset.channels != in_channels:
        raise SlimdiffError(
            f"data is {dataset.size}px {dataset.channels}-channel but the model expects "
            f"{sample_size}px {in_channels}-channel; pass size={sample_size} channels={in_channels}"
        )


def load_prompts(path: str | Path) -> list[str]:
    """Read a UTF-8 file with one prompt per line; blank lines and lines starting with '#' are skipped."""
    path = Path(path)
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise SlimdiffError(f"prompts file {str(path)!r} {what}; pass a UTF-8 text file with one prompt per line")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise SlimdiffError(
            f"prompts file {str(path)!r} is not UTF-8 text (bad byte at offset {e.start}); save it as UTF-8"
        ) from None
    except OSError as e:
        raise SlimdiffError(
            f"prompts file {str(path)!r} cannot be read ({e.strerror}); check its permissions"
        ) from None
    prompts = [s for s in (line.strip() for line in text.splitlines()) if s and not s.startswith("#")]
    if not prompts:
        raise SlimdiffError(
            f"prompts file {str(path)!r} has no prompts; write one prompt per line "
            "(blank lines and lines starting with '#' are skipped)"
        )
    return prompts


def class_prompts(classes: list[str]) -> list[str]:
    """The text prompt for each class: "a photo of the digit 3" for digit classes, else "a photo of a cat"."""
    if all(len(c) == 1 and c in "0123456789" for c in classes):
        return [f"a photo of the digit {c}" for c in classes]
    return [f"a photo of a {c}" for c in classes]


def _check_size(size: int, source: str, limits: tuple[int, int]) -> None:
    lo, hi = limits
    if not isinstance(size, int) or isinstance(size, bool) or not lo <= size <= hi:
        raise SlimdiffError(f"size={size!r} is out of range for {source!r}; use an integer from {lo} to {hi}")


def _load_digits(size: int, channels: int) -> ImageDataset:
    """scikit-learn's bundled 8x8 digits (no download), resized in memory."""
    from sklearn.datasets import load_digits

    _check_size(size, "digits", _DIGITS_SIZES)
    digits = load_digits()
    images = torch.from_numpy(digits.images).float().div_(16.0).unsqueeze(1)  # [N, 1, 8, 8] in [0, 1]
    if size != 8:
        images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    images = images.clamp_(0.0, 1.0).mul_(2.0).sub_(1.0)
    if channels == 3:
        images = images.repeat(1, 3, 1, 1)
    return ImageDataset(
        source="digits",
        classes=[str(name) for name in digits.target_names],
        size=size,
        channels=channels,
        labels=[int(t) for t in digits.target],
        images=images.contiguous(),
    )


def _is_image(path: Path) -> bool:
    return not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if _is_image(p))


def _load_folder(source: str, size: int, channels: int) -> ImageDataset:
    """A folder of class subfolders (one class each, sorted by name) or a flat folder (one class)."""
    root = Path(source).expanduser()
    if not root.exists():
        raise SlimdiffError(f"data source {source!r} does not exist; pass 'digits' or a folder of images")
    if not root.is_dir():
        raise SlimdiffError(
            f"data source {source!r} is a file; pass 'digits' or a folder of images (optionally in class subfolders)"
        )
    _check_size(size, source, _FOLDER_SIZES)

    try:
        top = _images_in(root)
        subfolders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        by_class = {d.name: files for d in subfolders if (files := _images_in(d))}
    except OSError as e:
        raise SlimdiffError(f"data folder {source!r} cannot be listed ({e}); check its permissions") from None
    if top and by_class:
        raise SlimdiffError(
            f"data folder {source!r} has images both at the top level and in subfolders "
            f"({', '.join(by_class)}); put all images in class subfolders, or all at the top level"
        )
    if not top and not by_class:
        raise SlimdiffError(
            f"data folder {source!r} has no images; accepted extensions are {' '.join(IMAGE_EXTENSIONS)} "
            "(directly in the folder, or one level down in class subfolders)"
        )
    if not by_class:
        by_class = {root.resolve().name or "images": top}

    classes = list(by_class)
    paths = [p for files in by_class.values() for p in files]
    labels = [label for label, files in enumerate(by_class.values()) for _ in files]
    for p in paths:
        try:
            with Image.open(p) as im:
                im.verify()
        except _PIL_ERRORS as e:
            raise _unreadable(p, e) from None
    return ImageDataset(source=source, classes=classes, size=size, channels=channels, labels=labels, paths=paths)


def _unreadable(path: Path, error: Exception) -> SlimdiffError:
    return SlimdiffError(f"image {str(path)!r} cannot be read ({type(error).__name__}: {error}); fix or remove it")


def _load_image(path: Path, size: int, channels: int) -> torch.Tensor:
    """Open one image file as a float32 [C, size, size] tensor in [-1, 1] (center crop, bicubic resize)."""
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im).convert("L" if channels == 1 else "RGB")
            w, h = im.size
            s = min(w, h)
            left, top = (w - s) // 2, (h - s) // 2
            im = im.crop((left, top, left + s, top + s)).resize((size, size), Image.Resampling.BICUBIC)
            array = np.asarray(im, dtype=np.float32)
    except _PIL_ERRORS as e:
        raise _unreadable(path, e) from None
    tensor = torch.from_numpy(array / 127.5 - 1.0)
    return tensor.unsqueeze(0) if channels == 1 else tensor.permute(2, 0, 1).contiguous()
