"""Learned GGDM samplers (``sampler.json`` of ddss-rs) in diffusers and k-diffusion-style code.

* :class:`GGDMScheduler`: a diffusers scheduler (``DDPMPipeline(unet=..., scheduler=...)``);
  needs ``diffusers``, imported when first used.
* :func:`sample_ggdm`: the same sampler over a denoiser ``model(x, sigma) -> x0``;
  :class:`DiffusersDenoiser` wraps a diffusers network as one.
* :func:`load_sampler` / :class:`GGDMSampler`: the file's steps, for code of your own.

The major version is the newest ``sampler.json`` version the package reads: 2.x reads versions 1
and 2 (:data:`SAMPLER_VERSIONS_READ`).
"""

from .errors import SamplerFileError
from .kdiffusion import DiffusersDenoiser, ggdm_sigmas, initial_noise_scale, sample_ggdm, step_noise_sampler
from .sampler_file import VERSIONS_READ as SAMPLER_VERSIONS_READ
from .sampler_file import GGDMSampler, load_sampler

__version__ = "2.0.0"

__all__ = [
    "DiffusersDenoiser",
    "GGDMSampler",
    "GGDMScheduler",
    "GGDMSchedulerOutput",
    "SAMPLER_VERSIONS_READ",
    "SamplerFileError",
    "ggdm_sigmas",
    "initial_noise_scale",
    "load_sampler",
    "sample_ggdm",
    "step_noise_sampler",
]

# diffusers is imported on first use of these names. SchedulerMixin and ConfigMixin are here
# because diffusers' pipeline loader looks a component's base classes up in the component's own
# module (model_index.json names `ddss_sampler` for the scheduler).
_FROM_SCHEDULER = ("GGDMScheduler", "GGDMSchedulerOutput", "SchedulerMixin", "ConfigMixin")


def __getattr__(name: str):
    if name in _FROM_SCHEDULER:
        from . import scheduler

        return getattr(scheduler, name)
    raise AttributeError(f"module 'ddss_sampler' has no attribute {name!r}")
