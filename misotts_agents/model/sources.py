"""Where files come from: a local directory, or a Hugging Face Hub repo downloaded on first use.

Downloads go through huggingface_hub, so its cache, progress bars and the HF_HUB_OFFLINE /
HF_HOME / HF_TOKEN environment variables all behave as users expect from other HF tools.
"""

from __future__ import annotations

import os
from pathlib import Path

from misotts_agents.errors import ModelSourceError

DEFAULT_MODEL = "MisoLabs/MisoTTS"
# The reference loads meta-llama/Llama-3.2-1B, which is gated; this mirror holds the same file.
DEFAULT_TOKENIZER = "unsloth/Llama-3.2-1B"


def looks_like_local_path(source: str | os.PathLike[str]) -> bool:
    """Hub repo ids are ``owner/name``; anything else that names a path is taken as one."""
    text = os.fspath(source)
    return Path(text).exists() or text.startswith((".", "/", "~")) or text.count("/") != 1


def fetch_file(source: str | os.PathLike[str], filename: str, what: str, hint: str = "") -> Path:
    """Return the path of ``filename`` in a local directory, or download it from the Hub repo ``source``."""
    text = os.fspath(source)
    local = Path(text).expanduser()
    if local.is_dir():
        path = local / filename
        if not path.is_file():
            raise ModelSourceError(f"{what}: {path} is missing. {hint}".strip())
        return path
    if local.is_file() and local.name == filename:
        return local
    if looks_like_local_path(text):
        raise ModelSourceError(f"{what}: no such directory {local}. {hint}".strip())
    return _hub_download(text, filename, what, hint)


def _hub_download(repo_id: str, filename: str, what: str, hint: str) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    # LocalEntryNotFoundError subclasses EntryNotFoundError in recent huggingface_hub: catch it first.
    try:
        return Path(hf_hub_download(repo_id=repo_id, filename=filename))
    except GatedRepoError as exc:
        raise ModelSourceError(
            f"{what}: {repo_id} is gated; accept its licence on the Hub and set HF_TOKEN. {hint}".strip()
        ) from exc
    except RepositoryNotFoundError as exc:
        raise ModelSourceError(
            f"{what}: no Hub repo {repo_id!r} (and no local directory of that name). {hint}".strip()
        ) from exc
    except LocalEntryNotFoundError as exc:
        raise ModelSourceError(
            f"{what}: {filename} from {repo_id} is not in the local Hugging Face cache and the Hub cannot be reached "
            f"(offline, or HF_HUB_OFFLINE=1). Download it once with `hf download {repo_id} {filename}` or pass a local "
            f"directory. {hint}".strip()
        ) from exc
    except EntryNotFoundError as exc:
        raise ModelSourceError(f"{what}: {repo_id} has no file {filename}. {hint}".strip()) from exc
    except (OSError, ValueError) as exc:
        raise ModelSourceError(f"{what}: could not download {filename} from {repo_id}: {exc}. {hint}".strip()) from exc
