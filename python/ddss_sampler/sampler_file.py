"""Reading ``sampler.json`` (``docs/sampler_json.md``) into the numbers a GGDM run needs.

Version 2 files carry every coefficient in ``derived``, so nothing is solved here. Version 1
files (always a DDIM(eta) base) carry only ``timesteps``, ``sigma``, ``u`` and ``w``; the rest
(``p``, ``q``, and in the ``marginal`` query mode where and how the network is queried) is
computed from those and the schedule exactly as ``ggdm_core`` computes it, and the file is
upgraded to version 2 in memory (``base = "ddim"``), which is what ``ddss-cli export --format
json`` writes for it too.
"""

from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from .errors import SamplerFileError
from .schedule import Schedule, betas_of

FORMAT = "ddss-ggdm-sampler"
#: The ``sampler.json`` versions this package reads.
VERSIONS_READ = (1, 2)
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
_VECTORS = ("timesteps", "sigma", "p", "q", "query_timesteps", "query_abar", "input_scale")
_MATRICES = ("u", "w")


@dataclass(frozen=True)
class StepCoefficients:
    """What step ``i`` needs, all float64.

    ``x0_hat = p x + q eps`` is evaluated as ``(p_rel x - noise_scale q_rel eps) x0_scale`` (and
    its sample/v forms), the same operations ``ggdm_core`` runs, so float32 runs agree closely.
    """

    timestep: float
    query_timestep: float
    query_abar: float
    input_scale: float
    x0_scale: float
    noise_scale: float
    p_rel: float
    q_rel: float
    sigma: float
    u: tuple[float, ...]
    w: tuple[float, ...]


class GGDMSampler:
    """A learned GGDM sampler read from ``sampler.json``: its ``K`` steps and the model it is for.

    ``source`` is the file as a version 2 object (what :class:`GGDMScheduler` stores in its
    config); ``origin`` names where it came from in error messages.
    """

    def __init__(self, source: Mapping[str, Any], origin: str = "sampler.json"):
        self.origin = origin
        self.source = _as_version_2(source, origin)
        file = self.source
        self.steps: int = file["steps"]
        self.history: str = file["history"]
        self.query: str = file.get("query", "grid")
        scheduler = file["scheduler"]
        self.prediction_type: str = scheduler["prediction_type"]
        if self.prediction_type not in PREDICTION_TYPES:
            raise SamplerFileError(
                f"{origin}: `scheduler.prediction_type` = {self.prediction_type!r} "
                f"(expected one of {', '.join(PREDICTION_TYPES)})"
            )
        self.num_train_timesteps: int = scheduler["num_train_timesteps"]
        self.schedule = Schedule(betas_of(scheduler, origin))
        shape = file["model"].get("sample_shape")
        self.sample_shape: tuple[int, ...] | None = None if shape is None else tuple(int(d) for d in shape)
        self.step_coefficients = [self._step(i) for i in range(self.steps)]

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "GGDMSampler":
        """Reads ``path``; errors name it."""
        path = os.fspath(path)
        try:
            with open(path, encoding="utf-8") as handle:
                text = handle.read()
        except OSError as err:
            raise SamplerFileError(f"{path}: cannot read the sampler file: {err}") from err
        try:
            value = json.loads(text)
        except json.JSONDecodeError as err:
            raise SamplerFileError(f"{path}: not valid JSON: {err}") from err
        return cls(value, origin=path)

    @property
    def timesteps(self) -> list[float]:
        """The continuous grid ``tau_1 > ... > tau_K``."""
        return [c.timestep for c in self.step_coefficients]

    @property
    def query_timesteps(self) -> list[float]:
        """Where the network is called at each step (the grid, in the ``grid`` query mode)."""
        return [c.query_timestep for c in self.step_coefficients]

    @property
    def sigmas(self) -> list[float]:
        """The k-diffusion noise level of each network call, ``sqrt((1 - abar) / abar)`` at the
        query timestep, then 0 for the sample."""
        return [math.sqrt((1.0 - c.query_abar) / c.query_abar) for c in self.step_coefficients] + [0.0]

    def check_sample_shape(self, shape: Sequence[int], what: str) -> None:
        """Raises when ``shape`` (``[N, C, H, W]``) is not the model's sample shape."""
        if self.sample_shape is not None and tuple(shape[1:]) != self.sample_shape:
            raise SamplerFileError(
                f"{what} has shape {list(shape)}, but {self.origin} was made for samples of shape "
                f"[N, {', '.join(str(d) for d in self.sample_shape)}] (`model.sample_shape`)"
            )

    def _step(self, i: int) -> StepCoefficients:
        derived = self.source["derived"]
        query_abar = derived["query_abar"][i]
        input_scale = derived["input_scale"][i]
        # p = x0_scale p_rel and q = -x0_scale noise_scale q_rel, with x0_scale = 1 / a_i and
        # noise_scale = sqrt(v_i) of the state's marginal (1 / sqrt(abar), sqrt(1 - abar) on the grid).
        x0_scale = input_scale / math.sqrt(query_abar)
        noise_scale = math.sqrt(1.0 - query_abar) / input_scale
        if not (x0_scale > 0.0 and noise_scale > 0.0):
            raise SamplerFileError(
                f"{self.origin}: step {i} queries the network at abar = {query_abar} with input scale "
                f"{input_scale}; need 0 < abar < 1 and a positive scale"
            )
        return StepCoefficients(
            timestep=derived["timesteps"][i],
            query_timestep=derived["query_timesteps"][i],
            query_abar=query_abar,
            input_scale=input_scale,
            x0_scale=x0_scale,
            noise_scale=noise_scale,
            p_rel=derived["p"][i] / x0_scale,
            q_rel=-derived["q"][i] / (x0_scale * noise_scale),
            sigma=derived["sigma"][i],
            u=tuple(derived["u"][i][: i + 1]),
            w=tuple(derived["w"][i][: i + 1]),
        )


