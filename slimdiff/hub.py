"""Model locations: a local folder, or a Hugging Face Hub id resolved through the local Hugging Face cache.

`locate` is the one place a model location becomes a folder; `export.resolve_model_dir` (and so every command and
`slimdiff.load`) goes through it. A Hub id is `ORG/NAME[/SUBFOLDER][@REVISION]`:

- `ORG/NAME` — the repository's snapshot (a pipeline repo's `unet/` or `transformer/` is then found as in a local
  pipeline folder); `ORG/NAME/SUBFOLDER` — a folder inside it (e.g. `org/pipe/unet`);
- `@REVISION` — a branch, tag or commit (default `main`).

It is fetched with `huggingface_hub.snapshot_download` into the ordinary cache (`HF_HUB_CACHE`, or `HF_HOME/hub`):
configs, tokenizer files and safetensors weights only, never pickles. With `HF_HUB_OFFLINE=1`, or when the Hub
cannot be reached, only the cache is read. An existing local path always wins over a Hub id of the same name.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path

from slimdiff.errors import SlimdiffError

#: What a snapshot fetches: configs, tokenizer files and the plain safetensors weights of each component
#: (diffusers' `diffusion_pytorch_model.safetensors`, transformers' `model.safetensors`, and their shards) — no
#: pickles, no `.fp16` / `.non_ema` variants, no single-file checkpoints.
ALLOW_PATTERNS = ("*.json", "*.txt", "*.model", "*model.safetensors", "*model-*-of-*.safetensors")

_HUB_ID = re.compile(
    r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?P<subfolder>(?:/[\w.-]+)*)(?:@(?P<revision>[\w.][\w./-]*))?$"
)


@dataclass(frozen=True)
class HubId:
    """A parsed Hub id: repository, optional revision and subfolder."""

    repo: str
    revision: str | None = None
    subfolder: str = ""

    def download_command(self) -> str:
        """The `hf` command that puts this id into the cache."""
        revision = f" --revision {self.revision}" if self.revision else ""
        return f"hf download {self.repo}{revision}"


def parse_hub_id(text: str) -> HubId | None:
    """`ORG/NAME[/SUBFOLDER][@REVISION]` as a `HubId`; None for anything that cannot be one (absolute, `./x`, …)."""
    match = _HUB_ID.match(text)
    if match is None or text.startswith((".", "~")) or {".", ".."} & set(text.split("@")[0].split("/")):
        return None
    return HubId(match["repo"], match["revision"], match["subfolder"].strip("/"))


def locate(location: str | Path) -> Path:
    """The local folder a model location names: an existing path as given, else a Hub id's snapshot folder."""
    path = Path(location)
    if path.exists():
        return path
    hub_id = parse_hub_id(str(location))
    if hub_id is None:
        raise SlimdiffError(f"model directory not found: {path}")
    from huggingface_hub import constants

    snapshot = _snapshot(hub_id.repo, hub_id.revision, str(constants.HF_HUB_CACHE), constants.HF_HUB_OFFLINE)
    folder = snapshot / hub_id.subfolder
    if not folder.is_dir():
        present = sorted(p.name for p in snapshot.iterdir() if p.is_dir() and not p.name.startswith("."))
        raise SlimdiffError(
            f"{location}: {hub_id.repo} has no folder '{hub_id.subfolder}' (it has: {', '.join(present) or 'none'})"
        )
    return folder


@functools.lru_cache(maxsize=64)
def _snapshot(repo: str, revision: str | None, cache_dir: str, offline: bool) -> Path:
    """The snapshot folder of `repo` at `revision`, fetched once per process (the cache alone when `offline`)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    hub_id = HubId(repo, revision)
    name = f"{repo}@{revision}" if revision else repo
    try:
        folder = snapshot_download(
            repo,
            revision=revision,
            cache_dir=cache_dir,
            local_files_only=offline,
            allow_patterns=list(ALLOW_PATTERNS),
        )
    except LocalEntryNotFoundError:
        raise SlimdiffError(
            f"model directory not found: {name} is neither a folder nor in the Hugging Face cache ({cache_dir}); "
            f"fetch it with `{hub_id.download_command()}`"
            + (" (HF_HUB_OFFLINE=1 is set)" if offline else " (the Hub could not be reached)")
        ) from None
    except GatedRepoError:
        raise SlimdiffError(f"{repo} is gated: accept its terms on the Hub, then `hf auth login`") from None
    except RepositoryNotFoundError:
        raise SlimdiffError(f"model directory not found: {name} is neither a folder nor a Hub repository") from None
    except RevisionNotFoundError:
        raise SlimdiffError(f"{repo} has no revision '{revision}' (a branch, tag or commit)") from None
    except (HFValidationError, HfHubHTTPError) as error:
        raise SlimdiffError(f"cannot fetch {name} from the Hub: {str(error).splitlines()[0]}") from None
    return Path(folder)
