"""Engine errors as LiveKit's APIError kinds, so LiveKit retries exactly what may succeed again."""

from __future__ import annotations

from livekit.agents import APIConnectionError, APIError, APIStatusError, APITimeoutError

from misotts_agents.errors import WIRE_CODES, CheckpointError, EngineClosed, ModelSourceError, error_code


def map_error(exc: BaseException) -> APIError:
    """An engine exception as the LiveKit error the framework's retry logic understands: whether a
    retry may succeed is the error table's (``errors.WIRE_CODES``), the kind of error what failed."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, TimeoutError):
        return APITimeoutError(f"MisoTTS produced no audio in time: {exc}")
    code = error_code(exc)
    row = WIRE_CODES[code]
    if isinstance(exc, (ModelSourceError, CheckpointError)):  # the model could not be loaded
        return APIConnectionError(f"MisoTTS engine failed to load: {exc}", retryable=row.retryable)
    if isinstance(exc, ConnectionError):  # url= (or the inference process): unreachable, or connection lost
        return APIConnectionError(f"MisoTTS server connection failed: {exc}", retryable=row.retryable)
    if isinstance(exc, EngineClosed) or code == "internal":
        return APIConnectionError(f"MisoTTS engine error: {type(exc).__name__}: {exc}", retryable=row.retryable)
    return APIStatusError(
        f"MisoTTS refused the request ({code}): {exc}", status_code=row.http_status, retryable=row.retryable
    )
