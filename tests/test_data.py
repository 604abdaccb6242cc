"""Tests for slimdiff.data: digits, image-folder and captioned datasets, deterministic splits, prompt files."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import CAPTIONS, captioned_folder, odd_images
from PIL import Image

from slimdiff.data import DataConfig, ImageDataset, check_fits, class_prompts, load_data, load_prompts
from slimdiff.errors import SlimdiffError

N_DIGITS = 1797


def _all_images(ds: ImageDataset) -> torch.Tensor:
    return torch.stack([ds[i][0] for i in range(len(ds))])


def _all_labels(ds: ImageDataset) -> list[int]:
    return [ds[i][1] for i in range(len(ds))]


# --- digits -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [8, 16, 32])
@pytest.mark.parametrize("channels", [1, 3])
def test_digits_shapes_and_range(size: int, channels: int) -> None:
    ds = load_data("digits", size=size, channels=channels, split="all")
    assert isinstance(ds, ImageDataset)
    assert len(ds) == N_DIGITS
    assert (ds.size, ds.channels, ds.source) == (size, channels, "digits")
    image, label = ds[0]
    assert image.shape == (channels, size, size)
    assert image.dtype == torch.float32
    assert isinstance(label, int)
    images = _all_images(ds)
    assert images.min() >= -1.0 and images.max() <= 1.0
    # Digits have both empty background (0 -> -1) and ink; resizing keeps a real spread of values.
    assert images.min() < -0.99 and images.max() > 0.9
    if channels == 3:
        assert torch.equal(images[:, 0], images[:, 1]) and torch.equal(images[:, 0], images[:, 2])


def test_digits_size_8_is_exact_rescale() -> None:
    from sklearn.datasets import load_digits

    raw = load_digits()
    ds = load_data("digits", size=8, split="all")
    expected = torch.from_numpy(raw.images[5]).float() / 8.0 - 1.0
    assert torch.allclose(ds[5][0][0], expected)
    assert ds[5][1] == int(raw.target[5])


def test_digits_labels_and_classes() -> None:
    ds = load_data("digits", split="all")
    assert ds.classes == [str(i) for i in range(10)]
    labels = _all_labels(ds)
    assert set(labels) == set(range(10))
    assert all(type(label) is int for label in labels)


def test_split_partitions_all_without_overlap() -> None:
    train = load_data("digits", split="train", size=8)
    holdout = load_data("digits", split="holdout", size=8)
    full = load_data("digits", split="all", size=8)
    assert len(holdout) == round(N_DIGITS * 0.2) == 359
    assert len(train) == N_DIGITS - 359
    # The split is documented: the first round(n * fraction) items of default_rng(seed).permutation(n) are holdout.
    order = np.random.default_rng(0).permutation(N_DIGITS)
    holdout_idx, train_idx = sorted(order[:359].tolist()), sorted(order[359:].tolist())
    assert not set(holdout_idx) & set(train_idx)
    assert set(holdout_idx) | set(train_idx) == set(range(N_DIGITS))
    images = _all_images(full)
    labels = _all_labels(full)
    assert torch.equal(_all_images(holdout), images[holdout_idx])
    assert torch.equal(_all_images(train), images[train_idx])
    assert _all_labels(holdout) == [labels[i] for i in holdout_idx]
    assert _all_labels(train) == [labels[i] for i in train_idx]


def test_split_sizes_follow_holdout_fraction() -> None:
    assert len(load_data("digits", split="holdout", holdout_fraction=0.5, size=8)) == round(N_DIGITS * 0.5)
    assert len(load_data("digits", split="train", holdout_fraction=0.0, size=8)) == N_DIGITS


def test_split_is_deterministic_and_ignores_global_rng() -> None:
    torch.manual_seed(0)
    np.random.seed(0)
    a = load_data("digits", split="holdout", size=8)
    torch.manual_seed(1234)
    np.random.seed(4321)
    torch.rand(10)
    np.random.rand(10)
    b = load_data("digits", split="holdout", size=8)
    assert torch.equal(_all_images(a), _all_images(b))
    assert _all_labels(a) == _all_labels(b)
    c = load_data("digits", split="holdout", size=8, seed=1)
    assert not torch.equal(_all_images(a), _all_images(c))


# --- image folders ----------------------------------------------------------------------------------


def _save(path: Path, color: int | tuple[int, int, int], size: tuple[int, int] = (20, 12), mode: str = "L") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)


def test_class_folders(tmp_path: Path) -> None:
    _save(tmp_path / "dog" / "a.PNG", 0)
    _save(tmp_path / "dog" / "b.jpg", 0, mode="RGB")
    _save(tmp_path / "cat" / "c.bmp", 255)
    _save(tmp_path / "cat" / ".hidden.png", 255)
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    (tmp_path / "empty").mkdir()
    (tmp_path / ".git").mkdir()
    _save(tmp_path / ".git" / "x.png", 255)
    ds = load_data(str(tmp_path), size=8, split="all")
    assert ds.classes == ["cat", "dog"]
    assert len(ds) == 3
    assert _all_labels(ds) == [0, 1, 1]
    white, black = ds[0][0], ds[1][0]
    assert white.shape == black.shape == (1, 8, 8)
    assert white.dtype == torch.float32
    assert torch.all(white == 1.0)
    assert torch.all(black == -1.0)


def test_flat_folder_rgb_and_center_crop(tmp_path: Path) -> None:
    folder = tmp_path / "flowers"
    # 30x10 image: red in the middle 10x10 square, blue on both sides; the center crop keeps only red.
    image = Image.new("RGB", (30, 10), (0, 0, 255))
    image.paste((255, 0, 0), (10, 0, 20, 10))
    folder.mkdir()
    image.save(folder / "wide.png")
    _save(folder / "gray.webp", 255, size=(9, 9))
    ds = load_data(str(folder), size=16, channels=3, split="all")
    assert ds.classes == ["flowers"]
    assert _all_labels(ds) == [0, 0]
    gray, wide = ds[0][0], ds[1][0]
    assert wide.shape == (3, 16, 16)
    assert torch.allclose(wide[0], torch.ones(16, 16))
    assert torch.allclose(wide[1:], -torch.ones(2, 16, 16))
    assert torch.allclose(gray, torch.ones(3, 16, 16))


def _pixel_values(ds: ImageDataset) -> list[float]:
    return [round(float(ds[i][0][0, 0, 0]), 4) for i in range(len(ds))]


def test_folder_split_is_deterministic(tmp_path: Path) -> None:
    for i in range(10):  # ten uniform images, each with its own gray level
        _save(tmp_path / f"{i:02d}.png", i * 25)
    folder = str(tmp_path)
    train = _pixel_values(load_data(folder, size=8, holdout_fraction=0.3, seed=3))
    holdout = _pixel_values(load_data(folder, size=8, split="holdout", holdout_fraction=0.3, seed=3))
    assert (len(train), len(holdout)) == (7, 3)
    assert sorted(train + holdout) == sorted(_pixel_values(load_data(folder, size=8, split="all")))
    assert not set(train) & set(holdout)
    assert holdout == _pixel_values(load_data(folder, size=8, split="holdout", holdout_fraction=0.3, seed=3))


# --- errors -----------------------------------------------------------------------------------------


def test_missing_folder(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(SlimdiffError, match=re.escape(str(missing)) + ".*does not exist"):
        load_data(str(missing))


def test_source_is_a_file(tmp_path: Path) -> None:
    path = tmp_path / "x.png"
    _save(path, 0)
    with pytest.raises(SlimdiffError, match=re.escape(str(path)) + ".*is a file"):
        load_data(str(path))


def test_empty_folder_names_extensions(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("hi")
    with pytest.raises(SlimdiffError, match=re.escape(str(tmp_path)) + ".*no images.*\\.png.*\\.webp"):
        load_data(str(tmp_path))


def test_garbage_png_names_file(tmp_path: Path) -> None:
    _save(tmp_path / "good.png", 0)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"this is not a png")
    with pytest.raises(SlimdiffError, match=re.escape(str(bad)) + ".*cannot be read"):
        load_data(str(tmp_path))


def test_mixed_top_level_and_subfolders(tmp_path: Path) -> None:
    _save(tmp_path / "a.png", 0)
    _save(tmp_path / "cls" / "b.png", 0)
    with pytest.raises(SlimdiffError, match="both at the top level and in subfolders"):
        load_data(str(tmp_path))


@pytest.mark.parametrize(("source", "size"), [("digits", 7), ("digits", 33), ("folder", 4), ("folder", 1025)])
def test_size_out_of_range(tmp_path: Path, source: str, size: int) -> None:
    if source == "folder":
        _save(tmp_path / "a.png", 0)
        source = str(tmp_path)
    with pytest.raises(SlimdiffError, match=f"size={size} is out of range"):
        load_data(source, size=size)


@pytest.mark.parametrize("channels", [0, 2, 4])
def test_bad_channels(channels: int) -> None:
    with pytest.raises(SlimdiffError, match=f"channels={channels} .*use 1 .* or 3"):
        load_data("digits", channels=channels)


def test_bad_split() -> None:
    with pytest.raises(SlimdiffError, match="split='test'.*'train', 'holdout' or 'all'"):
        load_data("digits", split="test")  # type: ignore[arg-type]


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5, float("nan")])
def test_bad_holdout_fraction(fraction: float) -> None:
    with pytest.raises(SlimdiffError, match=re.escape(f"holdout_fraction={fraction!r}") + r".*\[0, 1\)"):
        load_data("digits", holdout_fraction=fraction)


def test_empty_split_is_an_error() -> None:
    with pytest.raises(SlimdiffError, match="'holdout' split.*empty"):
        load_data("digits", split="holdout", holdout_fraction=0.0)


def test_check_fits() -> None:
    ds = load_data("digits", size=16, channels=1, split="all")
    check_fits(ds, sample_size=16, in_channels=1)
    expected = "data is 16px 1-channel but the model expects 32px 3-channel; pass size=32 channels=3"
    with pytest.raises(SlimdiffError, match=expected):
        check_fits(ds, sample_size=32, in_channels=3)
    with pytest.raises(SlimdiffError, match="expects 16px 3-channel"):
        check_fits(ds, sample_size=16, in_channels=3)


# --- prompts ----------------------------------------------------------------------------------------


def test_load_prompts_skips_comments_and_blanks(tmp_path: Path) -> None:
    path = tmp_path / "prompts.txt"
    text = "\ufeff# header\n  a red fox  \n\n   \n# another\ncafé au lait\r\n  # indented comment\n"
    path.write_text(text, "utf-8")
    assert load_prompts(path) == ["a red fox", "café au lait"]
    assert load_prompts(str(path)) == ["a red fox", "café au lait"]


def test_missing_prompts_file(tmp_path: Path) -> None:
    missing = tmp_path / "none.txt"
    with pytest.raises(SlimdiffError, match=re.escape(str(missing)) + ".*does not exist"):
        load_prompts(missing)


def test_empty_prompts_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.txt"
    path.write_text("# only a comment\n\n", "utf-8")
    with pytest.raises(SlimdiffError, match=re.escape(str(path)) + ".*no prompts"):
        load_prompts(path)


def test_prompts_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\u00e9\n".encode("latin-1"))
    with pytest.raises(SlimdiffError, match=re.escape(str(path)) + ".*not UTF-8"):
        load_prompts(path)


def test_class_prompts() -> None:
    assert class_prompts(["0", "7"]) == ["a photo of the digit 0", "a photo of the digit 7"]
    assert class_prompts(["cat", "dog"]) == ["a photo of a cat", "a photo of a dog"]
    assert class_prompts(["1", "10"]) == ["a photo of a 1", "a photo of a 10"]


# ----------------------------------------------------------------------------------------------------------------
# captioned data: imagefolder (jsonl, csv) and 🤗 datasets folders
# ----------------------------------------------------------------------------------------------------------------
def test_captioned_imagefolder_jsonl_and_csv(tmp_path: Path) -> None:
    jsonl = load_data(str(captioned_folder(tmp_path / "j")), size=16, channels=3, split="all")
    csv = load_data(str(captioned_folder(tmp_path / "c", "csv")), size=16, channels=3, split="all")
    assert jsonl.captions == csv.captions == list(CAPTIONS)
    assert torch.equal(torch.stack([jsonl[i][0] for i in range(4)]), torch.stack([csv[i][0] for i in range(4)]))
    assert jsonl[1][0].shape == (3, 16, 16) and jsonl[1][1] == 1
    # original size and crop offsets (in the 16 px frame) per image: 16×40 centered → left (40-16)/2 * 16/16
    assert jsonl.load(1)[1] == (16, 40, 0, 12)
    random = load_data(str(tmp_path / "j"), size=16, channels=3, split="all", crop="random", seed=3)
    again = load_data(str(tmp_path / "j"), size=16, channels=3, split="all", crop="random", seed=3)
    assert [random.load(i)[1] for i in range(4)] == [again.load(i)[1] for i in range(4)]  # one crop per image
    assert any(random.load(i)[1] != jsonl.load(i)[1] for i in range(4))
    train = load_data(str(tmp_path / "j"), size=16, channels=3, split="train")
    assert train.captions == [CAPTIONS[i] for i in (0, 1, 3)] and [train[i][1] for i in range(3)] == [0, 1, 2]


def test_saved_dataset(tmp_path: Path) -> None:
    import datasets  # the test extra installs it (an optional extra for users)

    images = odd_images()
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
    saved = datasets.Dataset.from_dict({"image": images, "caption": list(CAPTIONS)}, features=features)
    saved.save_to_disk(str(tmp_path / "ds"))
    loaded = load_data(DataConfig(str(tmp_path / "ds"), caption_column="caption"), size=16, channels=3, split="all")
    folder = load_data(str(captioned_folder(tmp_path / "f")), size=16, channels=3, split="all")
    assert loaded.captions == list(CAPTIONS)
    assert torch.equal(loaded[0][0], folder[0][0])
    with pytest.raises(SlimdiffError, match="no column 'text'; its columns are image, caption"):
        load_data(str(tmp_path / "ds"), size=16, channels=3)


def test_datasets_missing_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "state.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(SlimdiffError, match=r"pip install 'slimdiff\[datasets\]'"):
        load_data(str(tmp_path), size=16, channels=3)


def test_caption_column_errors_list_the_columns(tmp_path: Path) -> None:
    folder = captioned_folder(tmp_path / "d", column="prompt")
    with pytest.raises(SlimdiffError, match="no column 'text'; its columns are file_name, prompt"):
        load_data(str(folder), size=16, channels=3)
    assert load_data(DataConfig(str(folder), caption_column="prompt"), size=16, channels=3, split="all").captions


def test_zero_size_image_is_refused_by_name(tmp_path: Path) -> None:
    folder = captioned_folder(tmp_path / "d")
    (folder / "images" / "2.png").write_bytes(b"")
    with pytest.raises(SlimdiffError, match=r"2\.png.*empty"):
        load_data(str(folder), size=16, channels=3)
