"""The model's noise schedule and ddss-rs' continuous time (``crates/ggdm-core/src/schedule.rs``).

``abar_t = prod_{s<=t} (1 - beta_s)`` for the integer timesteps ``t = 0..T-1`` (diffusers'
indexing), in float64. Continuous time ``tau`` interpolates ``log abar`` linearly between the
integers, with one extra knot at ``tau = -1`` for clean data (``abar = 1``). That is the map a
learned grid lives on, and the one this package uses to turn a k-diffusion ``sigma`` into the
timestep the network is called at: ``abar = 1 / (1 + sigma^2)``, then the ``tau`` whose
interpolated ``log abar`` equals ``log abar``. It is not k-diffusion's interpolation of
``log sigma`` between quantised timesteps.
"""

from __future__ import annotations

import bisect
import math
from typing import Any, Mapping, Sequence

import torch

from .errors import SamplerFileError


def _linspace(start: float, end: float, count: int) -> list[float]:
    step = (end - start) / (count - 1)
    return [start + step * i for i in range(count)]


def betas_of(scheduler: Mapping[str, Any], origin: str) -> list[float]:
    """The ``T`` betas of a sampler file's ``scheduler`` section (float64, as ddss-rs computes them)."""
    count = scheduler["num_train_timesteps"]
    if not isinstance(count, int) or count < 2:
        raise SamplerFileError(f"{origin}: `scheduler.num_train_timesteps` = {count!r} (need an integer >= 2)")
    trained = scheduler.get("trained_betas")
    if trained is not None:
        if len(trained) != count:
            raise SamplerFileError(
                f"{origin}: `scheduler.trained_betas` has {len(trained)} values for num_train_timesteps = {count}"
            )
        return [float(b) for b in trained]
    schedule = scheduler["beta_schedule"]
    kind = schedule.get("kind") if isinstance(schedule, Mapping) else None
    if kind == "linear":
        return _linspace(schedule["beta_start"], schedule["beta_end"], count)
    if kind == "scaled_linear":
        roots = _linspace(math.sqrt(schedule["beta_start"]), math.sqrt(schedule["beta_end"]), count)
        return [r * r for r in roots]
    if kind == "squared_cos_cap_v2":
        def abar_fn(u: float) -> float:
            return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

        return [min(1.0 - abar_fn((i + 1) / count) / abar_fn(i / count), 0.999) for i in range(count)]
    raise SamplerFileError(
        f"{origin}: `scheduler.beta_schedule` = {schedule!r} is not one of linear, scaled_linear, squared_cos_cap_v2"
    )


class Schedule:
    """``abar`` at continuous time, and its inverse, for one model's schedule."""

    def __init__(self, betas: Sequence[float]):
        abar = []
        prod = 1.0
        for beta in betas:
            prod *= 1.0 - beta
            abar.append(prod)
        self.abar = abar
        # log abar at tau = -1, 0, ..., T-1 (index k is tau = k - 1).
        self.log_knots = [0.0] + [math.log(a) for a in abar]
        self._negated_knots = [-v for v in self.log_knots]

    @property
    def tau_max(self) -> float:
        """``T - 1``."""
        return float(len(self.abar) - 1)

    def abar_at(self, tau: float) -> float:
        """``abar(tau)`` for ``tau`` in ``[-1, T - 1]`` (clamped), by log-linear interpolation."""
        last = len(self.log_knots) - 1
        pos = min(max(tau + 1.0, 0.0), float(last))
        lo = min(max(math.floor(pos), 0), last - 1)
        frac = pos - lo
        log_lo, log_hi = self.log_knots[lo], self.log_knots[lo + 1]
        return math.exp(log_lo + (log_hi - log_lo) * frac)

    def tau_for_abar(self, abar: float) -> float:
        """The continuous time whose ``abar`` is ``abar`` (the inverse of :meth:`abar_at`)."""
        target = math.log(min(max(abar, 2.2250738585072014e-308), 1.0))
        knots = self.log_knots
        if target >= knots[0]:
            return -1.0
        if target <= knots[-1]:
            return self.tau_max
        # knots decrease strictly: k with knots[k] >= target > knots[k + 1]
        k = bisect.bisect_right(self._negated_knots, -target) - 1
        frac = (knots[k] - target) / (knots[k] - knots[k + 1])
        return k - 1.0 + frac

    def tau_for_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        """The timestep of each k-diffusion ``sigma`` (``abar = 1 / (1 + sigma^2)``), as float64."""
        flat = sigma.detach().to("cpu", torch.float64).reshape(-1).tolist()
        taus = [self.tau_for_abar(1.0 / (1.0 + s * s)) for s in flat]
        return torch.tensor(taus, dtype=torch.float64).reshape(sigma.shape)
