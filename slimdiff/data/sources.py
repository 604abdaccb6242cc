"""Where data comes from: `load_data` reads, as `DataConfig` (the data settings of every command) says, the bundled
digits, class folders, captioned `imagefolder` folders (`metadata.jsonl` / `metadata.csv`) and 🤗 `datasets`
folders written by `save_to_disk`.

Splits are deterministic: they depend only on `seed` and the sorted item list, never on global RNG state.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Literal

import numpy as np

from slimdiff.data.config import DataConfig
from slimdiff.data.images import (
    FOLDER_SIZES,
    ImageDataset,
    ImageItem,
    Split,
    check_size,
    digits_dataset,
    file_item,
    folder_dataset,
    verify_images,
)
from slimdiff.errors import SlimdiffError

#: Caption files of the `imagefolder` convention (diffusers' training scripts), looked for in this order.
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
#: The files `datasets.Dataset.save_to_disk` / `DatasetDict.save_to_disk` write at the top of their folder.
SAVED_DATASET_FILES = ("state.json", "dataset_dict.json")


def load_data(
    source: str | DataConfig,
    *,
    size: int = 16,
    channels: int = 1,
    split: Split = "train",
    holdout_fraction: float = 0.2,
    seed: int = 0,
    crop: Literal["center", "random"] = "center",
    flip: bool = False,
) -> ImageDataset:
    """Load `source` (see `DataConfig.data`) as `size`x`size` images with `channels` channels.

    `split` picks the "train" part, the "holdout" part (the first `round(n * holdout_fraction)` items of a
    permutation drawn from `numpy.random.default_rng(seed)`), or "all" items. Files are cropped per `crop` and
    mirrored per `flip` (one seeded draw per item, see `ImageDataset`).
    """
    config = DataConfig.of(source)
    if not isinstance(channels, int) or isinstance(channels, bool) or channels not in (1, 3):
        raise SlimdiffError(f"channels={channels!r} is not supported; use 1 (grayscale) or 3 (RGB)")
    if split not in ("train", "holdout", "all"):
        raise SlimdiffError(f"split={split!r} is not valid; use 'train', 'holdout' or 'all'")
    if (
        not isinstance(holdout_fraction, (int, float))
        or isinstance(holdout_fraction, bool)
        or not 0 <= holdout_fraction < 1
    ):
        raise SlimdiffError(f"holdout_fraction={holdout_fraction!r} is out of range; use a number in [0, 1)")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise SlimdiffError(f"seed={seed!r} is not valid; use a non-negative integer")

    dataset = _dataset(config, size, channels)
    dataset.crop, dataset.flip, dataset.seed = crop, flip, seed
    if split == "all":
        return dataset

    n = len(dataset)
    order = np.random.default_rng(seed).permutation(n)
    n_holdout = round(n * holdout_fraction)
    chosen = order[:n_holdout] if split == "holdout" else order[n_holdout:]
    if len(chosen) == 0:
        raise SlimdiffError(
            f"the {split!r} split of {config.data!r} is empty ({n} images, holdout_fraction={holdout_fraction}); "
            "use split='all', change holdout_fraction, or add images"
        )
    return dataset.subset(sorted(chosen.tolist()))


def is_captioned(source: str | DataConfig) -> bool:
    """Whether `source` is a captioned folder or a saved 🤗 dataset (rather than digits or class folders)."""
    root = Path(DataConfig.of(source).data).expanduser()
    return root.is_dir() and any((root / name).is_file() for name in METADATA_FILES + SAVED_DATASET_FILES)


def _dataset(config: DataConfig, size: int, channels: int) -> ImageDataset:
    if config.data == "digits":
        return digits_dataset(size, channels)
    root = Path(config.data).expanduser()
    if root.is_dir() and any((root / name).is_file() for name in SAVED_DATASET_FILES):
        return _saved_dataset(root, config, size, channels)
    metadata = (
        next((root / name for name in METADATA_FILES if (root / name).is_file()), None) if root.is_dir() else None
    )
    if metadata is not None:
        return _imagefolder(root, metadata, config, size, channels)
    return folder_dataset(config.data, size, channels)


def _columns_error(what: str, column: str, columns: list[str], setting: str) -> SlimdiffError:
    return SlimdiffError(
        f"{what} has no column {column!r}; its columns are {', '.join(columns) or '(none)'} (choose one with {setting})"
    )


def _metadata_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a `metadata.jsonl` (one JSON object a line) or `metadata.csv` (a header row)."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise SlimdiffError(f"{path} cannot be read as UTF-8 text ({error})") from None
    if path.suffix == ".csv":
        return list(csv.DictReader(text.splitlines()))
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise SlimdiffError(f"{path} line {number} is not JSON: {error}") from None
            if not isinstance(row, dict):
                raise SlimdiffError(f"{path} line {number} is not a JSON object")
            rows.append(row)
    return rows


def _imagefolder(root: Path, metadata: Path, config: DataConfig, size: int, channels: int) -> ImageDataset:
    """A captioned `imagefolder`: images anywhere under `root`, named with their captions in `metadata`."""
    check_size(size, config.data, FOLDER_SIZES)
    rows = _metadata_rows(metadata)
    if not rows:
        raise SlimdiffError(f"{metadata} lists no images; write one row per image (file_name + caption)")
    columns = list(rows[0])
    for column, setting in (
        ("file_name", "the imagefolder convention needs it"),
        (config.caption_column, "--caption-column"),
    ):
        if column not in columns:
            raise _columns_error(str(metadata), column, columns, setting)
    paths, captions = [], []
    for row in rows:
        path = root / str(row["file_name"])
        if not path.is_file():
            raise SlimdiffError(f"{metadata} names {row['file_name']!r}, which is not a file in {root}")
        caption = row.get(config.caption_column)
        if not isinstance(caption, str):
            raise SlimdiffError(f"{metadata}: the {config.caption_column!r} of {row['file_name']!r} is not text")
        paths.append(path)
        captions.append(caption)
    verify_images(paths)
    return _captioned(config, size, channels, [file_item(p) for p in paths], captions)


def _saved_dataset(root: Path, config: DataConfig, size: int, channels: int) -> ImageDataset:
    """A 🤗 dataset written by `save_to_disk` (a `DatasetDict` gives its `train` split): an image column, captions."""
    try:
        import datasets
    except ImportError:
        raise SlimdiffError(
            f"{root} is a 🤗 datasets folder; reading it needs the datasets package: pip install 'slimdiff[datasets]'"
        ) from None
    check_size(size, config.data, FOLDER_SIZES)
    loaded = datasets.load_from_disk(str(root))
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded and len(loaded) != 1:
            raise SlimdiffError(f"{root} holds the splits {', '.join(loaded)}; save the one to use as 'train'")
        loaded = loaded["train"] if "train" in loaded else next(iter(loaded.values()))
    columns = list(loaded.column_names)
    images = [name for name, feature in loaded.features.items() if isinstance(feature, datasets.Image)]
    if not images:
        raise SlimdiffError(f"{root} has no image column; its columns are {', '.join(columns)}")
    if config.caption_column not in columns:
        raise _columns_error(str(root), config.caption_column, columns, "--caption-column")
    image_column = images[0]
    captions = [str(c) for c in loaded[config.caption_column]]

    def item(i: int) -> ImageItem:
        return ImageItem(f"{loaded._fingerprint}:{i}", f"{root}[{i}]", lambda: loaded[i][image_column])

    return _captioned(config, size, channels, [item(i) for i in range(len(captions))], captions)


def _captioned(
    config: DataConfig, size: int, channels: int, items: list[ImageItem], captions: list[str]
) -> ImageDataset:
    """A captioned dataset: one item per caption, each its own label (no classes)."""
    return ImageDataset(
        source=config.data,
        classes=[],
        size=size,
        channels=channels,
        labels=list(range(len(items))),
        items=items,
        captions=captions,
    )
