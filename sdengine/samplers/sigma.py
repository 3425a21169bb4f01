"""Samplers in sigma space (Karras et al. 2022): Euler, Euler ancestral, Heun, optionally on Karras sigmas.

diffusers runs these on x_sigma = x0 + sigma eps, starting from init_noise_sigma * noise, and feeds the U-Net
scale_model_input(x_sigma) = x_sigma / sqrt(1 + sigma^2), which is the variance-preserving latent. The tables
keep that VP latent in slot 0, so the change of variable is folded into the rows: each row converts slot 0 to
x_sigma, takes diffusers' step, and converts back at the next sigma. The last row leaves diffusers' own final
sample (at sigma = 0 the two spaces agree; at final_sigmas_type "sigma_min" it is x_sigma, what the pipeline
decodes).

`start` is the first row of diffusers' timesteps that runs (img2img: t_start * order, with set_begin_index):
the loop runs from the level at that step index, with the class's state as set_timesteps leaves it. Its
add_noise is x0 + sigma noise with sigma = sigmas[step_index] (the begin index before the first step): in VP
space the level (1, sigma) / sqrt(1 + sigma^2) of the row's own sigma.
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


def _init_scale(s: SimpleNamespace, sig: np.ndarray, start: int) -> float:
    """diffusers' init_noise_sigma (of the whole run) as a VP multiplier at the first row that runs."""
    top = float(sig.max())
    init = top if s.timestep_spacing in ("linspace", "trailing") else math.sqrt(top**2 + 1)
    return init * _vp(float(sig[start]))


def euler(s: SimpleNamespace, n: int, karras: bool, start: int = 0) -> tuple[TableBuilder, float]:
    """Karras et al. 2022, Alg. 1 without churn: x' = x + (sigma' - sigma) (x - x0_hat) / sigma."""
    if s.interpolation_type != "linear":
        raise InvalidInputError(f"Euler with interpolation_type {s.interpolation_type!r} is not supported; "
                                "only 'linear'")
    if s.timestep_type != "discrete" and s.prediction_type == "v_prediction":
        raise InvalidInputError(f"Euler with timestep_type {s.timestep_type!r} is not supported; only 'discrete'")
    rescale = s.rescale_betas_zero_snr
    ts, sig, _ = sigma_levels(s, n, karras, rescale, s.final_sigmas_type == "sigma_min")
    sig = sig.astype(np.float64)
    b = TableBuilder(len(ts) - start, 1)
    for i in range(start, len(ts)):
        t, sg, nxt = ts[i], sig[i], sig[i + 1]
        sample = b.x / _vp(sg)
        m = b.model(t, b.x, levels.vp(sg))
        d = (sample - x0_sigma(sample, m, sg, s.prediction_type)) / sg
        sample = sample + d * (nxt - sg)
        b.keep(sample * _vp(nxt) if i + 1 < len(ts) else sample)
    return b, _init_scale(s, sig, start)


def euler_ancestral(s: SimpleNamespace, n: int, start: int = 0) -> tuple[TableBuilder, float]:
    """Karras et al. 2022 / k-diffusion's ancestral Euler: an Euler step down to sigma_down, then fresh noise
    sigma_up z, with sigma_up^2 = sigma'^2 (sigma^2 - sigma'^2) / sigma^2 and sigma_down^2 = sigma'^2 - sigma_up^2
    (DDPM's ancestral variance, Ho et al. 2020, in sigma space)."""
    rescale = s.rescale_betas_zero_snr
    ts, sig, _ = sigma_levels(s, n, False, rescale, False)
    sig = sig.astype(np.float64)
    b = TableBuilder(len(ts) - start, 1)
    for i in range(start, len(ts)):
        t, sg, nxt = ts[i], sig[i], sig[i + 1]
        sample = b.x / _vp(sg)
        m = b.model(t, b.x, levels.vp(sg))
        up = math.sqrt(nxt**2 * (sg**2 - nxt**2) / sg**2)
        down = math.sqrt(max(nxt**2 - up**2, 0.0))
        d = (sample - x0_sigma(sample, m, sg, s.prediction_type)) / sg
        sample = sample + d * (down - sg) + up * b.noise()
        b.keep(sample * _vp(nxt) if i + 1 < len(ts) else sample)
    return b, _init_scale(s, sig, start)


def heun(s: SimpleNamespace, n: int, karras: bool, start: int = 0) -> tuple[TableBuilder, float]:
    """Karras et al. 2022, Alg. 1 (churn 0): an Euler predictor to sigma', the model again there, and the step
    redone with the mean of both slopes (trapezoidal rule). The last step (to sigma = 0) stays first order.
    Rows: 2n - 1, diffusers' interleaved steps (first order at sigmas[2k] = sigma_k, second at sigmas[2k + 1] =
    sigma_{k+1}); start is even (t_start * order 2). Slots: the predicted x, and what diffusers' second step adds
    to its own slope: the stored sample plus half the first slope's step, sample + d1 dt / 2.
    """
    ts, sig, _ = sigma_levels(s, n, karras, False, False)
    sig = sig.astype(np.float64)
    k0 = start // 2
    b = TableBuilder(2 * (len(ts) - k0) - 1, 2)
    for i in range(k0, len(ts)):
        t, sg, nxt = ts[i], sig[i], sig[i + 1]
        sample = b.x / _vp(sg)
        m = b.model(t, b.x, levels.vp(sg))
        d1 = (sample - x0_sigma(sample, m, sg, s.prediction_type)) / sg
        dt = nxt - sg
        predicted = sample + d1 * dt
        if i + 1 == len(ts):
            b.keep(predicted)
            break
        half = sample + d1 * (dt / 2)  # diffusers keeps sample, d1 and dt; its second step only needs this
        b.keep(predicted * _vp(nxt), half * _vp(nxt))
        predicted = b.x / _vp(nxt)  # the latents the pipeline passes back (blended when inpainting)
        m2 = b.model(ts[i + 1], b.x, levels.vp(nxt))
        d2 = (predicted - x0_sigma(predicted, m2, nxt, s.prediction_type)) / nxt
        b.keep((half + d2 * (dt / 2)) * _vp(nxt))
    return b, _init_scale(s, sig, k0)
