"""The training noise schedule and sampling conventions of a model, as read from its scheduler config.

`SchedulerConfig` holds what a diffusers `scheduler_config.json` says, of any scheduler class; a key the file
does not have is stored as None, and each sampler resolves it to the default of its own diffusers class
(`sdengine.samplers.classes`), exactly as `SamplerClass.from_config(that_config)` would. The samplers
themselves are numpy tables in `sdengine.samplers` (DESIGN.md, "Samplers as tables").

numpy and the standard library only: this module is part of the torch-free runtime.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np

from sdengine.errors import InvalidInputError, UnsupportedModelError

BETA_SCHEDULES = ("scaled_linear", "linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
FINAL_SIGMAS_TYPES = ("zero", "sigma_min")
# diffusers config settings that change the arithmetic in ways the coefficient tables cannot express (dynamic
# thresholding clips per-image quantiles: not linear) or that select noise schedules sdengine does not implement.
# Refused when the config is read, whichever sampler is asked for later.
_UNSUPPORTED_FLAGS = ("thresholding", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas",
                      "use_flow_sigmas", "use_dynamic_shifting")


def _check_choice(name: str, value: str | None, allowed: tuple[str, ...]) -> None:
    if value is not None and value not in allowed:
        raise UnsupportedModelError(
            f"scheduler {name} {value!r} is not supported; supported: {', '.join(allowed)}"
        )


@dataclass(frozen=True)
class SchedulerConfig:
    """A diffusers scheduler config (Ho et al. 2020; spacing and zero SNR: Lin et al. 2023). None: not in the file.

    The defaults are Stable Diffusion 1.5's own `scheduler/scheduler_config.json` (a PNDMScheduler config
    without timestep_spacing), so `SchedulerConfig()` is what that file reads as.
    """

    num_train_timesteps: int = 1000
    beta_start: float | None = 0.00085
    beta_end: float | None = 0.012
    beta_schedule: str | None = "scaled_linear"
    prediction_type: str = "epsilon"
    timestep_spacing: str | None = None
    steps_offset: int | None = 1
    set_alpha_to_one: bool | None = False
    clip_sample: bool | None = False
    skip_prk_steps: bool | None = True
    rescale_betas_zero_snr: bool | None = None
    use_karras_sigmas: bool | None = None
    # Sigma samplers (Euler, Heun, DPM-Solver, UniPC)
    final_sigmas_type: str | None = None
    sigma_min: float | None = None
    sigma_max: float | None = None
    interpolation_type: str | None = None
    timestep_type: str | None = None
    # Multistep solvers (DPM-Solver, UniPC)
    solver_order: int | None = None
    solver_type: str | None = None
    lower_order_final: bool | None = None
    euler_at_final: bool | None = None
    lambda_min_clipped: float | None = None
    predict_x0: bool | None = None
    disable_corrector: tuple[int, ...] | None = None
    algorithm_type: str | None = None
    variance_type: str | None = None
    # LCM
    original_inference_steps: int | None = None
    timestep_scaling: float | None = None

    def __post_init__(self) -> None:
        _check_choice("beta_schedule", self.beta_schedule, BETA_SCHEDULES)
        _check_choice("prediction_type", self.prediction_type, PREDICTION_TYPES)
        _check_choice("timestep_spacing", self.timestep_spacing, TIMESTEP_SPACINGS)
        _check_choice("final_sigmas_type", self.final_sigmas_type, FINAL_SIGMAS_TYPES)
        if self.prediction_type is None:
            raise UnsupportedModelError(f"scheduler prediction_type must be one of {', '.join(PREDICTION_TYPES)}")
        if not _is_int(self.num_train_timesteps) or self.num_train_timesteps < 2:
            raise UnsupportedModelError(
                f"scheduler num_train_timesteps must be an integer >= 2, got {self.num_train_timesteps!r}"
            )
        for name in ("beta_start", "beta_end"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
                raise UnsupportedModelError(f"scheduler {name} must be a number, got {v!r}")
        if self.beta_schedule in (None, "scaled_linear", "linear") and None not in (self.beta_start, self.beta_end) \
                and not 0.0 < self.beta_start <= self.beta_end < 1.0:
            raise UnsupportedModelError(
                "scheduler betas must satisfy 0 < beta_start <= beta_end < 1, "
                f"got beta_start={self.beta_start!r}, beta_end={self.beta_end!r}"
            )
        for name, least in (("steps_offset", 0), ("solver_order", 1), ("original_inference_steps", 1)):
            v = getattr(self, name)
            if v is not None and (not _is_int(v) or v < least):
                raise UnsupportedModelError(f"scheduler {name} must be an integer >= {least}, got {v!r}")
        if self.disable_corrector is not None and not all(_is_int(i) for i in self.disable_corrector):
            raise UnsupportedModelError(
                f"scheduler disable_corrector must list step indices, got {self.disable_corrector!r}")

    @classmethod
    def from_diffusers(cls, d: dict) -> SchedulerConfig:
        """Read a diffusers `scheduler_config.json` dict of any scheduler class; unknown keys are ignored.

        A key the dict lacks (or sets to null) becomes None: each sampler then uses its own class's default.
        """
        if d.get("trained_betas") is not None:
            raise UnsupportedModelError(
                "scheduler config has explicit trained_betas; only beta_schedule "
                f"{', '.join(BETA_SCHEDULES)} from beta_start/beta_end is supported"
            )
        for flag in _UNSUPPORTED_FLAGS:
            if d.get(flag):
                raise UnsupportedModelError(f"scheduler config sets {flag}=true, which sdengine does not implement; "
                                            "remove it from scheduler/scheduler_config.json to sample without it")
        kw: dict = {f.name: None for f in fields(cls)}
        kw.update({f.name: d[f.name] for f in fields(cls) if d.get(f.name) is not None})
        kw["num_train_timesteps"] = kw["num_train_timesteps"] if kw["num_train_timesteps"] is not None else 1000
        kw["prediction_type"] = kw["prediction_type"] or "epsilon"  # every diffusers class defaults to epsilon
        casts = {"num_train_timesteps": _as_int, "steps_offset": _as_int, "solver_order": _as_int,
                 "original_inference_steps": _as_int, "beta_start": float, "beta_end": float, "sigma_min": float,
                 "sigma_max": float, "lambda_min_clipped": float, "timestep_scaling": float,
                 "set_alpha_to_one": bool, "clip_sample": bool, "skip_prk_steps": bool,
                 "rescale_betas_zero_snr": bool, "use_karras_sigmas": bool, "lower_order_final": bool,
                 "euler_at_final": bool, "predict_x0": bool,
                 "disable_corrector": lambda v: tuple(_as_int(i) for i in v)}
        try:
            for name, cast in casts.items():
                if kw[name] is not None:
                    kw[name] = cast(kw[name])
        except (TypeError, ValueError) as exc:
            raise UnsupportedModelError(f"scheduler config has a malformed value ({exc}); "
                                        "fix scheduler/scheduler_config.json") from None
        return cls(**kw)

    def to_diffusers(self) -> dict:
        """A diffusers DDIMScheduler config dict with the keys this config has (None: left out, as in the file).

        `SamplerClass.from_config` of it gives the same scheduler as of the file it was read from, for every
        class, and `SchedulerConfig.from_diffusers` reads it back to an equal config.
        """
        d = {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}
        if "disable_corrector" in d:
            d["disable_corrector"] = list(d["disable_corrector"])
        return {"_class_name": "DDIMScheduler", **d, "trained_betas": None, "thresholding": False}


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _as_int(v) -> int:
    if isinstance(v, bool) or int(v) != v:
        raise ValueError(f"{v!r} is not an integer")
    return int(v)


def _train_betas(cfg: SchedulerConfig) -> np.ndarray:
    """float64 betas [T] from beta_schedule (None fields: DDPMScheduler's defaults, the training scheduler)."""
    T = cfg.num_train_timesteps
    start = 0.0001 if cfg.beta_start is None else cfg.beta_start
    end = 0.02 if cfg.beta_end is None else cfg.beta_end
    schedule = cfg.beta_schedule or "linear"
    if schedule == "scaled_linear":
        return np.linspace(math.sqrt(start), math.sqrt(end), T, dtype=np.float64) ** 2
    if schedule == "linear":
        return np.linspace(start, end, T, dtype=np.float64)
    # Nichol & Dhariwal 2021, eq. 17, betas capped at 0.999
    f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    return np.array([min(1 - f((i + 1) / T) / f(i / T), 0.999) for i in range(T)], dtype=np.float64)


def alphas_cumprod(cfg: SchedulerConfig) -> np.ndarray:
    """abar_t = prod_{s<=t} (1 - beta_s), float64 [T] (Ho et al. 2020, eq. 4; LDM's scaled_linear betas).

    With rescale_betas_zero_snr, sqrt(abar) is shifted and scaled so abar_{T-1} = 0 (Lin et al. 2023, Alg. 1).
    """
    ac = np.cumprod(1.0 - _train_betas(cfg))
    if cfg.rescale_betas_zero_snr:
        s = np.sqrt(ac)
        s0, sT = s[0], s[-1]
        ac = ((s - sT) * (s0 / (s0 - sT))) ** 2
    return ac


# --- The DDIM-only API of before `sdengine.samplers` (kept until every caller has moved) -------------------------


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


def _timesteps(cfg: SchedulerConfig, n: int, spacing: str, offset: int) -> np.ndarray:
    """Timesteps as diffusers' DDIMScheduler.set_timesteps spaces them (Lin et al. 2023, Table 2)."""
    T = cfg.num_train_timesteps
    if spacing == "leading":
        ts = (np.arange(n) * (T // n))[::-1] + offset
    elif spacing == "trailing":
        # Same float values as diffusers' np.arange(T, 0, -T/n), but always exactly n of them.
        ts = np.round(T - np.arange(n) * (T / n)) - 1
    else:
        ts = np.linspace(0, T - 1, n).round()[::-1]
    ts = np.ascontiguousarray(ts).astype(np.int64)
    if ts.max() >= T or ts.min() < 0:
        raise InvalidInputError(
            f"{n} steps with timestep_spacing {spacing!r} and steps_offset {offset} "
            f"reach timestep {int(ts.max())}, outside the trained range 0..{T - 1}; use fewer steps"
        )
    return ts


def ddim_schedule(cfg: SchedulerConfig, num_inference_steps: int, eta: float = 0.0) -> Schedule:
    """DDIM on a subsequence of the training steps (Song et al. 2020, eq. 12 and 16).

    Superseded by `sdengine.samplers.build_schedule(cfg, "ddim", ...)`, which equals diffusers' DDIMScheduler
    for every spacing; this one follows the subsequence exactly for trailing/linspace spacing.
    """
    T = cfg.num_train_timesteps
    n = num_inference_steps
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= T:
        raise InvalidInputError(f"num_inference_steps must be an integer in [1, {T}], got {n!r}")
    if isinstance(eta, bool) or not isinstance(eta, (int, float, np.floating, np.integer)) \
            or not math.isfinite(eta) or eta < 0:
        raise InvalidInputError(f"eta must be a finite number >= 0 (0: deterministic DDIM, 1: DDPM), got {eta!r}")
    ac = alphas_cumprod(cfg)
    # DDIMScheduler's defaults for what the config does not say
    spacing = cfg.timestep_spacing or "leading"
    offset = 0 if cfg.steps_offset is None else cfg.steps_offset
    ts = _timesteps(cfg, n, spacing, offset)
    # The "previous" step is the next timestep of the DDIM subsequence. diffusers uses t - T//N instead,
    # which is the same for 'leading' always and for 'trailing'/'linspace' when N divides T; we follow
    # the subsequence exactly, so no training step is skipped or revisited.
    final = 1.0 if cfg.set_alpha_to_one in (None, True) else ac[0]
    ab_t = ac[ts]
    ab_p = np.append(ac[ts[1:]], final)
    with np.errstate(divide="ignore", invalid="ignore"):
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
        with np.errstate(divide="ignore", invalid="ignore"):
            a = np.sqrt(ab_p / ab_t)
            b = d - np.sqrt(ab_p) * np.sqrt(1 - ab_t) / np.sqrt(ab_t)
    else:
        # Salimans & Ho 2022: x0 = sqrt(ab_t) x - sqrt(1-ab_t) v, eps = sqrt(ab_t) v + sqrt(1-ab_t) x
        a = np.sqrt(ab_p * ab_t) + d * np.sqrt(1 - ab_t)
        b = d * np.sqrt(ab_t) - np.sqrt(ab_p) * np.sqrt(1 - ab_t)
    coefficients = np.stack([a, b, sigma], axis=1).astype(np.float32)
    if not np.all(np.isfinite(coefficients)):
        raise InvalidInputError("epsilon prediction is undefined at zero terminal SNR (rescale_betas_zero_snr); "
                                "use a v_prediction model or another spacing")
    return Schedule(timesteps=ts, coefficients=coefficients, eta=float(eta), prediction_type=cfg.prediction_type)
