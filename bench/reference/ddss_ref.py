"""PyTorch reference of one ddss-rs workload, reported as one JSON line (the same fields as
`ddss-cli bench-unroll`, with "side": "reference").

Workloads (--what):
  step      one DDSS objective evaluation: a K-step GGDM sampler at DDIM initialisation (eta 0,
            trailing grid, full-history linear combination), KID loss on features of the samples,
            backward to the sampler parameters (grid logits, u/w residuals, sigma residual);
            --remat naive (plain autograd) or per_call (torch.utils.checkpoint around each
            network call);
  sample    the same sampler under torch.no_grad (DDIM), images per second;
  features  the feature network alone on random samples, images per second.

The network is diffusers' UNet2DModel (from a model directory, or from a config.json with random
weights). Feature networks: a domain classifier .safetensors of ddss-rs (architecture "a",
weights loaded by name) or "inception-random" (torchvision's Inception-v3 with random weights and
the FID input scaling; for timing only).
"""

import argparse
import json
import math
import os
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# ---------------------------------------------------------------------------------------------
# Schedule and sampler (DESIGN.md section 4)
# ---------------------------------------------------------------------------------------------


def load_scheduler_config(path):
    cfg = {"beta_start": 1e-4, "beta_end": 0.02, "beta_schedule": "linear", "num_train_timesteps": 1000,
           "prediction_type": "epsilon", "set_alpha_to_one": True}
    if path and os.path.isfile(path):
        with open(path) as f:
            cfg.update({k: v for k, v in json.load(f).items() if v is not None})
    return cfg


def betas_of(cfg):
    t = int(cfg["num_train_timesteps"])
    kind = cfg["beta_schedule"]
    if kind == "linear":
        return np.linspace(cfg["beta_start"], cfg["beta_end"], t, dtype=np.float64)
    if kind == "scaled_linear":
        return np.linspace(cfg["beta_start"] ** 0.5, cfg["beta_end"] ** 0.5, t, dtype=np.float64) ** 2
    raise SystemExit(f"beta_schedule {kind!r} is not implemented in the reference")


def trailing_grid(t, k):
    # diffusers "trailing": round(T - i T / K) - 1, i = 0..K-1 (ratios are whole here).
    return [int(math.floor(t - i * t / k + 0.5)) - 1 for i in range(k)]


class Ggdm(nn.Module):
    """GGDM sampler: every coefficient is DDIM(eta=0) at the current grid plus a learned residual."""

    def __init__(self, cfg, steps, device):
        super().__init__()
        betas = betas_of(cfg)
        abar = np.cumprod(1.0 - betas)
        self.final_abar = 1.0 if cfg.get("set_alpha_to_one", True) else float(abar[0])
        self.tau_end = -1.0 if self.final_abar == 1.0 else 0.0
        knots = np.concatenate([[0.0], np.log(abar)])
        self.register_buffer("log_abar", torch.tensor(knots, dtype=torch.float64, device=device))
        grid = [float(v) for v in trailing_grid(len(betas), steps)]
        self.tau_max = grid[0]
        nxt = grid[1:] + [self.tau_end]
        gaps = [(a - b) / (self.tau_max - self.tau_end) for a, b in zip(grid, nxt)]
        k = steps
        f64 = dict(dtype=torch.float64, device=device)
        self.steps = k
        self.grid_logits = nn.Parameter(torch.tensor(np.log(gaps), **f64))
        self.u_res = nn.Parameter(torch.zeros(k, k, **f64))
        self.w_res = nn.Parameter(torch.zeros(k, k, **f64))
        self.sigma_res = nn.Parameter(torch.zeros(k, **f64))
        self.register_buffer("p_res", torch.zeros(k, **f64))
        self.register_buffer("q_res", torch.zeros(k, **f64))
        self.register_buffer("mask", torch.ones(k, k, **f64).tril())
        self.prediction_type = cfg.get("prediction_type", "epsilon")
        if self.prediction_type != "epsilon":
            raise SystemExit("the reference implements epsilon prediction only")

    def abar_of(self, tau):
        n = self.log_abar.shape[0]
        pos = (tau + 1.0).clamp(0.0, n - 1)
        lo = pos.detach().floor().clamp(0.0, n - 2)
        frac = pos - lo
        lo_i = lo.long()
        lo_v, hi_v = self.log_abar[lo_i], self.log_abar[lo_i + 1]
        return (lo_v + (hi_v - lo_v) * frac).exp()

    def coefficients(self):
        gaps = self.grid_logits.softmax(0)
        before = gaps.cumsum(0) - gaps
        tau = (1.0 - before) * (self.tau_max - self.tau_end) + self.tau_end
        tau_all = torch.cat([tau, tau.new_tensor([self.tau_end])])
        abar = self.abar_of(tau_all)
        a_t, a_s = abar[:-1], abar[1:]
        one_t, one_s = 1.0 - a_t, 1.0 - a_s
        sigma_base = torch.zeros_like(a_t)  # eta = 0
        u_base = (one_s - sigma_base * sigma_base).clamp_min(0).sqrt() / one_t.sqrt()
        w_base = a_s.sqrt() - a_t.sqrt() * u_base
        u = torch.diag_embed(u_base) + self.u_res * self.mask
        w = torch.diag_embed(w_base) + self.w_res * self.mask
        sigma = sigma_base + self.sigma_res
        return dict(tau=tau, abar=abar, u=u, w=w, sigma=sigma, scale=a_t.rsqrt(), s1m=one_t.sqrt(),
                    p_rel=1.0 + self.p_res, q_rel=1.0 + self.q_res)


