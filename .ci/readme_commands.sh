#!/usr/bin/env bash
# Runs the commands the README shows, as a new user would, after `cargo xtask test` has set up the
# environment, and checks what they produce. Progress goes to stdout; any failure stops the script.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/target/release:$PATH"
VENV="${DDSS_VENV:-$HOME/.cache/ddss-rs/torch-2.11.0}"
SCRATCH=$(mktemp -d)
trap 'rm -rf "$SCRATCH"' EXIT
step() { echo; echo "[readme] $*"; }
seconds() { echo $(( $(date +%s) - $1 )); }

step "cargo xtask search --config configs/fashion_mnist.toml"
t0=$(date +%s)
rm -rf runs/fashion_mnist
cargo xtask search --config configs/fashion_mnist.toml --quiet
echo "search and comparison: $(seconds "$t0") s (build included)"
for f in sampler.json results.json metrics.jsonl before.png after.png before_after.png curves.png sampler.png \
    fid_vs_steps.png fid_vs_steps.svg kid_vs_steps.png kid_vs_steps.svg grid_learned.png; do
    test -s "runs/fashion_mnist/$f" || { echo "missing runs/fashion_mnist/$f"; exit 1; }
done
# The acceptance check, on the held-out classifier (2,000 samples, the same noise for every
# sampler): at K = 10 the learned sampler's FID is at most 0.85x UniPC's, below DPM-Solver++(2M)'s
# and at most 0.7x DDIM's.
"$VENV/bin/python" - runs/fashion_mnist/results.json <<'EOF'
import json, sys
rows = json.load(open(sys.argv[1]))
def fid(sampler):
    return next(r["fid"] for r in rows if r["sampler"] == sampler and r["steps"] == 10 and r["held_out"]
                and not r.get("reference"))
learned = fid("learned")
print(f"held-out FID at K = 10: learned {learned:.4f}, UniPC {fid('unipc'):.4f} (ratio {learned / fid('unipc'):.3f}), "
      f"DPM-Solver++(2M) {fid('dpmpp2m'):.4f}, DDIM {fid('ddim'):.4f} (ratio {learned / fid('ddim'):.3f})")
reference = [r for r in rows if r.get("reference") and r["held_out"]]
assert reference, "results.json has no many-step reference row"
print(f"many-step reference: {reference[0]['sampler']} at {reference[0]['steps']} steps, FID {reference[0]['fid']:.4f}")
assert all("features" in r and "held_out" in r for r in rows)
assert learned <= 0.85 * fid("unipc"), f"learned/UniPC held-out FID ratio {learned / fid('unipc'):.3f} > 0.85"
assert learned < fid("dpmpp2m"), f"learned {learned:.4f} >= DPM-Solver++(2M) {fid('dpmpp2m'):.4f}"
assert learned <= 0.7 * fid("ddim"), f"learned/DDIM held-out FID ratio {learned / fid('ddim'):.3f} > 0.7"
EOF

step "ddss-cli export / sample / timesteps on the learned sampler"
ddss-cli export --sampler runs/fashion_mnist/sampler.json --format diffusers-timesteps
ddss-cli export --sampler runs/fashion_mnist/sampler.json --format json > "$SCRATCH/sampler.json"
ddss-cli --quiet sample --model models/fashion-mnist-ddpm --sampler runs/fashion_mnist/sampler.json --num 16 \
    --out "$SCRATCH/grid.png"
ddss-cli --quiet sample --model models/fashion-mnist-ddpm --sampler dpmpp2m --steps 10 --num 4 --out "$SCRATCH/d.png"
cargo run -p ddss-cli -- sample; test -s samples.png; rm samples.png
ddss-cli timesteps --steps 10 --spacing trailing
ddss-cli timesteps --steps 10 --multistep

step "cargo xtask search --config lsun_church.toml without the checkpoint must explain what to do"
if out=$(cargo xtask search --config lsun_church.toml 2>&1); then
    echo "expected a failure: $out"; exit 1
fi
echo "$out" | tail -n 3
echo "$out" | grep -q "ddpm-ema-church-256" || { echo "the message does not name the checkpoint"; exit 1; }
if echo "$out" | grep -q "panicked"; then echo "panic: $out"; exit 1; fi

step "ddss-cli stats / fid / eval with the held-out classifier"
ddss-cli --quiet stats /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz --num 500 \
    --features models/fmnist-classifier-b.safetensors --out "$SCRATCH/ref.npz"
ddss-cli --quiet eval --model models/fashion-mnist-ddpm --sampler runs/fashion_mnist/sampler.json --num 200 \
    --ref "$SCRATCH/ref.npz" --features models/fmnist-classifier-b.safetensors
ddss-cli --quiet fid "$SCRATCH/ref.npz" "$SCRATCH/ref.npz" --json

step "cargo xtask table (small)"
t0=$(date +%s)
cargo xtask table --num 200 --steps 5 --out "$SCRATCH/table"
test -s "$SCRATCH/table/fid_vs_steps.png"
test -s "$SCRATCH/table/fid_vs_steps.svg"
test -s "$SCRATCH/table/kid_vs_steps.png"
echo "table: $(seconds "$t0") s"

step "ddss-cli export-inception --half"
ddss-cli export-inception --half --out "$SCRATCH/inception_f16.safetensors"

step "README: converting a .bin checkpoint to safetensors"
(
    cd "$SCRATCH"
    "$VENV/bin/python" -c "import torch; torch.save({'w': torch.ones(2, 3)}, 'diffusion_pytorch_model.bin')"
    "$VENV/bin/python" -c "import torch; from safetensors.torch import save_file; \
save_file(torch.load('diffusion_pytorch_model.bin'), 'diffusion_pytorch_model.safetensors')"
    test -s diffusion_pytorch_model.safetensors
)

step "cargo xtask bench"
t0=$(date +%s)
cargo xtask bench
echo "bench: $(seconds "$t0") s"

step "ddss-cli bench-unroll with half the free memory as the budget (every call of the shipped model fits)"
ddss-cli --quiet bench-unroll --what step --steps 4 --batch 4 --device cpu --remat free:50 --warmup 0 --repeat 1 \
    | tee "$SCRATCH/free.json"
grep -q '"stored_steps":4' "$SCRATCH/free.json"

step "cargo xtask fixtures (regenerates the reference fixtures)"
t0=$(date +%s)
cargo xtask fixtures
git status --short tests/fixtures
echo "fixtures: $(seconds "$t0") s"

step "README: Use it from diffusers (its two blocks, as written, in the venv)"
t0=$(date +%s)
readme_block() {  # the code block after the marker <!-- readme_commands: $1 --> in README.md
    awk -v marker="<!-- readme_commands: $1 -->" '
        $0 == marker { found = 1; next }
        found && /^```/ { if (inside) exit; inside = 1; next }
        inside { print }' README.md
}
readme_block diffusers-sh > "$SCRATCH/readme_diffusers.sh"
readme_block diffusers-python > "$SCRATCH/readme_diffusers.py"
test -s "$SCRATCH/readme_diffusers.sh" && test -s "$SCRATCH/readme_diffusers.py"
PATH="$VENV/bin:$PATH" bash -euo pipefail "$SCRATCH/readme_diffusers.sh"
"$VENV/bin/python" "$SCRATCH/readme_diffusers.py"
test -s runs/fashion_mnist/diffusers_sample.png
echo "diffusers: $(seconds "$t0") s"

echo
echo "[readme] every README command ran"
