"""Reference fixtures for ggdm-core's multistep solvers (`ggdm_core::solvers`).

Run from the repository root with the project venv's Python (`cargo xtask fixtures` does this):

    ~/.cache/ddss-rs/torch-2.11.0/bin/python tests/scripts/gen_solver_fixtures.py

Needs diffusers==0.42.1 and torch==2.11.0. Writes, deterministically, tests/fixtures/solver_loops.json:

* "timesteps": `set_timesteps` lists of DPMSolverMultistepScheduler and UniPCMultistepScheduler for
  many (T, K, timestep_spacing, steps_offset); both schedulers place their steps the same way, and
  differently from DDIMScheduler (K + 1 points, the last one dropped).
* "loops": full sampling loops of DPMSolverMultistepScheduler (dpmsolver++, midpoint, orders 2 and
  3) and UniPCMultistepScheduler (predict_x0, bh2, orders 2 and 3), every other setting at its
  diffusers default (lower_order_final, final_sigmas_type "zero", no thresholding), for K in
  {5, 10, 20}, every prediction type and the spacings linspace (the default), trailing and leading;
  plus final_sigmas_type "sigma_min" loops (both solvers, and UniPC's bh1) with epsilon/linspace.
  The model is the smooth nonlinear dummy `smooth_model` of solver_loop.py, evaluated in float32; the loops
  are deterministic, so no noise is recorded.
* "unet_loops": 8-step trailing loops of both solvers (orders 2 and 3) on the committed tiny
  diffusers UNet tests/fixtures/unet/tiny_attn_pos, read as a v-prediction model.
"""

import json
import os

import torch
import diffusers
from diffusers import DPMSolverMultistepScheduler, UNet2DModel, UniPCMultistepScheduler
from solver_loop import run_loop

assert diffusers.__version__ == "0.42.1", diffusers.__version__
OUT = os.path.join("tests", "fixtures")
os.makedirs(OUT, exist_ok=True)
torch.set_num_threads(1)

# ---------------------------------------------------------------- timesteps
timestep_cases = []
for T in [1000, 100, 37]:
    for K in [1, 2, 3, 5, 7, 10, 15, 20, 25, 33, 50]:
        if K + 1 > T:
            continue
        for spacing in ["linspace", "leading", "trailing"]:
            for offset in [0, 1]:
                dpm = DPMSolverMultistepScheduler(num_train_timesteps=T, timestep_spacing=spacing, steps_offset=offset)
                dpm.set_timesteps(K)
                unipc = UniPCMultistepScheduler(num_train_timesteps=T, timestep_spacing=spacing, steps_offset=offset)
                unipc.set_timesteps(K)
                timestep_cases.append(
                    {
                        "num_train_timesteps": T,
                        "steps": K,
                        "spacing": spacing,
                        "steps_offset": offset,
                        "dpmsolver": dpm.timesteps.tolist(),
                        "unipc": unipc.timesteps.tolist(),
                    }
                )

# ---------------------------------------------------------------- full loops
SHAPE = (2, 1, 4, 4)




# (solver, order, solver_type, final_sigmas_type). diffusers' bh1 gives NaN with a final sigma of
# zero (B(h) is infinite at the last step), so bh1 is pinned with "sigma_min" only.
SOLVERS = [
    ("dpmsolver++", 2, "midpoint", "zero"),
    ("dpmsolver++", 3, "midpoint", "zero"),
    ("unipc", 2, "bh2", "zero"),
    ("unipc", 3, "bh2", "zero"),
    ("dpmsolver++", 2, "midpoint", "sigma_min"),
    ("dpmsolver++", 3, "midpoint", "sigma_min"),
    ("unipc", 2, "bh1", "sigma_min"),
    ("unipc", 3, "bh1", "sigma_min"),
    ("unipc", 3, "bh2", "sigma_min"),
]

loops = []
for solver, order, solver_type, final_sigmas_type in SOLVERS:
    for prediction_type in ["epsilon", "sample", "v_prediction"]:
        for spacing in ["linspace", "trailing", "leading"]:
            for K in [5, 10, 20]:
                if final_sigmas_type != "zero" and (spacing != "linspace" or prediction_type != "epsilon"):
                    continue
                if solver == "dpmsolver++":
                    sched = DPMSolverMultistepScheduler(
                        solver_order=order,
                        solver_type=solver_type,
                        prediction_type=prediction_type,
                        timestep_spacing=spacing,
                        final_sigmas_type=final_sigmas_type,
                    )
                else:
                    sched = UniPCMultistepScheduler(
                        solver_order=order,
                        solver_type=solver_type,
                        prediction_type=prediction_type,
                        timestep_spacing=spacing,
                        final_sigmas_type=final_sigmas_type,
                    )
                what = f"{solver} {order} {solver_type} {prediction_type}"
                loop = run_loop(sched, K, SHAPE, 2000 + len(loops), what)
                loops.append(
                    {
                        "solver": solver,
                        "order": order,
                        "solver_type": solver_type,
                        "final_sigmas_type": final_sigmas_type,
                        "prediction_type": prediction_type,
                        "spacing": spacing,
                        "steps": K,
                        **loop,
                    }
                )

# ---------------------------------------------------------------- loops on the tiny UNet
# The committed tiny diffusers UNet of tests/fixtures/unet/ (gen_unet_fixtures.py), read as a
# v-prediction model so that data predictions stay of order one even with random weights.
UNET_MODEL = "tiny_attn_pos"
unet = UNet2DModel.from_pretrained(os.path.join(OUT, "unet", UNET_MODEL)).eval()
unet_loops = []


def unet_call(x, t):
    """The tiny UNet at timestep `t` for every sample of `x`."""
    return unet(x, torch.full((x.shape[0],), float(t), dtype=torch.float32)).sample


for solver, order in [("dpmsolver++", 2), ("dpmsolver++", 3), ("unipc", 2), ("unipc", 3)]:
    kwargs = dict(solver_order=order, prediction_type="v_prediction", timestep_spacing="trailing")
    sched = DPMSolverMultistepScheduler(**kwargs) if solver == "dpmsolver++" else UniPCMultistepScheduler(**kwargs)
    with torch.no_grad():
        loop = run_loop(sched, 8, (1, 3, 16, 16), 3000 + len(unet_loops), f"{solver} {order} on the UNet", unet_call)
    unet_loops.append(
        {
            "model": UNET_MODEL,
            "solver": solver,
            "order": order,
            "prediction_type": "v_prediction",
            "spacing": "trailing",
            "steps": 8,
            **loop,
        }
    )

with open(os.path.join(OUT, "solver_loops.json"), "w") as f:
    json.dump(
        {"timesteps": timestep_cases, "loops": loops, "unet_loops": unet_loops}, f, indent=None, separators=(",", ":")
    )
    f.write("\n")
print(
    f"wrote {len(timestep_cases)} timestep cases, {len(loops)} loops and {len(unet_loops)} UNet loops"
    f" to {OUT}/solver_loops.json"
)
