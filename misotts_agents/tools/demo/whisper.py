"""The demo's local speech recognizer: a faster-whisper model fetched once (a local directory, or the
Hugging Face cache with a progress bar), loaded once per process, and Pipecat's Whisper STT service
on that one model.

Pipecat's ``WhisperSTTService`` loads its model in its constructor, so a model per conversation, and
faster-whisper downloads with its progress bar switched off; the demo fetches and loads the model
before serving instead, and every conversation's service shares it (CTranslate2 models take
concurrent calls).
"""

from __future__ import annotations

import functools
import logging
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_WHISPER = "small.en"  # 0.5 GB; real time on a few CPU cores, far faster on a GPU
WHISPER_FILES = ["config.json", "preprocessor_config.json", "model.bin", "tokenizer.json", "vocabulary.*"]


def whisper_repo(name: str) -> str:
    """The Hub repo of a faster-whisper model name (``small.en``) or id (``Systran/faster-whisper-small``)."""
    if "/" in name:
        return name
    from faster_whisper import available_models
    from faster_whisper.utils import _MODELS  # the size -> repo table faster-whisper itself uses

    if name not in _MODELS:
        raise ValueError(f"unknown Whisper model {name!r}: one of {', '.join(available_models())}, a repo id or a dir")
    return _MODELS[name]


def whisper_cached(model: str | None) -> str | None:
    """Why ``model`` cannot be had here (None: a local model directory, in the cache, or downloadable)."""
    from huggingface_hub import constants, snapshot_download

    name = model or DEFAULT_WHISPER
    path = Path(name).expanduser()
    if path.is_dir() or name.startswith((".", "/", "~")):
        return None if (path / "model.bin").is_file() else f"{path} holds no faster-whisper model (model.bin)"
    try:
        repo = whisper_repo(name)
    except ValueError as exc:
        return str(exc)
    if not constants.HF_HUB_OFFLINE:
        return None  # fetched on first use
    try:
        snapshot_download(repo, allow_patterns=WHISPER_FILES, local_files_only=True)
    except Exception:
        return f"Whisper model {repo} is not in the Hugging Face cache and HF_HUB_OFFLINE is set"
    return None


@functools.cache
def fetch_whisper(name: str) -> str:
    """A local directory holding the model: ``name`` itself, or its Hub snapshot (downloaded once into
    the Hugging Face cache, with a progress bar)."""
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "model.bin").is_file():
            raise FileNotFoundError(f"{path} holds no faster-whisper model (model.bin)")
        return str(path)
    from huggingface_hub import snapshot_download

    repo = whisper_repo(name)
    log.info("Whisper model %s: fetching into the Hugging Face cache (once)", repo)
    return snapshot_download(repo, allow_patterns=WHISPER_FILES)


@functools.cache
def load_whisper(name: str, device: str = "auto", compute_type: str = "default") -> Any:
    """The process-wide faster-whisper model for ``name`` (fetched first if needed)."""
    from faster_whisper import WhisperModel

    path = fetch_whisper(name)
    start = time.perf_counter()
    log.info("loading Whisper model %s (device %s)", name, device)
    model = WhisperModel(path, device=device, compute_type=compute_type)
    log.info("Whisper model %s loaded in %.1f s", name, time.perf_counter() - start)
    return model


def local_whisper_stt(name: str, **kwargs: Any) -> Any:
    """Pipecat's Whisper STT service on the shared model for ``name``."""
    from pipecat.services.whisper.stt import WhisperSTTService

    class SharedWhisperSTTService(WhisperSTTService):
        def _load(self) -> None:  # Pipecat's per-instance load, replaced by the process-wide model
            self._model = load_whisper(name)

    return SharedWhisperSTTService(settings=WhisperSTTService.Settings(model=name), **kwargs)
