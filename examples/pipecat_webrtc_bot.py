"""Talk to MisoTTS in a browser: Pipecat SmallWebRTC on localhost, the same server as `misotts-agents demo`.

    uv run python examples/pipecat_webrtc_bot.py                       # real model (CUDA), keys from env
    uv run misotts-agents make-tiny out/tiny
    uv run python examples/pipecat_webrtc_bot.py --model out/tiny      # offline, CPU, no keys

then open http://localhost:7860/ and press "Start talking" (Pipecat's prebuilt client is at /client/).

The pipeline each browser connection gets (see ``misotts_agents/tools/demo/``, which this example shares
with the ``demo`` command)::

    SmallWebRTCTransport.input()
      -> STT          --stt: deepgram | openai | whisper (local) | none (placeholder "(user spoke for N s)")
      -> user turns   LLMContextAggregatorPair with Silero VAD (bundled with Pipecat)
      -> LLM          --llm: openai (OPENAI_API_KEY / OPENAI_BASE_URL, any compatible server) | ollama
                      (a local Ollama on 127.0.0.1:11434) | scripted
      -> MisoTTSService  24 kHz streaming speech, conditioned on the user's turn audio + transcript
      -> SmallWebRTCTransport.output() -> assistant context

With no keys it runs locally: a local Whisper when faster-whisper is installed, a local Ollama when
one answers; otherwise the scripted responder answers each turn with a templated sentence, and
MisoTTS speaks it in a tone conditioned on the audio of what you said. The page says which parts
are real.
"""

import argparse
import logging
import sys

from misotts_agents.tools import demo


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    demo.add_arguments(parser)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    options = demo.DemoOptions.from_args(args)
    # load the engine once, build the FastAPI app (page, /api/offer), serve it with uvicorn
    return demo.serve(options)


if __name__ == "__main__":
    sys.exit(main())
