"""Pipecat integration: :class:`MisoTTSService`, a local streaming TTS with tone conditioning."""

from .tts import MisoTTSService, MisoTTSSettings, MisoUserAudioTap

__all__ = ["MisoTTSService", "MisoTTSSettings", "MisoUserAudioTap"]
