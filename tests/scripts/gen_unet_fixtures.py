#!/usr/bin/env python3
"""Reference fixtures for the native UNet2DModel port (`ggdm_core::unet`) and the TorchScript adapter.

Run from the repository root with the project's torch venv (torch 2.11.0, diffusers 0.42.1):

    ~/.cache/ddss-rs/torch-2.11.0/bin/python tests/scripts/gen_unet_fixtures.py

Everything is written under `tests/fixtures/unet/` and is float32. The script is deterministic
(fixed seeds, CPU only, single thread), so re-running it reproduces the committed files.

What it writes
--------------
* `<name>/` for every tiny configuration in `TINY_MODELS`: a diffusers model directory
  (`config.json` + `diffusion_pytorch_model.safetensors`, written by `save_pretrained`), plus
  - `io.safetensors`: `x` (N x C x H x W input), `timesteps` (float, shape [N]) and `output`
    (`model(x, timesteps).sample` computed by diffusers);
  - `fixture.json`: the prediction type this model is declared with (metadata only: the network is
    the same whatever it predicts), the timesteps as a list and the diffusers/torch versions.
* `torchscript/`: `model.pt` (one tiny model traced with `torch.jit.trace`, signature
  `forward(x, timesteps) -> tensor`), the `model.json` sidecar the Rust loader reads, and
  `io.safetensors` with its input and expected output.
* `ddim_loop.safetensors` + `ddim_loop.json`: a full 10-step DDIM (eta = 0) loop of diffusers'
  `DDIMScheduler` driven by the tiny model `DDIM_MODEL`, from a fixed initial noise.
* `unet2d_signature.json`: every parameter of `UNet2DModel.__init__` with its default, which pins
  the keys `config.json` may hold and the defaults of missing ones.
* `ddpm-cifar10-32.config.json`, `ddpm-ema-church-256.config.json`: the configs of the two public
  google DDPM checkpoints, and `<same>.keys.json`: the state-dict keys, shapes and parameter count
  diffusers builds from them (no weights; those checkpoints cannot be downloaded here).
"""

import inspect
import json
import math
import os
import shutil
import sys

import torch

import diffusers
from diffusers import DDIMScheduler, UNet2DModel
from safetensors.torch import save_file

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures", "unet")

# The same two timesteps for every model: float, one small and one mid-range (diffusers' positional
# and Fourier embeddings both accept fractional timesteps).
TIMESTEPS = [3.7, 512.25]

