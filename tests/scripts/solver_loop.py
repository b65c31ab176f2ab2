"""What gen_solver_fixtures.py and gen_solver_cosine_fixtures.py share: the smooth dummy network
and one full diffusers sampling loop over it (imported by both; not run on its own)."""

import torch


def smooth_model(x, t):
    """A smooth nonlinear dummy network: x * t / (t + 1) + 0.1 * (1 - t / 1000) * sin(3 x).

    Close to diffusers' scheduler-test dummy `x * t / (t + 1)` at high noise (so an epsilon reading
    stays well scaled), with a nonlinear part that grows towards clean data.
    """
    t = t.float()
    return x * t / (t + 1) + (1 - t / 1000) * 0.1 * torch.sin(x * 3)


def run_loop(sched, steps, shape, seed, what, model=smooth_model):
    """Runs `sched` for `steps` steps from seeded noise of `shape` over `model(x, t)` (by default
    `smooth_model`); the fixture fields of the loop (shape, timesteps, x_init, result). `what`
    names the loop in the NaN check."""
    sched.set_timesteps(steps)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    x_init = x.clone()
    for t in sched.timesteps:
        x = sched.step(model(x, t), t, x).prev_sample
    result = x.flatten().tolist()
    assert all(v == v for v in result), f"NaN in {what}"
    return {
        "shape": list(shape),
        "timesteps": sched.timesteps.tolist(),
        "x_init": x_init.flatten().tolist(),
        "result": result,
    }
