"""Pipecat integration: :class:`MisoTTSService`, a local streaming TTS with tone conditioning."""

from misotts_agents.pipecat.tts import MisoTTSService, MisoTTSSettings, MisoUserAudioTap

__all__ = ["MisoTTSService", "MisoTTSSettings", "MisoUserAudioTap"]
