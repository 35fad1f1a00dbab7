"""The engine runtime: requests in, streamed 24 kHz audio out, many conversations on one model.

``request`` (what a caller asks for), ``prompt`` (segments -> interleaved text/audio frames),
``voice`` (voice prompts and their cached prefill), ``scheduler`` (the thread that owns the model
and decides what runs: admission (``admission``), prefill by playout deadline (``deadline``,
``prefill``), batched frame steps, cancel), ``executor`` (the device side it drives), ``step`` (the
static-shape frame step and its CUDA graphs), ``stream`` (what a caller iterates), ``memory``
(turn memory for tone conditioning), ``miso_engine`` (:class:`MisoEngine`, the public entry
point) and ``registry`` (one engine per process).

Kept empty of imports so that light modules (``request``) can be used without loading the model.
"""
