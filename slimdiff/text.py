"""Prompt encoding for text-conditioned (Stable-Diffusion-family) models, from local directories only.

`TextEncoder` pairs a CLIP tokenizer with a CLIP text model and turns prompts into the `last_hidden_state`
embeddings a U-Net cross-attends to, exactly as diffusers' `StableDiffusionPipeline` computes them (SD 1.x/2.x).
`SDXLTextEncoders` holds SDXL's two and encodes through `StableDiffusionXLPipeline.encode_prompt` itself (penultimate
hidden states concatenated, the second encoder's pooled embedding), packed with the time ids into one condition
tensor (`slimdiff.models.unet.pack_added_cond`). `load_text_encoders` picks the right one for a pipeline folder.
`make_tiny_clip_text` builds a small random one (tokenizer included) without downloading anything, for tests
and demos.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from slimdiff.data.cache import weights_checksum
from slimdiff.errors import SlimdiffError
from slimdiff.io import atomic_dir
from slimdiff.models.unet import TIME_IDS, pack_added_cond, with_time_ids

if TYPE_CHECKING:  # importing diffusers' pipelines loads transformers' image processors: only where SDXL is used
    from diffusers import StableDiffusionXLPipeline

TOKENIZER_DIR = "tokenizer"
TEXT_ENCODER_DIR = "text_encoder"
TOKENIZER_2_DIR = "tokenizer_2"
TEXT_ENCODER_2_DIR = "text_encoder_2"
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
# Words merged into single tokens by the tiny tokenizer, so common prompts tokenize like a real BPE vocabulary.
_TINY_WORDS = ("a", "an", "the", "of", "photo", "picture", "digit", "number", "image", "drawing")


class TextEncoder:
    """A CLIP tokenizer and CLIP text model (eval mode, no grad) that map prompts to embeddings."""

    def __init__(self, tokenizer: CLIPTokenizer, text_model: CLIPTextModel) -> None:
        if tokenizer.model_max_length > text_model.config.max_position_embeddings:
            raise SlimdiffError(
                f"tokenizer max length {tokenizer.model_max_length} exceeds the text encoder's "
                f"max_position_embeddings {text_model.config.max_position_embeddings}; it must be at most that"
            )
        self.tokenizer = tokenizer
        self.text_model = text_model.eval().requires_grad_(False)
        #: What identifies the weights (their folder's checksum), for caching embeddings; None when unsaved.
        self.checksum: str | None = None

    @classmethod
    def from_dir(cls, path: str | Path) -> TextEncoder:
        """Load from a folder (e.g. a Stable Diffusion pipeline) with `tokenizer/` and `text_encoder/` subfolders.

        Local files only; the text encoder must be stored as safetensors (pickled `.bin` weights are refused).
        """
        path = Path(path)
        if not path.is_dir():
            raise SlimdiffError(f"{path} is not a directory; give a folder with tokenizer/ and text_encoder/")
        tokenizer, text_model = _load_clip(path, TOKENIZER_DIR, TEXT_ENCODER_DIR, CLIPTextModel)
        encoder = cls(tokenizer, text_model)
        encoder.checksum = weights_checksum(path / TEXT_ENCODER_DIR)
        return encoder

    @property
    def hidden_size(self) -> int:
        """Width of each token embedding (the U-Net's `cross_attention_dim`)."""
        return self.text_model.config.hidden_size

    @property
    def max_length(self) -> int:
        """Number of tokens every prompt is padded or truncated to."""
        return self.tokenizer.model_max_length

    @torch.no_grad()
    def encode(self, prompts: list[str], device: torch.device | str | None = None) -> torch.Tensor:
        """Embed `prompts` as a `(len(prompts), max_length, hidden_size)` tensor of last hidden states.

        `device` is where the text model runs (it is moved there if needed); default: where it already is.
        """
        if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise SlimdiffError(f"prompts must be a non-empty list of strings, got {prompts!r:.80}")
        if device is not None:
            self.text_model.to(device)
        ids = self.tokenizer(
            list(prompts), padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt"
        ).input_ids
        return self.text_model(ids.to(self.text_model.device)).last_hidden_state

    def uncond(self) -> torch.Tensor:
        """The condition for classifier-free guidance: the empty prompt's embedding `(1, tokens, dim)`."""
        return self.encode([""])

    def save(self, path: str | Path) -> None:
        """Write `tokenizer/` and `text_encoder/` (safetensors) into `path`, each replaced atomically."""
        path = Path(path)
        with atomic_dir(path / TOKENIZER_DIR) as tmp:
            self.tokenizer.save_pretrained(tmp)
            if not (tmp / "vocab.json").exists():
                # transformers 5 writes only tokenizer.json; keep vocab.json/merges.txt for the slow tokenizer of 4.x.
                self.tokenizer.backend_tokenizer.model.save(str(tmp))
        with atomic_dir(path / TEXT_ENCODER_DIR) as tmp:
            self.text_model.save_pretrained(tmp, safe_serialization=True)


def _load_clip(
    path: Path, tokenizer_dir: str, model_dir: str, model_class: type[CLIPTextModel] | type[CLIPTextModelWithProjection]
) -> tuple[CLIPTokenizer, CLIPTextModel | CLIPTextModelWithProjection]:
    """A tokenizer and CLIP text model from two subfolders of `path` (safetensors only), or one clear error."""
    for sub in (tokenizer_dir, model_dir):
        if not (path / sub).is_dir():
            raise SlimdiffError(f"{path} has no {sub}/ subfolder; it needs both {tokenizer_dir}/ and {model_dir}/")
    weights = path / model_dir
    if not any(weights.glob("*.safetensors")):
        found = sorted(p.name for p in weights.glob("*.bin"))
        detail = f"only pickled weights ({', '.join(found)})" if found else "no weights"
        raise SlimdiffError(f"{weights} has {detail}; slimdiff loads only .safetensors text encoder weights")
    try:
        tokenizer = CLIPTokenizer.from_pretrained(path / tokenizer_dir, local_files_only=True)
        text_model = model_class.from_pretrained(weights, local_files_only=True, use_safetensors=True)
    except (OSError, ValueError) as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise SlimdiffError(f"cannot load the CLIP text encoder from {path}: {message}") from None
    return tokenizer, text_model


class SDXLTextEncoders:
    """SDXL's two CLIP text encoders, encoding exactly as `StableDiffusionXLPipeline.encode_prompt` does; each
    condition is packed with the default time ids of `resolution` (no crop) for the U-Net adapter to unpack."""

    def __init__(self, pipeline: StableDiffusionXLPipeline, resolution: int, *, checksum: str | None = None) -> None:
        self.pipeline = pipeline
        self.resolution = resolution
        self.checksum = checksum

    @classmethod
    def from_dir(cls, path: str | Path, resolution: int) -> SDXLTextEncoders:
        """Load `tokenizer/`, `text_encoder/`, `tokenizer_2/` and `text_encoder_2/` of an SDXL pipeline folder."""
        from diffusers import StableDiffusionXLPipeline

        path = Path(path)
        if not (path / TEXT_ENCODER_2_DIR).is_dir():
            raise SlimdiffError(
                f"{path} is an SDXL pipeline (text_time conditioning) without {TEXT_ENCODER_2_DIR}/ and "
                f"{TOKENIZER_2_DIR}/; SDXL needs both of its text encoders"
            )
        tokenizer, text_model = _load_clip(path, TOKENIZER_DIR, TEXT_ENCODER_DIR, CLIPTextModel)
        tokenizer_2, text_model_2 = _load_clip(path, TOKENIZER_2_DIR, TEXT_ENCODER_2_DIR, CLIPTextModelWithProjection)
        index = path / "model_index.json"
        force_zeros = (
            json.loads(index.read_text()).get("force_zeros_for_empty_prompt", True) if index.is_file() else True
        )
        pipeline = StableDiffusionXLPipeline(
            vae=None,
            text_encoder=text_model.eval().requires_grad_(False),
            text_encoder_2=text_model_2.eval().requires_grad_(False),
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            unet=None,
            scheduler=None,
            force_zeros_for_empty_prompt=force_zeros,
        )
        checksum = weights_checksum(path / TEXT_ENCODER_DIR) + weights_checksum(path / TEXT_ENCODER_2_DIR)
        return cls(pipeline, resolution, checksum=checksum)

    @property
    def hidden_size(self) -> int:
        """Width of each token embedding: both encoders' hidden sizes (the U-Net's `cross_attention_dim`)."""
        return self.pipeline.text_encoder.config.hidden_size + self.pipeline.text_encoder_2.config.hidden_size

    def _time_ids(self, batch: int) -> torch.Tensor:
        r = self.resolution
        return torch.tensor([[r, r, 0, 0, r, r]], dtype=torch.float32).expand(batch, TIME_IDS)

    @torch.no_grad()
    def encode(self, prompts: list[str], device: torch.device | str | None = None) -> torch.Tensor:
        """Packed conditions `(len(prompts), 77 + rows, hidden_size)` (see `pack_added_cond`)."""
        if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise SlimdiffError(f"prompts must be a non-empty list of strings, got {prompts!r:.80}")
        device = torch.device(device) if device is not None else self.pipeline.text_encoder.device
        self.pipeline.to(device)
        embeds, _, pooled, _ = self.pipeline.encode_prompt(
            list(prompts), device=device, do_classifier_free_guidance=False
        )
        return pack_added_cond(embeds, pooled, self._time_ids(len(prompts)).to(device))

    @torch.no_grad()
    def uncond(self) -> torch.Tensor:
        """The guidance condition as the pipeline makes it: zeros where `force_zeros_for_empty_prompt` (SDXL's
        default), else the empty prompt's embeddings; with the default time ids."""
        if not self.pipeline.config.force_zeros_for_empty_prompt:
            return self.encode([""])
        empty = self.encode([""])
        return with_time_ids(torch.zeros_like(empty), self._time_ids(1))


def load_text_encoders(
    path: str | Path, unet_config: dict[str, Any], resolution: int
) -> TextEncoder | SDXLTextEncoders:
    """The text encoder(s) of a pipeline folder, as its U-Net reads them: SDXL's two, or one CLIP."""
    if unet_config.get("addition_embed_type") == "text_time":
        return SDXLTextEncoders.from_dir(path, resolution)
    return TextEncoder.from_dir(path)


def _byte_level_alphabet() -> list[str]:
    """The 256 printable characters byte-level BPE (GPT-2 / CLIP) uses for bytes 0..255, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(shifted)) for b in range(256)]


def _tiny_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP-style vocabulary: bytes, bytes + `</w>`, merged `_TINY_WORDS` pieces, then the two special tokens."""
    alphabet = _byte_level_alphabet()
    tokens = alphabet + [c + "</w>" for c in alphabet]
    merges: list[tuple[str, str]] = []
    for word in _TINY_WORDS:
        for i in range(1, len(word)):
            pair = (word[:i], word[i] + ("</w>" if i == len(word) - 1 else ""))
            if pair not in merges:
                merges.append(pair)
                tokens.append("".join(pair))
    tokens += [BOS_TOKEN, EOS_TOKEN]
    return {token: i for i, token in enumerate(tokens)}, merges


def make_tiny_clip_text(path: str | Path, *, hidden_size: int = 32, seed: int = 0, max_length: int = 77) -> TextEncoder:
    """Build a tiny random CLIP text encoder and tokenizer (no download), save it to `path`, and return it.

    The same `seed` gives identical weights; the global RNG state is left untouched.
    """
    if hidden_size < 2 or hidden_size % 2:
        raise SlimdiffError(f"hidden_size must be an even integer >= 2 (2 attention heads), got {hidden_size}")
    if max_length < 3:
        raise SlimdiffError(f"max_length must be >= 3 (start, end and one prompt token), got {max_length}")
    vocab, merges = _tiny_vocab_and_merges()
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        lines = ["#version: 0.2", *(f"{a} {b}" for a, b in merges)]
        (Path(tmp) / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        tokenizer = CLIPTokenizer.from_pretrained(tmp, model_max_length=max_length, local_files_only=True)
    config = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=max_length,
        bos_token_id=vocab[BOS_TOKEN],
        eos_token_id=vocab[EOS_TOKEN],
        pad_token_id=vocab[EOS_TOKEN],
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_model = CLIPTextModel(config)
    encoder = TextEncoder(tokenizer, text_model)
    encoder.save(path)
    return encoder
