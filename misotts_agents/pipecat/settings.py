"""MisoTTSSettings: the Pipecat service's runtime-updatable settings, and the request they make.

The settings start from the request's own defaults, and a change is checked by making a request
with it (the request declares the bounds), so a bad update is refused before it applies.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TypeVar

from pipecat.services.settings import TTSSettings
from pipecat.utils.types import NOT_GIVEN, NotGiven

from misotts_agents.engine.request import Segment, SynthesisRequest
from misotts_agents.engine.voice import VoicePrompt
from misotts_agents.errors import InvalidRequest

DEFAULT_VOICE = "default"
_REQUEST_DEFAULTS = SynthesisRequest("defaults")  # the settings start from the request's own defaults
_T = TypeVar("_T")


def _given(value: _T | NotGiven, name: str) -> _T:
    """A setting's value. The service's settings are complete (every field given: Pipecat checks at
    start, and an update only replaces given fields), so NOT_GIVEN here is refused, never sent on."""
    if isinstance(value, NotGiven):
        raise InvalidRequest(f"the {name} setting has no value")
    return value


@dataclass
class MisoTTSSettings(TTSSettings):
    """Runtime-updatable settings of :class:`MisoTTSService` (send a delta in ``TTSUpdateSettingsFrame``).

    Every change applies from the next request (the next sentence) on. An update is checked when it
    arrives: a value out of bounds (or an unregistered voice) is refused with an ``ErrorFrame`` and
    the settings stay as they were; the constructor raises ``ValueError`` for the same values.

    Parameters:
        voice: name of a registered voice prompt (``MisoTTSService.register_voice``; the constructor's
            ``voice=`` is registered as ``"default"``), or None for no voice prompt.
        temperature: sampling temperature, in (0, 100].
        topk: top-k sampling, in [1, 2051] (1 is greedy).
        watermark: None uses the engine's setting; False opts requests out of the SilentCipher mark;
            True requires it (an error if the engine was loaded without a watermarker).
        max_audio_ms: longest audio per sentence.
        max_ahead_s: pace generation to at most this many seconds of audio ahead of real time
            (less GPU work wasted when the user barges in); None generates flat out.
        seed: fixed sampling seed in [0, 2**63 - 1] (reproducible audio), or None for a fresh one per
            request.
    """

    temperature: float | NotGiven = field(default_factory=lambda: NOT_GIVEN)
    topk: int | NotGiven = field(default_factory=lambda: NOT_GIVEN)
    watermark: bool | NotGiven | None = field(default_factory=lambda: NOT_GIVEN)
    max_audio_ms: float | NotGiven = field(default_factory=lambda: NOT_GIVEN)
    max_ahead_s: float | NotGiven | None = field(default_factory=lambda: NOT_GIVEN)
    seed: int | NotGiven | None = field(default_factory=lambda: NOT_GIVEN)


def default_settings(model: str, voice: bool) -> MisoTTSSettings:
    """Every setting given: the request's defaults, labelled ``model``; the default voice if ``voice``."""
    return MisoTTSSettings(
        model=model,
        voice=DEFAULT_VOICE if voice else None,
        language=None,
        temperature=_REQUEST_DEFAULTS.temperature,
        topk=_REQUEST_DEFAULTS.topk,
        watermark=None,
        max_audio_ms=_REQUEST_DEFAULTS.max_audio_ms,
        max_ahead_s=None,
        seed=None,
    )


def settings_request(
    s: MisoTTSSettings,
    voices: Mapping[str, VoicePrompt],
    text: str,
    speaker: int = 0,
    context: tuple[Segment, ...] = (),
) -> SynthesisRequest:
    """The engine request for ``text`` with settings ``s`` (``voices``: the registered voice prompts);
    InvalidRequest for a value out of bounds or an unregistered voice."""
    voice = None
    name = _given(s.voice, "voice")
    if name is not None:
        voice = voices.get(name)
        if voice is None:
            raise InvalidRequest(f"unknown voice {name!r}: register it with register_voice() first")
    return SynthesisRequest(
        text,
        speaker=speaker,
        context=context,
        voice=voice,
        temperature=_given(s.temperature, "temperature"),
        topk=_given(s.topk, "topk"),
        seed=_given(s.seed, "seed"),
        max_audio_ms=_given(s.max_audio_ms, "max_audio_ms"),
        watermark=_given(s.watermark, "watermark"),
        max_ahead_s=_given(s.max_ahead_s, "max_ahead_s"),
    )
