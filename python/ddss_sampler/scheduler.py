"""``GGDMScheduler``: a learned GGDM sampler as a diffusers scheduler.

It runs the ``K`` steps of a ``sampler.json`` in any loop that calls ``set_timesteps`` and
``step(model_output, t, sample)``, ``DDPMPipeline`` included:

* ``timesteps`` are the sampler's continuous (float) query timesteps, which the loop passes to
  the network;
* ``set_timesteps`` takes exactly ``K`` steps (any other count is an error naming ``K``);
* ``step`` keeps every state and prediction, which full-history steps combine;
* the step noise ``z_i`` comes from ``variance_noise`` when given, else from ``generator``; it
  multiplies ``derived.sigma``, the convention of ``ddss-cli sample --step-noise``;
* in the ``marginal`` query mode the network reads a rescaled state. ``step`` returns that
  network input (``input_scale_{i+1} x_{i+1}``) and takes it back at the next step, so a loop that
  passes ``step``'s output straight to the network, as ``DDPMPipeline`` does, needs no
  ``scale_model_input``; the last step returns the sample itself. ``scale_model_input`` returns
  its input unchanged, so loops that call it work too.

The config holds the sampler file (``sampler``, version 2) and, for other tools reading the folder,
the model's own scheduler settings under diffusers' names (``num_train_timesteps``,
``beta_schedule``, ``prediction_type``, ...); ``DDIMScheduler.from_config(ggdm.config)`` therefore
gives a baseline on the same model. Loading checks that both agree.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from . import _math
from .errors import SamplerFileError
from .sampler_file import GGDMSampler, load_sampler

_SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type")


def model_settings(scheduler: Mapping[str, Any]) -> dict:
    """A sampler file's ``scheduler`` section under diffusers' key names (what
    ``SchedulerConfig::to_diffusers_json`` writes, less ``_class_name``)."""
    schedule = scheduler["beta_schedule"]
    kind = schedule["kind"]
    if kind in ("linear", "scaled_linear"):
        start, end = schedule["beta_start"], schedule["beta_end"]
    else:
        start, end = 1e-4, 0.02
    return {
        "num_train_timesteps": scheduler["num_train_timesteps"],
        "beta_start": start,
        "beta_end": end,
        "beta_schedule": {"squared_cos_cap_v2": "squaredcos_cap_v2"}.get(kind, kind),
        "trained_betas": scheduler.get("trained_betas"),
        "prediction_type": scheduler["prediction_type"],
        "clip_sample": scheduler["clip_sample"],
        "clip_sample_range": scheduler["clip_sample_range"],
        "variance_type": scheduler["variance_type"],
        "timestep_spacing": scheduler["timestep_spacing"],
        "steps_offset": scheduler["steps_offset"],
        "set_alpha_to_one": scheduler["set_alpha_to_one"],
        "use_lu_lambdas": scheduler.get("use_lu_lambdas", False),
    }


def check_model_config(sampler: GGDMSampler, model_config: Mapping[str, Any], what: str) -> None:
    """Raises when a model's scheduler config (``pipe.scheduler.config``, a dict, or the path of a
    ``scheduler_config.json``) has another schedule or prediction type than the sampler was made for."""
    if isinstance(model_config, (str, os.PathLike)):
        what = os.fspath(model_config)
        model_config = ConfigMixin._dict_from_json_file(model_config)
    ours = model_settings(sampler.source["scheduler"])
    defaults = {"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02, "beta_schedule": "linear",
                "trained_betas": None, "prediction_type": "epsilon"}
    for key in _SCHEDULE_KEYS:
        if key in ("beta_start", "beta_end") and ours["beta_schedule"] == "squaredcos_cap_v2":
            continue
        theirs = model_config.get(key, defaults[key])
        if theirs != ours[key]:
            raise SamplerFileError(
                f"{what}: `{key}` = {theirs!r}, but {sampler.origin} was made for a model with "
                f"`{key}` = {ours[key]!r}; a sampler only fits the model (schedule and prediction type) it was learned for"
            )


@dataclass
class GGDMSchedulerOutput(BaseOutput):
    """``prev_sample``: what the loop feeds the network next (the sample after the last step);
    ``pred_original_sample``: this step's ``x0_hat``."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


