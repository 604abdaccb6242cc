"""Quality metrics: feature extractors (digits CNN, TorchScript Inception), FID/KID/IS/PR, reference cache, CLIP."""

from __future__ import annotations

import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import linalg
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.inception import InceptionScore

from slimdiff.data import load_data
from slimdiff.errors import SlimdiffError
from slimdiff.metrics import features, quality
from slimdiff.metrics.features import Logits, digits_feature_extractor, extract, inception_feature_extractor
from slimdiff.metrics.quality import (
    class_agreement,
    clip_score,
    compute_quality,
    precision_recall,
    quality_from_features,
    reference_features,
)


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> tuple[features.DigitsNet, Path]:
    cache = tmp_path_factory.mktemp("cache")
    return digits_feature_extractor(cache), cache


@pytest.fixture(scope="module")
def splits() -> dict[str, torch.Tensor]:
    out = {}
    for split in ("train", "holdout"):
        data = load_data("digits", size=16, split=split)
        out[split] = torch.stack([image for image, _ in data])
        out[f"{split}_labels"] = torch.tensor([label for _, label in data])
    return out


def _images(splits: dict[str, torch.Tensor], split: str, n: int) -> torch.Tensor:
    return splits[split][:n]


# --- digits extractor -------------------------------------------------------------------------------------------


def test_digits_extractor_trains_caches_and_is_accurate(digits: tuple[features.DigitsNet, Path]) -> None:
    net, cache = digits
    assert not net.info["from_cache"]
    assert net.info["holdout_accuracy"] >= 0.95
    assert (cache / "features" / "digits-v1" / "weights.safetensors").is_file()
    again = digits_feature_extractor(cache)
    assert again.info["from_cache"] and again.info["holdout_accuracy"] == net.info["holdout_accuracy"]
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), again.state_dict().values()))
    x = torch.rand(5, 3, 24, 24) * 2 - 1  # RGB, another size: resized and averaged to gray internally
    assert net(x).shape == (5, 64) and net.logits(x).shape == (5, 10)
    assert not net.training and not any(p.requires_grad for p in net.parameters())