def load_sampler(path: str | os.PathLike) -> GGDMSampler:
    """Reads a ``sampler.json`` (version 1 or 2)."""
    return GGDMSampler.from_file(path)


def _as_version_2(value: Any, origin: str) -> dict:
    """The file as a checked version 2 object (a version 1 file is upgraded)."""
    if not isinstance(value, Mapping):
        raise SamplerFileError(f"{origin}: expected a JSON object, got {type(value).__name__}")
    file_format = value.get("format")
    if file_format != FORMAT:
        raise SamplerFileError(
            f"{origin}: not a GGDM sampler file (`format` = {file_format!r}, expected {FORMAT!r}); "
            "sampler files are written by `ddss-cli search` and `ddss-cli export --format json`"
        )
    version = value.get("version")
    if version not in VERSIONS_READ:
        raise SamplerFileError(
            f"{origin}: `version` = {version!r} is not supported; this package reads versions "
            f"{' and '.join(str(v) for v in VERSIONS_READ)} (a newer ddss-sampler may read it)"
        )
    file = copy.deepcopy(dict(value))
    for key in ("steps", "history", "scheduler", "model", "params", "derived", "tau_max", "tau_end"):
        if key not in file:
            raise SamplerFileError(f"{origin}: missing key `{key}`")
    steps = file["steps"]
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise SamplerFileError(f"{origin}: `steps` = {steps!r} (need an integer >= 1)")
    if file["history"] not in ("full", "last"):
        raise SamplerFileError(f"{origin}: `history` = {file['history']!r} (expected \"full\" or \"last\")")
    if file.get("query", "grid") not in ("grid", "marginal"):
        raise SamplerFileError(f"{origin}: `query` = {file['query']!r} (expected \"grid\" or \"marginal\")")
    _check_model(file["model"], origin)
    if version == 1:
        _upgrade_version_1(file, origin)
    _check_derived(file["derived"], steps, origin)
    return file


def _check_model(model: Any, origin: str) -> None:
    shape = model.get("sample_shape") if isinstance(model, Mapping) else None
    if not isinstance(model, Mapping) or "sample_shape" not in model:
        raise SamplerFileError(f"{origin}: `model` must be an object with `name` and `sample_shape`")
    if shape is not None and not (
        isinstance(shape, list) and len(shape) == 3 and all(isinstance(d, int) and d > 0 for d in shape)
    ):
        raise SamplerFileError(f"{origin}: `model.sample_shape` = {shape!r} (expected [C, H, W] or null)")


