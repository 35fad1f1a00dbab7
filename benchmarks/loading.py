"""Peak resident memory of loading a checkpoint: the lean loader against the previous one, one run.

It writes a random checkpoint of the given size (default CSM-1B: 1.55 B parameters, 6.2 GB of fp32)
to a temporary directory (``--dir``, default /tmp), tensor by tensor so the writer itself stays
small, then loads it in a fresh subprocess per loader and dtype and reports each subprocess's peak
resident size (``VmHWM`` of ``/proc/self/status``: anonymous memory and the file pages mapped in,
as the kernel counts them, since the subprocess's exec; ``ru_maxrss`` would start from the parent's
own peak, which the kernel carries across fork and exec) and its wall time. The file is deleted at the end.

- ``previous``: the loader before lean loading, reproduced here as the baseline: the file opened
  with ``safetensors.safe_open`` (mapped), each tensor read through the map and converted, the
  map open until every tensor is in. For an fp32 target on CPU safetensors hands out tensors backed
  by the map itself: nothing is copied while loading, the weights come in as they are first read and
  the map lives as long as the model (hence the "after first use" column, which reads every page).
- ``lean``: ``misotts_agents.model.weights.load_model`` (plain reads in 64 MB pieces into each
  destination tensor, tensorfile.py).
- ``int8``: the same with ``weights="int8"`` (linear layers quantized as they stream in, 64 MB of
  fp32 rows at a time; the rest in ``--dtypes``).

    uv run python benchmarks/loading.py                          # CSM-1B size, bf16 (needs ~10 GB free)
    uv run python benchmarks/loading.py --dtypes bfloat16,float32
    uv run python benchmarks/loading.py --loaders lean,int8
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from misotts_agents.model.config import CSM_1B, MISOTTS_8B, ModelConfig
from misotts_agents.model.weights import load_model
from misotts_agents.testing.random_weights import write_random_checkpoint

SIZES = {"csm-1b": CSM_1B, "misotts-8b": MISOTTS_8B}


def previous_load_model(path: Path, config: ModelConfig, dtype: torch.dtype) -> torch.nn.Module:
    """The loader before lean loading (its reading part verbatim; then the same finishing steps as
    load_model): the file stays mapped throughout."""
    from safetensors import safe_open

    from misotts_agents.model.transformer import MisoModel

    with torch.device("meta"):
        model = MisoModel(config)
    state = {}
    with safe_open(str(path), framework="pt", device="cpu") as f:
        for key in sorted(model.state_dict()):
            state[key] = f.get_tensor(key).to(device="cpu", dtype=dtype)
    model.load_state_dict(state, strict=True, assign=True)
    state.clear()
    model.init_buffers()
    model.fuse_weights()
    return model


def peak_rss_kb() -> int:
    """This process's peak resident size since its exec, in kB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status (this benchmark needs Linux)")


def child(loader: str, path: Path, size: str, dtype_name: str) -> None:
    """Load once in this fresh process and print its figures as one JSON line."""
    torch.set_num_threads(1)
    dtype = getattr(torch, dtype_name)
    config = SIZES[size]
    before_kb = peak_rss_kb()
    started = time.perf_counter()
    if loader == "previous":
        model = previous_load_model(path, config, dtype)
    else:
        model = load_model(path, config, dtype=dtype, progress=False, weights="int8" if loader == "int8" else "bf16")
    seconds = time.perf_counter() - started
    peak_kb = peak_rss_kb()
    tensors = list(model.state_dict().values())
    for t in tensors:  # read one value per 4 KB page: weights a loader left in the file map come in now
        t.reshape(-1)[:: max(1, 4096 // t.element_size())].float().sum()
    used_kb = peak_rss_kb()
    used_s = time.perf_counter() - started
    figures = {
        "peak_gb": peak_kb / 1e6,
        "used_gb": used_kb / 1e6,
        "before_gb": before_kb / 1e6,
        "s": seconds,
        "used_s": used_s,
        "model_gb": sum(t.numel() * t.element_size() for t in tensors) / 1e9,
    }
    print(json.dumps(figures))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="csm-1b")
    parser.add_argument("--dtypes", default="bfloat16", help="target dtypes, comma separated (bfloat16, float32)")
    parser.add_argument("--loaders", default="previous,lean")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()), help="where the file is written")
    parser.add_argument("--child", nargs=4, metavar=("LOADER", "PATH", "SIZE", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        loader, path, size, dtype = args.child
        child(loader, Path(path), size, dtype)
        return 0

    print(f"command: {shlex.join([sys.executable, *sys.argv])}")
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="misotts-loading-") as tmp:
        path = Path(tmp) / "model.safetensors"
        started = time.perf_counter()
        size = write_random_checkpoint(path, SIZES[args.size])
        print(f"wrote {path} ({size / 1e9:.2f} GB, {args.size}, fp32) in {time.perf_counter() - started:.0f} s")
        rows = []
        for dtype in args.dtypes.split(","):
            for loader in args.loaders.split(","):
                out = subprocess.run(
                    [sys.executable, __file__, "--child", loader, str(path), args.size, dtype],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                figures = json.loads(out.stdout.strip().splitlines()[-1])
                rows.append((loader, dtype, figures))
                print(f"  {loader:<9} {dtype:<9} peak {figures['peak_gb']:.2f} GB in {figures['s']:.1f} s", flush=True)
    print()
    print(
        f"{'loader':<10}{'dtype':<10}{'model':>8}{'peak RSS loading':>18}{'after first use':>17}"
        f"{'before load':>13}{'load':>7}{'+ first use':>13}"
    )
    for loader, dtype, f in rows:
        print(
            f"{loader:<10}{dtype:<10}{f['model_gb']:>6.2f}GB{f['peak_gb']:>16.2f}GB{f['used_gb']:>15.2f}GB"
            f"{f['before_gb']:>11.2f}GB{f['s']:>6.1f}s{f['used_s']:>12.1f}s"
        )
    print(f"file: {size / 1e9:.2f} GB fp32 (deleted). peak RSS = VmHWM of the loading process (anonymous")
    print("memory and touched pages of mapped files); after first use = the same once every weight was read")
    print("(a loader that leaves fp32 weights in the file map is lazy: they come in on first use);")
    print("before load = its peak after the imports (torch). Times depend on the page cache (the file was")
    print("just written; with less free memory than file + model, part of it is read from disk again).")
    print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