@pytest.mark.parametrize(
    "extractor, procedure",
    [
        (features.digits_feature_extractor, "_DIGITS_TRAIN"),
        (features.digits_multiscale_feature_extractor, "_DIGITS_MS_TRAIN"),
    ],
)
def test_feature_network_training_is_deterministic_from_its_seed(
    extractor: Callable[[Path], torch.nn.Module], procedure: str, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setitem(getattr(features, procedure), "epochs", 1)  # same procedure, shorter
    state = torch.get_rng_state()
    a = extractor(tmp_path / "a")
    b = extractor(tmp_path / "b")
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left as it was
    assert not a.info["from_cache"] and not b.info["from_cache"]
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert a.info["weights_sha256"] == b.info["weights_sha256"]
    monkeypatch.setitem(getattr(features, procedure), "seed", 2)
    assert extractor(tmp_path / "c").info["weights_sha256"] != a.info["weights_sha256"]


def test_corrupt_digits_cache_is_retrained(
    digits: tuple[features.DigitsNet, Path], tmp_path: Path, monkeypatch
) -> None:
    net, cache = digits
    shutil.copytree(cache / "features", tmp_path / "features")
    weights = tmp_path / "features" / "digits-v1" / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    calls = []
    monkeypatch.setattr(features, "_train_digits", lambda: calls.append(1) or features.DigitsNet(dict(net.info)))
    retrained = digits_feature_extractor(tmp_path)
    assert calls and not retrained.info["from_cache"]
    assert digits_feature_extractor(tmp_path).info["from_cache"]  # the rewritten cache is valid again


# --- FID / KID / IS / PR ----------------------------------------------------------------------------------------


def test_fid_real_holdout_is_far_below_noise(digits, splits) -> None:
    net, cache = digits
    real = reference_features(load_data("digits", size=16, split="train"), net, split="train", cache_dir=cache)
    holdout = _images(splits, "holdout", 300)
    noise = torch.rand_like(holdout) * 2 - 1
    good = compute_quality(holdout, real, net, kid_subset_size=100, kid_subsets=20, is_splits=5)
    bad = compute_quality(noise, real, net, kid_subset_size=100, kid_subsets=20, is_splits=5)
    assert set(good) == {"fid", "kid_mean", "kid_std", "is_mean", "is_std", "precision", "recall"}
    assert all(isinstance(v, float) for v in good.values())
    assert bad["fid"] > 20 * good["fid"] and bad["kid_mean"] > 20 * abs(good["kid_mean"])
    assert good["precision"] > 0.8 and good["recall"] > 0.5 and bad["precision"] < 0.3
    assert good["is_mean"] > bad["is_mean"]
    state = torch.get_rng_state()
    assert compute_quality(holdout, real, net, kid_subset_size=100, kid_subsets=20, is_splits=5) == good  # seeded
    assert torch.equal(torch.get_rng_state(), state)


def test_torchmetrics_accepts_the_extractor(digits, splits) -> None:
    net, _ = digits
    real, fake = _images(splits, "train", 200), _images(splits, "holdout", 100)
    fid = FrechetInceptionDistance(feature=net, normalize=True)  # a custom module gets the images unchanged
    fid.update(real, real=True)
    fid.update(fake, real=False)
    ours = quality_from_features(extract(net, fake), extract(net, real), metrics=("fid",))["fid"]
    assert fid.compute().item() == pytest.approx(ours, rel=1e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        inception = InceptionScore(feature=Logits(net), splits=2)
    inception.update(fake)
    assert inception.compute()[0].item() > 1


def _numpy_fid(a: np.ndarray, b: np.ndarray) -> float:
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(cov_a @ cov_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))


def _numpy_kid(a: np.ndarray, b: np.ndarray) -> float:
    m, d = len(a), a.shape[1]
    k = lambda x, y: (x @ y.T / d + 1) ** 3
    kaa, kbb, kab = k(a, a), k(b, b), k(a, b)
    return float(
        (kaa.sum() - np.trace(kaa)) / (m * (m - 1)) + (kbb.sum() - np.trace(kbb)) / (m * (m - 1)) - 2 * kab.mean()
    )


def test_fid_and_kid_match_independent_computation() -> None:
    gen = torch.Generator().manual_seed(1)
    real = torch.randn(120, 8, generator=gen, dtype=torch.float64)
    fake = torch.randn(120, 8, generator=gen, dtype=torch.float64) * 1.3 + 0.4
    out = quality_from_features(fake, real, metrics=("fid", "kid"), kid_subset_size=120, kid_subsets=5)
    assert out["fid"] == pytest.approx(_numpy_fid(real.numpy(), fake.numpy()), rel=1e-3)
    # subsets the size of both sets are the whole sets, so every subset gives the full unbiased MMD²
    assert out["kid_mean"] == pytest.approx(_numpy_kid(real.numpy(), fake.numpy()), rel=1e-3)
    assert out["kid_std"] == pytest.approx(0.0, abs=1e-9)


def test_precision_recall_extremes() -> None:
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(200, 16, generator=gen)
    assert precision_recall(a, a.clone(), chunk=64) == (1.0, 1.0)
    b = torch.randn(150, 16, generator=gen) + 100.0
    assert precision_recall(a, b) == (0.0, 0.0)
    out = quality_from_features(a[:100], a, metrics=("pr",))
    assert out["precision"] == 1.0 and 0.3 < out["recall"] < 1.0  # half the real set is covered only partly


def test_inception_score_of_one_class_is_below_balanced(digits, splits) -> None:
    net, _ = digits
    labels = splits["holdout_labels"]
    holdout = splits["holdout"]
    one_class = holdout[labels == 3][:30]
    balanced = torch.cat([holdout[labels == c][:30] for c in range(10)])
    score = lambda x: compute_quality(x, torch.zeros(2, 64), net, metrics=("is",), is_splits=2)["is_mean"]
    assert score(one_class) < 1.5 < 6 < score(balanced)


def test_class_agreement_follows_labels(digits, splits) -> None:
    net, _ = digits
    images, labels = splits["holdout"], splits["holdout_labels"]
    assert class_agreement(images, labels, net) > 0.9
    assert class_agreement(images, (labels + 1) % 10, net) < 0.1  # every image conditioned on the wrong class
    with pytest.raises(SlimdiffError, match="one class label per image"):
        class_agreement(images, labels[:-1], net)
    with pytest.raises(SlimdiffError, match=r"0\.\.9"):
        class_agreement(images[:2], torch.tensor([0, 10]), net)


def test_bad_metric_arguments(digits, splits) -> None:
    net, _ = digits
    real = extract(net, _images(splits, "train", 20))
    fake = _images(splits, "holdout", 10)
    with pytest.raises(SlimdiffError, match="valid names are fid, kid, is, pr"):
        compute_quality(fake, real, net, metrics=("fid", "lpips"))
    with pytest.raises(SlimdiffError, match="kid_subset_size=50 is out of range"):
        compute_quality(fake, real, net, metrics=("kid",), kid_subset_size=50)
    with pytest.raises(SlimdiffError, match="is needs at least 10 samples"):
        compute_quality(fake[:5], real, net, metrics=("is",), is_splits=10)
    with pytest.raises(SlimdiffError, match="fid needs at least 2 samples"):
        compute_quality(fake[:1], real, net, metrics=("fid",))
    with pytest.raises(SlimdiffError, match="pr needs at least 4 samples"):
        compute_quality(fake[:3], real, net, metrics=("pr",))
    with pytest.raises(SlimdiffError, match=r"gives \(N, 64\) features"):
        compute_quality(fake, torch.zeros(20, 32), net, metrics=("fid",))
    with pytest.raises(SlimdiffError, match=r"C = 1 or 3"):
        compute_quality(torch.zeros(4, 2, 16, 16), real, net)


# --- reference features -----------------------------------------------------------------------------------------


def test_reference_features_are_cached_and_reused(digits, tmp_path: Path, monkeypatch) -> None:
    net, _ = digits
    data = load_data("digits", size=16, split="holdout").subset(list(range(40)))
    first = reference_features(data, net, split="holdout", cache_dir=tmp_path, batch_size=16)
    assert first.shape == (40, 64)
    files = sorted((tmp_path / "reference").iterdir())
    assert [p.suffix for p in files] == [".json", ".safetensors"]

    def fail(*args, **kwargs):
        raise AssertionError("features were recomputed")

    monkeypatch.setattr(quality, "extract", fail)
    assert torch.equal(reference_features(data, net, split="holdout", cache_dir=tmp_path), first)
    with pytest.raises(AssertionError, match="recomputed"):  # another key (split) is another entry
        reference_features(data, net, split="train", cache_dir=tmp_path)
    monkeypatch.undo()
    files[1].write_bytes(b"not a safetensors file")  # corrupt: recomputed, not trusted
    assert torch.allclose(reference_features(data, net, split="holdout", cache_dir=tmp_path), first, atol=1e-5)
    with pytest.raises(SlimdiffError, match="split='val' is not valid"):
        reference_features(data, net, split="val", cache_dir=tmp_path)  # type: ignore[arg-type]


def test_reference_features_follow_folder_changes(digits, tmp_path: Path) -> None:
    from PIL import Image

    net, _ = digits
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(4):
        Image.new("L", (8, 8), color=40 * i).save(folder / f"{i}.png")
    first = reference_features(load_data(str(folder), size=16, split="all"), net, split="all", cache_dir=tmp_path)
    Image.new("L", (8, 8), color=255).save(folder / "0.png")  # same count, new content
    second = reference_features(load_data(str(folder), size=16, split="all"), net, split="all", cache_dir=tmp_path)
    assert not torch.equal(first[0], second[0]) and torch.equal(first[1:], second[1:])


# --- FID Inception (TorchScript) --------------------------------------------------------------------------------


class _TinyInception(torch.nn.Module):
    """Stand-in with the FID Inception's call convention: 3-channel 0..255 in, resizes itself, probabilities out.

    128 features instead of 2048 keep FID's eigendecomposition fast."""

    def __init__(self) -> None:
        super().__init__()
        self.features = torch.nn.Linear(3 * 4 * 4, 128)
        self.fc = torch.nn.Linear(128, 1008)

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        assert x.shape[1] == 3 and bool(x.min() >= 0) and bool(x.max() <= 255)
        x = F.interpolate(x / 128 - 1, size=[4, 4], mode="bilinear", align_corners=False)
        f = torch.relu(self.features(x.flatten(1)))
        return f if return_features else F.softmax(self.fc(f), dim=1)


@pytest.fixture
def tiny_inception(tmp_path: Path) -> Path:
    path = tmp_path / "inception-2015-12-05.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.manual_seed(0)
        torch.jit.script(_TinyInception()).save(str(path))
    return path


def test_missing_or_invalid_inception_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pt"
    with pytest.raises(SlimdiffError, match=r"nope\.pt.*does not exist.*inception-2015-12-05\.pt.*never downloads"):
        inception_feature_extractor(missing)
    pickled = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.save({"w": torch.zeros(1)}, pickled)
    with pytest.raises(SlimdiffError, match="not a TorchScript file"):
        inception_feature_extractor(pickled)


def test_torchscript_inception_end_to_end(tiny_inception: Path, splits, tmp_path: Path) -> None:
    net = inception_feature_extractor(tiny_inception)
    assert (net.name, net.num_features, net.num_classes) == ("inception-2015-12-05", 128, 1008)
    gray = _images(splits, "holdout", 24)  # 1 channel, 16 px: expanded to RGB 0..255 for the network
    assert net(gray).shape == (24, 128)
    log_probs = net.logits(gray)
    assert torch.allclose(log_probs.exp().sum(1), torch.ones(24), atol=1e-4)
    data = load_data("digits", size=16, split="train").subset(list(range(40)))
    real = reference_features(data, net, split="train", cache_dir=tmp_path)
    out = compute_quality(gray, real, net, kid_subset_size=20, is_splits=2)
    assert set(out) == {"fid", "kid_mean", "kid_std", "is_mean", "is_std", "precision", "recall"}
    assert all(np.isfinite(v) for v in out.values())


# --- CLIP score -------------------------------------------------------------------------------------------------


@pytest.fixture
def tiny_clip(tmp_path: Path) -> Path:
    from transformers import CLIPConfig, CLIPModel

    from slimdiff.text import BOS_TOKEN, EOS_TOKEN, make_tiny_clip_text

    folder = tmp_path / "clip"
    tokenizer = make_tiny_clip_text(folder).tokenizer  # writes folder/tokenizer/
    vocab = tokenizer.get_vocab()
    config = CLIPConfig(
        text_config={
            "vocab_size": len(vocab),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": 77,
            "bos_token_id": vocab[BOS_TOKEN],
            "eos_token_id": vocab[EOS_TOKEN],
            "pad_token_id": vocab[EOS_TOKEN],
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    return folder


def test_clip_score(tiny_clip: Path, splits) -> None:
    images = _images(splits, "holdout", 6)
    prompts = [f"a photo of the digit {i}" for i in range(6)]
    score = clip_score(images, prompts, tiny_clip, batch_size=4)
    assert 0.0 <= score <= 100.0
    assert clip_score(images, prompts, tiny_clip) == pytest.approx(score, abs=1e-4)
    assert clip_score(images.repeat(1, 3, 1, 1), prompts, tiny_clip) == pytest.approx(score, abs=1e-4)
    with pytest.raises(SlimdiffError, match="list of 6 strings"):
        clip_score(images, prompts[:5], tiny_clip)


def test_clip_score_refuses_pickled_weights(tmp_path: Path) -> None:
    folder = tmp_path / "clip"
    folder.mkdir()
    (folder / "pytorch_model.bin").write_bytes(b"\x80")
    with pytest.raises(SlimdiffError, match=r"only pickled weights \(pytorch_model\.bin\).*\.safetensors"):
        clip_score(torch.zeros(1, 3, 8, 8), ["x"], folder)
