"""The on-disk cache of encoded data: VAE latents and text embeddings, computed once per content and settings.

A cache is a folder per key (a hash of what the tensors depend on: the encoder's weights checksum, resolution, crop,
flip, …) holding safetensors shards of `SHARD_ITEMS` items each. A shard is named by the hash of its items' keys, is
written atomically, and is reused whenever it exists: an interrupted run resumes at the first missing shard, and a
changed image invalidates only its shard.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file

from slimdiff.errors import SlimdiffError
from slimdiff.io import atomic_path, sha256_file

if TYPE_CHECKING:
    from diffusers import AutoencoderKL

    from slimdiff.data.images import ImageDataset

Log = Callable[[str], None]

#: Items per shard: the unit of work that an interrupted run does not redo.
SHARD_ITEMS = 64
#: The cache folder inside a writable data folder.
DATA_CACHE = ".slimdiff-cache"


def default_cache_root(source: str) -> Path:
    """`SOURCE/.slimdiff-cache` for a writable data folder, else `$XDG_CACHE_HOME/slimdiff` (`~/.cache/slimdiff`)."""
    folder = Path(source).expanduser()
    if folder.is_dir() and os.access(folder, os.W_OK):
        return folder / DATA_CACHE
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "slimdiff"


def weights_checksum(folder: Path) -> str:
    """SHA-256 over the safetensors files of a model folder (name and content), for cache keys."""
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.safetensors")):
        digest.update(f"{path.name}\0{sha256_file(path)}\n".encode())
    return digest.hexdigest()


def cache_folder(root: Path, kind: str, key: dict[str, Any]) -> Path:
    """The folder of one cache: `root/kind-<hash of key>/`, with the key written beside the shards as `key.json`."""
    text = json.dumps(key, sort_keys=True)
    folder = root / f"{kind}-{hashlib.sha256(text.encode()).hexdigest()[:16]}"
    try:
        if not (folder / "key.json").is_file():
            with atomic_path(folder / "key.json") as tmp:
                tmp.write_text(text + "\n")
    except OSError as error:
        raise SlimdiffError(f"the cache folder {root} is not writable ({error.strerror}); pass --cache-dir") from None
    return folder


def cached_tensors(
    folder: Path,
    item_keys: Sequence[str],
    compute: Callable[[range], dict[str, torch.Tensor]],
    *,
    what: str,
    log: Log = print,
) -> dict[str, torch.Tensor]:
    """Tensors for every item (stacked along dim 0 in item order), read from `folder` or made by `compute(range of
    item indices)` shard by shard and stored there; logs how many items were reused and how many encoded."""
    parts: list[dict[str, torch.Tensor]] = []
    reused = 0
    for start in range(0, len(item_keys), SHARD_ITEMS):
        keys = item_keys[start : start + SHARD_ITEMS]
        path = folder / f"shard-{hashlib.sha256(chr(10).join(keys).encode()).hexdigest()[:20]}.safetensors"
        if path.is_file():
            parts.append(load_file(path))
            reused += len(keys)
            continue
        tensors = {
            name: value.detach().cpu().contiguous() for name, value in compute(range(start, start + len(keys))).items()
        }
        with atomic_path(path) as tmp:
            save_file(tensors, tmp)
        parts.append(tensors)
    encoded = len(item_keys) - reused
    log(
        f"{what}: {reused} reused from {folder}, {encoded} encoded"
        if reused
        else f"{what}: {encoded} encoded → {folder}"
    )
    return {name: torch.cat([part[name] for part in parts]) for name in parts[0]} if parts else {}


#: Images per VAE call while encoding.
ENCODE_BATCH = 8


def encode_images(
    dataset: ImageDataset, vae: AutoencoderKL, vae_dir: Path, root: Path, *, log: Log = print
) -> ImageDataset:
    """The dataset's images as the VAE's scaled latents (`(mean - shift_factor) * scaling_factor`), cached under
    `root` by the VAE's weights checksum, the resolution, crop, flip and seed; with each item's original size and
    crop offsets (`crops`, SDXL's micro-conditioning).

    The posterior mean is stored, not a sample: a cached sample would freeze one noise draw for every epoch anyway,
    the mean is what the latent really encodes, and it makes the cache (and every calibration) deterministic.
    """
    keys = dataset.item_keys() or [
        hashlib.sha256(dataset[i][0].numpy().tobytes()).hexdigest() for i in range(len(dataset))
    ]  # in-memory images (digits): keyed by their content
    settings = {
        "vae": weights_checksum(vae_dir),
        "resolution": dataset.size,
        "crop": dataset.crop,
        "flip": dataset.flip,
        "seed": dataset.seed if dataset.crop == "random" or dataset.flip else None,
    }
    folder = cache_folder(root, "latents", settings)
    device = next(vae.parameters()).device
    shift = getattr(vae.config, "shift_factor", None) or 0.0

    @torch.no_grad()
    def compute(indices: range) -> dict[str, torch.Tensor]:
        latents, crops = [], []
        for start in range(indices.start, indices.stop, ENCODE_BATCH):
            loaded = [dataset.load(i) for i in range(start, min(start + ENCODE_BATCH, indices.stop))]
            images = torch.stack([image for image, _ in loaded]).to(device, vae.dtype)
            mean = vae.encode(images).latent_dist.mean
            latents.append((mean.float() - shift) * vae.config.scaling_factor)
            crops += [torch.tensor(crop) for _, crop in loaded]
        return {"latents": torch.cat(latents), "crops": torch.stack(crops)}

    tensors = cached_tensors(folder, keys, compute, what=f"latents of {len(keys)} images", log=log)
    return dataset.with_images(tensors["latents"], tensors["crops"])


def embed_prompts(encoder: Any, prompts: list[str], root: Path, *, log: Log = print) -> torch.Tensor:
    """`encoder.encode(prompts)`, cached under `root` by the text encoders' weights checksum (and, for SDXL's
    packed conditions, the resolution of their default time ids); uncached for an encoder never saved."""
    if encoder.checksum is None:
        return encoder.encode(prompts)
    key = {
        "text": encoder.checksum,
        "encoder": type(encoder).__name__,
        "resolution": getattr(encoder, "resolution", None),
    }
    folder = cache_folder(root, "text", key)

    def compute(indices: range) -> dict[str, torch.Tensor]:
        return {"embeddings": encoder.encode([prompts[i] for i in indices])}

    return cached_tensors(folder, prompts, compute, what=f"embeddings of {len(prompts)} captions", log=log)[
        "embeddings"
    ]
