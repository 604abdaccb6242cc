"""Sample quality: FID, KID, Inception Score, improved precision/recall, CLIP score and class agreement.

FID, KID and IS are torchmetrics' implementations, run on features computed once by a `FeatureExtractor`
(real-image features are cached by `reference_features`, so repeated evaluations only extract the samples).
Precision/recall (Kynkäänniemi et al. 2019) has no torchmetrics metric and is computed here with `torch.cdist`.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, get_args

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

# Imported from their modules: `torchmetrics.image` exports them only when torch-fidelity is installed, which just
# their default Inception needs (never used here).
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.inception import InceptionScore
from torchmetrics.image.kid import KernelInceptionDistance

from slimdiff.data import ImageDataset, Split
from slimdiff.errors import SlimdiffError
from slimdiff.io import atomic_path, atomic_write_json
from slimdiff.metrics.features import FeatureExtractor, cache_root, check_images, extract

if TYPE_CHECKING:
    from transformers import CLIPModel, CLIPTokenizer

METRICS = ("fid", "kid", "is", "pr")
_REFERENCE_VERSION = 1
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def reference_features(
    dataset: ImageDataset,
    extractor: FeatureExtractor,
    *,
    split: Split,
    cache_dir: str | Path | None = None,
    batch_size: int = 256,
) -> torch.Tensor:
    """Features of every image in `dataset` (the `split` it was loaded as), cached under `<cache>/reference/`.

    The cache key is the dataset (source, split, size, channels, count, and for image folders each file's path,
    size and mtime) plus the extractor's name and weights hash; a stale or unreadable entry is recomputed.
    """
    if split not in get_args(Split):
        raise SlimdiffError(f"split={split!r} is not valid; use 'train', 'holdout' or 'all'")
    key = {
        "version": _REFERENCE_VERSION,
        "source": dataset.source if dataset.source == "digits" else str(Path(dataset.source).expanduser().resolve()),
        "split": split,
        "size": dataset.size,
        "channels": dataset.channels,
        "count": len(dataset),
        "files": _files_digest(dataset),
        "extractor": extractor.name,
        "weights": extractor.info.get("weights_sha256"),
    }
    text = json.dumps(key, sort_keys=True)
    path = cache_root(cache_dir) / "reference" / f"{hashlib.sha256(text.encode()).hexdigest()[:20]}.safetensors"
    try:
        with safe_open(path, "pt") as f:
            if f.metadata().get("key") == text:
                features = f.get_tensor("features")
                if features.shape == (len(dataset), extractor.num_features) and features.isfinite().all():
                    return features
    except (OSError, SafetensorError, KeyError, AttributeError):
        pass  # missing or corrupt: recompute

    chunks = []
    for start in range(0, len(dataset), batch_size):
        images = torch.stack([dataset[i][0] for i in range(start, min(start + batch_size, len(dataset)))])
        chunks.append(extract(extractor, images, batch_size=batch_size))
    features = torch.cat(chunks).contiguous()
    try:
        with atomic_path(path) as tmp:
            save_file({"features": features}, tmp, metadata={"key": text})
        atomic_write_json(path.with_suffix(".json"), key)
    except OSError as error:  # a read-only cache costs time, not the result
        warnings.warn(f"reference features not cached in {path.parent}: {error}", stacklevel=2)
    return features


def _files_digest(dataset: ImageDataset) -> str | None:
    """Hash of each image's key (a file's resolved path, size and mtime; None for in-memory datasets such as digits)."""
    keys = dataset.item_keys()
    if not keys:
        return None
    return hashlib.sha256("".join(f"{key}\n" for key in keys).encode()).hexdigest()


def compute_quality(
    fake_images: torch.Tensor,
    real_features: torch.Tensor,
    extractor: FeatureExtractor,
    metrics: Sequence[str] = METRICS,
    *,
    kid_subset_size: int | None = None,
    kid_subsets: int = 100,
    is_splits: int = 10,
    pr_k: int = 3,
    seed: int = 0,
    batch_size: int = 256,
) -> dict[str, float]:
    """Quality of generated `fake_images` (in [-1, 1]) against `real_features` from the same `extractor`.

    See `quality_from_features` for the metrics and keys; the extractor's logits feed the Inception Score.
    """
    metrics = _check_metrics(metrics)
    if (
        not isinstance(real_features, torch.Tensor)
        or real_features.ndim != 2
        or (real_features.shape[1] != extractor.num_features)
    ):
        shape = tuple(real_features.shape) if isinstance(real_features, torch.Tensor) else type(real_features).__name__
        raise SlimdiffError(
            f"real_features is {shape} but {extractor.name!r} gives (N, {extractor.num_features}) features; "
            "compute them with reference_features(..., the same extractor)"
        )
    fake_features = extract(extractor, fake_images, batch_size=batch_size)
    fake_logits = extract(extractor, fake_images, logits=True, batch_size=batch_size) if "is" in metrics else None
    return quality_from_features(
        fake_features,
        real_features,
        fake_logits=fake_logits,
        metrics=metrics,
        kid_subset_size=kid_subset_size,
        kid_subsets=kid_subsets,
        is_splits=is_splits,
        pr_k=pr_k,
        seed=seed,
    )


def quality_from_features(
    fake_features: torch.Tensor,
    real_features: torch.Tensor,
    *,
    fake_logits: torch.Tensor | None = None,
    metrics: Sequence[str] = ("fid", "kid", "pr"),
    kid_subset_size: int | None = None,
    kid_subsets: int = 100,
    is_splits: int = 10,
    pr_k: int = 3,
    seed: int = 0,
) -> dict[str, float]:
    """FID (`fid`), KID (`kid_mean`, `kid_std`; subsets of `kid_subset_size`, default min(1000, n_real, n_fake)),
    IS (`is_mean`, `is_std` over `is_splits` splits of `fake_logits`) and precision/recall (`precision`,
    `recall`; `pr_k`-th neighbour radii). Random subsets and splits are drawn from `seed`; global RNG is untouched.
    """
    metrics = _check_metrics(metrics)
    for name, t in (("fake_features", fake_features), ("real_features", real_features)):
        if not isinstance(t, torch.Tensor) or t.ndim != 2 or t.shape[1] != real_features.shape[-1]:
            raise SlimdiffError(f"{name} must be an (N, D) tensor with the same D for real and fake features")
    n_real, n_fake = len(real_features), len(fake_features)
    if "fid" in metrics:
        _need("fid", 2, n_real=n_real, n_fake=n_fake)
    if "kid" in metrics:
        kid_subset_size = min(1000, n_real, n_fake) if kid_subset_size is None else kid_subset_size
        if not _is_int(kid_subset_size) or not 2 <= kid_subset_size <= min(n_real, n_fake):
            raise SlimdiffError(
                f"kid_subset_size={kid_subset_size!r} is out of range; use an integer from 2 to "
                f"min(n_real, n_fake) = {min(n_real, n_fake)}"
            )
        if not _is_int(kid_subsets) or kid_subsets < 1:
            raise SlimdiffError(f"kid_subsets={kid_subsets!r} is not valid; use an integer >= 1")
    if "is" in metrics:
        if not isinstance(fake_logits, torch.Tensor) or fake_logits.ndim != 2 or len(fake_logits) != n_fake:
            raise SlimdiffError("the Inception Score needs fake_logits, an (N, classes) tensor for the N fake samples")
        if not _is_int(is_splits) or is_splits < 2:
            raise SlimdiffError(f"is_splits={is_splits!r} is not valid; use an integer >= 2")
        _need("is", is_splits, n_fake=n_fake, why=f" (one per split, is_splits={is_splits})")
    if "pr" in metrics:
        if not _is_int(pr_k) or pr_k < 1:
            raise SlimdiffError(f"pr_k={pr_k!r} is not valid; use an integer >= 1")
        _need("pr", pr_k + 1, n_real=n_real, n_fake=n_fake, why=f" (pr_k={pr_k} neighbours plus the point)")

    real, fake = real_features.double().cpu(), fake_features.double().cpu()
    out: dict[str, float] = {}
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torchmetrics' "will save all features in buffer" notes
        torch.manual_seed(seed)
        if "fid" in metrics:
            fid = FrechetInceptionDistance(feature=_Given(real.shape[1]))
            fid.update(real, real=True)
            fid.update(fake, real=False)
            out["fid"] = fid.compute().item()
        if "kid" in metrics:
            kid = KernelInceptionDistance(
                feature=_Given(real.shape[1]), subsets=kid_subsets, subset_size=kid_subset_size
            )
            kid.update(real, real=True)
            kid.update(fake, real=False)
            mean, std = kid.compute()
            out["kid_mean"], out["kid_std"] = mean.item(), std.item()
        if "is" in metrics:
            assert fake_logits is not None
            inception = InceptionScore(feature=_Given(fake_logits.shape[1]), splits=is_splits)
            inception.update(fake_logits.double().cpu())
            mean, std = inception.compute()
            out["is_mean"], out["is_std"] = mean.item(), std.item()
    if "pr" in metrics:
        out["precision"], out["recall"] = precision_recall(real_features, fake_features, k=pr_k)
    return out


def precision_recall(
    real_features: torch.Tensor, fake_features: torch.Tensor, *, k: int = 3, chunk: int = 1024
) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019).

    Each set's manifold is the union of balls around its points reaching their k-th nearest neighbour; precision is
    the share of fake points inside the real manifold, recall the share of real points inside the fake one.
    """
    real, fake = real_features.float().cpu(), fake_features.float().cpu()
    return _inside(fake, real, _radii(real, k, chunk), chunk), _inside(real, fake, _radii(fake, k, chunk), chunk)


