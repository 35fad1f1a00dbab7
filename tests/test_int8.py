"""An int8 engine through every way in: Pipecat, LiveKit, the server, the Ray Serve arguments."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
from livekit.agents import APIConnectOptions
from pipecat.frames.frames import TTSAudioRawFrame, TTSSpeakFrame
from pipecat.pipeline.worker import PipelineParams
from pipecat.tests.utils import run_test
from remote_server import LoopbackServer

from misotts_agents.engine.registry import shared_engine
from misotts_agents.engine.request import SynthesisRequest
from misotts_agents.livekit import TTS
from misotts_agents.pipecat import MisoTTSService
from misotts_agents.server import RemoteEngine

SHORT_MS = 80 * 4


@pytest.fixture(scope="module")
def int8_engine(tiny_dir: Path):
    """The process-wide engine both integrations ask the registry for with ``weights="int8"``."""
    engine = shared_engine(str(tiny_dir), device="cpu", watermark=False, weights="int8")
    assert engine.model.weights == "int8"
    yield engine
    engine.close()


def test_pipecat_speaks_with_int8_weights(tiny_dir, int8_engine):
    tts = MisoTTSService(
        str(tiny_dir),
        device="cpu",
        watermark=False,
        weights="int8",
        settings=MisoTTSService.Settings(max_audio_ms=SHORT_MS),
    )
    assert tts.engine is int8_engine  # the option reached the registry
    down, _ = asyncio.run(
        run_test(
            tts, frames_to_send=[TTSSpeakFrame("Hello.")], pipeline_params=PipelineParams(audio_out_sample_rate=24_000)
        )
    )
    assert sum(len(f.audio) for f in down if isinstance(f, TTSAudioRawFrame)) > 0


@pytest.mark.asyncio
async def test_livekit_speaks_with_int8_weights(tiny_dir, int8_engine):
    tts = TTS(
        model=str(tiny_dir), device="cpu", watermark=False, load_options={"weights": "int8"}, max_audio_ms=SHORT_MS
    )
    assert tts.load_engine() is int8_engine
    frame = await tts.synthesize("Hello.", conn_options=APIConnectOptions(max_retry=0, timeout=20.0)).collect()
    assert frame.samples_per_channel > 0
    await tts.aclose()


def test_server_says_what_the_int8_engine_says(int8_engine):
    request = SynthesisRequest("Over the wire.", seed=5, max_audio_ms=SHORT_MS)
    with LoopbackServer(int8_engine, token=None) as server, RemoteEngine(server.url) as remote:
        np.testing.assert_array_equal(remote.synthesize(request).codes, int8_engine.synthesize(request).codes)


def test_ray_serve_args_take_weights():
    pytest.importorskip("ray")
    from misotts_agents.server.ray.serve import RayServeArgs, build_app

    args = RayServeArgs.model_validate({"weights": "int8"})
    assert args.weights == "int8"
    build_app(args)  # the replica's options accept it
    with pytest.raises(ValueError, match="weights"):
        RayServeArgs.model_validate({"weights": "int4"})
