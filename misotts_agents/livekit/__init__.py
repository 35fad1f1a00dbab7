"""LiveKit Agents integration: MisoTTS as a streaming ``tts.TTS`` with tone conditioning.

    from misotts_agents.livekit import TTS, MisoToneMixin

    class Assistant(MisoToneMixin, Agent): ...

    session = AgentSession(stt=..., llm=..., tts=TTS("MisoLabs/MisoTTS"))

Worker modes: with ``JobExecutorType.THREAD`` every job shares the process-wide engine
(``registry.shared_engine``); with the default process-per-job worker call
:func:`register_inference_runner` at import and pass ``TTS(engine=InferenceEngine())`` so the
worker's inference process holds the one engine (see ``inference_process.py``).
"""

from misotts_agents.livekit.errors import map_error
from misotts_agents.livekit.inference_process import InferenceEngine, MisoInferenceRunner, register_inference_runner
from misotts_agents.livekit.tone import MisoToneMixin, ToneTracker, tone_for
from misotts_agents.livekit.tts import TTS, ChunkedStream, SynthesizeStream

__all__ = [
    "TTS",
    "ChunkedStream",
    "InferenceEngine",
    "MisoInferenceRunner",
    "MisoToneMixin",
    "SynthesizeStream",
    "ToneTracker",
    "map_error",
    "register_inference_runner",
    "tone_for",
]
