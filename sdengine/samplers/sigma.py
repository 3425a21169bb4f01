"""Samplers in sigma space (Karras et al. 2022): Euler, Euler ancestral, Heun, optionally on Karras sigmas.

diffusers runs these on x_sigma = x0 + sigma eps, starting from init_noise_sigma * noise, and feeds the U-Net
scale_model_input(x_sigma) = x_sigma / sqrt(1 + sigma^2), which is the variance-preserving latent. The tables
keep that VP latent in slot 0, so the change of variable is folded into the rows: each row converts slot 0 to
x_sigma, takes diffusers' step, and converts back at the next sigma. The last row leaves diffusers' own final
sample (at sigma = 0 the two spaces agree; at final_sigmas_type "sigma_min" it is x_sigma, what the pipeline
decodes).
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np

from ..errors import InvalidInputError
from . import levels
from .linear import Lin, TableBuilder


def x0_sigma(sample: Lin, m: Lin, sigma: float, prediction_type: str) -> Lin:
    """x0 from the model output at x_sigma (Karras et al. 2022, Table 1; v: Salimans & Ho 2022 in sigma space)."""
    if prediction_type == "epsilon":
        return sample - sigma * m
    return m * (-sigma / math.sqrt(sigma**2 + 1)) + sample / (sigma**2 + 1)


def sigma_levels(s: SimpleNamespace, n: int, karras: bool, rescale: bool, final_sigma_min: bool
                 ) -> tuple[np.ndarray, np.ndarray, float]:
    """(timesteps [n] float32, sigmas [n+1] float32, init_scale) as Euler/Euler a/Heun set_timesteps make them."""
    T = s.num_train_timesteps
    ac = levels.train_alphas_cumprod(T, s.beta_start, s.beta_end, s.beta_schedule, rescale=rescale,
                                     clamp_last=rescale)
    sig32 = levels.train_sigmas(ac)
    ts = levels.sigma_timesteps(s.timestep_spacing, T, n, s.steps_offset)
    levels.check_range(ts, T, f"{n} steps with timestep_spacing {s.timestep_spacing!r} and steps_offset "
                              f"{s.steps_offset}")
    sigmas = levels.interp_sigmas(ts, sig32)
    if karras:  # Karras et al. 2022, eq. 5, between the run's own end levels unless the config pins them
        lo = getattr(s, "sigma_min", None)
        hi = getattr(s, "sigma_max", None)
        sigmas = levels.karras_sigmas(sigmas[-1].item() if lo is None else lo,
                                      sigmas[0].item() if hi is None else hi, n)
        ts = levels.sigma_to_t(sigmas, np.log(sig32))
    last = sig32[0] if final_sigma_min else 0.0
    sigmas = np.concatenate([sigmas, [last]]).astype(np.float32)
    top = float(sigmas.max())
    init = top if s.timestep_spacing in ("linspace", "trailing") else math.sqrt(top**2 + 1)
    init_scale = init / math.sqrt(float(sigmas[0]) ** 2 + 1)
    return ts.astype(np.float32), sigmas, init_scale


def _vp(sigma: float) -> float:
    """x_vp = x_sigma * _vp(sigma)."""
    return 1.0 / math.sqrt(sigma**2 + 1)


def euler(s: SimpleNamespace, n: int, karras: bool) -> tuple[TableBuilder, float]:
    """Karras et al. 2022, Alg. 1 without churn: x' = x + (sigma' - sigma) (x - x0_hat) / sigma."""
    if s.interpolation_type != "linear":
        raise InvalidInputError(f"Euler with interpolation_type {s.interpolation_type!r} is not supported; "
                                "only 'linear'")
    if s.timestep_type != "discrete" and s.prediction_type == "v_prediction":
        raise InvalidInputError(f"Euler with timestep_type {s.timestep_type!r} is not supported; only 'discrete'")
    rescale = s.rescale_betas_zero_snr
    ts, sig, init_scale = sigma_levels(s, n, karras, rescale, s.final_sigmas_type == "sigma_min")
    sig = sig.astype(np.float64)
    b = TableBuilder(len(ts), 1)
    sample = b.x / _vp(sig[0])
    for i, t in enumerate(ts):
        sg, nxt = sig[i], sig[i + 1]
        m = b.model(t, sample * _vp(sg))
        d = (sample - x0_sigma(sample, m, sg, s.prediction_type)) / sg
        sample = sample + d * (nxt - sg)
        b.keep(sample * _vp(nxt) if i + 1 < len(ts) else sample)
    return b, init_scale


def euler_ancestral(s: SimpleNamespace, n: int) -> tuple[TableBuilder, float]:
    """Karras et al. 2022 / k-diffusion's ancestral Euler: an Euler step down to sigma_down, then fresh noise
    sigma_up z, with sigma_up^2 = sigma'^2 (sigma^2 - sigma'^2) / sigma^2 and sigma_down^2 = sigma'^2 - sigma_up^2
    (DDPM's ancestral variance, Ho et al. 2020, in sigma space)."""
    rescale = s.rescale_betas_zero_snr
    ts, sig, init_scale = sigma_levels(s, n, False, rescale, False)
    sig = sig.astype(np.float64)
    b = TableBuilder(len(ts), 1)
    sample = b.x / _vp(sig[0])
    for i, t in enumerate(ts):
        sg, nxt = sig[i], sig[i + 1]
        m = b.model(t, sample * _vp(sg))
        up = math.sqrt(nxt**2 * (sg**2 - nxt**2) / sg**2)
        down = math.sqrt(max(nxt**2 - up**2, 0.0))
        d = (sample - x0_sigma(sample, m, sg, s.prediction_type)) / sg
        sample = sample + d * (down - sg) + up * b.noise()
        b.keep(sample * _vp(nxt) if i + 1 < len(ts) else sample)
    return b, init_scale


def heun(s: SimpleNamespace, n: int, karras: bool) -> tuple[TableBuilder, float]:
    """Karras et al. 2022, Alg. 1 (churn 0): an Euler predictor to sigma', the model again there, and the step
    redone with the mean of both slopes (trapezoidal rule). The last step (to sigma = 0) stays first order.
    Rows: 2n - 1. Slots: the predicted x and the x it was predicted from.
    """
    ts, sig, init_scale = sigma_levels(s, n, karras, False, False)
    sig = sig.astype(np.float64)
    b = TableBuilder(2 * len(ts) - 1, 2)
    sample = b.x / _vp(sig[0])
    for i, t in enumerate(ts):
        sg, nxt = sig[i], sig[i + 1]
        m = b.model(t, sample * _vp(sg))
        d1 = (sample - x0_sigma(sample, m, sg, s.prediction_type)) / sg
        dt = nxt - sg
        predicted = sample + d1 * dt
        if i + 1 == len(ts):
            b.keep(predicted)
            break
        b.keep(predicted * _vp(nxt), sample * _vp(sg))
        m2 = b.model(ts[i + 1], predicted * _vp(nxt))
        d2 = (predicted - x0_sigma(predicted, m2, nxt, s.prediction_type)) / nxt
        sample = sample + (d1 + d2) / 2 * dt
        b.keep(sample * _vp(nxt))
    return b, init_scale
