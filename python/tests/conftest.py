"""Shared fixtures: the shipped model (loaded with diffusers) and the committed interop fixtures
(tests/fixtures/interop, made by tests/scripts/gen_interop_fixtures.py with ddss-cli)."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "interop"
MODEL = ROOT / "models" / "fashion-mnist-ddpm"
# The repository's package, whether or not (or whichever copy) is installed.
sys.path.insert(0, str(ROOT / "python"))
SAMPLERS = json.loads((FIXTURES / "manifest.json").read_text())["samplers"]
#: Largest difference allowed between ddss-cli's samples and ours, from the same noise.
TOLERANCE = 1e-4

torch.set_num_threads(1)


def sampler_path(name: str) -> Path:
    return FIXTURES / SAMPLERS[name]["sampler"]


def cli_samples(name: str) -> torch.Tensor:
    return torch.from_numpy(np.load(FIXTURES / SAMPLERS[name]["samples"]))


@pytest.fixture(scope="session")
def unet():
    from diffusers import UNet2DModel

    return UNet2DModel.from_pretrained(MODEL).eval()


@pytest.fixture(scope="session")
def init_noise() -> torch.Tensor:
    return torch.from_numpy(np.load(FIXTURES / "init_noise.npy"))


@pytest.fixture(scope="session")
def step_noise() -> torch.Tensor:
    return torch.from_numpy(np.load(FIXTURES / "step_noise.npy"))


def max_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.double() - b.double()).abs().max().item()
