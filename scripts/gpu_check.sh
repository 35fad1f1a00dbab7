#!/usr/bin/env bash
# The prepared GPU check (issue 14): a lent GPU is a bare machine for minutes, so everything it
# needs is decided here, and its minutes go to measuring.
#
#   scripts/gpu_check.sh prepare        # here, once (needs PyPI): cp312 wheels + tokenizer into .whl/
#   scripts/gpu_check.sh [RESULTS_DIR]  # on the GPU machine: about 5-8 minutes on one H100/H200, then int8 (stage 6) within 9.5
#   MISOTTS_GPU_CHECK_DRY=1 scripts/gpu_check.sh /tmp/gpu_check   # CPU dry run: tiny layout, 2 levels
#
# The check, each stage under its own time limit so one hang cannot eat the others:
#   1. environment: GPU, driver, torch, a measured device read bandwidth       -> env.txt
#   2. the CUDA-marked tests (graph replay == eager codes, bf16 vs fp32, every
#      shape captured at start-up, the engine speaking on CUDA, no host wait
#      while a step or a prefill pass is queued, Mimi's decode graphs replay
#      like eager decodes)                                                       -> cuda_tests.log
#   3. the 8B layout with random weights made on the device (no download):
#      1, 8, 32, 64 and 128 concurrent streams, TTFA p50/p95, RTF, ms per step
#      next to the bandwidth floor (weights + KV), kernels per frame, each
#      level also with the step loop not overlapped (the baseline)             -> bench_8b.{log,json,png}
#      (if the compiled run fails, the same without torch.compile)
#   4. our Mimi and SilentCipher on the GPU (benchmarks/codecs.py; the
#      originals are not carried, their columns say absent)                    -> codecs.log
#   5. each step's watermark in one batched call vs one call per stream, at
#      1/8/32/64 streams (benchmarks/watermark_streaming.py)                   -> watermark.log
#   6. joining while others speak, the 8B layout: whole prompts vs the default
#      (playout deadlines), a small and a large batch (benchmarks/joining.py)  -> joining.log
#   7. stage 3 again with int8 weights (batched only), next to stage 3's bf16,
#      if time is left: ms per step, peak device memory, streams that fit       -> bench_8b_int8.{log,json}
#   8. the last lines of each                                                    -> summary.txt
# RESULTS_DIR defaults to $OUT (the device tool's folder that comes back) or out/gpu_check.
# Missing packages travel as wheels in .whl/ (device tool: carry [".whl"]); the package itself
# runs from this checkout (PYTHONPATH), nothing is installed into the machine's Python.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=.whl