# Tiny random-weight configurations. Between them they cover: attention in down/up/mid blocks and
# none at all, 1 to 3 resolution levels, positional (flip_sin_to_cos true/false, freq_shift 0/1) and
# Fourier time embeddings, downsample_padding 0 and 1, several activations, multi-head, single-head
# and non-dividing attention_head_dim, "scale_shift" time conditioning, resnet up/down-samplers,
# a missing mid block, non-square sample sizes, centred inputs and 1/2/3/4 channels.
TINY_MODELS = {
    # Two levels, attention at the coarse level (4 heads of 4 channels), embedding flipped to
    # cos-first. Also the epsilon model of the DDIM loop fixture.
    "tiny_attn_pos": dict(
        prediction_type="epsilon",
        config=dict(
            sample_size=16,
            in_channels=3,
            out_channels=3,
            block_out_channels=[8, 16],
            down_block_types=["DownBlock2D", "AttnDownBlock2D"],
            up_block_types=["AttnUpBlock2D", "UpBlock2D"],
            layers_per_block=1,
            norm_num_groups=4,
            attention_head_dim=4,
            flip_sin_to_cos=True,
            freq_shift=0,
            downsample_padding=1,
        ),
    ),
    # Three levels, no attention anywhere (mid block without attention), the original DDPM
    # embedding (sin first, freq_shift 1), asymmetric downsampling padding, centred input, GELU.
    "tiny_noattn_3lvl": dict(
        prediction_type="sample",
        config=dict(
            sample_size=8,
            in_channels=1,
            out_channels=1,
            block_out_channels=[8, 8, 16],
            down_block_types=["DownBlock2D", "DownBlock2D", "DownBlock2D"],
            up_block_types=["UpBlock2D", "UpBlock2D", "UpBlock2D"],
            layers_per_block=2,
            norm_num_groups=4,
            add_attention=False,
            flip_sin_to_cos=False,
            freq_shift=1,
            downsample_padding=0,
            center_input_sample=True,
            act_fn="gelu",
            norm_eps=1e-6,
        ),
    ),
    # Score-SDE style Fourier embedding, single-head attention, mid-block scale sqrt(2).
    "tiny_fourier": dict(
        prediction_type="epsilon",
        config=dict(
            sample_size=8,
            in_channels=3,
            out_channels=3,
            block_out_channels=[8, 16],
            down_block_types=["AttnDownBlock2D", "DownBlock2D"],
            up_block_types=["UpBlock2D", "AttnUpBlock2D"],
            layers_per_block=1,
            norm_num_groups=4,
            attention_head_dim=None,
            time_embedding_type="fourier",
            time_embedding_dim=48,
            mid_block_scale_factor=math.sqrt(2.0),
            downsample_padding=1,
            act_fn="silu",
        ),
    ),
    # One level (no resampling), non-square sample, "scale_shift" conditioning, separate attention
    # group count, dropout (inactive at inference), more output channels than input channels.
    "tiny_1lvl_scale_shift": dict(
        prediction_type="sample",
        config=dict(
            sample_size=[8, 12],
            in_channels=2,
            out_channels=4,
            block_out_channels=[16],
            down_block_types=["DownBlock2D"],
            up_block_types=["UpBlock2D"],
            layers_per_block=2,
            norm_num_groups=4,
            attn_norm_num_groups=2,
            resnet_time_scale_shift="scale_shift",
            attention_head_dim=4,
            dropout=0.1,
            norm_eps=1e-5,
            act_fn="mish",
        ),
    ),
    # Resnet-block down/up-samplers in the attention blocks, no mid block, an attention_head_dim
    # that does not divide the channel count (inner dim 6 at 8 channels, 12 at 16), ReLU.
    "tiny_resnet_updown": dict(
        prediction_type="epsilon",
        config=dict(
            sample_size=8,
            in_channels=3,
            out_channels=3,
            block_out_channels=[8, 16],
            down_block_types=["AttnDownBlock2D", "AttnDownBlock2D"],
            up_block_types=["AttnUpBlock2D", "AttnUpBlock2D"],
            mid_block_type=None,
            layers_per_block=1,
            norm_num_groups=4,
            attention_head_dim=6,
            downsample_type="resnet",
            upsample_type="resnet",
            act_fn="relu",
            flip_sin_to_cos=True,
            freq_shift=1,
        ),
    ),
}

# The model traced to TorchScript and the one that drives the DDIM loop (the latter is fitted
# briefly to a toy denoising task before it is saved, see `fit_to_flat_colours`).
TORCHSCRIPT_MODEL = "tiny_resnet_updown"
DDIM_MODEL = "tiny_attn_pos"

# The DDPM checkpoints of Ho et al. as converted to diffusers (`google/ddpm-cifar10-32` and
# `google/ddpm-ema-church-256`): original DDPM embedding, single-head attention, padding 0.
DDPM_CIFAR10_CONFIG = {
    "_class_name": "UNet2DModel",
    "_diffusers_version": "0.1.1",
    "act_fn": "silu",
    "attention_head_dim": None,
    "block_out_channels": [128, 256, 256, 256],
    "center_input_sample": False,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "downsample_padding": 0,
    "flip_sin_to_cos": False,
    "freq_shift": 1,
    "in_channels": 3,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-06,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 32,
    "time_embedding_type": "positional",
    "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
}
DDPM_CHURCH_CONFIG = dict(
    DDPM_CIFAR10_CONFIG,
    block_out_channels=[128, 128, 256, 256, 512, 512],
    down_block_types=["DownBlock2D"] * 4 + ["AttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "AttnUpBlock2D"] + ["UpBlock2D"] * 4,
    sample_size=256,
)


def write_json(path, value):
    """Writes `value` as stable, human-readable JSON (sorted keys, trailing newline)."""
    with open(path, "w") as f:
        json.dump(value, f, indent=2, sort_keys=True)
        f.write("\n")


def versions():
    return {"diffusers": diffusers.__version__, "torch": torch.__version__.split("+")[0]}


def build_tiny_model(config, seed):
    """A UNet2DModel with deterministic random weights.

    diffusers initialises norm layers to weight 1 / bias 0; every parameter is perturbed so that a
    port which mixes up an affine weight and bias (or drops one) cannot pass by accident.
    """
    torch.manual_seed(seed)
    model = UNet2DModel(**config)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))
    return model.eval()


