"""Pipecat integration: :class:`MisoTTSService`, a local streaming TTS with tone conditioning."""

from misotts_agents.pipecat.capture import MisoUserAudioTap
from misotts_agents.pipecat.settings import MisoTTSSettings
from misotts_agents.pipecat.tts import MisoTTSService

__all__ = ["MisoTTSService", "MisoTTSSettings", "MisoUserAudioTap"]
