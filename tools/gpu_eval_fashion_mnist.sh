#!/usr/bin/env bash
# The 10k-sample comparison table of the shipped Fashion-MNIST model on a CUDA machine, with the
# FID Inception network and the held-out classifier b, plus the CUDA checks of the Inception port.
#
# Prepare on the build machine (it has cargo and the project venv):
#
#   tools/gpu_eval_fashion_mnist.sh --prepare
#
# which builds ddss-cli (release) and the CUDA Inception test, runs the K = 5, 10, 20 searches
# if their runs are missing (runs/fashion_mnist_k<K>), and fills .devcarry/ with what the GPU
# machine needs (about 52 MB: the stripped binary, the Inception weights as xz-compressed fp16
# safetensors, the Fashion-MNIST test images and the learned samplers). Then, on the GPU machine,
# from the repository root with .devcarry/ copied along and $OUT pointing at an output folder:
#
#   tools/gpu_eval_fashion_mnist.sh
#
# It needs only python3 with torch 2.11 (for libtorch) and xz or python3's lzma. It writes
# table.md, results.json, the plots and the logs into $OUT.
#
# The Inception weights travel as fp16 (upcast to f32 on load), so the Inception numbers are those
# of the network with its weights rounded to fp16; the CUDA test below bounds the feature error.
set -uo pipefail
cd "$(dirname "$0")/.."
CARRY=.devcarry
KS="5 10 20"
BASELINES="${BASELINES:-ddpm,ddim,ddim@quadratic}"

if [ "${1:-}" = "--prepare" ]; then
    set -e
    cargo build --release -p ddss-cli
    mkdir -p "$CARRY/learned"
    for k in $KS; do
        if [ ! -f "runs/fashion_mnist_k$k/sampler.json" ]; then
            resume=""
            [ -f "runs/fashion_mnist_k$k/checkpoint.safetensors" ] && resume="--resume"
            target/release/ddss-cli search --config configs/fashion_mnist.toml --steps "$k" --skip-eval \
                --out "runs/fashion_mnist_k$k" --device cpu $resume
        fi
        cp "runs/fashion_mnist_k$k/sampler.json" "$CARRY/learned/k$k.json"
    done
    cp target/release/ddss-cli "$CARRY/ddss-cli" && strip "$CARRY/ddss-cli"
    test_bin=$(cargo test --release -p fid-metrics --features cuda-tests --test cuda_inception --no-run \
        --message-format=json 2>/dev/null | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "cuda_inception":
        print(m["executable"])')
    cp "$test_bin" "$CARRY/cuda_inception" && strip "$CARRY/cuda_inception"
    if [ ! -f "$CARRY/inception_f16.safetensors.xz" ]; then
        target/release/ddss-cli export-inception --out "$CARRY/inception_f16.safetensors" --half
        xz -1 -T1 -f "$CARRY/inception_f16.safetensors"
    fi
    cp /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz "$CARRY/"
    du -sh "$CARRY"
    exit 0
fi

: "${OUT:?set OUT to the folder that receives the results}"
TORCH_LIB=$(python3 -c 'import torch, os; print(os.path.dirname(torch.__file__))')/lib
export LD_LIBRARY_PATH="$TORCH_LIB:${LD_LIBRARY_PATH:-}"
nvidia-smi -L | tee "$OUT/machine.txt"
date -u | tee -a "$OUT/machine.txt"
if command -v xz >/dev/null; then
    xz -dc "$CARRY/inception_f16.safetensors.xz" > /tmp/inception_f16.safetensors
else
    python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
        "$CARRY/inception_f16.safetensors.xz" /tmp/inception_f16.safetensors
fi
export DDSS_INCEPTION=/tmp/inception_f16.safetensors

echo "== CUDA Inception checks"
timeout 120 "$CARRY/cuda_inception" --test-threads 1 --nocapture 2>&1 | tee "$OUT/cuda_inception.log" | tail -n 30

echo "== comparison table, 10k samples per cell"
learned=$(for k in $KS; do printf '%s,' "$CARRY/learned/k$k.json"; done)
timeout "${TABLE_TIMEOUT:-420}" "$CARRY/ddss-cli" --quiet table --device cuda \
    --model models/fashion-mnist-ddpm --samplers "$BASELINES" --steps "${KS// /,}" \
    --learned "${learned%,}" --features models/fmnist-classifier-b.safetensors,inception \
    --ref "$CARRY/t10k-images-idx3-ubyte.gz" --num "${NUM:-10000}" --batch 500 --out "$OUT" \
    2>&1 | tee "$OUT/table.log"
echo "exit status: ${PIPESTATUS[0]}"
