"""Feature extractors for the quality metrics: two small digits CNNs trained here, or a user-supplied FID Inception.

Every extractor is a `FeatureExtractor`: an eval-mode, no-grad `nn.Module` that takes float images in [-1, 1]
shaped `(N, C, H, W)` with C = 1 or 3 and any H, W (it resizes and converts channels itself) and returns
`(N, num_features)` features; `logits(images)` gives class logits for the Inception Score where supported.
torchmetrics accepts an extractor as its `feature=` module (FID and KID pass images to a custom module
unchanged, whatever `normalize` says, so feed them [-1, 1] images); for `InceptionScore` wrap it in `Logits`
and keep `normalize=False`.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import nn

from slimdiff.errors import SlimdiffError
from slimdiff.io import atomic_dir, atomic_write_json, read_json, sha256_file

DIGITS_VERSION = "digits-v1"
INCEPTION_FILE = "inception-2015-12-05.pt"
_DIGITS_SIZE = 16
_DIGITS_TRAIN = {"seed": 0, "epochs": 20, "batch_size": 64, "lr": 3e-3, "weight_decay": 1e-4}
DIGITS_MS_VERSION = "digits-ms-v1"
_DIGITS_MS_TRAIN = {
    "seed": 1,
    "epochs": 15,
    "batch_size": 64,
    "lr": 2e-3,
    "weight_decay": 5e-4,
    "label_smoothing": 0.1,
    "max_shift": 2,
}
DIGITS_FEATURES = ("digits", "digits-ms")


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """`cache_dir`, else `$SLIMDIFF_CACHE`, else `~/.cache/slimdiff`."""
    return Path(cache_dir or os.environ.get("SLIMDIFF_CACHE") or Path.home() / ".cache" / "slimdiff").expanduser()


def check_images(images: torch.Tensor) -> None:
    """Raise SlimdiffError unless `images` is a float `(N, C, H, W)` tensor with C = 1 or 3."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] not in (1, 3):
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise SlimdiffError(f"images must be a (N, C, H, W) tensor with C = 1 or 3, got {shape}")
    if not images.is_floating_point():
        raise SlimdiffError(f"images must be float in [-1, 1], got dtype {images.dtype}")


def _clamped(images: torch.Tensor) -> torch.Tensor:
    check_images(images)
    return images.float().clamp(-1.0, 1.0)


class FeatureExtractor(nn.Module):
    """Images in [-1, 1] → features; `name` identifies the network and weights (cache keys, reports)."""

    name: str
    num_features: int
    num_classes: int | None = None  # width of `logits()`; None when the extractor has no classifier
    info: dict[str, Any]  # provenance shown in reports; `weights_sha256`, when present, joins cache keys

    def __init__(self) -> None:
        super().__init__()
        self.info = {}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def logits(self, images: torch.Tensor) -> torch.Tensor | None:
        """Class logits for the Inception Score, or None if this extractor has none."""
        return None

    def train(self, mode: bool = True) -> FeatureExtractor:
        """Always eval mode (torchmetrics or a parent module may call `.train()`)."""
        return super().train(False)

    @property
    def device(self) -> torch.device:
        tensor = next(iter([*self.parameters(), *self.buffers()]), None)
        return tensor.device if tensor is not None else torch.device("cpu")


class Logits(nn.Module):
    """Adapter for torchmetrics' `InceptionScore(feature=Logits(extractor), normalize=False)`."""

    def __init__(self, extractor: FeatureExtractor) -> None:
        super().__init__()
        if extractor.num_classes is None:
            raise SlimdiffError(f"feature extractor {extractor.name!r} has no class logits; IS needs a classifier")
        self.extractor = extractor

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.extractor.logits(images)
        assert out is not None
        return out


@torch.no_grad()
def extract(
    extractor: FeatureExtractor, images: torch.Tensor, *, logits: bool = False, batch_size: int = 256
) -> torch.Tensor:
    """Features (or logits) of `images`, computed in batches on the extractor's device, returned on the CPU."""
    check_images(images)
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise SlimdiffError(f"batch_size={batch_size!r} is not valid; use an integer >= 1")
    if logits and extractor.num_classes is None:
        raise SlimdiffError(
            f"feature extractor {extractor.name!r} has no class logits for the Inception Score; drop 'is' from metrics"
        )
    run = extractor.logits if logits else extractor
    device = extractor.device
    chunks = [run(images[i : i + batch_size].to(device)).float().cpu() for i in range(0, len(images), batch_size)]
    return torch.cat(chunks) if chunks else torch.empty(0, extractor.num_classes if logits else extractor.num_features)