def fit_to_flat_colours(model, config, seed, steps=600, batch=16):
    """Briefly trains `model` as an epsilon predictor for toy data: flat-colour images.

    A random network's "noise prediction" is unrelated to its input, so a DDIM loop driven by one
    scales its state by up to 1/sqrt(abar_900) ~ 60 and ends with values in the hundreds, where
    float32 rounding alone is ~1e-4. A few hundred Adam steps on flat colours (linear betas,
    integer timesteps, x0-weighted loss) make the prediction track the noise, which brings the
    final sample from ~300 down to ~10, so the fixture compares numbers at a scale where a 1e-4
    tolerance tests the sampler and not float32 rounding.
    """
    generator = torch.Generator().manual_seed(seed)
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    abar = torch.cumprod(1.0 - betas, dim=0).to(torch.float32)
    size = config["sample_size"]
    channels = config["in_channels"]
    optimiser = torch.optim.Adam(model.parameters(), lr=4e-3)
    model.train()
    for _ in range(steps):
        colours = torch.rand(batch, channels, 1, 1, generator=generator) * 2.0 - 1.0
        x0 = colours.expand(batch, channels, size, size)
        timesteps = torch.randint(0, 1000, (batch,), generator=generator)
        noise = torch.randn(batch, channels, size, size, generator=generator)
        abar_t = abar[timesteps].view(-1, 1, 1, 1)
        x_t = abar_t.sqrt() * x0 + (1.0 - abar_t).sqrt() * noise
        eps_hat = model(x_t, timesteps.to(torch.float32)).sample
        # The error of the implied x0 prediction, (1 - abar) / abar * |eps_hat - eps|^2: it weights
        # the high-noise steps whose errors DDIM's first step amplifies.
        loss = ((1.0 - abar_t) / abar_t * (eps_hat - noise) ** 2).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    print(f"fitted to flat colours: final loss {loss.item():.4f}")
    return model.eval()


def sample_input(config, batch, seed):
    """Standard-normal input of the model's sample shape."""
    size = config["sample_size"]
    height, width = (size, size) if isinstance(size, int) else size
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, config["in_channels"], height, width, generator=generator)


def write_tiny_models():
    """Each tiny model as a diffusers directory plus its reference input/output."""
    models = {}
    for index, (name, spec) in enumerate(TINY_MODELS.items()):
        config = spec["config"]
        model = build_tiny_model(config, seed=1000 + index)
        if name == DDIM_MODEL:
            model = fit_to_flat_colours(model, config, seed=5000)
        directory = os.path.join(ROOT, name)
        shutil.rmtree(directory, ignore_errors=True)
        model.save_pretrained(directory, safe_serialization=True)

        x = sample_input(config, batch=len(TIMESTEPS), seed=2000 + index)
        timesteps = torch.tensor(TIMESTEPS, dtype=torch.float32)
        with torch.no_grad():
            output = model(x, timesteps).sample
        save_file(
            {"x": x.contiguous(), "timesteps": timesteps, "output": output.contiguous()},
            os.path.join(directory, "io.safetensors"),
        )
        write_json(
            os.path.join(directory, "fixture.json"),
            {
                "prediction_type": spec["prediction_type"],
                "timesteps": TIMESTEPS,
                "num_parameters": model.num_parameters(),
                "versions": versions(),
            },
        )
        models[name] = model
        print(f"{name}: {model.num_parameters()} parameters, |output|max {output.abs().max():.3f}")
    return models


