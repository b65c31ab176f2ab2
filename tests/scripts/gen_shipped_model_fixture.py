"""diffusers' output of the shipped model for a fixed input, so a test can check that ours agrees.

Run from the repository root with the project venv's Python (`cargo xtask fixtures`):

    ~/.cache/ddss-rs/torch-2.11.0/bin/python tests/scripts/gen_shipped_model_fixture.py

Writes tests/fixtures/shipped_model_io.safetensors: `x` (4 x 1 x 28 x 28), `t` (float timesteps) and
`out`, diffusers 0.42.1's `UNet2DModel.from_pretrained("models/fashion-mnist-ddpm")(x, t).sample`.
"""

import torch
import diffusers
from diffusers import UNet2DModel
from safetensors.torch import save_file

assert diffusers.__version__ == "0.42.1", diffusers.__version__
model = UNet2DModel.from_pretrained("models/fashion-mnist-ddpm").eval()
gen = torch.Generator().manual_seed(0)
x = torch.randn(4, 1, 28, 28, generator=gen)
t = torch.tensor([999.0, 500.5, 37.25, 0.0])
with torch.no_grad():
    out = model(x, t).sample
save_file({"x": x, "t": t, "out": out.contiguous()}, "tests/fixtures/shipped_model_io.safetensors")
print("wrote tests/fixtures/shipped_model_io.safetensors", tuple(out.shape))