# --- digits ---------------------------------------------------------------------------------------------------


class DigitsNet(FeatureExtractor):
    """A small CNN for 16x16 grayscale digits: features are its 64-d penultimate layer, logits its 10 outputs."""

    name = DIGITS_VERSION
    num_features = 64
    num_classes = 10

    def __init__(self, info: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * 4 * 4, self.num_features),
            nn.ReLU(),
        )
        self.head = nn.Linear(self.num_features, self.num_classes)
        # Set after training so the train features' mean square is 1: KID's polynomial kernel assumes O(1) values.
        self.register_buffer("feature_scale", torch.ones(()))
        self.info = info or {}

    @staticmethod
    def prepare(images: torch.Tensor) -> torch.Tensor:
        """[-1, 1] images of any size → 1-channel 16x16 (RGB averaged, antialiased bilinear resize)."""
        x = _clamped(images)
        x = x.mean(dim=1, keepdim=True) if x.shape[1] == 3 else x
        if x.shape[-2:] != (_DIGITS_SIZE, _DIGITS_SIZE):
            x = F.interpolate(x, size=(_DIGITS_SIZE,) * 2, mode="bilinear", antialias=True, align_corners=False)
        return x

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(self.prepare(images)) * self.feature_scale

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.prepare(images)))

    def calibrate(self, train_images: torch.Tensor) -> None:
        """Scale features to unit mean square on the training images."""
        self.feature_scale.fill_(self.body(train_images).square().mean().rsqrt())


class DigitsMultiscaleNet(FeatureExtractor):
    """A second digits network, independent of `DigitsNet` in architecture, features and training.

    A strided 3-stage CNN (16, 32, 64 channels at 16², 8², 4²; SiLU) trained from another seed with random
    whole-pixel shifts and label smoothing. Its 112 features read three depths: the strongest response of each
    first-stage filter anywhere in the image (16; an isolated bright pixel or any stroke pattern absent from real
    digits shows here), the spatial mean of each second-stage channel (32; texture and noise) and the 64-d embedding
    before the classifier (what digit it is). Each part is centred on the training split's mean and scaled so that
    its dimensions' variance there averages 1: distances count in units of real digits' own spread, and each part
    weighs by how far samples leave it rather than by its raw activation size.
    """

    name = DIGITS_MS_VERSION
    num_features = 16 + 32 + 64
    num_classes = 10
    _parts = ((0, 16), (16, 48), (48, 112))

    def __init__(self, info: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.body = nn.Sequential(  # three stages; `_features` reads the first two's activations too
            nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.SiLU()),
            nn.Sequential(nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.SiLU()),
            nn.Sequential(
                nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.SiLU(), nn.Flatten(), nn.Linear(64 * 4 * 4, 64), nn.SiLU()
            ),
        )
        self.head = nn.Linear(64, self.num_classes)
        self.register_buffer("feature_shift", torch.zeros(self.num_features))
        self.register_buffer("feature_scale", torch.ones(self.num_features))
        self.info = info or {}

    prepare = staticmethod(DigitsNet.prepare)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        first = self.body[0](x)
        second = self.body[1](first)
        embedding = self.body[2](second)
        return torch.cat([first.amax(dim=(2, 3)), second.mean(dim=(2, 3)), embedding], dim=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return (self._features(self.prepare(images)) - self.feature_shift) * self.feature_scale

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.prepare(images)))

    def calibrate(self, train_images: torch.Tensor) -> None:
        """Centre the features on the training images and scale each part to unit mean variance there."""
        features = self._features(train_images)
        self.feature_shift.copy_(features.mean(0))
        for lo, hi in self._parts:
            self.feature_scale[lo:hi] = features[:, lo:hi].var(0).mean().rsqrt()


# --- loading and training the digits networks -----------------------------------------------------------------


def digits_feature_extractor(cache_dir: str | Path | None = None) -> DigitsNet:
    """The digits feature network: loaded from `<cache>/features/digits-v1/`, else trained (seeded) and cached.

    `info` holds `holdout_accuracy` (on the digits holdout split), `epochs`, `seed`, `version`, `train_seconds`
    and `from_cache`. A cache that is missing, stale or corrupt is retrained, never trusted.
    """
    return _cached_network(DigitsNet, _DIGITS_TRAIN, lambda: _train_digits(), cache_dir)


