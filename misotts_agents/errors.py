"""Exceptions the engine raises, so callers (and the framework integrations) can map them cleanly."""


class MisoError(Exception):
    """Base class for every error misotts-agents raises on purpose."""


class ModelSourceError(MisoError, FileNotFoundError):
    """A model, tokenizer, codec or watermark source could not be found or downloaded."""


class CheckpointError(MisoError, ValueError):
    """A checkpoint file exists but does not match the model it should fill (keys, shapes, format)."""


class InvalidRequest(MisoError, ValueError):
    """The request itself is bad: empty or too long text, unusable audio, bad sampling parameters."""


class EngineBusy(MisoError):
    """Every slot is busy and the waiting queue is full: retry later or add capacity."""


class EngineClosed(MisoError):
    """The engine was closed; it takes no more requests and ends those still running."""
