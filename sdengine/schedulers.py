"""Schedulers as numbers: per-step timesteps and coefficient rows `x' = a x + b m + c noise`.

numpy and the standard library only: this module is part of the torch-free runtime.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np

from sdengine.errors import InvalidInputError, UnsupportedModelError

BETA_SCHEDULES = ("scaled_linear", "linear")
PREDICTION_TYPES = ("epsilon", "v_prediction")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
# diffusers config flags that change the arithmetic and that this module does not implement.
_UNSUPPORTED_FLAGS = ("thresholding", "rescale_betas_zero_snr")


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise UnsupportedModelError(
            f"scheduler {name} {value!r} is not supported; supported: {', '.join(allowed)}"
        )


@dataclass(frozen=True)
class SchedulerConfig:
    """Training noise schedule and sampling conventions (Ho et al. 2020; spacing: Lin et al. 2023, Table 2)."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    prediction_type: str = "epsilon"
    timestep_spacing: str = "leading"
    steps_offset: int = 1
    set_alpha_to_one: bool = False

    def __post_init__(self) -> None:
        _check_choice("beta_schedule", self.beta_schedule, BETA_SCHEDULES)
        _check_choice("prediction_type", self.prediction_type, PREDICTION_TYPES)
        _check_choice("timestep_spacing", self.timestep_spacing, TIMESTEP_SPACINGS)
        if int(self.num_train_timesteps) != self.num_train_timesteps or self.num_train_timesteps < 1:
            raise UnsupportedModelError(
                f"scheduler num_train_timesteps must be a positive integer, got {self.num_train_timesteps!r}"
            )
        if not 0.0 < self.beta_start <= self.beta_end < 1.0:
            raise UnsupportedModelError(
                "scheduler betas must satisfy 0 < beta_start <= beta_end < 1, "
                f"got beta_start={self.beta_start!r}, beta_end={self.beta_end!r}"
            )
        if int(self.steps_offset) != self.steps_offset or self.steps_offset < 0:
            raise UnsupportedModelError(
                f"scheduler steps_offset must be a non-negative integer, got {self.steps_offset!r}"
            )

    @classmethod
    def from_diffusers(cls, d: dict) -> SchedulerConfig:
        """Read a diffusers `scheduler_config.json` dict of any scheduler class; unknown keys are ignored."""
        if d.get("trained_betas") is not None:
            raise UnsupportedModelError(
                "scheduler config has explicit trained_betas; only beta_schedule "
                f"{', '.join(BETA_SCHEDULES)} from beta_start/beta_end is supported"
            )
        for flag in _UNSUPPORTED_FLAGS:
            if d.get(flag):
                raise UnsupportedModelError(f"scheduler config sets {flag}=true, which sdengine does not implement")
        # clip_sample is ignored on purpose: diffusers' Stable Diffusion pipelines also force it off.
        kw = {f.name: d[f.name] for f in fields(cls) if f.name in d and d[f.name] is not None}
        for name, cast in (("num_train_timesteps", int), ("steps_offset", int), ("set_alpha_to_one", bool),
                           ("beta_start", float), ("beta_end", float)):
            if name in kw:
                kw[name] = cast(kw[name])
        return cls(**kw)

    def to_diffusers(self) -> dict:
        """The equivalent diffusers DDIMScheduler config dict (`DDIMScheduler.from_config` accepts it)."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        return {"_class_name": "DDIMScheduler", **d, "clip_sample": False, "trained_betas": None,
                "thresholding": False, "rescale_betas_zero_snr": False}


def alphas_cumprod(cfg: SchedulerConfig) -> np.ndarray:
    """abar_t = prod_{s<=t} (1 - beta_s), float64 [T] (Ho et al. 2020, eq. 4; LDM's scaled_linear betas)."""
    T = cfg.num_train_timesteps
    if cfg.beta_schedule == "scaled_linear":
        betas = np.linspace(math.sqrt(cfg.beta_start), math.sqrt(cfg.beta_end), T, dtype=np.float64) ** 2
    else:
        betas = np.linspace(cfg.beta_start, cfg.beta_end, T, dtype=np.float64)
    return np.cumprod(1.0 - betas)


@dataclass(frozen=True)
class Schedule:
    """Per-step timesteps [N] and coefficient rows [N, 3] of `x_next = a x + b m + c noise`."""

    timesteps: np.ndarray
    coefficients: np.ndarray
    eta: float
    prediction_type: str
    init_noise_sigma: float = 1.0

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.shape[0])

    @property
    def needs_noise(self) -> bool:
        return bool(np.any(self.coefficients[:, 2] != 0))