def digits_multiscale_feature_extractor(cache_dir: str | Path | None = None) -> DigitsMultiscaleNet:
    """The second, independent digits network (`digits-ms-v1`), cached under `<cache>/features/digits-ms-v1/`.

    Same cache rules and `info` keys as `digits_feature_extractor`.
    """
    return _cached_network(DigitsMultiscaleNet, _DIGITS_MS_TRAIN, lambda: _train_digits_multiscale(), cache_dir)


def feature_extractor(feature: str, cache_dir: str | Path | None = None) -> FeatureExtractor:
    """The extractor `feature` names: 'digits', 'digits-ms', or the path of the FID Inception TorchScript file."""
    if feature == "digits":
        return digits_feature_extractor(cache_dir)
    if feature == "digits-ms":
        return digits_multiscale_feature_extractor(cache_dir)
    return inception_feature_extractor(feature)


def _cached_network(
    cls: type[DigitsNet] | type[DigitsMultiscaleNet],
    train_config: dict[str, Any],
    train: Callable[[], DigitsNet | DigitsMultiscaleNet],
    cache_dir: str | Path | None,
) -> Any:
    folder = cache_root(cache_dir) / "features" / cls.name
    net = _load_cached(folder, cls, train_config)
    if net is None:
        net = train()
        weights = save(net.state_dict())
        net.info["weights_sha256"] = hashlib.sha256(weights).hexdigest()
        try:
            with atomic_dir(folder) as tmp:
                (tmp / "weights.safetensors").write_bytes(weights)
                atomic_write_json(tmp / "info.json", net.info)
        except OSError as error:  # read-only cache, or another process writing it at the same moment
            warnings.warn(f"{cls.name} feature network not cached in {folder}: {error}", stacklevel=3)
        net.info["from_cache"] = False
    return net.requires_grad_(False).eval()


def _load_cached(
    folder: Path, cls: type[DigitsNet] | type[DigitsMultiscaleNet], train_config: dict[str, Any]
) -> DigitsNet | DigitsMultiscaleNet | None:
    try:
        info = read_json(folder / "info.json", f"{cls.name} feature cache")
        weights = folder / "weights.safetensors"
        if not isinstance(info, dict) or info.get("version") != cls.name or info.get("train") != train_config:
            return None
        if info.get("weights_sha256") != sha256_file(weights):
            return None
        net = cls(info)
        net.load_state_dict(load_file(weights), strict=True)
    except (SlimdiffError, OSError, SafetensorError, RuntimeError, KeyError, ValueError):
        return None
    if not all(p.isfinite().all() for p in net.parameters()):
        return None
    net.info["from_cache"] = True
    return net


def _train_digits() -> DigitsNet:
    """Train on the digits train split with small random affine jitter; deterministic, global RNG untouched."""
    return _train_classifier(DigitsNet, _DIGITS_TRAIN, _jitter)


def _train_digits_multiscale() -> DigitsMultiscaleNet:
    """Train on the digits train split with random whole-pixel shifts and label smoothing; deterministic."""
    cfg = _DIGITS_MS_TRAIN
    return _train_classifier(
        DigitsMultiscaleNet, cfg, lambda x: _shift(x, cfg["max_shift"]), label_smoothing=cfg["label_smoothing"]
    )


def _train_classifier(
    cls: type[DigitsNet] | type[DigitsMultiscaleNet],
    cfg: dict[str, Any],
    augment: Callable[[torch.Tensor], torch.Tensor],
    label_smoothing: float = 0.0,
) -> Any:
    """AdamW + one-cycle classification training of `cls` from `cfg["seed"]`; global RNG and threads untouched."""
    from slimdiff.data import load_data

    train, holdout = (load_data("digits", size=_DIGITS_SIZE, split=s) for s in ("train", "holdout"))
    x, y = torch.stack([im for im, _ in train]), torch.tensor([label for _, label in train])
    start, threads = time.perf_counter(), torch.get_num_threads()
    torch.set_num_threads(1)  # tiny batches train fastest single-threaded, and results never depend on core count
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg["seed"])
            net = cls()
            model = nn.Sequential(net.body, net.head)
            steps_per_epoch = math.ceil(len(x) / cfg["batch_size"])
            opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg["lr"], total_steps=cfg["epochs"] * steps_per_epoch)
            for _ in range(cfg["epochs"]):
                for idx in torch.randperm(len(x)).split(cfg["batch_size"]):
                    loss = F.cross_entropy(model(augment(x[idx])), y[idx], label_smoothing=label_smoothing)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    sched.step()
            net.eval()
            with torch.no_grad():
                net.calibrate(x)
                images = torch.stack([im for im, _ in holdout])
                correct = (net.logits(images).argmax(1) == torch.tensor([label for _, label in holdout])).sum()
    finally:
        torch.set_num_threads(threads)
    net.info = {
        "version": cls.name,
        "holdout_accuracy": round(correct.item() / len(holdout), 6),
        "epochs": cfg["epochs"],
        "seed": cfg["seed"],
        "train": cfg,
        "train_seconds": round(time.perf_counter() - start, 2),
    }
    return net