if [ "${1:-}" = "prepare" ]; then
    mkdir -p "$WHEELS"
    platforms=()
    for n in 17 24 27 28 31 34 35; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
    # What the check imports that the machine's image lacks (KINDS.md lists the image), at uv.lock's versions.
    pins=$("$PY" -c 'import tomllib, sys
lock = {p["name"]: p["version"] for p in tomllib.load(open("uv.lock", "rb"))["package"] if "version" in p}
print(" ".join(f"{n}=={lock[n]}" for n in sys.argv[1:]))' soxr cachetools pyyaml) || exit 1
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${platforms[@]}" --platform manylinux2014_x86_64 -d "$WHEELS" $pins || exit 1
    uv run python -c "from misotts_agents.testing.tiny import bundled_tokenizer; print(bundled_tokenizer())" |
        xargs -I{} cp {} "$WHEELS/tokenizer.json" || exit 1
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || { mkdir -p .git/info && echo '/.whl/' >> .git/info/exclude; }
    ls -la "$WHEELS"
    echo "ready: run scripts/gpu_check.sh on the GPU machine with .whl carried"
    exit 0
fi

RESULTS=${1:-${OUT:-out/gpu_check}}
mkdir -p "$RESULTS"
STARTED=$(date +%s)
elapsed() { echo $(( $(date +%s) - STARTED )); }
log() { echo "[gpu_check +$(elapsed)s] $*" | tee -a "$RESULTS/summary.txt"; }

if ! "$PY" -c "import soxr, cachetools, yaml" 2>/dev/null && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    SITE=/tmp/misotts_site
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        "$WHEELS"/*.whl || { log "installing the carried wheels failed"; exit 1; }
    export PYTHONPATH="$SITE:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}"
export PYTHONUNBUFFERED=1
[ -f "$WHEELS/tokenizer.json" ] && export MISOTTS_TOKENIZER=${MISOTTS_TOKENIZER:-$PWD/$WHEELS/tokenizer.json}
TOKENIZER_ARGS=()
[ -n "${MISOTTS_TOKENIZER:-}" ] && TOKENIZER_ARGS=(--tokenizer "$MISOTTS_TOKENIZER")

if [ -n "${MISOTTS_GPU_CHECK_DRY:-}" ]; then
    LAYOUT=tiny LEVELS=1,2 FRAMES=4 EXTRA=(--bandwidth-gbs 20)
    JOINING=(--loads 2+2 --context 300 --warm-s 1)
    log "dry run (MISOTTS_GPU_CHECK_DRY): tiny layout, levels $LEVELS, $FRAMES frames per stream"
else
    LAYOUT=llama-8B LEVELS=1,8,32,64,128 FRAMES=25 EXTRA=()
    JOINING=(--loads 8+4,112+16)
fi

log "1. environment"
{
    date -u
    nvidia-smi 2>&1 || echo "nvidia-smi: not available"
    "$PY" - <<'EOF'
import sys, time, torch
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(0), torch.cuda.get_device_properties(0))
    x = torch.empty(4 * 2**30 // 4, device="cuda")
    x.sum(); torch.cuda.synchronize()
    best = 0.0
    for _ in range(5):
        t = time.perf_counter(); x.sum(); torch.cuda.synchronize()
        best = max(best, x.numel() * 4 / (time.perf_counter() - t) / 1e9)
    print(f"measured read bandwidth (sum of 4 GiB fp32): {best:.0f} GB/s")
else:
    print("no CUDA device: the CUDA tests skip, the benchmark runs on the CPU")
EOF
} > "$RESULTS/env.txt" 2>&1
tail -n 3 "$RESULTS/env.txt" | tee -a "$RESULTS/summary.txt"

log "2. CUDA-marked tests"
timeout 180 "$PY" -m pytest -q -p no:cacheprovider -m cuda tests/test_step.py tests/test_overlap.py tests/test_codec.py \
    tests/test_quantized.py -rs > "$RESULTS/cuda_tests.log" 2>&1
log "   pytest exit status $? (0: passed; see cuda_tests.log)"
tail -n 8 "$RESULTS/cuda_tests.log" | tee -a "$RESULTS/summary.txt"

log "3. $LAYOUT random weights: levels $LEVELS"
bench() {  # $1: time limit in s, then extra bench options
    local limit=$1
    shift
    timeout "$limit" "$PY" -m misotts_agents.tools.bench --random-weights "$LAYOUT" --levels "$LEVELS" \
        --frames "$FRAMES" --modes batched,no-overlap --batch-buckets "${TOKENIZER_ARGS[@]}" "${EXTRA[@]}" \
        --plot "$RESULTS/bench_8b.png" --json "$RESULTS/bench_8b.json" "$@" > "$RESULTS/bench_8b.log" 2>&1
}
bench 280
status=$?
log "   bench exit status $status"
if [ $status -ne 0 ] && [ "$(elapsed)" -lt 400 ]; then
    mv "$RESULTS/bench_8b.log" "$RESULTS/bench_8b_compiled_failed.log"
    log "   compiled run failed: the same without torch.compile (CUDA graphs only)"
    bench $(( 475 - $(elapsed) )) --no-compile
    log "   bench --no-compile exit status $?"
fi
grep -E "^ *[0-9]+ +(batched|no-overlap)|measured +[0-9]|kernels per frame|engine ready|FAILED|Error" "$RESULTS/bench_8b.log" |
    tee -a "$RESULTS/summary.txt"
log "4. Mimi and SilentCipher on the device"
timeout 60 "$PY" benchmarks/codecs.py --device cuda --seconds 4 > "$RESULTS/codecs.log" 2>&1
log "   codecs exit status $?"
tail -n 9 "$RESULTS/codecs.log" | tee -a "$RESULTS/summary.txt"
log "5. the watermark per engine step on the device"
timeout 45 "$PY" benchmarks/watermark_streaming.py --device cuda --seconds 4 --levels 1,8,32,64 \
    > "$RESULTS/watermark.log" 2>&1
log "   watermark exit status $?"
tail -n 12 "$RESULTS/watermark.log" | tee -a "$RESULTS/summary.txt"
log "6. joining while others speak: $LAYOUT, whole prompts vs playout deadlines"
left=$(( 570 - $(elapsed) ))
device=$("$PY" -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
timeout $(( left < 150 ? left : 150 )) "$PY" benchmarks/joining.py --device "$device" --random-weights "$LAYOUT" \
    --schedules 0,auto "${JOINING[@]}" "${TOKENIZER_ARGS[@]}" > "$RESULTS/joining.log" 2>&1
log "   joining exit status $?"
tail -n 22 "$RESULTS/joining.log" | grep -E "^[0-9]+\+|goal|meets|misses" | tee -a "$RESULTS/summary.txt"
log "7. int8 weights next to bf16 (stage 3): the same layout and levels, batched"
left=$(( 570 - $(elapsed) ))
if [ $left -lt 90 ]; then
    log "   skipped: $left s left of the device's 10 minutes"
else
    timeout $(( left < 240 ? left : 240 )) "$PY" -m misotts_agents.tools.bench --random-weights "$LAYOUT" \
        --weights int8 --levels "$LEVELS" --frames "$FRAMES" --modes batched --batch-buckets \
        "${TOKENIZER_ARGS[@]}" "${EXTRA[@]}" --plot "$RESULTS/bench_8b_int8.png" --json "$RESULTS/bench_8b_int8.json" \
        > "$RESULTS/bench_8b_int8.log" 2>&1
    log "   int8 bench exit status $?"
    for run in bench_8b bench_8b_int8; do  # ms per step and memory (peak, streams at full context), side by side
        grep -E "weights read per frame|memory:|batched +measured" "$RESULTS/$run.log" | sed "s/^/$run: /"
    done | tee -a "$RESULTS/summary.txt"
fi
log "done in $(elapsed) s; results in $RESULTS"
