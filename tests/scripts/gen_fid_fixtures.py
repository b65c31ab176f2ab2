#!/usr/bin/env python3
"""Reference fixtures for the `fid-metrics` crate (DESIGN.md section 4, "Metrics"; section 6).

Writes into tests/fixtures/fid/ (all deterministic: fixed seeds, CPU, float64 where it matters):

* fid_reference.safetensors / .json
    Fixed random feature sets (several sizes and dimensions, including N < d, i.e. singular
    covariances). The expected FID is pytorch-fid 0.3.0's own `calculate_frechet_distance`
    (scipy `sqrtm` route) applied to `np.mean(axis=0)` / `np.cov(rowvar=False)` statistics, the
    way pytorch-fid's `calculate_activation_statistics` computes them. A second value from the
    symmetric-eigen route in numpy is stored alongside for information.
* kid_reference.safetensors / .json
    Fixed feature sets and the reference KID. The estimator is torch-fidelity's
    (`torch_fidelity/metric_kid.py`: `kernel_poly` with degree 3, gamma 1/d, coef0 1, and `mmd2` with
    `mmd_est='unbiased'`; mean and `np.std` (ddof 0) over subsets), written out again below in numpy.
    clean-fid's `kernel_distance` computes the same per-subset estimate. Because neither tool's
    random subset draw (numpy's legacy RandomState) is reproduced in Rust, the subsets used here are
    saved as index arrays; a second case uses subset_size = N and one subset (no randomness at all).
    A third case has unequal set sizes and the general unbiased MMD^2 on the full sets (the form the
    differentiable KID loss uses).
* inception_reference.safetensors / .json
    The FID Inception TorchScript file (fid-helper-pytorch 0.1.3 `default_1.pt`) applied to 2 random
    3x32x32 samples and 1 Fashion-MNIST 28x28 grey image (the first test image, with a little deterministic noise that
    breaks the exact ties of its black background), after the crate's
    preprocessing: samples in [-1, 1] -> x_uint8 = (x + 1) * 127.5 (no rounding) -> bilinear resize to
    299x299 with `F.interpolate(..., align_corners=False)` (pytorch-fid's resize) -> (x_uint8 - 128) / 128;
    grey images are repeated to 3 channels after the resize. Stored: samples, features, fixed random
    weights W and the input gradient of sum(features * W). Also small resize references: torch's
    bilinear and fid-helper's default `nv_bilinear` (TensorFlow-1 style, StyleGAN's resize).
* pytorch_fid_stats.npz      statistics written by pytorch-fid's own code path:
                             np.savez_compressed(path, mu=mu, sigma=sigma) with mu = np.mean(act, axis=0),
                             sigma = np.cov(act, rowvar=False), act = the float32 features below
                             held in float64 as pytorch-fid's `get_activations` holds them.
* stats_features.npz         those features, key `features`, float32 [N, d] (np.savez).

Run with the project's venv python from the repository root:
    ~/.cache/ddss-rs/torch-2.11.0/bin/python tests/scripts/gen_fid_fixtures.py
"""

import gzip
import hashlib
import importlib.util
import json
import os
import sys
import types
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.numpy import save_file

import pytorch_fid
from pytorch_fid.fid_score import calculate_frechet_distance


def load_fid_helper_resample():
    """fid-helper-pytorch's `_resample_func` module, loaded by file path.

    The package is installed with --no-deps, so its `__init__` (which needs cv2, filetype) cannot be
    imported; `nv_bilinear` itself needs only torch, so cv2 is stubbed while the module loads.
    """
    spec = importlib.util.find_spec("fid_helper_pytorch")
    package_dir = spec.submodule_search_locations[0]
    sys.modules.setdefault("cv2", types.ModuleType("cv2"))
    module_spec = importlib.util.spec_from_file_location(
        "fid_helper_resample", os.path.join(package_dir, "_resample_func.py"))
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return package_dir, module


