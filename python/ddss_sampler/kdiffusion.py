"""The learned sampler as a k-diffusion-style function over a denoiser ``model(x, sigma) -> x0``.

k-diffusion's convention: states are ``x = x0 + sigma * noise`` (variance-exploding scale) and the
denoiser returns its estimate of ``x0``. GGDM's states ``x_i`` live in the variance-preserving
scale of the model's schedule; step ``i`` calls the denoiser at
``sigma_i = sqrt((1 - abar_i) / abar_i)`` (``abar_i = derived.query_abar[i]``) on
``x = input_scale_i x_i / sqrt(abar_i)``, and forms ``x0_hat_i`` from what it returns exactly as
the scheduler forms it from a sample-predicting network.

:class:`DiffusersDenoiser` turns a diffusers ``UNet2DModel`` (or any ``unet(x, t).sample``
network) into such a denoiser. It maps ``sigma`` to the network's timestep with ddss-rs' map
(``schedule.Schedule.tau_for_sigma``: ``log abar`` interpolated linearly between integer
timesteps, clean data at ``tau = -1``), not k-diffusion's interpolation of ``log sigma``, so the
network sees the learned continuous timesteps exactly.
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable, Mapping

import torch

from . import _math
from .errors import SamplerFileError
from .sampler_file import GGDMSampler, load_sampler

Denoiser = Callable[..., torch.Tensor]
NoiseSampler = Callable[[float, float], torch.Tensor]


def _as_sampler(sampler: GGDMSampler | str | os.PathLike) -> GGDMSampler:
    return sampler if isinstance(sampler, GGDMSampler) else load_sampler(sampler)


def ggdm_sigmas(sampler: GGDMSampler | str | os.PathLike) -> torch.Tensor:
    """The ``K + 1`` noise levels of a run: the denoiser's ``sigma`` at each step, then 0."""
    return torch.tensor(_as_sampler(sampler).sigmas, dtype=torch.float64)


def initial_noise_scale(sampler: GGDMSampler | str | os.PathLike) -> float:
    """``sqrt(1 + sigma_1^2)``: ``x = torch.randn(shape) * initial_noise_scale(s)`` starts
    :func:`sample_ggdm` from the same unit noise ``x_1`` that ``ddss-cli sample`` and
    :class:`GGDMScheduler` start from (k-diffusion's own samplers start from ``randn * sigma_1``,
    smaller by ``sqrt(1 - abar_1)``)."""
    sigma = _as_sampler(sampler).sigmas[0]
    return math.sqrt(1.0 + sigma * sigma)


def step_noise_sampler(step_noise: torch.Tensor) -> NoiseSampler:
    """A ``noise_sampler`` replaying ``step_noise`` (``[K, N, C, H, W]``, e.g. the
    ``--out-step-noise`` file of ``ddss-cli sample``), one entry per step."""
    calls = iter(range(step_noise.shape[0]))

    def sample(sigma: float, sigma_next: float) -> torch.Tensor:
        index = next(calls, None)
        if index is None:
            raise SamplerFileError(f"step_noise holds {step_noise.shape[0]} steps; the sampler asked for more")
        return step_noise[index]

    return sample


def sample_ggdm(
    model: Denoiser,
    x: torch.Tensor,
    sampler: GGDMSampler | str | os.PathLike,
    extra_args: Mapping[str, Any] | None = None,
    callback: Callable[[dict], None] | None = None,
    disable: bool | None = None,
    noise_sampler: NoiseSampler | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Runs the learned sampler from ``x`` (the initial noise in the denoiser's scale, see
    :func:`initial_noise_scale`) and returns the sample.

    ``model(x, sigma * s_in, **extra_args)`` is the denoiser. ``noise_sampler(sigma, sigma_next)``
    gives ``z_i`` (it multiplies ``derived.sigma``); by default it is drawn with ``generator``
    where ``sigma_i != 0``. ``callback`` receives ``{"x", "i", "sigma", "sigma_hat", "denoised"}``
    after each step. Differentiable: nothing here stops gradients. ``disable`` is accepted for
    k-diffusion signature compatibility (there is no progress bar).
    """
    ggdm = _as_sampler(sampler)
    ggdm.check_sample_shape(x.shape, "x")
    extra_args = {} if extra_args is None else dict(extra_args)
    sigmas = ggdm.sigmas
    s_in = x.new_ones([x.shape[0]])
    states = [x / initial_noise_scale(ggdm)]
    x0_hats: list[torch.Tensor] = []
    for i, step in enumerate(ggdm.step_coefficients):
        x_net = states[i] * step.input_scale if step.input_scale != 1.0 else states[i]
        x_model = x_net / math.sqrt(step.query_abar)
        denoised = model(x_model, sigmas[i] * s_in, **extra_args)
        x0_hat = _math.x0_from_output(step, ggdm.query, states[i], x_net, denoised, "sample")
        x0_hats.append(x0_hat)
        noise = None
        if noise_sampler is not None:
            noise = noise_sampler(sigmas[i], sigmas[i + 1])
        elif step.sigma != 0.0:
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        states.append(_math.combine(step, states, x0_hats, noise))
        if callback is not None:
            x_shown = states[-1] * math.sqrt(1.0 + sigmas[i + 1] ** 2)
            callback({"x": x_shown, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": x0_hat})
    return states[-1]


class DiffusersDenoiser:
    """A diffusers network (``net(x, t).sample``, e.g. ``UNet2DModel``) as a k-diffusion denoiser
    ``(x, sigma) -> x0`` on the schedule of ``sampler``.

    ``model_config`` (the model's scheduler config: ``pipe.scheduler.config``, a dict or a
    ``scheduler_config.json`` path) is checked against the sampler's schedule and prediction type.
    The network's output is read as the sampler's ``prediction_type``.
    """

    def __init__(
        self,
        net: Any,
        sampler: GGDMSampler | str | os.PathLike,
        model_config: Mapping[str, Any] | str | os.PathLike | None = None,
    ):
        from .scheduler import check_model_config

        self.net = net
        self.sampler = _as_sampler(sampler)
        if model_config is not None:
            check_model_config(self.sampler, model_config, "the model's scheduler config")
        config = getattr(net, "config", None)
        if config is not None and self.sampler.sample_shape is not None:
            size = config.get("sample_size") if hasattr(config, "get") else None
            channels = config.get("in_channels") if hasattr(config, "get") else None
            if size is not None and channels is not None:
                size = [size, size] if isinstance(size, int) else list(size)
                self.sampler.check_sample_shape([1, channels, *size], "the network's samples (config.json)")
        self.prediction_type = self.sampler.prediction_type

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1).expand(x.shape[0])
        tau = self.sampler.schedule.tau_for_sigma(sigma)
        abar = 1.0 / (1.0 + sigma.cpu() ** 2)
        c_in = abar.sqrt().to(x.device, x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        x_net = x * c_in
        output = self.net(x_net, tau.to(x.device, torch.float32), **kwargs)
        output = output.sample if hasattr(output, "sample") else output
        shape = (-1, *([1] * (x.ndim - 1)))
        if self.prediction_type == "epsilon":
            return x - output * sigma.to(x.device, x.dtype).reshape(shape)
        if self.prediction_type == "sample":
            return output
        sqrt_abar = c_in
        sqrt_one_minus = (1.0 - abar).sqrt().to(x.device, x.dtype).reshape(shape)
        return x_net * sqrt_abar - output * sqrt_one_minus
