#!/usr/bin/env bash
# GPU comparison of ddss-rs against the PyTorch reference (bench/reference/), on a CUDA machine
# that has no cargo: it drives the release ddss-cli binary and system python3 directly.
#
#   tools/gpu_bench.sh prepare   (here, with cargo and internet) builds target/release/ddss-cli and
#                                downloads the pure-Python wheels the reference needs into .whl/
#   tools/gpu_bench.sh           (there) runs everything and writes into $OUT (default ./gpu-bench-out):
#                                results.jsonl, table.md, bench.log, env.txt
#
# What runs there (cifar10 architecture google/ddpm-cifar10-32 with random weights, KID on a
# random-weight Inception-v3 at 299x299; each measurement a fresh process), most important first:
#   1. one DDSS step, K = 10, batch 64, per-call remat (reference: torch.utils.checkpoint per
#      network call), f32 and bf16 network calls: ours eager, with --cuda-graphs, and with
#      --cuda-graphs --feature-chunk 16 (the Inception's backward 16 samples at a time, less
#      memory), same weights and noise, so the table also compares their losses and gradients;
#      bf16 also with channels-last and --cudnn-benchmark; then ours with the memory-budget remat
#      given the room left under the reference's f32 peak (as many stored calls as fit there); and
#      the reference with cuDNN benchmark mode too;
#   2. DDIM sampling K = 10, batch 256, f32 and bf16, eager and with CUDA graphs (bf16 also with
#      channels-last and cuDNN benchmark mode), against the reference's f32 loop;
#   3. K = 5 and 20 per-call steps (memory growth with K), eager f32 and with bf16 CUDA graphs;
#   4. K = 10 naive autograd; Inception feature extraction, batch 256; K = 10 budget remat (ours),
#      fixed (5 stored calls) and half of the free memory (free:50); the church-256 architecture
#      (step at batch 8, sampling at batch 32).
# table.md ends with the headline comparisons (bench/reference/table.py): every K = 10 step against
# the reference's f32 per-call checkpoint (goal: 2x the throughput at no more than its peak
# memory), sampling against its f32 loop (goal: 1.5x), and the memory growth from K = 5 to 20.
# Shorter runs (about 2 minutes each): PART=goal runs only the baselines and the cells that meet the
# step goal, twice each, with the reference measured twice; PART=tapes only the baselines, the calls
# kept on tapes within the reference's peak and budget:5 (after a change to the tapes).
# Each part has its own timeout, and the whole stays under TOTAL_SECONDS (default 470, under
# 8 minutes; give the device call a 600 s limit); what the time budget cuts is logged as skipped.
#
# Needs there: the repository tree, target/release/ddss-cli, python3 with torch 2.11 (+ CUDA),
# torchvision and safetensors, and diffusers 0.42.1 (from the carried .whl/ if not installed).
set -u

cd "$(dirname "$0")/.."
ROOT=$(pwd)