FID_HELPER_DIR, FID_HELPER_RESAMPLE = load_fid_helper_resample()
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.path.join(ROOT, "tests", "fixtures", "fid")
INCEPTION = os.path.join(FID_HELPER_DIR, "default_1.pt")
FASHION_TEST_IMAGES = "/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz"


def write_safetensors(tensors, name):
    """safetensors writes 0600 files; fixtures are plain readable files."""
    path = os.path.join(OUT, name)
    save_file(tensors, path)
    os.chmod(path, 0o644)


def write_json(name, obj):
    with open(os.path.join(OUT, name), "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def correlated_features(rng, n, d, scale):
    """Non-negative-ish features with a full covariance structure, like pooled activations."""
    mixing = rng.standard_normal((d, d)) * scale / np.sqrt(d)
    offset = rng.standard_normal(d)
    return rng.standard_normal((n, d)) @ mixing + offset


def fid_eigh(mu1, sigma1, mu2, sigma2):
    """FID by the symmetric-eigen route (for information; the tests compare with pytorch-fid)."""
    w, v = np.linalg.eigh(sigma1)
    sqrt1 = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    m = sqrt1 @ sigma2 @ sqrt1
    e = np.linalg.eigvalsh((m + m.T) / 2)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.sqrt(np.clip(e, 0, None)).sum())