def predict_x0(net, c, i, x, remat):
    n = x.shape[0]
    tau = c["tau"][i].float().expand(n)
    if remat == "per_call" and torch.is_grad_enabled():
        eps = checkpoint(net, x, tau, use_reentrant=False)
    else:
        eps = net(x, tau)
    f = torch.float32
    p_rel, q_rel = c["p_rel"][i].to(f), c["q_rel"][i].to(f)
    return (x * p_rel - eps * (c["s1m"][i].to(f) * q_rel)) * c["scale"][i].to(f)


def run_sampler(sampler, net, x_init, z, remat):
    c = sampler.coefficients()
    f = torch.float32
    states, x0s = [x_init], []
    for i in range(sampler.steps):
        x0s.append(predict_x0(net, c, i, states[i], remat))
        nxt = z[i] * c["sigma"][i].to(f)
        for j in range(i + 1):
            nxt = nxt + states[j] * c["u"][i, j].to(f) + x0s[j] * c["w"][i, j].to(f)
        states.append(nxt)
    return states[-1]


# ---------------------------------------------------------------------------------------------
# Networks
# ---------------------------------------------------------------------------------------------


class UNetCall(nn.Module):
    """x, tau -> epsilon with diffusers' UNet2DModel (optionally in bf16)."""

    def __init__(self, model, bf16):
        super().__init__()
        self.model, self.bf16 = model, bf16

    def forward(self, x, tau):
        if self.bf16:
            return self.model(x.to(torch.bfloat16), tau).sample.to(x.dtype)
        return self.model(x, tau).sample


def open_unet(args, device):
    try:
        from diffusers import UNet2DModel
    except ImportError as e:
        raise SystemExit(f"diffusers is needed for the UNet ({e}); see bench/reference/README.md")
    if args.unet_config:
        with open(args.unet_config) as f:
            config = json.load(f)
        torch.manual_seed(0)
        model = UNet2DModel.from_config(config)
        sched = os.path.join(os.path.dirname(os.path.abspath(args.unet_config)), "scheduler_config.json")
    else:
        model = UNet2DModel.from_pretrained(args.model)
        sched = os.path.join(args.model, "scheduler_config.json")
    model = model.to(device).eval().requires_grad_(False)
    if args.precision == "bf16":
        model = model.to(torch.bfloat16)
    size = model.config.sample_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    return UNetCall(model, args.precision == "bf16"), load_scheduler_config(sched), (model.config.in_channels,) + size


