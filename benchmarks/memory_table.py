"""The README's memory table, derived from the model's layout (model/footprint.py), not typed in.

For MisoTTS 8B and CSM-1B: weight bytes in bf16 / int8 / fp8, the KV cache of one stream at the
full 2,048-position context, and how many such streams fit on a 16 / 24 / 48 / 80 GiB device once
the weights and a reserve (footprint.RESERVE_BYTES) are set aside. No device needed:

    uv run python benchmarks/memory_table.py
"""

from __future__ import annotations

from misotts_agents.model.config import CSM_1B, MAX_SEQ_LEN, MISOTTS_8B, WEIGHT_FORMATS
from misotts_agents.model.footprint import RESERVE_BYTES, kv_bytes_per_stream, streams_that_fit, weight_bytes

DEVICES_GIB = (16, 24, 48, 80)


def main() -> None:
    gib = 1 << 30
    print(
        f"| model | weights | weight bytes | KV per stream ({MAX_SEQ_LEN} positions) | "
        + " | ".join(f"streams on {n} GiB" for n in DEVICES_GIB)
        + " |"
    )
    print("|---|---|---|---|" + "---|" * len(DEVICES_GIB))
    for name, config in (("MisoTTS 8B", MISOTTS_8B), ("CSM-1B", CSM_1B)):
        kv = kv_bytes_per_stream(config)
        for weights in WEIGHT_FORMATS:
            fits = [streams_that_fit(config, weights, n * gib) for n in DEVICES_GIB]
            print(
                f"| {name} | {weights} | {weight_bytes(config, weights) / 1e9:.2f} GB | {kv / 1e6:.0f} MB | "
                + " | ".join(str(n) for n in fits)
                + " |"
            )
    print(
        f"\nreserve per device: {RESERVE_BYTES / gib:.0f} GiB (CUDA context, Mimi, SilentCipher, activations, graphs)"
    )


if __name__ == "__main__":
    main()