class SampleOnly(torch.nn.Module):
    """`UNet2DModel` with a plain-tensor output, so it can be traced."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, x, timesteps):
        return self.unet(x, timesteps, return_dict=False)[0]


def write_torchscript(models):
    """One tiny model traced to TorchScript, its sidecar JSON and its reference input/output."""
    name = TORCHSCRIPT_MODEL
    config = TINY_MODELS[name]["config"]
    directory = os.path.join(ROOT, "torchscript")
    shutil.rmtree(directory, ignore_errors=True)
    os.makedirs(directory)

    x = sample_input(config, batch=len(TIMESTEPS), seed=3000)
    timesteps = torch.tensor(TIMESTEPS, dtype=torch.float32)
    wrapper = SampleOnly(models[name]).eval()
    with torch.no_grad():
        traced = torch.jit.trace(wrapper, (x, timesteps), check_trace=True)
        output = traced(x, timesteps)
        expected = wrapper(x, timesteps)
    assert torch.equal(output, expected), "traced module disagrees with the eager model"
    traced.save(os.path.join(directory, "model.pt"))

    size = config["sample_size"]
    write_json(
        os.path.join(directory, "model.json"),
        {
            "prediction_type": TINY_MODELS[name]["prediction_type"],
            "sample_shape": [config["in_channels"], size, size],
            "num_train_timesteps": 1000,
            "source": f"diffusers UNet2DModel `{name}` traced with torch.jit.trace",
        },
    )
    save_file(
        {"x": x.contiguous(), "timesteps": timesteps, "output": output.contiguous()},
        os.path.join(directory, "io.safetensors"),
    )


def write_ddim_loop(models):
    """A 10-step DDIM (eta = 0) loop of diffusers' DDIMScheduler on a tiny epsilon model."""
    name = DDIM_MODEL
    config = TINY_MODELS[name]["config"]
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.0001,
        beta_end=0.02,
        beta_schedule="linear",
        clip_sample=False,
        set_alpha_to_one=True,
        steps_offset=0,
        prediction_type="epsilon",
        timestep_spacing="leading",
    )
    scheduler.set_timesteps(10)

    initial_noise = sample_input(config, batch=2, seed=4000)
    sample = initial_noise.clone()
    model = models[name]
    with torch.no_grad():
        for timestep in scheduler.timesteps:
            # The scheduler's integer timestep, broadcast over the batch as a float tensor, exactly
            # what a sampler querying the model at continuous times would pass.
            tau = torch.full((sample.shape[0],), float(timestep), dtype=torch.float32)
            eps = model(sample, tau).sample
            sample = scheduler.step(eps, timestep, sample, eta=0.0).prev_sample

    save_file(
        {
            "initial_noise": initial_noise.contiguous(),
            "timesteps": scheduler.timesteps.to(torch.int64).contiguous(),
            "final_sample": sample.contiguous(),
        },
        os.path.join(ROOT, "ddim_loop.safetensors"),
    )
    write_json(
        os.path.join(ROOT, "ddim_loop.json"),
        {
            "model": name,
            "scheduler": "DDIMScheduler",
            "scheduler_config": {
                k: v for k, v in scheduler.config.items() if not k.startswith("_")
            },
            "num_inference_steps": 10,
            "eta": 0.0,
            "timesteps": [int(t) for t in scheduler.timesteps],
            "versions": versions(),
        },
    )
    print(f"ddim loop: final |sample|max {sample.abs().max():.3f}")


def write_public_configs():
    """Configs of the public DDPM checkpoints and the state-dict layout diffusers builds from them."""
    for stem, config in [
        ("ddpm-cifar10-32", DDPM_CIFAR10_CONFIG),
        ("ddpm-ema-church-256", DDPM_CHURCH_CONFIG),
    ]:
        write_json(os.path.join(ROOT, f"{stem}.config.json"), config)
        model = UNet2DModel.from_config(config)
        write_json(
            os.path.join(ROOT, f"{stem}.keys.json"),
            {
                "num_parameters": model.num_parameters(),
                "state_dict": {k: list(v.shape) for k, v in model.state_dict().items()},
                "versions": versions(),
            },
        )
        print(f"{stem}: {model.num_parameters()} parameters")


def write_signature():
    """`UNet2DModel.__init__`'s parameters and defaults (tuples written as lists, as in config.json)."""
    parameters = inspect.signature(UNet2DModel.__init__).parameters
    defaults = {
        name: list(p.default) if isinstance(p.default, tuple) else p.default
        for name, p in parameters.items()
        if name != "self"
    }
    write_json(
        os.path.join(ROOT, "unet2d_signature.json"),
        {"defaults": defaults, "versions": versions()},
    )


def main():
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    os.makedirs(ROOT, exist_ok=True)
    models = write_tiny_models()
    write_torchscript(models)
    write_ddim_loop(models)
    write_public_configs()
    write_signature()
    return 0


if __name__ == "__main__":
    sys.exit(main())