class ClassifierA(nn.Module):
    """Architecture "a" of ddss-rs' domain classifiers; features are the 128 fc activations."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.conv3 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc = nn.Linear(64 * 7 * 7, 128)
        self.head = nn.Linear(128, 10)

    def forward(self, x):
        if x.shape[1] == 3:
            x = x.mean(1, keepdim=True)
        if x.shape[-2:] != (28, 28):
            x = F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False)
        h = F.max_pool2d(F.relu(self.conv2(F.relu(self.conv1(x)))), 2)
        h = F.max_pool2d(F.relu(self.conv3(h)), 2)
        return F.relu(self.fc(h.flatten(1)))


class InceptionFeatures(nn.Module):
    """torchvision Inception-v3 (random weights) behind the FID input mapping of ddss-rs:
    [-1, 1] -> uint8 scale, bilinear resize to 299, (x - 128) / 128; 2048 pooled features."""

    def __init__(self):
        super().__init__()
        from torchvision.models import inception_v3

        torch.manual_seed(0)
        self.net = inception_v3(weights=None, aux_logits=False, init_weights=False)
        self.net.fc = nn.Identity()

    def forward(self, x):
        h = (x.float() + 1.0) * 127.5
        if h.shape[-2:] != (299, 299):
            h = F.interpolate(h, size=(299, 299), mode="bilinear", align_corners=False)
        h = (h - 128.0) / 128.0
        if h.shape[1] == 1:
            h = h.repeat(1, 3, 1, 1)
        return self.net(h)


def open_features(spec, device):
    if spec == "inception-random":
        net, dim = InceptionFeatures(), 2048
    elif spec.endswith(".safetensors"):
        from safetensors.torch import load_file

        sidecar = spec[: -len(".safetensors")] + ".json"
        with open(sidecar) as f:
            arch = json.load(f)["arch"]
        if arch != "a":
            raise SystemExit(f"classifier architecture {arch!r}: the reference implements 'a'")
        net, dim = ClassifierA(), 128
        net.load_state_dict(load_file(spec), strict=True)
    else:
        raise SystemExit(f"--features {spec}: expected inception-random or a classifier .safetensors")
    return net.to(device).eval().requires_grad_(False), dim


# ---------------------------------------------------------------------------------------------
# KID loss (features scaled by one scalar from the real set, as ddss-opt's FeatureLoss does)
# ---------------------------------------------------------------------------------------------


def poly_kernel(a, b):
    return (a @ b.T / a.shape[1] + 1.0) ** 3


class Kid:
    def __init__(self, real):
        raw = real.double()
        self.scale = 1.0 / max(math.sqrt(raw.square().sum().item() / raw.numel()), 1e-12)
        self.real = (raw * self.scale).float().double()
        n = self.real.shape[0]
        k = poly_kernel(self.real, self.real)
        self.real_term = ((k.sum() - k.diagonal().sum()) / (n * (n - 1))).item()

    def __call__(self, features):
        g = (features * self.scale).double()
        m, n = g.shape[0], self.real.shape[0]
        k = poly_kernel(g, g)
        within = (k.sum() - k.diagonal().sum()) / (m * (m - 1))
        cross = poly_kernel(g, self.real).sum() / (m * n)
        return within - 2.0 * cross + self.real_term


# ---------------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------------


def rss_mib():
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmHWM:", "VmRSS:")):
                out[line.split(":")[0]] = int(line.split()[1]) / 1024.0
    return out.get("VmHWM", float("nan")), out.get("VmRSS", float("nan"))


def cuda_used_mib():
    free, total = torch.cuda.mem_get_info()
    return (total - free) / 2**20


def model_name(args):
    """The network's name in the tables: the --unet-config file without .config.json / .json,
    else the model folder's name (as `ddss-cli bench-unroll` reports it)."""
    if args.unet_config:
        name = os.path.basename(args.unet_config)
        for suffix in (".config.json", ".json"):
            if name.endswith(suffix):
                return name[: -len(suffix)]
        return name
    return os.path.basename(os.path.normpath(args.model))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--what", default="step", choices=["step", "sample", "features"])
    p.add_argument("--model", default="models/fashion-mnist-ddpm")
    p.add_argument("--unet-config", default=None)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--remat", default="per_call", choices=["naive", "per_call"])
    p.add_argument("--features", default="models/fmnist-classifier-a.safetensors")
    p.add_argument("--device", default="cpu")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--precision", default="f32", choices=["f32", "bf16"])
    p.add_argument("--noise", default=None, help="safetensors from ddss-cli bench-unroll --save-noise")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: PyTorch's default)")
    p.add_argument("--cudnn-benchmark", action="store_true",
                   help="torch.backends.cudnn.benchmark = True (default: PyTorch's default, False)")
    args = p.parse_args()

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        # PyTorch's defaults, stated: TF32 for cuDNN convolutions, full f32 for matmuls.
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.benchmark = args.cudnn_benchmark
    B, K = args.batch, args.steps
    extra = {}

    if args.what == "features":
        feat, dim = open_features(args.features, device)
        # The sample shape of the UNet, read from its config.json.
        config_path = args.unet_config or os.path.join(args.model, "config.json")
        with open(config_path) as f:
            config = json.load(f)
        size = config.get("sample_size", 32)
        shape = (config.get("in_channels", 3),) + ((size, size) if isinstance(size, int) else tuple(size))
        extra["feature_dim"] = dim

        def once():
            with torch.no_grad():
                x = torch.rand((B,) + shape, device=device) * 2 - 1
                feat(x)
            return {}
    else:
        net, cfg, shape = open_unet(args, device)
        sampler = Ggdm(cfg, K, device)
        full = (B,) + shape
        if args.what == "sample":

            def once():
                with torch.no_grad():
                    x = torch.randn(full, device=device)
                    z = [torch.randn(full, device=device) for _ in range(K)]
                    run_sampler(sampler, net, x, z, "naive")
                return {}
        else:
            feat, dim = open_features(args.features, device)
            if args.noise:
                from safetensors.torch import load_file

                t = load_file(args.noise)
                x_init = t["x_init"].to(device)
                z = [t[f"z_{i}"].to(device) for i in range(K)]
                real = t["real"].to(device)
                if x_init.shape != full:
                    raise SystemExit(f"--noise holds x_init {tuple(x_init.shape)}, expected {full}")
            else:
                g = torch.Generator(device="cpu").manual_seed(1)
                x_init = torch.randn(full, generator=g).to(device)
                z = [torch.randn(full, generator=g).to(device) for _ in range(K)]
                torch.manual_seed(0)
                real = torch.randn(256, dim).abs().to(device)
            kid = Kid(real)

            def once():
                sampler.zero_grad(set_to_none=True)
                out = run_sampler(sampler, net, x_init.detach().requires_grad_(True), z, args.remat)
                loss = kid(feat(out))
                loss.backward()
                names = {"grid_logits": sampler.grid_logits, "u_residual": sampler.u_res,
                         "w_residual": sampler.w_res, "sigma_residual": sampler.sigma_res}
                norms = {k: v.grad.norm().item() for k, v in names.items() if v.grad is not None}
                return {"loss": loss.item(), "grad_norms": norms}

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    _, rss_before = rss_mib()
    if device.type == "cuda":
        sync()
        torch.cuda.reset_peak_memory_stats()
        alloc_before = torch.cuda.memory_allocated()
        reserved_before = torch.cuda.memory_reserved()
        used_before = cuda_used_mib()
    value = {}
    for _ in range(args.warmup):
        value = once()
        sync()
    times = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        value = once()
        sync()
        times.append(time.perf_counter() - t0)
    seconds = statistics.median(times)
    peak, _ = rss_mib()
    line = {
        "side": "reference", "what": args.what, "steps": K, "batch": B, "model": model_name(args),
        "remat": args.remat if args.what == "step" else "-", "features": args.features,
        "precision": args.precision, "random_weights": bool(args.unet_config) or args.features == "inception-random",
        "device": str(device), "seconds": seconds, "times": times,
        "images_per_second": B / seconds, "loss": value.get("loss"),
        "grad_norms": value.get("grad_norms"), "rss_before_mib": rss_before,
        "peak_rss_mib": peak, "step_extra_mib": peak - rss_before,
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "cudnn_benchmark": args.cudnn_benchmark,
    }
    if device.type == "cuda":
        line["cuda_max_allocated_mib"] = (torch.cuda.max_memory_allocated() - alloc_before) / 2**20
        line["cuda_max_reserved_mib"] = (torch.cuda.max_memory_reserved() - reserved_before) / 2**20
        line["cuda_reserved_mib"] = cuda_used_mib() - used_before
        line["memory_mib"] = line["cuda_reserved_mib"]
        line["memory_kind"] = "cuda reserved growth"
    else:
        line["memory_mib"] = peak - rss_before
        line["memory_kind"] = "peak RSS - RSS before"
    line.update(extra)
    print(json.dumps(line), flush=True)


if __name__ == "__main__":
    sys.exit(main())
