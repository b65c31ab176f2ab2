"""One GGDM step on tensors (DESIGN.md section 4, "GGDM step"; ``docs/sampler_json.md``):

    x0_hat_i = p_i x_i + q_i eps_i
    x_{i+1}  = sum_{j<=i} u_ij x_j + sum_{j<=i} w_ij x0_hat_j + sigma_i z_i

in the operation order of ``ggdm_core::ggdm::GgdmSampler::x0_from_output`` and ``combine``, so
that a float32 run here and a float32 run of ``ddss-cli sample`` round alike. Coefficients are
Python floats (float64); each one is rounded to the state's dtype where it multiplies a state.
No gradient is cut: the functions are differentiable in the states and the network's output.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from .sampler_file import StepCoefficients


def x0_from_output(
    step: StepCoefficients,
    query: str,
    x: torch.Tensor,
    x_net: torch.Tensor,
    output: torch.Tensor,
    prediction_type: str,
) -> torch.Tensor:
    """``x0_hat_i`` from the network's ``output`` on ``x_net = input_scale_i x_i``."""
    scale, p_rel, q_rel = step.x0_scale, step.p_rel, step.q_rel
    sqrt_abar = math.sqrt(step.query_abar)
    sqrt_one_minus = math.sqrt(1.0 - step.query_abar)
    if query == "marginal":
        if prediction_type == "epsilon":
            eps = output
        elif prediction_type == "sample":
            eps = (x_net - output * sqrt_abar) / sqrt_one_minus
        else:
            eps = output * sqrt_abar + x_net * sqrt_one_minus
        return (x * p_rel - eps * (step.noise_scale * q_rel)) * scale
    if prediction_type == "epsilon":
        return (x * p_rel - output * (sqrt_one_minus * q_rel)) * scale
    if prediction_type == "sample":
        return x * ((p_rel - q_rel) * scale) + output * q_rel
    x0_model = x * sqrt_abar - output * sqrt_one_minus
    eps_model = output * sqrt_abar + x * sqrt_one_minus
    return x0_model * p_rel + eps_model * (scale * sqrt_one_minus * (p_rel - q_rel))


def combine(
    step: StepCoefficients,
    states: Sequence[torch.Tensor],
    x0_hats: Sequence[torch.Tensor],
    noise: torch.Tensor | None,
) -> torch.Tensor:
    """``x_{i+1}`` from every state and prediction so far (``noise`` is ``z_i``; ``None`` when
    ``sigma_i = 0``). Zero coefficients are skipped: adding ``0 * x`` changes nothing."""
    i = len(x0_hats) - 1
    if noise is not None:
        next_state = noise * step.sigma
    else:
        next_state = torch.zeros_like(states[i])
    for j in range(i + 1):
        u_ij, w_ij = step.u[j], step.w[j]
        if u_ij != 0.0:
            next_state = next_state + states[j] * u_ij
        if w_ij != 0.0:
            next_state = next_state + x0_hats[j] * w_ij
    return next_state
