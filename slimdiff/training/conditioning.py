"""How dataset labels become a model's condition in training: class labels (with dropout to the null class), or
prompt embeddings (with caption dropout to the empty prompt, and SDXL's size/crop ids)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from slimdiff.errors import SlimdiffError
from slimdiff.models import Adapter
from slimdiff.models.unet import with_time_ids


@dataclass
class Conditioning:
    """How dataset labels become the model's condition: class labels, or prompt embeddings.

    A text model's `prompt_table` holds one embedding per prompt; a label picks its row directly (one prompt per
    class) or through `prompt_rows` (captioned data: label = item, row = its caption). `time_ids` (SDXL), one row
    per label, are written into the packed condition after caption dropout, so a dropped caption keeps its image's
    size and crop, as in diffusers' SDXL training script.
    """

    kind: Literal["none", "class", "text"]
    null_class: int | None = None
    prompt_table: torch.Tensor | None = None  # (prompts, tokens, dim)
    empty_prompt: torch.Tensor | None = None  # (1, tokens, dim)
    prompt_rows: torch.Tensor | None = None  # (labels,) → row of prompt_table
    time_ids: torch.Tensor | None = None  # (labels, 6)

    def __call__(self, labels: torch.Tensor, drop: torch.Tensor) -> torch.Tensor | None:
        """Conditions for a batch; where `drop` is true the condition is replaced by the null one."""
        if self.kind == "none":
            return None
        if self.kind == "class":
            return labels if self.null_class is None else torch.where(drop, self.null_class, labels)
        cond = self.prompt_table[labels if self.prompt_rows is None else self.prompt_rows[labels]]
        if self.empty_prompt is not None:
            cond = torch.where(drop[:, None, None], self.empty_prompt.expand_as(cond), cond)
        return cond if self.time_ids is None else with_time_ids(cond, self.time_ids[labels])

    def to(self, device: torch.device | str) -> Conditioning:
        """The same conditioning with its tensors on `device`."""
        moved = {
            name: value.to(device) if isinstance(value, torch.Tensor) else value for name, value in vars(self).items()
        }
        return Conditioning(**moved)


def default_conditioning(adapter: Adapter) -> Conditioning:
    """Class labels (with the model's null class for dropout) or nothing; text models need `text_conditioning`.

    Models that drop labels themselves in training mode (DiT) get no second dropout.
    """
    if adapter.cond_kind == "text":
        raise SlimdiffError("a text-conditioned model needs prompt embeddings: build them with text_conditioning()")
    null = adapter.null_class if adapter.builtin_label_dropout == 0 else None
    return Conditioning(kind=adapter.cond_kind, null_class=null)


def text_conditioning(
    prompt_embeddings: torch.Tensor,
    empty_prompt: torch.Tensor | None,
    prompt_rows: torch.Tensor | None = None,
    time_ids: torch.Tensor | None = None,
) -> Conditioning:
    """Prompt embeddings `(prompts, tokens, dim)` (one per class, or per caption with `prompt_rows` mapping labels
    to them), the empty prompt's for caption dropout, and SDXL's per-label `time_ids`."""
    return Conditioning(
        kind="text",
        prompt_table=prompt_embeddings,
        empty_prompt=empty_prompt,
        prompt_rows=prompt_rows,
        time_ids=time_ids,
    )
