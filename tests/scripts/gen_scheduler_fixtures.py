"""Reference fixtures for ggdm-core's schedules, timestep grids and baseline samplers.

Run from the repository root with the project venv's Python (`cargo xtask fixtures` does this):

    ~/.cache/ddss-rs/torch-2.11.0/bin/python tests/scripts/gen_scheduler_fixtures.py

Needs diffusers==0.42.1 and torch==2.11.0. Writes, deterministically:

* tests/fixtures/schedules.json   betas / alphas_cumprod of DDPMScheduler for each beta schedule
                                  (float32, as diffusers stores them) and the same definitions
                                  evaluated in float64.
* tests/fixtures/timesteps.json   DDIMScheduler / DDPMScheduler `set_timesteps` lists for many
                                  (T, K, spacing, steps_offset).
* tests/fixtures/loops.json       full DDIM (eta 0 and 1) and DDPM loops of deterministic models,
                                  with every noise tensor the loop consumed.
* tests/fixtures/logsnr_timesteps.json
                                  DPMSolverMultistepScheduler(use_lu_lambdas=True) `set_timesteps`
                                  for each beta schedule and K: the integer timesteps the model is
                                  called at (rounded, or truncated for squaredcos_cap_v2, possibly
                                  repeated) and the unrounded float32 sigmas the steps use.
"""

import json
import math
import os

import numpy as np
import torch
import diffusers
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
import diffusers.schedulers.scheduling_ddpm as ddpm_module

assert diffusers.__version__ == "0.42.1", diffusers.__version__
OUT = os.path.join("tests", "fixtures")
os.makedirs(OUT, exist_ok=True)


def dump(name, obj):
    with open(os.path.join(OUT, name), "w") as f:
        json.dump(obj, f, indent=None, separators=(",", ":"))
        f.write("\n")


# ---------------------------------------------------------------- schedules
def f64_betas(kind, T, start, end):
    """The diffusers definitions, evaluated in float64."""
    if kind == "linear":
        return torch.linspace(start, end, T, dtype=torch.float64)
    if kind == "scaled_linear":
        return torch.linspace(start**0.5, end**0.5, T, dtype=torch.float64) ** 2
    if kind == "squaredcos_cap_v2":
        fn = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        return torch.tensor(
            [min(1 - fn((i + 1) / T) / fn(i / T), 0.999) for i in range(T)], dtype=torch.float64
        )
    raise ValueError(kind)


schedules = []
for kind, T, start, end in [
    ("linear", 1000, 1e-4, 0.02),
    ("linear", 100, 1e-4, 0.02),
    ("scaled_linear", 1000, 0.00085, 0.012),
    ("squaredcos_cap_v2", 1000, 1e-4, 0.02),
    ("squaredcos_cap_v2", 50, 1e-4, 0.02),
]:
    s = DDPMScheduler(num_train_timesteps=T, beta_start=start, beta_end=end, beta_schedule=kind)
    b64 = f64_betas(kind, T, start, end)
    schedules.append(
        {
            "beta_schedule": kind,
            "num_train_timesteps": T,
            "beta_start": start,
            "beta_end": end,
            "betas_f32": s.betas.tolist(),
            "alphas_cumprod_f32": s.alphas_cumprod.tolist(),
            "betas_f64": b64.tolist(),
            "alphas_cumprod_f64": torch.cumprod(1 - b64, 0).tolist(),
        }
    )
dump("schedules.json", schedules)

# ---------------------------------------------------------------- timesteps
cases = []
for T in [1000, 100, 37]:
    for K in [1, 2, 3, 5, 6, 7, 10, 17, 20, 33, 50, 100, 999]:
        if K > T:
            continue
        for spacing in ["leading", "trailing", "linspace"]:
            for offset in [0, 1]:
                ddim = DDIMScheduler(num_train_timesteps=T, timestep_spacing=spacing, steps_offset=offset)
                ddim.set_timesteps(K)
                ddpm = DDPMScheduler(num_train_timesteps=T, timestep_spacing=spacing, steps_offset=offset)
                ddpm.set_timesteps(K)
                cases.append(
                    {
                        "num_train_timesteps": T,
                        "steps": K,
                        "spacing": spacing,
                        "steps_offset": offset,
                        "ddim": ddim.timesteps.tolist(),
                        "ddpm": ddpm.timesteps.tolist(),
                    }
                )
dump("timesteps.json", cases)

