"""Learned and start samplers made by ddss-cli, and ddss-cli sample's output for each from given
noise, so the Python package's tests (python/tests) can run the same samplers on the same numbers.

Run from the repository root with the project venv's Python (`cargo xtask fixtures`):

    ~/.cache/ddss-rs/torch-2.11.0/bin/python tests/scripts/gen_interop_fixtures.py

Builds ddss-cli (release) and writes tests/fixtures/interop/:

* `init_noise.npy` (float32 [N, 1, 28, 28]) and `step_noise.npy` (float32 [K, N, 1, 28, 28]), drawn
  from torch.Generator().manual_seed(2024), N = 3, K = 10;
* `<name>.json`, a sampler.json (version 2), and `<name>.samples.npy`, `ddss-cli sample
  --model models/fashion-mnist-ddpm --sampler <name>.json --init-noise init_noise.npy
  --step-noise step_noise.npy --out-npy ...`:
  - `ddim_init`: a search started from DDIM (eta 0, trailing spacing) that did not move (every
    learning rate scaled by 0), so it is DDIM at initialisation (its provenance without the
    search's wall time);
  - `unipc_init`: the same from UniPC (linspace spacing, diffusers' UniPCMultistepScheduler grid);
  - `learned_stochastic`: the default search's learned sampler (docs/fashion_mnist/sampler.json,
    DDIM base, learned sigma of both signs), re-exported as version 2; `learned_stochastic_v1.json`
    is the version 1 original;
  - `learned_deterministic`: the learned UniPC sampler of docs/recipes/unipc_kid with its learned
    sigma set to 0 (grid and coefficients as learned);
  - `marginal`: `learned_stochastic` in the `marginal` query mode, with p and q residuals set so
    that the prediction coefficients differ from their defaults.
* `scheduler/scheduler_config.json`: `ddss-cli export --format diffusers-scheduler` of
  `learned_stochastic_v1.json` (what `GGDMScheduler.from_pretrained` and ggdm-core's model loader read);
* `pipeline_model_index.json`: the `model_index.json` of `ddss-cli export --format diffusers-pipeline`
  (its `unet/` is the shipped model's files, its `scheduler/` the folder above);
* `manifest.json`: what each file is.
"""

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "fixtures" / "interop"
MODEL = "models/fashion-mnist-ddpm"
NUM, STEPS, SEED = 3, 10, 2024

SEARCH_CONFIG = """
[model]
path = "models/fashion-mnist-ddpm"

[data]
path = "/usr/share/datasets/fashion-mnist"
num = 64

[sampler]
steps = 10
init = "{init}"
eta = 0.0
spacing = "{spacing}"
history = "full"

[loss]
kind = "kid"
features = "models/fmnist-classifier-a.safetensors"

[optim]
steps = 1
batch_size = 4
seed = 0
validate_every = 0
validation_num = 4
checkpoint_every = 1
lr_scale = {{ timesteps = 0.0, coefficients = 0.0, sigma = 0.0, prediction = 0.0 }}

[optim.lr]
lr = 0.005

[eval]
num = 4
batch = 4
features = ["models/fmnist-classifier-b.safetensors"]
reference = "/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz"
compare = []
grid_num = 4

[output]
device = "cpu"
"""


def cli(*args, stdout=None):
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    subprocess.run([str(ROOT / "target" / "release" / "ddss-cli"), "--quiet", *args], cwd=ROOT, check=True,
                   stdout=stdout, env=env)


def export_json(source, name):
    """`ddss-cli export --format json` of `source` (a path) into OUT/<name>.json."""
    with open(OUT / f"{name}.json", "w") as handle:
        cli("export", "--sampler", str(source), "--format", "json", stdout=handle)


def edited(source, name, edit):
    """OUT/<name>.json: `source` changed by `edit(dict)`, then re-derived by ddss-cli."""
    value = json.loads(Path(source).read_text())
    edit(value)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "sampler.json"
        path.write_text(json.dumps(value))
        export_json(path, name)


def unmoved_search(init, spacing, name):
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "config.toml"
        config.write_text(SEARCH_CONFIG.format(init=init, spacing=spacing))
        run = Path(tmp) / "run"
        cli("search", "--config", str(config), "--out", str(run), "--skip-eval")
        # The search's wall time is the one thing that changes between runs: dropped from the
        # provenance, so that regenerating gives the same file.
        value = json.loads((run / "sampler.json").read_text())
        value["provenance"]["search"].pop("seconds", None)
        (run / "sampler.json").write_text(json.dumps(value))
        export_json(run / "sampler.json", name)


def zero_sigma(value):
    value["params"]["sigma_residual"] = [0.0] * value["steps"]
    value["learn"]["sigma"] = False


def marginal(value):
    steps = value["steps"]
    value["query"] = "marginal"
    value["params"]["p_residual"] = [0.01 * math.sin(i + 1) for i in range(steps)]
    value["params"]["q_residual"] = [0.02 * math.cos(i + 1) for i in range(steps)]
    value["learn"]["prediction"] = True


def main():
    subprocess.run(["cargo", "build", "--release", "-p", "ddss-cli"], cwd=ROOT, check=True)
    OUT.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(SEED)
    init = torch.randn(NUM, 1, 28, 28, generator=gen)
    step = torch.randn(STEPS, NUM, 1, 28, 28, generator=gen)
    np.save(OUT / "init_noise.npy", init.numpy())
    np.save(OUT / "step_noise.npy", step.numpy())

    unmoved_search("ddim", "trailing", "ddim_init")
    unmoved_search("unipc", "linspace", "unipc_init")
    export_json(ROOT / "docs" / "fashion_mnist" / "sampler.json", "learned_stochastic")
    shutil.copy(ROOT / "docs" / "fashion_mnist" / "sampler.json", OUT / "learned_stochastic_v1.json")
    edited(ROOT / "docs" / "recipes" / "unipc_kid" / "sampler.json", "learned_deterministic", zero_sigma)
    edited(OUT / "learned_stochastic.json", "marginal", marginal)

    cli("export", "--sampler", str(OUT / "learned_stochastic_v1.json"), "--format", "diffusers-scheduler", "--out",
        str(OUT / "scheduler"), stdout=subprocess.DEVNULL)

    with tempfile.TemporaryDirectory() as tmp:
        cli("export", "--sampler", str(OUT / "learned_stochastic_v1.json"), "--format", "diffusers-pipeline",
            "--model", MODEL, "--out", tmp, stdout=subprocess.DEVNULL)
        shutil.copy(Path(tmp) / "model_index.json", OUT / "pipeline_model_index.json")

    names = ["ddim_init", "unipc_init", "learned_stochastic", "learned_deterministic", "marginal"]
    for name in names:
        cli("sample", "--model", MODEL, "--sampler", f"{OUT / name}.json", "--init-noise",
            str(OUT / "init_noise.npy"), "--step-noise", str(OUT / "step_noise.npy"), "--batch", str(NUM),
            "--device", "cpu", "--out-npy", str(OUT / f"{name}.samples.npy"))
    manifest = {
        "generator": "tests/scripts/gen_interop_fixtures.py",
        "model": MODEL,
        "init_noise": "init_noise.npy",
        "step_noise": "step_noise.npy",
        "scheduler": "scheduler/scheduler_config.json",
        "pipeline_model_index": "pipeline_model_index.json",
        "samplers": {name: {"sampler": f"{name}.json", "samples": f"{name}.samples.npy"} for name in names},
    }
    (OUT / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"wrote {OUT}", file=sys.stderr)


if __name__ == "__main__":
    main()