class GGDMScheduler(SchedulerMixin, ConfigMixin):
    """A learned GGDM sampler (``sampler.json`` of ``ddss-cli search``) as a diffusers scheduler.

    Build it with :meth:`from_sampler_file` or :meth:`from_pretrained` (a folder written by
    ``ddss-cli export --format diffusers-scheduler`` or by :meth:`save_pretrained`).
    """

    _compatibles: list = []
    order = 1

    @register_to_config
    def __init__(
        self,
        sampler: dict | None = None,
        num_train_timesteps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: list | None = None,
        prediction_type: str = "epsilon",
        clip_sample: bool = True,
        clip_sample_range: float = 1.0,
        variance_type: str = "fixed_small",
        timestep_spacing: str = "leading",
        steps_offset: int = 0,
        set_alpha_to_one: bool = True,
        use_lu_lambdas: bool = False,
    ):
        if sampler is None:
            raise SamplerFileError(
                "GGDMScheduler needs a learned sampler: build it with GGDMScheduler.from_sampler_file(path) or "
                "from_pretrained(dir) on a folder written by `ddss-cli export --format diffusers-scheduler`; "
                "its config has no `sampler`"
            )
        self.ggdm = GGDMSampler(sampler, origin="the scheduler config's `sampler`")
        expected = model_settings(self.ggdm.source["scheduler"])
        given = {key: value for key, value in self.config.items() if key in expected}
        for key, value in expected.items():
            if given.get(key) != value:
                raise SamplerFileError(
                    f"scheduler config: `{key}` = {given.get(key)!r}, but its `sampler` was made for {value!r}"
                )
        self.init_noise_sigma = 1.0
        self.num_inference_steps = self.ggdm.steps
        self.timesteps = torch.tensor(self.ggdm.query_timesteps, dtype=torch.float32)
        self._reset()

    @classmethod
    def from_sampler_file(
        cls, path: str | os.PathLike, model_config: Mapping[str, Any] | str | os.PathLike | None = None
    ) -> "GGDMScheduler":
        """The scheduler of a ``sampler.json`` (version 1 or 2). With ``model_config`` (the model's
        scheduler config, e.g. ``pipe.scheduler.config``), also checks that the sampler was made
        for that schedule and prediction type."""
        sampler = load_sampler(path)
        if model_config is not None:
            check_model_config(sampler, model_config, "the model's scheduler config")
        return cls(sampler=sampler.source, **model_settings(sampler.source["scheduler"]))

    @property
    def steps(self) -> int:
        """``K``, the only step count this scheduler runs."""
        return self.ggdm.steps

    def _reset(self) -> None:
        self._step_index = 0
        self._states: list[torch.Tensor] = []
        self._x0_hats: list[torch.Tensor] = []
        self._last_output: torch.Tensor | None = None

    def set_timesteps(
        self, num_inference_steps: int | None = None, device: str | torch.device | None = None, **kwargs: Any
    ) -> None:
        """Starts a run of the ``K`` learned steps (``num_inference_steps`` must be ``K`` or None)."""
        k = self.ggdm.steps
        if kwargs.get("timesteps") is not None or kwargs.get("sigmas") is not None:
            raise SamplerFileError(
                f"GGDMScheduler: the timesteps are learned ({k} of them); custom `timesteps`/`sigmas` cannot be set"
            )
        if num_inference_steps is not None and num_inference_steps != k:
            raise SamplerFileError(
                f"GGDMScheduler: this sampler was learned for exactly K = {k} steps, got num_inference_steps = "
                f"{num_inference_steps}; pass num_inference_steps={k} (e.g. pipe(num_inference_steps={k}))"
            )
        self.timesteps = torch.tensor(self.ggdm.query_timesteps, dtype=torch.float32, device=device)
        self._reset()

    def scale_model_input(self, sample: torch.Tensor, timestep: Any = None) -> torch.Tensor:
        """Returns ``sample``: the states :meth:`step` returns already are the network's input."""
        return sample

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        variance_noise: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> GGDMSchedulerOutput | tuple:
        """Step ``i``: ``x0_hat_i`` from ``model_output`` (the network at ``(sample, timestep)``),
        then ``x_{i+1}``. ``variance_noise`` is ``z_i`` (drawn from ``generator`` when not given;
        not used when ``sigma_i = 0``)."""
        i = self._step_index
        k = self.ggdm.steps
        if i >= k:
            raise SamplerFileError(
                f"GGDMScheduler: all K = {k} steps are done; call set_timesteps({k}) to start another run"
            )
        self._check_timestep(i, timestep)
        self.ggdm.check_sample_shape(sample.shape, "the sample passed to step()")
        coefficients = self.ggdm.step_coefficients[i]
        if self._last_output is not None and sample is self._last_output:
            x = self._states[i]
        else:
            x = sample if coefficients.input_scale == 1.0 else sample / coefficients.input_scale
            if i == 0:
                self._states = [x]
            else:
                self._states[i] = x
        x0_hat = _math.x0_from_output(
            coefficients, self.ggdm.query, x, sample, model_output, self.ggdm.prediction_type
        )
        self._x0_hats.append(x0_hat)
        noise = self._step_noise(coefficients.sigma, sample, generator, variance_noise)
        next_state = _math.combine(coefficients, self._states, self._x0_hats, noise)
        self._states.append(next_state)
        self._step_index = i + 1
        output = next_state
        if i + 1 < k and self.ggdm.step_coefficients[i + 1].input_scale != 1.0:
            output = next_state * self.ggdm.step_coefficients[i + 1].input_scale
        self._last_output = output
        if not return_dict:
            return (output, x0_hat)
        return GGDMSchedulerOutput(prev_sample=output, pred_original_sample=x0_hat)

    def _check_timestep(self, i: int, timestep: float | torch.Tensor) -> None:
        expected = float(self.timesteps[i])
        got = float(timestep.reshape(-1)[0]) if isinstance(timestep, torch.Tensor) else float(timestep)
        if abs(got - expected) > 1e-3 * max(1.0, abs(expected)):
            raise SamplerFileError(
                f"GGDMScheduler: step {i} is at timestep {expected}, but step() was given {got}; run the steps "
                "in the order of scheduler.timesteps, after set_timesteps()"
            )

    def _step_noise(
        self,
        sigma: float,
        sample: torch.Tensor,
        generator: torch.Generator | None,
        variance_noise: torch.Tensor | None,
    ) -> torch.Tensor | None:
        if variance_noise is not None:
            if variance_noise.shape != sample.shape:
                raise SamplerFileError(
                    f"GGDMScheduler: variance_noise has shape {list(variance_noise.shape)}, the sample "
                    f"{list(sample.shape)}"
                )
            return variance_noise.to(sample.device, sample.dtype)
        if sigma == 0.0:
            return None
        return randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)

    def __len__(self) -> int:
        return self.config.num_train_timesteps
