#!/usr/bin/env bash
# The shipped Fashion-MNIST model on a CUDA machine: DDSS searches at K = 5, 10, 20 with the
# classifier-a KID loss and with the Inception KID loss (the paper's setting), then the comparison
# table with every baseline, 10k samples per cell, scored with the FID Inception network and the
# held-out classifier b; plus the CUDA checks of the Inception port.
#
# Defaults fit a 6-minute run on an H200 (DEADLINE seconds in all); BASELINES, NUM, KS and
# INCEPTION_KS override what is compared.
#
# 1. On the build machine (cargo, the project venv, the Debian Fashion-MNIST package):
#
#      tools/gpu_eval_fashion_mnist.sh --prepare
#
#    builds ddss-cli (release) and the CUDA Inception test, and fills .devcarry/ (about 50 MB):
#    the binaries (stripped, xz), the Inception weights as byte-shuffled xz fp16 safetensors
#    (tools/pack.py), the first 10,000 training images (the loss's real data) and the 10,000 test
#    images (the reference).
# 2. On the GPU machine, from the repository root with .devcarry/ alongside and $OUT set:
#
#      tools/gpu_eval_fashion_mnist.sh
#
#    It needs python3 with torch 2.11 (for libtorch) and writes everything into $OUT: table.md,
#    results.json, fid_vs_steps*.png, the learned samplers (learned-*.json) and logs.
#
# The Inception weights travel as fp16 (upcast to f32 on load): the Inception numbers are those of
# the network with its weights rounded to fp16 (features within about 1e-3 relative of the f32
# network; see the cuda_inception log).
set -uo pipefail
cd "$(dirname "$0")/.."
CARRY=.devcarry
KS="${KS:-5 10 20}"
BASELINES="${BASELINES:-ddpm,ddim@trailing,ddim-noclip@trailing,ddim@quadratic,dpmpp2m,unipc}"
INCEPTION_KS="${INCEPTION_KS-10}"   # step counts searched with the Inception KID loss
FASHION=/usr/share/datasets/fashion-mnist

if [ "${1:-}" = "--prepare" ]; then
    set -e
    PY="${DDSS_VENV:-$HOME/.cache/ddss-rs/torch-2.11.0}/bin/python"
    mkdir -p "$CARRY"
    cargo build --release -p ddss-cli
    strip -o "$CARRY/ddss-cli" target/release/ddss-cli
    xz -1 -T1 -f "$CARRY/ddss-cli"
    test_bin=$(cargo test --release -p fid-metrics --features cuda-tests --test cuda_inception --no-run \
        --message-format=json 2>/dev/null | "$PY" tools/cargo_executable.py cuda_inception)
    strip -o "$CARRY/cuda_inception" "$test_bin"
    xz -1 -T1 -f "$CARRY/cuda_inception"
    if [ ! -f "$CARRY/inception_f16.bsxz" ]; then
        target/release/ddss-cli export-inception --half --out "$CARRY/inception_f16.safetensors"
        "$PY" tools/pack.py pack "$CARRY/inception_f16.safetensors" "$CARRY/inception_f16.bsxz"
        rm "$CARRY/inception_f16.safetensors"
    fi
    "$PY" - "$FASHION/train-images-idx3-ubyte.gz" "$CARRY/train10k-images-idx3-ubyte.gz" <<'EOF'
import gzip, sys
raw = gzip.open(sys.argv[1]).read()
n = 10000
gzip.open(sys.argv[2], "wb", 9).write(raw[:4] + n.to_bytes(4, "big") + raw[8:16] + raw[16:16 + n * 784])
EOF
    cp "$FASHION/t10k-images-idx3-ubyte.gz" "$CARRY/"
    du -sh "$CARRY"
    exit 0
fi

