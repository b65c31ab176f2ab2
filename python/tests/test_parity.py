"""The scheduler and sample_ggdm against ddss-cli sample on the shipped model, from the same
initial and step noise (tests/fixtures/interop), and the start samplers against diffusers' own."""

import pytest
import torch
from conftest import SAMPLERS, TOLERANCE, cli_samples, max_difference, sampler_path
from diffusers import DDIMScheduler, DDPMPipeline, UniPCMultistepScheduler
from diffusers.utils.torch_utils import randn_tensor

from ddss_sampler import DiffusersDenoiser, GGDMScheduler, initial_noise_scale, sample_ggdm, step_noise_sampler

#: UniPC at initialisation against diffusers' UniPCMultistepScheduler: diffusers keeps its noise
#: levels in float32, the sampler in float64 (docs/sampler_json.md, "Bases"). Measured: 9e-6 at
#: K = 10 on the shipped model (6e-6 between diffusers and ddss-cli).
UNIPC_TOLERANCE = 5e-5


def run_loop(unet, scheduler, x, steps, step_noise=None, **step_kwargs):
    """The loop every diffusers pipeline runs (``steps`` steps), with the step noise injected when
    given."""
    scheduler.set_timesteps(steps)
    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps):
            output = unet(scheduler.scale_model_input(x, t), t).sample
            if step_noise is not None:
                step_kwargs["variance_noise"] = step_noise[i]
            x = scheduler.step(output, t, x, **step_kwargs).prev_sample
    return x


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_scheduler_equals_ddss_cli(name, unet, init_noise, step_noise):
    scheduler = GGDMScheduler.from_sampler_file(sampler_path(name))
    assert scheduler.timesteps.dtype == torch.float32
    samples = run_loop(unet, scheduler, init_noise.clone(), scheduler.steps, step_noise)
    assert max_difference(samples, cli_samples(name)) < TOLERANCE


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_sample_ggdm_equals_ddss_cli(name, unet, init_noise, step_noise):
    denoiser = DiffusersDenoiser(unet, sampler_path(name), model_config=unet_scheduler_config())
    with torch.no_grad():
        x = init_noise * initial_noise_scale(sampler_path(name))
        samples = sample_ggdm(denoiser, x, sampler_path(name), noise_sampler=step_noise_sampler(step_noise))
    assert max_difference(samples, cli_samples(name)) < TOLERANCE


def unet_scheduler_config():
    from conftest import MODEL

    return MODEL / "scheduler_config.json"


def test_the_samplers_cover_what_parity_must_show():
    """Learned deterministic and stochastic samplers, the marginal mode, DDIM and UniPC starts."""
    from ddss_sampler import load_sampler

    loaded = {name: load_sampler(sampler_path(name)) for name in SAMPLERS}
    assert all(s == 0 for s in loaded["learned_deterministic"].source["derived"]["sigma"])
    assert any(r != 0 for row in loaded["learned_deterministic"].source["params"]["u_residual"] for r in row)
    stochastic = loaded["learned_stochastic"].source
    assert all(s > 0 for s in stochastic["derived"]["sigma"])
    # Learned sigma of both signs: the step noise convention (it multiplies |sigma|) matters.
    assert {r > 0 for r in stochastic["params"]["sigma_residual"]} == {True, False}
    assert loaded["marginal"].query == "marginal"
    assert any(abs(s - 1.0) > 1e-3 for s in loaded["marginal"].source["derived"]["input_scale"])
    assert loaded["ddim_init"].source["base"] == "ddim" and loaded["unipc_init"].source["base"] == "unipc"
    for name in ("ddim_init", "unipc_init"):
        params = loaded[name].source["params"]
        assert all(v == 0 for key in ("u_residual", "w_residual") for row in params[key] for v in row)


def test_ddim_start_equals_diffusers_ddim(unet, init_noise):
    ggdm = GGDMScheduler.from_sampler_file(sampler_path("ddim_init"))
    # The GGDM config carries the model's settings, so diffusers' schedulers can be made from it.
    ddim = DDIMScheduler.from_config(
        ggdm.config, clip_sample=False, timestep_spacing="trailing", set_alpha_to_one=True
    )
    ddim.set_timesteps(ggdm.steps)
    assert ddim.timesteps.tolist() == ggdm.timesteps.tolist()
    diffusers_samples = run_loop(unet, ddim, init_noise.clone(), ggdm.steps, eta=0.0)
    assert max_difference(diffusers_samples, cli_samples("ddim_init")) < TOLERANCE
    ours = run_loop(unet, ggdm, init_noise.clone(), ggdm.steps)
    assert max_difference(ours, diffusers_samples) < TOLERANCE


def test_unipc_start_equals_diffusers_unipc(unet, init_noise):
    ggdm = GGDMScheduler.from_sampler_file(sampler_path("unipc_init"))
    unipc = UniPCMultistepScheduler.from_config(ggdm.config, timestep_spacing="linspace")
    unipc.set_timesteps(ggdm.steps)
    assert unipc.timesteps.tolist() == ggdm.timesteps.tolist()
    diffusers_samples = run_loop(unet, unipc, init_noise.clone(), ggdm.steps)
    assert max_difference(diffusers_samples, cli_samples("unipc_init")) < UNIPC_TOLERANCE
    ours = run_loop(unet, ggdm, init_noise.clone(), ggdm.steps)
    assert max_difference(ours, diffusers_samples) < UNIPC_TOLERANCE


def drawn_like_ddpm_pipeline(scheduler, batch, seed):
    """The initial and step noise DDPMPipeline draws from `generator` with this scheduler."""
    generator = torch.Generator().manual_seed(seed)
    shape = (batch, *scheduler.ggdm.sample_shape)
    init = randn_tensor(shape, generator=generator)
    steps = [randn_tensor(shape, generator=generator) if c.sigma != 0 else torch.zeros(shape)
             for c in scheduler.ggdm.step_coefficients]
    return init, torch.stack(steps)


@pytest.mark.parametrize("name", ["learned_stochastic", "marginal"])
def test_ddpm_pipeline_runs_the_sampler(name, unet):
    """DDPMPipeline, unchanged, with generator= driving the step noise; in the marginal mode it
    never calls scale_model_input, and the result is still sample_ggdm's on the same noise."""
    scheduler = GGDMScheduler.from_sampler_file(sampler_path(name))
    pipe = DDPMPipeline(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=2, generator=torch.Generator().manual_seed(5), num_inference_steps=scheduler.steps,
                  output_type="pt").images
    init, steps = drawn_like_ddpm_pipeline(scheduler, 2, 5)
    denoiser = DiffusersDenoiser(unet, scheduler.ggdm)
    with torch.no_grad():
        expected = sample_ggdm(denoiser, init * initial_noise_scale(scheduler.ggdm), scheduler.ggdm,
                               noise_sampler=step_noise_sampler(steps))
    expected = (expected / 2 + 0.5).clamp(0, 1)
    assert max_difference(images, expected) < TOLERANCE


def test_sample_ggdm_is_differentiable(unet, init_noise):
    """No gradient is cut: the sample's gradient reaches the initial noise through every step."""
    x = (init_noise[:1] * initial_noise_scale(sampler_path("learned_deterministic"))).requires_grad_(True)
    denoiser = DiffusersDenoiser(unet, sampler_path("learned_deterministic"))
    sample_ggdm(denoiser, x, sampler_path("learned_deterministic")).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
