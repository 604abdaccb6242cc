"""Image datasets: scikit-learn digits, class folders, lazily loaded items with crops; prompt files.

Every dataset yields `(image, label)` with `image` a float32 `[C, H, W]` tensor in [-1, 1]. Splits are
deterministic: they depend only on `seed` and the sorted item list, never on global RNG state.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
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
_DIGITS_SIZES = (8, 32)
FOLDER_SIZES = (8, 1024)
PIL_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


@dataclass(frozen=True)
class ImageItem:
    """One image of a lazily loaded dataset: `key` identifies its content (for caches), `name` is for messages."""

    key: str
    name: str
    open: Callable[[], Image.Image]


def file_item(path: Path) -> ImageItem:
    """An image file as an item, keyed by its resolved path, size and modification time."""
    stat = path.stat()
    return ImageItem(f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}", str(path), lambda: Image.open(path))


@dataclass(eq=False)
class ImageDataset(Dataset[tuple[torch.Tensor, int]]):
    """Labelled square images, held in memory (`images`) or loaded lazily (`items`; exactly one of the two).

    A captioned dataset has one caption per item (`captions`) and labels `0 … n-1` (an item's label is its own
    index, so the caption and SDXL micro-conditioning of each item can be looked up); `crops` holds each item's
    original (height, width) and crop (top, left) when its images were encoded from files. Lazily loaded images are
    resized on the short side and cropped to `size` (`crop` "center", or "random": one seeded crop per item, the
    same on every read), and mirrored where `flip` (one seeded coin per item).
    """

    source: str
    classes: list[str]
    size: int
    channels: int
    labels: list[int]
    images: torch.Tensor | None = None
    items: list[ImageItem] | None = None
    captions: list[str] | None = None
    crops: torch.Tensor | None = None
    crop: Literal["center", "random"] = "center"
    flip: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if (self.images is None) == (self.items is None):
            raise TypeError("ImageDataset needs exactly one of images= or items=")
        n = len(self.images) if self.images is not None else len(self.items or [])
        if n != len(self.labels):
            raise TypeError(f"ImageDataset got {n} images but {len(self.labels)} labels")
        if self.captions is not None and (len(self.captions) != n or self.labels != list(range(n))):
            raise TypeError("a captioned ImageDataset needs one caption per item and labels 0 … n-1")

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        label = self.labels[index]
        if self.images is not None:
            return self.images[index], label
        return self.load(index)[0], label

    def load(self, index: int) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
        """Item `index` as an image tensor, with its original (height, width) and crop (top, left) at `size`."""
        if self.items is None:
            return self.images[index], (self.size, self.size, 0, 0)
        item = self.items[index]
        rng = np.random.default_rng([self.seed, int(hashlib.sha256(item.key.encode()).hexdigest()[:8], 16)])
        return _load_image(item, self.size, self.channels, self.crop, rng, self.flip)

    def item_keys(self) -> list[str] | None:
        """What identifies each lazily loaded item's content (None for in-memory datasets)."""
        return None if self.items is None else [item.key for item in self.items]

    def subset(self, indices: list[int]) -> ImageDataset:
        """A dataset with the items at `indices`, in that order."""
        return dataclasses.replace(
            self,
            labels=list(range(len(indices))) if self.captions else [self.labels[i] for i in indices],
            images=self.images[indices] if self.images is not None else None,
            items=[self.items[i] for i in indices] if self.items is not None else None,
            captions=[self.captions[i] for i in indices] if self.captions else None,
            crops=self.crops[indices] if self.crops is not None else None,
        )

    def with_images(self, images: torch.Tensor, crops: torch.Tensor | None = None) -> ImageDataset:
        """The same items (labels, captions) held as `images` (e.g. their latents) in memory, with their `crops`."""
        return dataclasses.replace(
            self, images=images, items=None, size=images.shape[-1], channels=images.shape[1], crops=crops
        )


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


def check_size(size: int, source: str, limits: tuple[int, int]) -> None:
    lo, hi = limits
    if not isinstance(size, int) or isinstance(size, bool) or not lo <= size <= hi:
        raise SlimdiffError(f"size={size!r} is out of range for {source!r}; use an integer from {lo} to {hi}")


def digits_dataset(size: int, channels: int) -> ImageDataset:
    """scikit-learn's bundled 8x8 digits (no download), resized in memory."""
    from sklearn.datasets import load_digits

    check_size(size, "digits", _DIGITS_SIZES)
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


def folder_dataset(source: str, size: int, channels: int) -> ImageDataset:
    """A folder of class subfolders (one class each, sorted by name) or a flat folder (one class)."""
    root = Path(source).expanduser()
    if not root.exists():
        raise SlimdiffError(f"data source {source!r} does not exist; pass 'digits' or a folder of images")
    if not root.is_dir():
        raise SlimdiffError(
            f"data source {source!r} is a file; pass 'digits' or a folder of images (optionally in class subfolders)"
        )
    check_size(size, source, FOLDER_SIZES)

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
    verify_images(paths)
    items = [file_item(p) for p in paths]
    return ImageDataset(source=source, classes=classes, size=size, channels=channels, labels=labels, items=items)


def verify_images(paths: list[Path]) -> None:
    """Refuse the first image file that is empty or cannot be decoded, naming it."""
    for path in paths:
        try:
            if path.stat().st_size == 0:
                raise ValueError("the file is empty (0 bytes)")
            with Image.open(path) as im:
                im.verify()
        except PIL_ERRORS as e:
            raise unreadable(path, e) from None


def unreadable(name: str | Path, error: Exception) -> SlimdiffError:
    return SlimdiffError(f"image {str(name)!r} cannot be read ({type(error).__name__}: {error}); fix or remove it")


def _load_image(
    item: ImageItem, size: int, channels: int, crop: str, rng: np.random.Generator, flip: bool
) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """One image as a float32 [C, size, size] tensor in [-1, 1]: a square of the short side (centered, or at a
    random offset), resized (bicubic), mirrored when `flip` wins its coin; with its original (h, w) and the crop's
    (top, left) in the resized image (SDXL's micro-conditioning)."""
    try:
        with item.open() as im:
            im = ImageOps.exif_transpose(im).convert("L" if channels == 1 else "RGB")
            w, h = im.size
            s = min(w, h)
            if crop == "random":
                top, left = int(rng.integers(0, h - s + 1)), int(rng.integers(0, w - s + 1))
            else:
                top, left = (h - s) // 2, (w - s) // 2
            im = im.crop((left, top, left + s, top + s)).resize((size, size), Image.Resampling.BICUBIC)
            if flip and rng.random() < 0.5:
                im = ImageOps.mirror(im)
            array = np.asarray(im, dtype=np.float32)
    except PIL_ERRORS as e:
        raise unreadable(item.name, e) from None
    tensor = torch.from_numpy(array / 127.5 - 1.0)
    tensor = tensor.unsqueeze(0) if channels == 1 else tensor.permute(2, 0, 1).contiguous()
    return tensor, (h, w, round(top * size / s), round(left * size / s))
