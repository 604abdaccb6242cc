"""`DataConfig`: the data settings of every command that reads images (light: the CLI derives its options from it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from slimdiff.errors import SlimdiffError


@dataclass
class DataConfig:
    """The data settings of every command that reads images (train, finetune, compress, eval)."""

    data: str = field(
        default="digits",
        metadata={
            "help": "'digits' (bundled), an image folder (class subfolders), a captioned folder (metadata.jsonl or "
            "metadata.csv with file_name + a caption column) or a 🤗 datasets save_to_disk folder."
        },
    )
    caption_column: str = field(default="text", metadata={"help": "The caption column of captioned data."})
    center_crop: bool = field(
        default=False,
        metadata={
            "help": "Center-crop training images (default: one seeded random crop per image; calibration "
            "and evaluation always center-crop)."
        },
    )
    random_flip: bool = field(
        default=False, metadata={"help": "Mirror a seeded half of the training images (never for calibration)."}
    )
    cache_dir: str | None = field(
        default=None,
        metadata={
            "help": "Where encoded latents and text embeddings are cached (default: DATA/.slimdiff-cache, "
            "or ~/.cache/slimdiff when the data folder is read-only or is 'digits')."
        },
    )

    def validate(self) -> None:
        """Refuse settings no source could satisfy (whether the data exists is checked when it is read)."""
        for name in ("data", "caption_column"):
            if not getattr(self, name).strip():
                raise SlimdiffError(f"invalid data setting {name} ('--{name.replace('_', '-')}'): must not be empty")

    @classmethod
    def of(cls, data: str | DataConfig) -> DataConfig:
        """`data` as settings: a bare data string gets the defaults."""
        return data if isinstance(data, DataConfig) else cls(data=str(data))

    def crop(self, purpose: Literal["train", "calibrate"]) -> Literal["center", "random"]:
        """How images are cropped for training, or for calibration and evaluation (always centered)."""
        return "random" if purpose == "train" and not self.center_crop else "center"

    def flip(self, purpose: Literal["train", "calibrate"]) -> bool:
        return purpose == "train" and self.random_flip