def gen_fid():
    rng = np.random.default_rng(20240601)
    # (name, n_a, n_b, d, scale). The last three have N < d: singular covariances.
    specs = [
        ("small_16", 200, 150, 16, 3.0),
        ("medium_64", 300, 250, 64, 2.0),
        ("singular_64", 40, 50, 64, 2.0),
        ("singular_128", 30, 30, 128, 4.0),
        ("singular_256", 100, 120, 256, 1.0),
    ]
    tensors, cases = {}, []
    for name, n_a, n_b, d, scale in specs:
        a = correlated_features(rng, n_a, d, scale)
        b = correlated_features(rng, n_b, d, scale) + 0.5
        mu_a, sigma_a = np.mean(a, axis=0), np.cov(a, rowvar=False)
        mu_b, sigma_b = np.mean(b, axis=0), np.cov(b, rowvar=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fid = float(calculate_frechet_distance(mu_a, sigma_a, mu_b, sigma_b))
        tensors[f"{name}.features_a"] = a
        tensors[f"{name}.features_b"] = b
        cases.append({
            "name": name, "n_a": n_a, "n_b": n_b, "dim": d,
            "fid_pytorch_fid": fid,
            "fid_eigh_numpy": fid_eigh(mu_a, sigma_a, mu_b, sigma_b),
        })
    write_safetensors(tensors, "fid_reference.safetensors")
    write_json("fid_reference.json", {
        "source": f"pytorch-fid {pytorch_fid.__version__} calculate_frechet_distance; "
                  "stats = np.mean(axis=0), np.cov(rowvar=False) in float64",
        "cases": cases,
    })


def kernel_poly(x, y):
    """torch-fidelity `kernel_poly(degree=3, gamma=None -> 1/d, coef0=1)`."""
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def mmd2_unbiased_equal(k_xx, k_xy, k_yy):
    """torch-fidelity `mmd2(..., mmd_est='unbiased')`: sets of equal size m."""
    m = k_xx.shape[0]
    kt_xx_sum = k_xx.sum() - np.trace(k_xx)
    kt_yy_sum = k_yy.sum() - np.trace(k_yy)
    return (kt_xx_sum + kt_yy_sum) / (m * (m - 1)) - 2 * k_xy.sum() / (m * m)


def mmd2_unbiased_general(x, y):
    """Unbiased MMD^2 for sets of sizes m and n (reduces to the above when m == n)."""
    m, n = len(x), len(y)
    k_xx, k_yy, k_xy = kernel_poly(x, x), kernel_poly(y, y), kernel_poly(x, y)
    return ((k_xx.sum() - np.trace(k_xx)) / (m * (m - 1))
            + (k_yy.sum() - np.trace(k_yy)) / (n * (n - 1))
            - 2 * k_xy.sum() / (m * n))


def kid_subsets(a, b, idx_a, idx_b):
    """torch-fidelity's `kid_features_to_metric` loop with the subset draws given."""
    mmds = []
    for ia, ib in zip(idx_a, idx_b):
        x, y = a[ia], b[ib]
        mmds.append(mmd2_unbiased_equal(kernel_poly(x, x), kernel_poly(x, y), kernel_poly(y, y)))
    mmds = np.array(mmds)
    return float(np.mean(mmds)), float(np.std(mmds))


def gen_kid():
    rng = np.random.default_rng(7)
    tensors, cases = {}, []

    # 1. subset_size = N, one subset: identity indices, no randomness.
    a = np.abs(correlated_features(rng, 50, 32, 2.0))
    b = np.abs(correlated_features(rng, 50, 32, 2.0)) * 1.1
    ident = np.arange(50)[None, :]
    mean, std = kid_subsets(a, b, ident, ident)
    tensors.update({"full_equal.features_a": a, "full_equal.features_b": b})
    cases.append({"name": "full_equal", "num_subsets": 1, "subset_size": 50, "kid_mean": mean,
                  "kid_std": std, "mmd2_full": float(mmd2_unbiased_general(a, b))})

    # 2. 5 random subsets of size 30 from sets of 80 and 70; indices saved (drawn without replacement).
    a = np.abs(correlated_features(rng, 80, 32, 2.0))
    b = np.abs(correlated_features(rng, 70, 32, 2.0)) + 0.2
    idx_a = np.stack([rng.choice(80, 30, replace=False) for _ in range(5)])
    idx_b = np.stack([rng.choice(70, 30, replace=False) for _ in range(5)])
    mean, std = kid_subsets(a, b, idx_a, idx_b)
    tensors.update({"subsets.features_a": a, "subsets.features_b": b,
                    "subsets.indices_a": idx_a.astype(np.int64), "subsets.indices_b": idx_b.astype(np.int64)})
    cases.append({"name": "subsets", "num_subsets": 5, "subset_size": 30, "kid_mean": mean, "kid_std": std,
                  "mmd2_full": float(mmd2_unbiased_general(a, b))})

    # 3. Unequal sizes, realistic dimension: general unbiased MMD^2 on the full sets.
    a = np.abs(correlated_features(rng, 24, 512, 1.0))
    b = np.abs(correlated_features(rng, 17, 512, 1.0)) * 0.9
    tensors.update({"unequal.features_a": a, "unequal.features_b": b})
    cases.append({"name": "unequal", "mmd2_full": float(mmd2_unbiased_general(a, b))})

    write_safetensors(tensors, "kid_reference.safetensors")
    write_json("kid_reference.json", {
        "source": "torch-fidelity metric_kid.py estimator (kernel_poly degree 3, gamma 1/d, coef0 1; "
                  "mmd2 unbiased; mean and np.std over subsets), re-implemented in numpy",
        "cases": cases,
    })


def samples_to_network_input(x):
    """[-1, 1] samples -> the Inception's input scale at 299x299 (see module docstring)."""
    x_uint8 = (x + 1.0) * 127.5
    resized = F.interpolate(x_uint8, size=(299, 299), mode="bilinear", align_corners=False)
    net_in = (resized - 128.0) / 128.0
    if net_in.shape[1] == 1:
        net_in = net_in.repeat(1, 3, 1, 1)
    return net_in


def read_idx_images(path, count):
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic, n, h, w = np.frombuffer(data[:16], dtype=">u4")
    assert magic == 0x00000803
    return np.frombuffer(data[16:16 + count * h * w], dtype=np.uint8).reshape(count, 1, h, w)


def gen_inception():
    torch.manual_seed(0)
    net = torch.jit.load(INCEPTION, map_location="cpu").eval()
    gen = torch.Generator().manual_seed(1234)
    rgb = torch.rand(2, 3, 32, 32, generator=gen, dtype=torch.float32) * 2 - 1
    grey_u8 = read_idx_images(FASHION_TEST_IMAGES, 1)
    grey = torch.from_numpy(grey_u8.astype(np.float32)) / 127.5 - 1.0
    # A little deterministic noise (+-0.02, within [-1, 1]) so that no two pixels of the upsampled
    # image are equal: on the exact -1 background every max-pool window is an exact tie, and CPU
    # kernels of other instruction sets break ties differently, which moves the input gradient.
    tie_breaker = torch.Generator().manual_seed(28)
    grey = grey * 0.98 + 0.02 * (torch.rand(grey.shape, generator=tie_breaker) * 2 - 1)
    tensors = {}
    for name, samples in (("rgb32", rgb), ("grey28", grey)):
        x = samples.clone().requires_grad_(True)
        features = net(samples_to_network_input(x))
        weights = torch.randn(features.shape, generator=gen, dtype=torch.float32)
        (features * weights).sum().backward()
        tensors[f"{name}.samples"] = samples.numpy()
        tensors[f"{name}.features"] = features.detach().numpy()
        tensors[f"{name}.weights"] = weights.numpy()
        tensors[f"{name}.input_grad"] = x.grad.numpy()

    # Resize references (pixel scale, no rounding): up 9x7 -> 29x23 and down 32x32 -> 20x13.
    small = torch.rand(1, 3, 9, 7, generator=gen) * 255
    big = torch.rand(1, 3, 32, 32, generator=gen) * 255
    for name, img, hw in (("up", small, (29, 23)), ("down", big, (20, 13))):
        tensors[f"resize_{name}.input"] = img.numpy()
        tensors[f"resize_{name}.torch_bilinear"] = F.interpolate(
            img, size=hw, mode="bilinear", align_corners=False).numpy()
        tensors[f"resize_{name}.tf_legacy_bilinear"] = FID_HELPER_RESAMPLE.nv_bilinear(img, hw).numpy()

    write_safetensors({k: np.ascontiguousarray(v) for k, v in tensors.items()}, "inception_reference.safetensors")
    with open(INCEPTION, "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    write_json("inception_reference.json", {
        "network": "fid-helper-pytorch 0.1.3 default_1.pt (TorchScript FID Inception-v3)",
        "network_sha256": sha,
        "torch": torch.__version__,
        "preprocessing": "x in [-1,1] -> (x+1)*127.5 -> F.interpolate(299x299, bilinear, "
                         "align_corners=False) -> (v-128)/128 -> grey repeated to 3 channels",
        "gradient": "d/d samples of sum(features * weights)",
        "grey28_source": "Fashion-MNIST t10k-images-idx3-ubyte.gz image 0, x_uint8/127.5 - 1, then "
                         "0.98 x + 0.02 u with u uniform in [-1, 1] (torch.Generator seed 28)",
        "resize": "resize_*.torch_bilinear: F.interpolate bilinear align_corners=False; "
                  "resize_*.tf_legacy_bilinear: fid_helper_pytorch nv_bilinear",
    })


def gen_stats():
    rng = np.random.default_rng(99)
    features = np.abs(correlated_features(rng, 120, 48, 2.0)).astype(np.float32)
    np.savez(os.path.join(OUT, "stats_features.npz"), features=features)
    act = features.astype(np.float64)  # pytorch-fid holds activations in a float64 array
    mu = np.mean(act, axis=0)
    sigma = np.cov(act, rowvar=False)
    np.savez_compressed(os.path.join(OUT, "pytorch_fid_stats.npz"), mu=mu, sigma=sigma)


if __name__ == "__main__":
    os.makedirs(OUT, exist_ok=True)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    gen_fid()
    gen_kid()
    gen_stats()
    gen_inception()
    print(f"wrote fixtures to {OUT}")
