"""Reference fixtures for ggdm-core's multistep solvers on the cosine schedule (`squaredcos_cap_v2`).

Run from the repository root with the project venv's Python (`cargo xtask fixtures` does this):

    ~/.cache/ddss-rs/torch-2.11.0/bin/python tests/scripts/gen_solver_cosine_fixtures.py

Needs diffusers==0.42.1 and torch==2.11.0. Writes, deterministically,
tests/fixtures/solver_loops_cosine.json:

* "loops": full sampling loops of DPMSolverMultistepScheduler (dpmsolver++, midpoint, orders 2 and
  3) and UniPCMultistepScheduler (predict_x0, bh2, orders 2 and 3) with
  beta_schedule="squaredcos_cap_v2", for K in {5, 10, 20}, prediction types epsilon and
  v_prediction, spacings trailing and linspace; every other setting at its diffusers default
  (lower_order_final, final_sigmas_type "zero", no thresholding, and for DPM-Solver++
  lambda_min_clipped = -inf, which leaves the timestep range whole; UniPC has no such setting).
  The model is solver_loop.py's smooth dummy, evaluated in float32.
* "lambda_min_clipped": DPMSolverMultistepScheduler.set_timesteps(10) lists (linspace) for several
  beta schedules and finite lambda_min_clipped values, with the unclipped list and diffusers'
  float32 minimum of lambda_t = log(alpha_t) - log(sigma_t): a value truncates the timestep
  range exactly when some lambda_t lies below it.

json.dump runs with allow_nan=False: the file is strict JSON. Also writes, with diffusers'
save_config, tests/fixtures/scheduler_configs/<name>/scheduler_config.json for the names in
SAVED_CONFIGS: DPMSolverMultistepScheduler saves its default lambda_min_clipped as the bare
token -Infinity, which strict JSON rejects.
"""

import json
import os

import torch
import diffusers
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler
from solver_loop import run_loop

assert diffusers.__version__ == "0.42.1", diffusers.__version__
OUT = os.path.join("tests", "fixtures")
os.makedirs(OUT, exist_ok=True)
torch.set_num_threads(1)

SHAPE = (2, 1, 4, 4)
BETA_SCHEDULE = "squaredcos_cap_v2"


# ---------------------------------------------------------------- full loops
loops = []
for solver, order in [("dpmsolver++", 2), ("dpmsolver++", 3), ("unipc", 2), ("unipc", 3)]:
    for prediction_type in ["epsilon", "v_prediction"]:
        for spacing in ["trailing", "linspace"]:
            for K in [5, 10, 20]:
                kwargs = dict(
                    beta_schedule=BETA_SCHEDULE,
                    solver_order=order,
                    prediction_type=prediction_type,
                    timestep_spacing=spacing,
                )
                if solver == "dpmsolver++":
                    sched = DPMSolverMultistepScheduler(solver_type="midpoint", **kwargs)
                    assert sched.config.lambda_min_clipped == -float("inf")
                else:
                    sched = UniPCMultistepScheduler(solver_type="bh2", **kwargs)
                    assert "lambda_min_clipped" not in sched.config
                what = f"{solver} {order} {prediction_type} {spacing} {K}"
                loop = run_loop(sched, K, SHAPE, 4000 + len(loops), what)
                loops.append(
                    {
                        "solver": solver,
                        "order": order,
                        "solver_type": "midpoint" if solver == "dpmsolver++" else "bh2",
                        "beta_schedule": BETA_SCHEDULE,
                        "prediction_type": prediction_type,
                        "spacing": spacing,
                        "steps": K,
                        **loop,
                    }
                )

# ---------------------------------------------------------------- lambda_min_clipped
SCHEDULES = [
    ("linear", 0.0001, 0.02),
    ("scaled_linear", 0.00085, 0.012),
    ("squaredcos_cap_v2", 0.0001, 0.02),
]
clipping = []
for name, beta_start, beta_end in SCHEDULES:
    base = dict(beta_schedule=name, beta_start=beta_start, beta_end=beta_end)
    plain = DPMSolverMultistepScheduler(**base)
    plain.set_timesteps(10)
    lambda_min = float(plain.lambda_t.min())
    for value in [-20.0, -10.0, -5.1, -5.0, -3.0, -2.0, lambda_min - 1e-3, lambda_min + 1e-3]:
        sched = DPMSolverMultistepScheduler(lambda_min_clipped=value, **base)
        sched.set_timesteps(10)
        clipping.append(
            {
                "beta_schedule": name,
                "beta_start": beta_start,
                "beta_end": beta_end,
                "lambda_min_clipped": value,
                "lambda_min": lambda_min,
                "steps": 10,
                "spacing": "linspace",
                "unclipped": plain.timesteps.tolist(),
                "timesteps": sched.timesteps.tolist(),
            }
        )

with open(os.path.join(OUT, "solver_loops_cosine.json"), "w") as f:
    json.dump({"loops": loops, "lambda_min_clipped": clipping}, f, indent=None, separators=(",", ":"), allow_nan=False)
    f.write("\n")
print(f"wrote {len(loops)} loops and {len(clipping)} lambda_min_clipped cases to {OUT}/solver_loops_cosine.json")

# ---------------------------------------------------------------- saved scheduler configs
COSINE_V = dict(beta_schedule=BETA_SCHEDULE, prediction_type="v_prediction")
SAVED_CONFIGS = {
    "dpmsolver_cosine": DPMSolverMultistepScheduler(**COSINE_V),
    "dpmsolver_linear_clip_5.1": DPMSolverMultistepScheduler(lambda_min_clipped=-5.1),
    "dpmsolver_cosine_clip_5.1": DPMSolverMultistepScheduler(lambda_min_clipped=-5.1, **COSINE_V),
    "unipc_cosine": UniPCMultistepScheduler(**COSINE_V),
    "ddpm_cosine": DDPMScheduler(**COSINE_V),
}
for name, sched in SAVED_CONFIGS.items():
    folder = os.path.join(OUT, "scheduler_configs", name)
    sched.save_config(folder)
    print(f"wrote {folder}/scheduler_config.json")