: "${OUT:?set OUT to the folder that receives the results}"
started=$(date +%s)
DEADLINE=${DEADLINE:-360}   # seconds for the whole script; each step gets what is left
remaining() { echo $(( DEADLINE - ($(date +%s) - started) )); }
cap() { local left; left=$(( $(remaining) - $2 )); [ "$left" -lt "$1" ] && echo "$left" || echo "$1"; }
WORK=/tmp/gpu_results
mkdir -p "$WORK" /tmp/carry
finish() {
    cp "$WORK"/table.md "$WORK"/results.json "$WORK"/fid_vs_steps.png "$OUT"/ 2>/dev/null
    tar czf "$OUT/gpu_results.tgz" -C "$WORK" .
}
trap finish EXIT
TORCH_LIB=$(python3 -c 'import torch, os; print(os.path.dirname(torch.__file__))')/lib
export LD_LIBRARY_PATH="$TORCH_LIB:${LD_LIBRARY_PATH:-}"
for f in ddss-cli cuda_inception; do
    python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
        "$CARRY/$f.xz" "/tmp/carry/$f" && chmod +x "/tmp/carry/$f"
done
python3 tools/pack.py unpack "$CARRY/inception_f16.bsxz" /tmp/carry/inception_f16.safetensors
export DDSS_INCEPTION=/tmp/carry/inception_f16.safetensors
BIN=/tmp/carry/ddss-cli
{ nvidia-smi -L 2>/dev/null; date -u; } | tee "$WORK/machine.txt"

echo "== searches"
learned=""
for loss in a inception; do
    config=/tmp/carry/search_$loss.toml
    sed -e "s|^path = \"$FASHION\"|path = \"$CARRY/train10k-images-idx3-ubyte.gz\"|" \
        -e "s|^reference = .*|reference = \"$CARRY/t10k-images-idx3-ubyte.gz\"|" \
        configs/fashion_mnist.toml > "$config"
    [ -n "${OPTIM_STEPS:-}" ] && sed -i "s|^steps = 60$|steps = $OPTIM_STEPS|" "$config"
    [ "$loss" = inception ] && sed -i 's|^features = "models/fmnist-classifier-a.safetensors"|features = "inception"|' "$config"
    ks=$KS
    [ "$loss" = inception ] && ks=$INCEPTION_KS
    for k in $ks; do
        run=/tmp/carry/runs/$loss-k$k
        t0=$(date +%s)
        timeout "$(cap "${SEARCH_TIMEOUT:-90}" 180)" "$BIN" --quiet search --device "${DEVICE:-cuda}" --config "$config" \
            --steps "$k" --skip-eval --out "$run" > "$WORK/search_$loss-k$k.log" 2>&1
        echo "search loss=$loss K=$k: exit $? in $(( $(date +%s) - t0 )) s" | tee -a "$WORK/summary.log"
        if [ -f "$run/sampler.json" ]; then
            cp "$run/sampler.json" "$run/metrics.jsonl" "$WORK/" 2>/dev/null
            mv "$WORK/sampler.json" "$WORK/learned-kid-$loss-k$k.json"
            mv "$WORK/metrics.jsonl" "$WORK/metrics-kid-$loss-k$k.jsonl"
            learned="$learned,learned-kid-${loss:0:3}=$run/sampler.json"
        fi
    done
done

echo "== comparison table, ${NUM:-10000} samples per cell ($(( $(date +%s) - started )) s so far)"
learned_args=()
[ -n "$learned" ] && learned_args=(--learned "${learned#,}")
"$BIN" --quiet table --device "${DEVICE:-cuda}" --model models/fashion-mnist-ddpm --samplers "$BASELINES" \
    --steps "${KS// /,}" "${learned_args[@]}" --features models/fmnist-classifier-b.safetensors,inception \
    --ref "$CARRY/t10k-images-idx3-ubyte.gz" --num "${NUM:-10000}" --batch 1000 --out "$WORK" \
    > "$WORK/table.log" 2>&1 &
table_pid=$!
( sleep "$(cap 600 45)"; kill "$table_pid" 2>/dev/null ) &
wait "$table_pid"
echo "table exit status $? after $(( $(date +%s) - started )) s" | tee -a "$WORK/summary.log"
"$BIN" --quiet table --render --out "$WORK" --model models/fashion-mnist-ddpm > "$WORK/render.log" 2>&1
cat "$WORK/table.md"

echo "== CUDA Inception checks ($(remaining) s left)"
timeout "$(cap 120 10)" /tmp/carry/cuda_inception --test-threads 1 --nocapture > "$WORK/cuda_inception.log" 2>&1
echo "cuda_inception exit status $?" | tee -a "$WORK/summary.log"
grep -E "^test |result|rel err|img/s" "$WORK/cuda_inception.log" | tail -n 20
cat "$WORK/summary.log"
