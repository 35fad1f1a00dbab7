"""What refusing the worst-shaped messages costs: CPU time, Python memory (tracemalloc's peak) and
the process's peak RSS growth, for each shape of misotts_agents/testing/json_shapes.py (6 MiB each),
through the WebSocket parser and the HTTP body's. Each shape runs in a fresh process, so its RSS
figure is its own (the peak RSS only ever grows):

    uv run python benchmarks/message_cost.py
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
import tracemalloc

from misotts_agents.server import schema
from misotts_agents.server.protocol import Limits, ProtocolError
from misotts_agents.testing.json_shapes import worst_shapes


def measure(index: int) -> dict[str, object]:
    """Refuse shape ``index`` three times: CPU (the fastest), RSS growth, tracemalloc's peak."""
    endpoint, shape, build = worst_shapes()[index]
    raw = build()
    limits = Limits()

    def refuse() -> str:
        try:
            if isinstance(raw, str):
                schema.parse_message(raw, limits)
            else:
                schema.parse_speech_body(raw, limits)
        except ProtocolError as exc:
            return exc.code
        return "accepted"

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cpu = []
    for _ in range(3):
        started = time.process_time()
        code = refuse()
        cpu.append(time.process_time() - started)
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before
    tracemalloc.start()
    refuse()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return {
        "endpoint": endpoint,
        "shape": shape,
        "code": code,
        "cpu_ms": min(cpu) * 1000,
        "rss_mb": rss_kb / 1024,
        "traced_mb": peak / 2**20,
    }


def main() -> None:
    if len(sys.argv) > 1:
        print(json.dumps(measure(int(sys.argv[1]))))
        return
    print(f"{'endpoint':8} {'shape':44} {'refused as':15} {'CPU ms':>7} {'RSS +MB':>8} {'traced MB':>9}")
    for index in range(len(worst_shapes())):
        out = subprocess.run([sys.executable, __file__, str(index)], capture_output=True, text=True, check=True)
        r = json.loads(out.stdout)
        print(
            f"{r['endpoint']:8} {r['shape']:44} {r['code']:15} {r['cpu_ms']:7.1f} {r['rss_mb']:8.1f} "
            f"{r['traced_mb']:9.1f}"
        )


if __name__ == "__main__":
    main()