if [ "${1:-}" = "prepare" ]; then
    set -e
    export LIBTORCH="${LIBTORCH:-$ROOT/.libtorch}"
    cargo build --release -p ddss-cli --features cuda-graphs
    # The CUDA-graph test (replayed calls equal eager ones), run there before the timings.
    PY="${PYTHON:-$HOME/.cache/ddss-rs/torch-2.11.0/bin/python}"
    test_bin=$(cargo test --release -p ggdm-nets --features cuda-graphs --test cuda_graphs --no-run \
        --message-format=json 2>/dev/null | "$PY" tools/cargo_executable.py cuda_graphs)
    mkdir -p .whl
    cp "$test_bin" .whl/cuda_graphs-test
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
        diffusers==0.42.1 importlib_metadata
    ls -la target/release/ddss-cli .whl
    du -ch target/release/ddss-cli .whl/* | tail -1
    exit 0
fi

OUT="${OUT:-$ROOT/gpu-bench-out}"
mkdir -p "$OUT"
LOG="$OUT/bench.log"
RESULTS="$OUT/results.jsonl"
: >"$RESULTS"
: >"$LOG"
TOTAL_SECONDS="${TOTAL_SECONDS:-470}"
START=$(date +%s)
BIN="${BIN:-$ROOT/target/release/ddss-cli}"
PY="${PYTHON:-python3}"
REF="$ROOT/bench/reference/ddss_ref.py"
UNET="$ROOT/tests/fixtures/unet/ddpm-cifar10-32.config.json"
FEATURES=inception-random
SCRATCH=$(mktemp -d)

log() { echo "[gpu_bench $(($(date +%s) - START))s] $*" | tee -a "$LOG"; }

# libtorch of the system torch (the binary was linked against the same release).
TORCH_LIB=$("$PY" -c 'import torch, os; print(os.path.dirname(torch.__file__))')/lib
export LD_LIBRARY_PATH="$TORCH_LIB:${LD_LIBRARY_PATH:-}"
export PYTHONUNBUFFERED=1

if ! "$PY" -c 'import diffusers' 2>/dev/null; then
    if ls .whl/*.whl >/dev/null 2>&1; then
        log "installing the carried wheels into $SCRATCH/site"
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$SCRATCH/site" .whl/*.whl >>"$LOG" 2>&1
        export PYTHONPATH="$SCRATCH/site:${PYTHONPATH:-}"
    fi
fi

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
    "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))' 2>&1
    "$PY" -c 'import diffusers; print("diffusers", diffusers.__version__)' 2>&1 | tail -1
    ls -la "$BIN" 2>&1
} >"$OUT/env.txt"
cat "$OUT/env.txt" | tee -a "$LOG"

# run LIMIT NAME CMD...: runs CMD with a timeout of min(LIMIT, time left - 15 s), appending its
# JSON line to results.jsonl and everything else to bench.log.
run() {
    local limit=$1 name=$2
    shift 2
    local left=$((TOTAL_SECONDS - ($(date +%s) - START) - 15))
    if [ "$left" -lt 10 ]; then
        log "$name: skipped (time budget spent)"
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    log "$name (timeout ${limit}s)"
    timeout --kill-after=5 "$limit" "$@" >"$SCRATCH/out" 2>>"$LOG"
    local rc=$?
    grep '^{' "$SCRATCH/out" | tail -1 | tee -a "$RESULTS" >>"$LOG"
    grep -v '^{' "$SCRATCH/out" >>"$LOG"
    [ $rc -ne 0 ] && log "$name: exit code $rc$([ $rc -eq 124 ] && echo ' (timed out)')"
}

# Overridable for a dry run on a CPU (e.g. DEVICE=cpu BATCH=2 TBATCH=2 WARMUP=0 REPEAT=1).
DEVICE="${DEVICE:-cuda}"
BATCH="${BATCH:-64}"
TBATCH="${TBATCH:-256}"
COMMON=(--device "$DEVICE" --unet-config "$UNET" --features "$FEATURES" --warmup "${WARMUP:-2}" --repeat "${REPEAT:-3}")

# The flags of a run for its name, without the noise files.
flags_label() {
    local out=""
    while [ $# -gt 0 ]; do
        case $1 in
            --save-noise | --noise) shift ;;
            *) out+=" $1" ;;
        esac
        shift
    done
    echo "$out"
}

# cell SIDE LIMIT WHAT K REMAT PRECISION [FLAGS...]: one run of SIDE (ours: ddss-cli bench-unroll,
# reference: ddss_ref.py), named after its settings; `ours` and `reference` are its two spellings.
cell() {
    local side=$1 limit=$2 what=$3 k=$4 remat=$5 prec=$6 batch=$BATCH
    shift 6
    [ "$what" = step ] || batch=$TBATCH
    local name="$what K=$k B=$batch $([ "$what" = step ] && echo "$remat ")$prec: $side$(flags_label "$@")"
    local args=(--what "$what" --steps "$k" --batch "$batch" --precision "$prec" "${COMMON[@]}")
    [ "$what" = step ] && args+=(--remat "$remat")
    if [ "$side" = ours ]; then
        run "$limit" "$name" "$BIN" --quiet bench-unroll "${args[@]}" "$@"
    else
        run "$limit" "$name" "$PY" "$REF" "${args[@]}" "$@"
    fi
}
ours() { cell ours "$@"; }
reference() { cell reference "$@"; }

# The CUDA-graph test binary (from `prepare`): replayed forward calls and VJPs equal eager ones.
if [ -x .whl/cuda_graphs-test ]; then
    log "CUDA-graph test"
    timeout 120 .whl/cuda_graphs-test --nocapture --test-threads=1 >>"$LOG" 2>&1 && log "CUDA-graph test: passed" \
        || log "CUDA-graph test: FAILED (see bench.log)"
fi

# MiB between the reference's f32 per-call K = 10 peak and the most recent run of ours that stored
# nothing on the memory budget (`memory:0`: every call recomputed on a tape) at PRECISION (the
# caching allocator's peak bytes in tensors when both report them, else the reserved growth:
# table.py's peaks), less a 128 MiB margin; nothing when a side is missing or there is no room.
headroom() {
    "$PY" - "$RESULTS" "$1" "$BATCH" "$ROOT/bench/reference" <<'PYEOF'
import json, sys
sys.path.insert(0, sys.argv[4])
from table import peaks
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
prec, batch = sys.argv[2], int(sys.argv[3])
def pick(**want):
    found = [r for r in rows if all(r.get(k) == v for k, v in want.items()) and r.get("seconds")]
    return found[-1] if found else None
base = dict(what="step", steps=10, batch=batch)
ref = pick(side="reference", precision="f32", cudnn_benchmark=False, remat="per_call", **base)
ours = pick(side="ours", precision=prec, remat="memory:0", **base)
if ref and ours:
    (ref_peak, ours_peak), _ = peaks(ref, ours)
    room = int(ref_peak - ours_peak - 128)
    if room > 0:
        print(room)
PYEOF
}

# A step that keeps as many network calls as fit under the reference's f32 peak: first the
# memory-budget rematerialisation with no budget (`memory:0`, every call recomputed on a tape, the
# least memory), then with the room that run leaves under the reference's peak, so the step keeps
# as many calls on tapes as fit (feature chunks of 16 and FLAGS in both): the fastest step at no
# more than the reference's memory. Eager: a graphed VJP would keep a call's autograd activations.
within_reference_peak() { # PRECISION [FLAGS...]
    local prec=$1 room
    shift
    ours 40 step 10 memory:0 "$prec" --feature-chunk 16 "$@"
    room=$(headroom "$prec")
    if [ -z "$room" ]; then
        log "step K=10 $prec within the reference's peak: skipped (no headroom measured)"
        return
    fi
    ours 40 step 10 "memory:$room" "$prec" --feature-chunk 16 "$@"
}

# Most important first (the time budget may cut the tail). The first run also pays for cold caches
# (libraries, CUDA context, cuDNN): a longer limit.
NOISE="$SCRATCH/noise-k10.safetensors"

# The cells that met the step goal on an H200 (bf16, and f32 when the reference runs slowly):
# per-call remat with CUDA graphs and feature chunks of 16.
goal_cells() {
    ours 40 step 10 per_call bf16 --cuda-graphs --feature-chunk 16
    ours 40 step 10 per_call f32 --cuda-graphs --feature-chunk 16
}

# 1. The step goal: K = 10, batch 64, against the reference's per-call checkpoint (same weights and
#    noise for ours eager, with CUDA graphs and with feature chunks, so their losses are compared).
ours 75 step 10 per_call f32 --save-noise "$NOISE"
reference 60 step 10 per_call f32 --noise "$NOISE"
case "${PART:-all}" in
goal)
    # The goal cells, the reference again (its times vary from run to run), the goal cells again.
    goal_cells
    reference 60 step 10 per_call f32 --noise "$NOISE"
    goal_cells
    ;;
tapes)
    # The calls kept on tapes within the reference's peak, the fixed budget (its recomputed calls
    # run on tapes too) and a goal cell for comparison.
    within_reference_peak bf16
    within_reference_peak f32
    ours 40 step 10 budget:5 f32
    ours 40 step 10 per_call bf16 --cuda-graphs --feature-chunk 16
    ;;
*)
    goal_cells
    ours 40 step 10 per_call f32 --cuda-graphs
    ours 40 step 10 per_call bf16
    ours 40 step 10 per_call bf16 --cuda-graphs
    within_reference_peak bf16
    within_reference_peak f32
    ours 40 step 10 per_call bf16 --cuda-graphs --feature-chunk 16 --channels-last --cudnn-benchmark
    reference 40 step 10 per_call bf16 --noise "$NOISE"
    within_reference_peak bf16 --channels-last --cudnn-benchmark
    reference 60 step 10 per_call f32 --cudnn-benchmark --noise "$NOISE"
    # 2. The sampling goal: against the reference's f32 loop.
    ours 40 sample 10 - f32
    ours 40 sample 10 - f32 --cuda-graphs
    reference 40 sample 10 - f32
    ours 40 sample 10 - bf16
    ours 40 sample 10 - bf16 --cuda-graphs
    ours 40 sample 10 - bf16 --cuda-graphs --channels-last --cudnn-benchmark
    # 3. Memory growth of the per-call step from K = 5 to K = 20, eager and with bf16 CUDA graphs.
    for k in 5 20; do
        ours 60 step "$k" per_call f32 --save-noise "$SCRATCH/noise-k$k.safetensors"
        reference 60 step "$k" per_call f32 --noise "$SCRATCH/noise-k$k.safetensors"
        ours 40 step "$k" per_call bf16 --cuda-graphs
    done
    # 4. The rest: naive autograd, features, a fixed budget and half the free memory as the budget,
    #    then the church-256 architecture.
    ours 45 step 10 naive f32
    reference 45 step 10 naive f32
    run 40 "features B=$TBATCH: ours" "$BIN" --quiet bench-unroll --what features --steps 10 --batch "$TBATCH" "${COMMON[@]}"
    run 40 "features B=$TBATCH: reference" "$PY" "$REF" --what features --steps 10 --batch "$TBATCH" "${COMMON[@]}"
    ours 30 step 10 budget:5 f32
    ours 40 step 10 free:50 f32

    # The google/ddpm-ema-church-256 architecture (113.7M parameters, 256x256), random weights:
    # K = 10 per-call step at batch 8 and sampling at batch 32, eager and with CUDA graphs, bf16 graphs.
    CHURCH="$ROOT/tests/fixtures/unet/ddpm-ema-church-256.config.json"
    CHURCH_COMMON=(--device "$DEVICE" --unet-config "$CHURCH" --features "$FEATURES" --warmup 1 --repeat 2)
    CB="${CHURCH_BATCH:-8}"
    CS="${CHURCH_SAMPLE_BATCH:-32}"
    run 60 "church step K=10 B=$CB per_call: ours" "$BIN" --quiet bench-unroll --what step --steps 10 --batch "$CB" \
        --remat per_call "${CHURCH_COMMON[@]}"
    run 60 "church step K=10 B=$CB per_call: reference" "$PY" "$REF" --what step --steps 10 --batch "$CB" \
        --remat per_call "${CHURCH_COMMON[@]}"
    run 60 "church step K=10 B=$CB per_call bf16: ours, CUDA graphs" "$BIN" --quiet bench-unroll --what step \
        --steps 10 --batch "$CB" --remat per_call "${CHURCH_COMMON[@]}" --precision bf16 --cuda-graphs
    run 60 "church sample B=$CS: ours, CUDA graphs" "$BIN" --quiet bench-unroll --what sample --steps 10 --batch "$CS" \
        "${CHURCH_COMMON[@]}" --cuda-graphs
    run 60 "church sample B=$CS: reference" "$PY" "$REF" --what sample --steps 10 --batch "$CS" "${CHURCH_COMMON[@]}"
    ;;
esac

"$PY" "$ROOT/bench/reference/table.py" "$RESULTS" --title "$DEVICE: cifar10 architecture (random weights)" \
    --out "$OUT/table.md" 2>>"$LOG" | tee -a "$LOG"
log "done; files in $OUT"
rm -rf "$SCRATCH"