def _check_derived(derived: Any, steps: int, origin: str) -> None:
    if not isinstance(derived, Mapping):
        raise SamplerFileError(f"{origin}: `derived` must be an object")
    for key in _VECTORS:
        values = derived.get(key)
        if not isinstance(values, list) or len(values) != steps:
            raise SamplerFileError(f"{origin}: `derived.{key}` must be a list of steps = {steps} numbers")
        _check_numbers(values, f"derived.{key}", origin)
    for key in _MATRICES:
        rows = derived.get(key)
        if not isinstance(rows, list) or len(rows) != steps or any(
            not isinstance(r, list) or len(r) != steps for r in rows
        ):
            raise SamplerFileError(f"{origin}: `derived.{key}` must be a {steps} x {steps} matrix")
        for row in rows:
            _check_numbers(row, f"derived.{key}", origin)


def _check_numbers(values: list, key: str, origin: str) -> None:
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise SamplerFileError(f"{origin}: `{key}` holds {v!r}, not a finite number")


def _upgrade_version_1(file: dict, origin: str) -> None:
    """Completes a version 1 file's ``derived`` (``ggdm_core``'s ``GgdmSampler::coefficients``
    for a DDIM base) and marks it version 2 with ``base = "ddim"``."""
    derived = file["derived"]
    steps = file["steps"]
    for key in ("timesteps", "sigma"):
        if not isinstance(derived.get(key), list) or len(derived[key]) != steps:
            raise SamplerFileError(f"{origin}: `derived.{key}` must be a list of steps = {steps} numbers")
        _check_numbers(derived[key], f"derived.{key}", origin)
    params = file["params"]
    p_rel = [1.0 + r for r in params["p_residual"]]
    q_rel = [1.0 + r for r in params["q_residual"]]
    schedule = Schedule(betas_of(file["scheduler"], origin))
    tau = derived["timesteps"]
    abar = [schedule.abar_at(t) for t in tau]
    if file.get("query", "grid") == "grid":
        x0_scale = [1.0 / math.sqrt(a) for a in abar]
        noise_scale = [math.sqrt(1.0 - a) for a in abar]
        query_tau, query_abar, input_scale = list(tau), list(abar), [1.0] * steps
    else:
        signal, variance = _marginal(abar, derived["u"], derived["w"], derived["sigma"])
        total = [a * a + v for a, v in zip(signal, variance)]
        query_abar = [a * a / t for a, t in zip(signal, total)]
        query_tau = [schedule.tau_for_abar(a) for a in query_abar]
        x0_scale = [1.0 / a for a in signal]
        noise_scale = [math.sqrt(v) for v in variance]
        input_scale = [1.0 / math.sqrt(t) for t in total]
    derived["p"] = [s * r for s, r in zip(x0_scale, p_rel)]
    derived["q"] = [-(s * n * r) for s, n, r in zip(x0_scale, noise_scale, q_rel)]
    derived["query_timesteps"] = query_tau
    derived["query_abar"] = query_abar
    derived["input_scale"] = input_scale
    file["version"] = 2
    file["base"] = "ddim"


def _marginal(abar: list[float], u: list, w: list, sigma: list[float]) -> tuple[list[float], list[float]]:
    """``(a_i, v_i)`` of ``q(x_i | x_0) = N(a_i x_0, v_i I)`` when every prediction is exact:
    ``x_1 = sqrt(abar_1) x_0 + sqrt(1 - abar_1) n_0`` and the step recursion (DESIGN.md section 4)."""
    steps = len(abar)
    signal = [math.sqrt(abar[0])]
    noise = [[math.sqrt(1.0 - abar[0])] + [0.0] * steps]
    for i in range(steps - 1):
        a_next = sum(w[i][: i + 1])
        c_next = [0.0] * (steps + 1)
        c_next[i + 1] = sigma[i]
        for j in range(i + 1):
            a_next += signal[j] * u[i][j]
            c_next = [c + n * u[i][j] for c, n in zip(c_next, noise[j])]
        signal.append(a_next)
        noise.append(c_next)
    return signal, [sum(c * c for c in row) for row in noise]
