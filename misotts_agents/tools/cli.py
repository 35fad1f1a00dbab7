"""The `misotts-agents` command: demo, say, serve, make-tiny, quantize, bench, watermark-check."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from misotts_agents.errors import MisoError
from misotts_agents.model.config import WEIGHT_FORMATS
from misotts_agents.model.sources import DEFAULT_MODEL

if TYPE_CHECKING:
    from misotts_agents.engine.prefill import PrefillChunk


def _key(text: str) -> tuple[int, ...]:
    try:
        key = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError("a key is five integers 0-255, comma separated") from None
    if len(key) != 5 or not all(0 <= v <= 255 for v in key):
        raise argparse.ArgumentTypeError("a key is five integers 0-255, comma separated")
    return key


def _prefill_chunk(text: str) -> PrefillChunk:
    from misotts_agents.engine.prefill import parse_prefill_chunk  # only when serve is parsed (imports torch)

    try:
        return parse_prefill_chunk(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text!r}")
    return value


def _add_watermark_args(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument(
        "--watermark-model",
        default=None,
        help=f"SilentCipher weights: a Hub repo id or a local directory (default: {default})",
    )
    p.add_argument(
        "--watermark-key", type=_key, default=None, help="five integers 0-255 (default: the public 0,0,0,0,0)"
    )


def _add_weights_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--weights",
        choices=WEIGHT_FORMATS,
        default="bf16",
        help="the transformers' linear layers: bf16 (the model's dtype), int8, or fp8 (CUDA, compute "
        "capability >= 8.9); 8-bit weights are quantized while loading, or read from a `quantize` "
        "checkpoint (default: %(default)s)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="misotts-agents", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    sub = parser.add_subparsers(dest="command", required=True)

    say = sub.add_parser("say", help="speak TEXT into a WAV file, streaming through the engine")
    say.add_argument("text")
    say.add_argument("--out", required=True, type=Path, help="output WAV (24 kHz mono, 16-bit)")
    say.add_argument("--model", default=DEFAULT_MODEL, help="local directory or Hub repo id (default: %(default)s)")
    say.add_argument("--device", default=None, help="cuda, cuda:1 or cpu (default: cuda when present)")
    say.add_argument(
        "--dtype", choices=["float32", "bfloat16"], default=None, help="default: bf16 on CUDA, fp32 on CPU"
    )
    _add_weights_arg(say)
    say.add_argument("--speaker", type=int, default=0, help="speaker id of the generated voice (default: 0)")
    say.add_argument("--voice", type=Path, help="a ~10 s clip of the voice to use (any rate; spoken by --speaker)")
    say.add_argument("--voice-text", help="transcript of --voice")
    say.add_argument("--context-audio", type=Path, help="the other party's last turn, to match its tone")
    say.add_argument("--context-text", help="transcript of --context-audio")
    say.add_argument("--context-speaker", type=int, default=1, help="speaker id of the context turn (default: 1)")
    say.add_argument("--seed", type=int, default=None, help="sampling seed (default: random, printed)")
    say.add_argument("--topk", type=int, default=50)
    say.add_argument("--temperature", type=float, default=0.9)
    say.add_argument("--max-ms", type=float, default=90_000, help="longest audio to generate (default: 90000)")
    say.add_argument("--no-watermark", action="store_true", help="do not watermark the output")
    say.add_argument("--codes-out", type=Path, help="also save the codes as an int array (frames, 32) .npy")
    _add_watermark_args(say, "the model directory's silentcipher/ when present, else sony/silentcipher")

    tiny = sub.add_parser("make-tiny", help="write a small random checkpoint directory usable as --model DIR")
    tiny.add_argument("directory", type=Path)
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--tokenizer", default=None, help="tokenizer.json source (default: the bundled Llama-3.2 file)")

    quantize = sub.add_parser(
        "quantize", help="write a checkpoint directory with 8-bit linear layers (loads with --weights int8|fp8)"
    )
    quantize.add_argument("source", help="full-precision checkpoint: a local directory or Hub repo id")
    quantize.add_argument("destination", type=Path, help="directory to write (the source's other files are copied)")
    quantize.add_argument("--weights", choices=WEIGHT_FORMATS[1:], default="int8", help="default: %(default)s")

    bench = sub.add_parser(
        "bench",
        help="time to first audio, RTF and frames/s for 1..N concurrent streams (see `bench --help`)",
        add_help=False,
    )
    bench.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)

    check = sub.add_parser("watermark-check", help="report whether a file carries the SilentCipher watermark")
    check.add_argument("file", type=Path)
    check.add_argument("--phase-shift", action="store_true", help="search phase shifts like the reference (slow)")
    _add_watermark_args(check, "sony/silentcipher")

    serve = sub.add_parser(
        "serve",
        help="serve one shared engine: WebSocket stream + OpenAI-compatible speech (README: Exposing the server)",
    )
    serve.add_argument("--model", default=DEFAULT_MODEL, help="local directory or Hub repo id (default: %(default)s)")
    serve.add_argument(
        "--host", default="127.0.0.1", help="bind address (default: %(default)s; others need a token of 16+ characters)"
    )
    serve.add_argument("--port", type=int, default=8700)
    serve.add_argument(
        "--token-file",
        type=Path,
        default=None,
        help="bearer tokens: NAME:TOKEN lines, one tenant each (or a single token); default: $MISOTTS_TOKENS "
        "(NAME:TOKEN,...) or $MISOTTS_TOKEN; none: no token asked (loopback only)",
    )
    serve.add_argument(
        "--token", default=None, help="one bearer token (visible to other users in `ps`: prefer $MISOTTS_TOKEN)"
    )
    serve.add_argument(
        "--allow-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="a browser origin allowed to use the server, with CORS (repeatable; '*' for any); default: none",
    )
    serve.add_argument("--device", default=None, help="cuda, cuda:1 or cpu (default: cuda when present)")
    serve.add_argument("--no-watermark", action="store_true", help="do not watermark the output")
    _add_weights_arg(serve)
    serve.add_argument("--max-batch", type=int, default=8, help="requests generated at once (default: %(default)s)")
    serve.add_argument(
        "--max-queue", type=int, default=64, help="requests waiting for a slot; more: busy (default: %(default)s)"
    )
    serve.add_argument(
        "--max-wait-s",
        type=_positive_float,
        default=10.0,
        help="seconds a request may wait for a slot before it is refused as busy / HTTP 503 (default: %(default)s)",
    )
    serve.add_argument(
        "--prefill-chunk",
        type=_prefill_chunk,
        default="auto",
        metavar="auto|N|0",
        help="prompt positions prefilled per pass while others speak: 'auto' (sized from measured step and "
        "prefill times), N, or 0 for whole prompts (default: %(default)s)",
    )
    serve.add_argument("--max-text", type=int, default=4000, help="longest text per request in characters")
    serve.add_argument("--max-per-connection", type=int, default=8, help="concurrent requests per WebSocket")
    serve.add_argument(
        "--max-messages-per-s",
        type=float,
        default=200.0,
        help="messages a WebSocket may send a second (pings too), bursts of twice that; over it: closed (1008)",
    )
    serve.add_argument("--max-connections", type=int, default=256, help="open connections (default: %(default)s)")
    serve.add_argument(
        "--max-streams-per-tenant", type=int, default=32, help="concurrent requests per tenant (default: %(default)s)"
    )
    serve.add_argument(
        "--max-waiting-per-tenant",
        type=int,
        default=16,
        help="requests per tenant waiting for an engine slot; more: too_many / HTTP 429 (default: %(default)s)",
    )
    serve.add_argument(
        "--memory-mb",
        type=int,
        default=1024,
        help="sessions and cached audio of all tenants together, in MiB (default: %(default)s)",
    )
    serve.add_argument(
        "--drain-timeout", type=float, default=10.0, help="on SIGTERM: seconds running streams get to finish"
    )
    serve.add_argument(
        "--voice",
        action="append",
        default=[],
        metavar="NAME=CLIP",
        help="a named voice (repeatable): a ~10 s clip, its transcript in the file beside it with .txt "
        "(anna=voices/anna.wav reads voices/anna.txt); requests and the OpenAI 'voice' pick it by name; "
        "TENANT/NAME=CLIP: that tenant's only",
    )
    serve.add_argument("--session-ttl", type=float, default=1800, help="forget sessions idle this many seconds")

    from misotts_agents.tools import demo  # light: Pipecat and torch are imported only when the demo runs

    demo_parser = sub.add_parser("demo", help="talk to MisoTTS in the browser (WebRTC on localhost, Pipecat)")
    demo.add_arguments(demo_parser)
    return parser


def _segment(audio: Path | None, text: str | None, speaker: int, what: str):
    from misotts_agents.audio import read_audio
    from misotts_agents.engine.request import Segment

    if audio is None and text is None:
        return None
    if audio is None or not text:
        raise SystemExit(f"error: {what} needs both the audio file and its transcript")
    return Segment(speaker=speaker, text=text, audio=read_audio(audio))


def cmd_say(args: argparse.Namespace) -> int:
    import torch

    from misotts_agents.audio import SAMPLE_RATE, write_wav
    from misotts_agents.engine.miso_engine import MisoEngine
    from misotts_agents.engine.request import SynthesisRequest
    from misotts_agents.model.watermark import DEFAULT_WATERMARK_KEY

    context = [
        s
        for s in (
            _segment(args.voice, args.voice_text, args.speaker, "--voice"),
            _segment(args.context_audio, args.context_text, args.context_speaker, "--context-audio"),
        )
        if s is not None
    ]
    request = SynthesisRequest(
        text=args.text,
        speaker=args.speaker,
        context=tuple(context),
        temperature=args.temperature,
        topk=args.topk,
        seed=args.seed,
        max_audio_ms=args.max_ms,
    )
    engine = MisoEngine.load(
        args.model,
        device=args.device,
        dtype=getattr(torch, args.dtype) if args.dtype else None,
        watermark=False if args.no_watermark else (args.watermark_model or True),
        watermark_key=args.watermark_key or DEFAULT_WATERMARK_KEY,
        weights=args.weights,
    )
    stream = engine.stream(request)
    pieces = []
    start = time.perf_counter()
    for chunk in stream:
        pieces.append(chunk.pcm)
        logging.getLogger("misotts_agents.say").debug(
            "chunk: %d frames at %.3f s", chunk.frames, time.perf_counter() - start
        )
    audio = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.float32)
    write_wav(args.out, audio)
    if args.codes_out:
        args.codes_out.parent.mkdir(parents=True, exist_ok=True)
        np.save(args.codes_out, stream.codes)
    s = stream.stats
    ttfa = f"{s.time_to_first_audio_s * 1000:.0f} ms" if s.time_to_first_audio_s is not None else "n/a"
    rtf = f"{s.real_time_factor:.2f}" if s.real_time_factor is not None else "n/a"
    print(
        f"wrote {args.out}: {audio.size / SAMPLE_RATE:.2f} s, {s.frames} frames ({s.stop_reason}), "
        f"first audio {ttfa}, RTF {rtf}, seed {s.seed}"
    )
    return 0


def cmd_make_tiny(args: argparse.Namespace) -> int:
    from misotts_agents.testing.tiny import make_tiny

    path = make_tiny(args.directory, seed=args.seed, tokenizer=args.tokenizer)
    print(f"wrote a tiny random checkpoint to {path} (use it as --model {path})")
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from misotts_agents.model.prequantize import quantize_checkpoint

    path = quantize_checkpoint(args.source, args.destination, args.weights)
    print(f"wrote {args.weights} weights to {path} (load it with --model {path} --weights {args.weights})")
    return 0


def cmd_watermark_check(args: argparse.Namespace) -> int:
    from misotts_agents.model.watermark import DEFAULT_WATERMARK_KEY, DEFAULT_WATERMARK_SOURCE, Watermarker, check_file

    source = args.watermark_model or DEFAULT_WATERMARK_SOURCE
    marker = Watermarker.load(source, key=args.watermark_key or DEFAULT_WATERMARK_KEY)
    result = check_file(args.file, marker, phase_shift=args.phase_shift)
    verdict = "watermarked" if result.detected else "not watermarked"
    detail = ""
    if result.message is not None:  # a detection's type allows a message without a confidence
        confidence = "n/a" if result.confidence is None else f"{result.confidence:.2f}"
        detail = f" (message {list(result.message)}, confidence {confidence})"
    print(f"{args.file}: {verdict}{detail}; {result.reason}")
    return 0 if result.detected else 1


def cmd_demo(args: argparse.Namespace) -> int:
    from misotts_agents.tools import demo

    return demo.main(args)


def cmd_bench(args: argparse.Namespace) -> int:
    from misotts_agents.tools.bench import main as bench_main

    return bench_main(args.args)


def cmd_serve(args: argparse.Namespace) -> int:
    from misotts_agents.engine.miso_engine import MisoEngine
    from misotts_agents.server.app import create_app
    from misotts_agents.server.lifecycle import GracefulServer, uvicorn_config
    from misotts_agents.server.protocol import Limits
    from misotts_agents.server.sessions import EngineBackend
    from misotts_agents.server.tenants import Tenants, check_bind
    from misotts_agents.server.voices import named_voices

    try:
        tenants = Tenants.load(args.token_file, args.token)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"error: tokens: {exc}") from None
    check_bind(args.host, tenants)
    if args.token:
        logging.getLogger("misotts_agents.serve").warning(
            "--token is visible to other users of this machine (ps); prefer $MISOTTS_TOKEN or --token-file"
        )
    try:
        voices = named_voices(args.voice)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    for name in voices:
        owner, sep, _ = name.rpartition("/")
        if sep and owner not in tenants.names:
            raise SystemExit(f"error: --voice {name}: no tenant {owner!r} (tenants: {', '.join(tenants.names)})")
    if not 0 < args.max_messages_per_s < float("inf"):
        raise SystemExit(f"error: --max-messages-per-s must be a positive number, got {args.max_messages_per_s}")
    limits = Limits(
        max_text_chars=args.max_text,
        max_concurrent_per_connection=args.max_per_connection,
        max_messages_per_s=args.max_messages_per_s,
        message_burst=max(1, round(2 * args.max_messages_per_s)),
        max_connections=args.max_connections,
        max_streams_per_tenant=args.max_streams_per_tenant,
        max_waiting_per_tenant=args.max_waiting_per_tenant,
        max_memory_bytes=args.memory_mb * 1024 * 1024,
        session_ttl_s=args.session_ttl,
        drain_timeout_s=args.drain_timeout,
    )
    engine = MisoEngine.load(
        args.model,
        device=args.device,
        watermark=not args.no_watermark,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        max_wait_s=args.max_wait_s,
        prefill_chunk=args.prefill_chunk,
        weights=args.weights,
    )
    try:
        backend = EngineBackend(engine, limits, voices)
        app = create_app(
            backend, tenants=tenants, limits=limits, model_name=str(args.model), allow_origins=args.allow_origin
        )
        server = GracefulServer(
            uvicorn_config(app, args.host, args.port, limits), app.state.lifecycle, args.drain_timeout
        )
        server.run()
    finally:
        engine.close()
    logging.getLogger("misotts_agents.serve").info("stopped; the engine is closed")
    return 0


COMMANDS = {
    "say": cmd_say,
    "make-tiny": cmd_make_tiny,
    "quantize": cmd_quantize,
    "watermark-check": cmd_watermark_check,
    "bench": cmd_bench,
    "demo": cmd_demo,
    "serve": cmd_serve,
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # its options are bench's own (argparse REMAINDER cannot take leading options)
        return cmd_bench(argparse.Namespace(args=argv[1:]))
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return COMMANDS[args.command](args)
    except MisoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
