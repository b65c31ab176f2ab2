#!/usr/bin/env bash
# Trains the shipped Fashion-MNIST DDPM on a CUDA machine with a prebuilt release binary.
#
#   tools/gpu_train_fashion_mnist.sh BINARY DATA.gz OUT_DIR MINUTES [PROBE]
#
# The binary is built on a CPU machine against the PyPI torch 2.11.0 wheel; on the GPU machine it
# finds libtorch through the system PyTorch (same version). With PROBE set it only measures the
# training throughput (steps/s) and exits. Otherwise it picks the step count that fits MINUTES,
# trains, and samples a DDIM grid on the GPU as a check.
set -euo pipefail
BIN=$1 DATA=$2 OUT=$3 MINUTES=$4 PROBE=${5:-}
TORCH_LIB=$(python3 -c 'import torch,os;print(os.path.join(os.path.dirname(torch.__file__),"lib"))')
export LD_LIBRARY_PATH=$TORCH_LIB:${LD_LIBRARY_PATH:-}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
probe_dir=$(mktemp -d)
start=$(date +%s.%N)
"$BIN" --quiet train --data "$DATA" --out "$probe_dir" --steps 300 --device cuda
end=$(date +%s.%N)
rate=$(python3 -c "print(300/($end-$start))")
echo "probe: 300 steps in $(python3 -c "print(round($end-$start,1))") s (${rate} steps/s, includes start-up and data loading)" | tee -a "$OUT/gpu.txt"
[ -n "$PROBE" ] && exit 0
steps=$(python3 -c "print(int($rate*60*$MINUTES*0.97//1000*1000))")
echo "training for $steps steps" | tee -a "$OUT/gpu.txt"
model="$OUT/fashion-mnist-ddpm"
"$BIN" --quiet train --data "$DATA" --out "$model" --steps "$steps" --device cuda --max-minutes "$MINUTES"
tail -3 "$model/metrics.jsonl" | tee -a "$OUT/gpu.txt"
"$BIN" --quiet sample --model "$model" --sampler ddim --steps 50 --num 64 --seed 0 --device cuda --out "$OUT/ddim50_cuda.png"
"$BIN" --quiet sample --model "$model" --sampler ddim --steps 10 --num 64 --seed 0 --device cuda --out "$OUT/ddim10_cuda.png"
rm -rf "$model/checkpoint"   # 18 MB training state; not needed for the shipped model