def _timesteps(cfg: SchedulerConfig, n: int) -> np.ndarray:
    """Timesteps as diffusers' DDIMScheduler.set_timesteps spaces them (Lin et al. 2023, Table 2)."""
    T = cfg.num_train_timesteps
    if cfg.timestep_spacing == "leading":
        ts = (np.arange(n) * (T // n))[::-1] + cfg.steps_offset
    elif cfg.timestep_spacing == "trailing":
        # Same float values as diffusers' np.arange(T, 0, -T/n), but always exactly n of them.
        ts = np.round(T - np.arange(n) * (T / n)) - 1
    else:
        ts = np.linspace(0, T - 1, n).round()[::-1]
    ts = np.ascontiguousarray(ts).astype(np.int64)
    if ts.max() >= T or ts.min() < 0:
        raise InvalidInputError(
            f"{n} steps with timestep_spacing {cfg.timestep_spacing!r} and steps_offset {cfg.steps_offset} "
            f"reach timestep {int(ts.max())}, outside the trained range 0..{T - 1}; use fewer steps"
        )
    return ts


def ddim_schedule(cfg: SchedulerConfig, num_inference_steps: int, eta: float = 0.0) -> Schedule:
    """DDIM on a subsequence of the training steps (Song et al. 2020, eq. 12 and 16)."""
    T = cfg.num_train_timesteps
    n = num_inference_steps
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= T:
        raise InvalidInputError(f"num_inference_steps must be an integer in [1, {T}], got {n!r}")
    if isinstance(eta, bool) or not isinstance(eta, (int, float, np.floating, np.integer)) \
            or not math.isfinite(eta) or eta < 0:
        raise InvalidInputError(f"eta must be a finite number >= 0 (0: deterministic DDIM, 1: DDPM), got {eta!r}")
    ac = alphas_cumprod(cfg)
    ts = _timesteps(cfg, n)
    # The "previous" step is the next timestep of the DDIM subsequence. diffusers uses t - T//N instead,
    # which is the same for 'leading' always and for 'trailing'/'linspace' when N divides T; we follow
    # the subsequence exactly, so no training step is skipped or revisited.
    final = 1.0 if cfg.set_alpha_to_one else ac[0]
    ab_t = ac[ts]
    ab_p = np.append(ac[ts[1:]], final)
    sigma = eta * np.sqrt((1 - ab_p) / (1 - ab_t)) * np.sqrt(1 - ab_t / ab_p)  # eq. 16
    dir_var = 1 - ab_p - sigma**2
    if np.any(dir_var < 0):
        i = int(np.argmax(dir_var < 0))
        raise InvalidInputError(
            f"eta={eta} is too large for this schedule: 1 - abar_prev - sigma^2 < 0 at step {i} "
            f"(t={int(ts[i])}); use eta in [0, 1]"
        )
    d = np.sqrt(dir_var)
    if cfg.prediction_type == "epsilon":
        # x0 = (x - sqrt(1-ab_t) eps) / sqrt(ab_t); x_prev = sqrt(ab_p) x0 + d eps + sigma z
        a = np.sqrt(ab_p / ab_t)
        b = d - np.sqrt(ab_p) * np.sqrt(1 - ab_t) / np.sqrt(ab_t)
    else:
        # Salimans & Ho 2022: x0 = sqrt(ab_t) x - sqrt(1-ab_t) v, eps = sqrt(ab_t) v + sqrt(1-ab_t) x
        a = np.sqrt(ab_p * ab_t) + d * np.sqrt(1 - ab_t)
        b = d * np.sqrt(ab_t) - np.sqrt(ab_p) * np.sqrt(1 - ab_t)
    coefficients = np.stack([a, b, sigma], axis=1).astype(np.float32)
    return Schedule(timesteps=ts, coefficients=coefficients, eta=float(eta), prediction_type=cfg.prediction_type)
