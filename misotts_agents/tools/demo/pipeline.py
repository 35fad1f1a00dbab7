"""One conversation's Pipecat pipeline around a transport, and the engine all of them share::

    transport.input() -> STT -> user turns (Silero VAD) -> LLM -> MisoTTSService -> transport.output()

Used by the demo's WebRTC server and by the examples (the Twilio phone bot runs the same pipeline
over a WebSocket transport). Pipecat, torch and the engine are imported when called.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from misotts_agents.audio import SAMPLE_RATE
from misotts_agents.tools.demo.options import DemoOptions
from misotts_agents.tools.demo.services import describe, make_llm, make_stt, resolve_llm, resolve_stt

log = logging.getLogger(__name__)


def load_engine(options: DemoOptions) -> Any:
    """The process-wide engine for these options, loaded and warmed up (first audio is then prompt);
    None with ``url`` (each pipeline's service connects to the server)."""
    if options.url:
        return None

    from misotts_agents.engine.registry import shared_engine
    from misotts_agents.engine.request import SynthesisRequest

    # The download and the weight loading show their own progress bars; these lines frame them.
    start = time.perf_counter()
    log.info("loading MisoTTS %s", options.model)
    engine = shared_engine(options.model, device=options.device, watermark=options.watermark)
    loaded = time.perf_counter()
    log.info(
        "MisoTTS loaded on %s in %.1f s; warming up (first allocations, CUDA graph capture)",
        engine.device,
        loaded - start,
    )
    engine.synthesize(SynthesisRequest("Warming up.", max_audio_ms=240, seed=0))
    log.info(
        "engine ready: warm-up took %.1f s, %.1f s in all", time.perf_counter() - loaded, time.perf_counter() - start
    )
    return engine


def make_tts(options: DemoOptions, engine: Any, memory: Any = None) -> Any:
    """The conversation's MisoTTSService: on ``engine``, or on the ``options.url`` server; ``memory``
    (the demo's switchable turn memory) records every turn, its switch decides what a reply hears."""
    from misotts_agents.pipecat import MisoTTSService

    where: dict[str, Any] = {"url": options.url, "token": options.token} if options.url else {"engine": engine}
    return MisoTTSService(
        model=options.model,
        **where,
        watermark=options.watermark,
        memory=memory,
        tone_conditioning=options.tone_conditioning if memory is None else True,
        max_turns=options.max_turns,
        # Pace generation a little ahead of playback: a barge-in then wastes little GPU work.
        settings=MisoTTSService.Settings(max_audio_ms=options.max_sentence_s * 1000, max_ahead_s=3.0),
    )


@dataclass
class Conversation:
    """One conversation's pipeline and the parts the web page talks to."""

    pipeline: Any
    context: Any  # the LLM context
    tts: Any  # MisoTTSService
    controls: Any  # DemoControls: the tone switch and the uploaded voice


def build_pipeline(transport: Any, options: DemoOptions, engine: Any) -> tuple[Any, Any]:
    """The voice-agent pipeline around ``transport``; returns ``(pipeline, context)``."""
    conversation = build_conversation(transport, options, engine)
    return conversation.pipeline, conversation.context


def build_conversation(transport: Any, options: DemoOptions, engine: Any) -> Conversation:
    """The voice-agent pipeline around ``transport``, with its controls."""
    from pipecat.audio.vad.silero import SileroVADAnalyzer
    from pipecat.pipeline.pipeline import Pipeline
    from pipecat.processors.aggregators.llm_context import LLMContext
    from pipecat.processors.aggregators.llm_response_universal import (
        LLMContextAggregatorPair,
        LLMUserAggregatorParams,
    )

    from misotts_agents.tools.demo.processors import DemoControls, SwitchableMemory, TurnReport

    stt_kind, llm_kind = resolve_stt(options.stt, options.stt_model), resolve_llm(options.llm)
    stt = make_stt(stt_kind, options.stt_model)
    llm = make_llm(llm_kind, options.llm_model)
    system = options.system_prompt
    if stt_kind == "none":
        system += (
            " No speech recognizer is running: each user message is only a placeholder such as "
            "'(user spoke for 2.3 s)'. Do not pretend to know what was said."
        )
    messages: list[Any] = [{"role": "system", "content": system}] if llm_kind != "scripted" else []
    context = LLMContext(messages)
    user, assistant = LLMContextAggregatorPair(
        context, user_params=LLMUserAggregatorParams(vad_analyzer=SileroVADAnalyzer())
    )
    memory = SwitchableMemory(conditioning=options.tone_conditioning, max_turns=max(options.max_turns, 1))
    tts = make_tts(options, engine, memory)
    controls = DemoControls(tts, memory)
    # MisoTTSService records the user's turn audio itself: InputAudioRawFrame passes through the STT,
    # the user aggregator and the LLM (or scripted responder) down to it, with the turn frames.
    report = TurnReport(controls, memory)
    processors = [transport.input(), stt, user, llm, controls, tts, report, transport.output(), assistant]
    return Conversation(Pipeline(processors), context, tts, controls)


async def run_pipeline(
    transport: Any,
    pipeline: Any,
    options: DemoOptions,
    *,
    audio_in_sample_rate: int = 16000,
    audio_out_sample_rate: int = SAMPLE_RATE,
    handle_sigint: bool = False,
) -> None:
    """Run one conversation until the client goes away: greet on connect, cancel on disconnect."""
    from pipecat.frames.frames import TTSSpeakFrame
    from pipecat.pipeline.worker import PipelineParams, PipelineWorker
    from pipecat.workers.runner import WorkerRunner

    worker = PipelineWorker(
        pipeline,
        params=PipelineParams(
            audio_in_sample_rate=audio_in_sample_rate,
            audio_out_sample_rate=audio_out_sample_rate,
            enable_metrics=True,
        ),
    )

    @transport.event_handler("on_client_connected")
    async def _connected(_transport: Any, _client: Any) -> None:
        log.info("client connected: %s", describe(options))
        if options.greeting:
            await worker.queue_frames([TTSSpeakFrame(options.greeting)])

    @transport.event_handler("on_client_disconnected")
    async def _disconnected(_transport: Any, _client: Any) -> None:
        log.info("client disconnected")
        await worker.cancel()

    runner = WorkerRunner(handle_sigint=handle_sigint)
    await runner.add_workers(worker)
    await runner.run()