def _jitter(x: torch.Tensor) -> torch.Tensor:
    """Random rotation (±10°), scale (±10 %) and shift (±1 px) per image; the border stays background (-1)."""
    n = len(x)
    angle = (torch.rand(n) * 2 - 1) * math.radians(10)
    scale = 1 + (torch.rand(n) * 2 - 1) * 0.1
    shift = (torch.rand(n, 2) * 2 - 1) * (2 / _DIGITS_SIZE)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x + 1, grid, align_corners=False) - 1


def _shift(x: torch.Tensor, max_shift: int) -> torch.Tensor:
    """Shift each image by a random whole number of pixels in [-max_shift, max_shift] per axis (border -1)."""
    h, w = x.shape[-2:]
    offsets = torch.randint(0, 2 * max_shift + 1, (len(x), 2)).tolist()
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    return torch.stack([padded[i, :, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(offsets)])


# --- FID Inception ----------------------------------------------------------------------------------------------


class InceptionNet(FeatureExtractor):
    """The FID Inception-v3 TorchScript network (2048-d pool features, 1008-class IS head)."""

    def __init__(self, net: torch.jit.ScriptModule, name: str, info: dict[str, Any]) -> None:
        super().__init__()
        self.net = net.eval()
        self.name = name
        self.info = info
        arguments = [a.name for a in net.forward.schema.arguments]
        # StyleGAN/clean-fid compute IS without the classifier bias, as the original TensorFlow code did.
        self._logit_kwargs = {"no_output_bias": True} if "no_output_bias" in arguments else {}
        probe = torch.zeros(2, 3, 32, 32)
        try:
            with torch.no_grad():
                features, head = self.net(probe, return_features=True), self.net(probe, **self._logit_kwargs)
        except Exception as error:  # TorchScript raises plain RuntimeErrors with multi-line messages
            detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise SlimdiffError(
                f"{info['path']} does not behave like the FID Inception network "
                f"(net(images, return_features=True) failed: {detail}); supply {INCEPTION_FILE}"
            ) from None
        self.num_features = features.reshape(2, -1).shape[1]
        self.num_classes = head.reshape(2, -1).shape[1]
        # The standard network returns softmax probabilities; take their log so `logits()` is log-probabilities.
        self._returns_probs = bool((head >= 0).all() and torch.allclose(head.sum(-1), torch.ones(2), atol=1e-3))

    @staticmethod
    def prepare(images: torch.Tensor) -> torch.Tensor:
        """[-1, 1] images → 3-channel float 0..255 (quantized like uint8); the network resizes to 299 itself."""
        x = _clamped(images)
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        return ((x + 1) * 127.5).round()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(self.prepare(images), return_features=True).reshape(len(images), -1)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        out = self.net(self.prepare(images), **self._logit_kwargs).reshape(len(images), -1)
        return out.clamp_min(1e-30).log() if self._returns_probs else out


def inception_feature_extractor(path: str | Path) -> InceptionNet:
    """Load the FID Inception network from a local TorchScript file (never downloaded).

    The file is the standard `inception-2015-12-05.pt` of StyleGAN2-ADA / clean-fid, called as
    `net(images_0_255, return_features=True) -> (N, 2048)`. It is read with `torch.jit.load` — TorchScript, an
    archive of code and tensors, not a pickle. pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` is a pickled
    state dict and is refused.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise SlimdiffError(
            f"FID Inception file {str(path)!r} {what}; supply the TorchScript {INCEPTION_FILE} "
            "(StyleGAN2-ADA / clean-fid); slimdiff never downloads it"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torch>=2.9 deprecates TorchScript loading
            net = torch.jit.load(str(path), map_location="cpu")
    except (RuntimeError, ValueError, OSError) as error:
        detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise SlimdiffError(
            f"{str(path)!r} is not a TorchScript file ({detail}); supply {INCEPTION_FILE} "
            "(pickled .pth weights such as pytorch-fid's are not accepted)"
        ) from None
    info = {"path": str(path), "weights_sha256": sha256_file(path)}
    return InceptionNet(net, path.stem, info).requires_grad_(False).eval()