def _radii(points: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    # the k+1-th smallest distance skips the point itself (distance 0)
    return torch.cat([torch.cdist(c, points).kthvalue(k + 1, dim=1).values for c in points.split(chunk)])


def _inside(points: torch.Tensor, centers: torch.Tensor, radii: torch.Tensor, chunk: int) -> float:
    hits = torch.cat([(torch.cdist(c, centers) <= radii).any(dim=1) for c in points.split(chunk)])
    return hits.double().mean().item()


class _Given(nn.Identity):
    """A torchmetrics `feature=` module for features computed beforehand: it passes them through."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features


def _check_metrics(metrics: Sequence[str]) -> tuple[str, ...]:
    chosen = (metrics,) if isinstance(metrics, str) else tuple(metrics)
    unknown = [m for m in chosen if m not in METRICS]
    if unknown or not chosen:
        what = f"unknown metric(s) {', '.join(map(repr, unknown))}" if unknown else "no metrics given"
        raise SlimdiffError(f"{what}; valid names are {', '.join(METRICS)}")
    return chosen


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _need(metric: str, minimum: int, *, why: str = "", **counts: int) -> None:
    for name, n in counts.items():
        if n < minimum:
            raise SlimdiffError(f"{metric} needs at least {minimum} samples{why} but {name}={n}; use more samples")


# --- class agreement --------------------------------------------------------------------------------------------


def class_agreement(images: torch.Tensor, labels: torch.Tensor, extractor: FeatureExtractor) -> float:
    """The fraction of samples that `extractor`'s classifier assigns to the class they were conditioned on: how
    well a class- or prompt-conditioned model follows its condition, where a domain classifier is at hand and a
    CLIP model is not (the digits networks)."""
    if extractor.num_classes is None:
        raise SlimdiffError(f"feature extractor {extractor.name!r} has no classifier; class agreement needs one")
    labels = torch.as_tensor(labels)
    if labels.shape != (len(images),):
        raise SlimdiffError(f"need one class label per image ({len(images)}), got shape {tuple(labels.shape)}")
    if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < extractor.num_classes:
        raise SlimdiffError(f"labels must lie in 0..{extractor.num_classes - 1} (the extractor's classes)")
    predicted = extract(extractor, images, logits=True).argmax(-1)
    return (predicted == labels).double().mean().item()


# --- CLIP score -------------------------------------------------------------------------------------------------


def clip_score(images: torch.Tensor, prompts: Sequence[str], clip_dir: str | Path, *, batch_size: int = 64) -> float:
    """CLIP score: 100 × mean over (image, prompt) pairs of max(cosine(image embedding, text embedding), 0).

    `clip_dir` is a local transformers `CLIPModel` folder (safetensors weights; pickled `.bin` is refused) with its
    tokenizer in the same folder or a `tokenizer/` subfolder. Images in [-1, 1] are preprocessed here as CLIP's
    processor does: RGB, bicubic resize to the vision tower's size, CLIP mean/std normalisation.
    """
    check_images(images)
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts) or len(prompts) != len(images):
        n = len(prompts) if not isinstance(prompts, str) else "a single string"
        raise SlimdiffError(f"prompts must be a list of {len(images)} strings, one per image; got {n}")
    if not len(images):
        raise SlimdiffError("clip_score needs at least one image")
    model, tokenizer = _load_clip(Path(clip_dir).expanduser())
    size = model.config.vision_config.image_size
    max_length = min(tokenizer.model_max_length, model.config.text_config.max_position_embeddings)
    mean, std = torch.tensor(_CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(_CLIP_STD).view(1, 3, 1, 1)
    scores = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            x = (images[start : start + batch_size].float().cpu().clamp(-1, 1) + 1) / 2
            x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
            x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
            tokens = tokenizer(
                list(prompts[start : start + batch_size]),
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            )
            out = model(
                input_ids=tokens.input_ids,
                attention_mask=tokens.attention_mask,
                pixel_values=(x.clamp(0, 1) - mean) / std,
            )
            cosine = (F.normalize(out.image_embeds, dim=-1) * F.normalize(out.text_embeds, dim=-1)).sum(-1)
            scores.append(cosine.clamp_min(0))
    return 100 * torch.cat(scores).double().mean().item()


def _load_clip(path: Path) -> tuple[CLIPModel, CLIPTokenizer]:
    from transformers import CLIPModel, CLIPTokenizer

    if not path.is_dir():
        raise SlimdiffError(f"CLIP folder {str(path)!r} does not exist; pass a CLIPModel.save_pretrained folder")
    if not any(path.glob("*.safetensors")):
        found = sorted(p.name for p in path.glob("*.bin"))
        detail = f"only pickled weights ({', '.join(found)})" if found else "no weights"
        raise SlimdiffError(f"CLIP folder {str(path)!r} has {detail}; slimdiff loads only .safetensors CLIP weights")
    tokenizer_dir = path / "tokenizer" if (path / "tokenizer").is_dir() else path
    try:
        tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
        model = CLIPModel.from_pretrained(path, local_files_only=True, use_safetensors=True)
    except (OSError, ValueError, TypeError) as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise SlimdiffError(f"cannot load the CLIP model from {str(path)!r}: {message}") from None
    return model.float().eval(), tokenizer