# ---------------------------------------------------------------- log-SNR-uniform timesteps
# diffusers places log-SNR-uniform steps only in DPMSolverMultistepScheduler(use_lu_lambdas=True):
# K log-sigmas uniform from the largest to the smallest training timestep (both ends included; K = 1
# is the largest alone), each mapped to a fractional t by `_sigma_to_t` and rounded to an integer
# (truncated for squaredcos_cap_v2), while `sigmas` keeps the unrounded values.
logsnr_cases = []
for kind, T, start, end in [
    ("linear", 1000, 1e-4, 0.02),
    ("scaled_linear", 1000, 0.00085, 0.012),
    ("squaredcos_cap_v2", 1000, 1e-4, 0.02),
    ("linear", 100, 1e-4, 0.02),
]:
    for K in [1, 2, 5, 10, 20, 50]:
        lu = DPMSolverMultistepScheduler(
            num_train_timesteps=T, beta_schedule=kind, beta_start=start, beta_end=end, use_lu_lambdas=True
        )
        lu.set_timesteps(K)
        logsnr_cases.append(
            {
                "beta_schedule": kind,
                "num_train_timesteps": T,
                "beta_start": start,
                "beta_end": end,
                "steps": K,
                "timesteps": lu.timesteps.tolist(),
                "sigmas": lu.sigmas[:-1].tolist(),
            }
        )
dump("logsnr_timesteps.json", logsnr_cases)

# ---------------------------------------------------------------- full loops
SHAPE = (2, 1, 4, 4)


def dummy_model(x, t):
    """diffusers' scheduler-test dummy model."""
    return x * t / (t + 1)


def gaussian_eps_model(abar_table, mean=0.3, std=0.5):
    """Exact eps prediction for data with i.i.d. N(mean, std^2) pixels."""

    def model(x, t):
        a = abar_table[int(t)].double()
        return (torch.sqrt(1 - a) * (x.double() - torch.sqrt(a) * mean) / (a * std**2 + 1 - a)).float()

    return model


class Recorder:
    """Replaces diffusers' randn_tensor so every noise draw is recorded (and reproducible)."""

    def __init__(self, seed):
        self.gen = torch.Generator().manual_seed(seed)
        self.drawn = []

    def __call__(self, shape, generator=None, device=None, dtype=None, layout=None):
        z = torch.randn(shape, generator=self.gen, dtype=torch.float32)
        self.drawn.append(z.flatten().tolist())
        return z


loops = []
for model_name in ["dummy", "gaussian"]:
    for prediction_type in ["epsilon", "sample", "v_prediction"]:
        if model_name == "gaussian" and prediction_type != "epsilon":
            continue
        for sampler, eta, clip in [("ddim", 0.0, False), ("ddim", 1.0, False), ("ddim", 0.5, True), ("ddpm", None, True), ("ddpm", None, False)]:
            for spacing, K in [("leading", 10), ("trailing", 5), ("linspace", 7)]:
                seed = len(loops)
                x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1000 + seed))
                x_init = x.clone()
                if sampler == "ddim":
                    sched = DDIMScheduler(
                        timestep_spacing=spacing, prediction_type=prediction_type, clip_sample=clip,
                        set_alpha_to_one=True,
                    )
                else:
                    sched = DDPMScheduler(timestep_spacing=spacing, prediction_type=prediction_type, clip_sample=clip)
                sched.set_timesteps(K)
                model = dummy_model if model_name == "dummy" else gaussian_eps_model(sched.alphas_cumprod)
                noise = Recorder(seed)
                for t in sched.timesteps:
                    out = model(x, t.float())
                    if sampler == "ddim":
                        if eta > 0:
                            z = noise(x.shape)
                            x = sched.step(out, t, x, eta=eta, variance_noise=z).prev_sample
                        else:
                            x = sched.step(out, t, x, eta=eta).prev_sample
                    else:
                        original = ddpm_module.randn_tensor
                        ddpm_module.randn_tensor = noise
                        try:
                            x = sched.step(out, t, x).prev_sample
                        finally:
                            ddpm_module.randn_tensor = original
                loops.append(
                    {
                        "model": model_name,
                        "prediction_type": prediction_type,
                        "sampler": sampler,
                        "eta": eta,
                        "clip_sample": clip,
                        "spacing": spacing,
                        "steps": K,
                        "shape": list(SHAPE),
                        "timesteps": sched.timesteps.tolist(),
                        "x_init": x_init.flatten().tolist(),
                        "noise": noise.drawn,
                        "result": x.flatten().tolist(),
                    }
                )
dump("loops.json", loops)
print(
    f"wrote {len(schedules)} schedules, {len(cases)} timestep cases, {len(logsnr_cases)} log-SNR cases, "
    f"{len(loops)} loops to {OUT}"
)
