"""Samplers on the discrete training levels, in the variance-preserving space: DDIM, DDPM, PLMS, LCM.

Each function runs its diffusers class's loop on `Lin`s (linear.py) and returns the builder's table. The sample
here *is* the VP latent x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, so the U-Net reads it unchanged.

`start` is the first row of diffusers' timesteps that runs (img2img's t_start * order, order 1 here): the loop
runs from there with the scheduler's state as set_timesteps leaves it. These classes' add_noise takes the
timestep itself: a row's level is sqrt(abar) of its own timestep (as float32 alphas_cumprod, like diffusers').
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np

from ..errors import InvalidInputError
from . import levels
from .linear import Lin, TableBuilder


def x0_eps(x: Lin, m: Lin, abar: float, prediction_type: str) -> tuple[Lin, Lin]:
    """(x0, eps) from the model output at level abar: eps-prediction (Ho et al. 2020) or v (Salimans & Ho 2022)."""
    a, s = math.sqrt(abar), math.sqrt(1.0 - abar)
    if prediction_type == "epsilon":
        if a == 0:
            raise InvalidInputError("epsilon prediction is undefined at zero SNR (rescale_betas_zero_snr reaches "
                                    "abar = 0 at t = T-1): use a v_prediction model, or a spacing that stops short")
        return (x - s * m) / a, m
    return a * x - s * m, a * m + s * x


def _level(ac: np.ndarray, t) -> tuple[float, float]:
    """The VP (alpha, sigma) add_noise uses at timestep t: sqrt(abar_t), sqrt(1 - abar_t)."""
    ab = float(ac[int(t)])
    return math.sqrt(ab), math.sqrt(1.0 - ab)


def _alphas(s: SimpleNamespace, rescale: bool) -> np.ndarray:
    ac = levels.train_alphas_cumprod(s.num_train_timesteps, s.beta_start, s.beta_end, s.beta_schedule,
                                     rescale=rescale)
    return ac.astype(np.float64)


def ddim(s: SimpleNamespace, n: int, eta: float, start: int = 0) -> tuple[TableBuilder, float]:
    """Song et al. 2020, eq. 12 and 16: x' = sqrt(abar') x0 + sqrt(1 - abar' - sigma^2) eps + sigma z.

    diffusers' DDIMScheduler: prev = t - T//n (for every spacing), abar' = final_alpha_cumprod below t = 0.
    """
    T = s.num_train_timesteps
    ac = _alphas(s, s.rescale_betas_zero_snr)
    ts = levels.discrete_timesteps(s.timestep_spacing, T, n, s.steps_offset)
    levels.check_range(ts, T, f"{n} steps with timestep_spacing {s.timestep_spacing!r} and steps_offset "
                              f"{s.steps_offset}")
    final = 1.0 if s.set_alpha_to_one else ac[0]
    ts = ts[start:]
    b = TableBuilder(len(ts), 1)
    for t in ts:
        x = b.x
        m = b.model(t, x, _level(ac, t))
        prev = t - T // n
        ab_t, ab_p = ac[t], (ac[prev] if prev >= 0 else final)
        x0, eps = x0_eps(x, m, ab_t, s.prediction_type)
        var = (1 - ab_p) / (1 - ab_t) * (1 - ab_t / ab_p)
        std = eta * math.sqrt(var)
        dir_var = 1 - ab_p - std**2
        if dir_var < -1e-12:  # (exactly 0 at eta = 1 when abar_t = 0, up to rounding)
            raise InvalidInputError(f"eta={eta} is too large for this schedule (1 - abar_prev - sigma^2 < 0 at "
                                    f"t={int(t)}); use eta in [0, 1]")
        x = math.sqrt(ab_p) * x0 + math.sqrt(max(dir_var, 0.0)) * eps
        if eta > 0:
            x = x + std * b.noise()
        b.keep(x)
    return b, 1.0


_DDPM_VARIANCES = ("fixed_small", "fixed_small_log", "fixed_large")


def ddpm(s: SimpleNamespace, n: int, start: int = 0) -> tuple[TableBuilder, float]:
    """Ho et al. 2020, eq. 6-7: the posterior mean of q(x_prev | x_t, x0_hat) plus its standard deviation times z.

    diffusers' DDPMScheduler: prev = the next timestep of the run (1 after the last), noise only where t > 0.
    """
    if s.variance_type not in _DDPM_VARIANCES:
        raise InvalidInputError(f"DDPM with variance_type {s.variance_type!r} is not supported (learned variances "
                                f"need a model that predicts them); supported: {', '.join(_DDPM_VARIANCES)}")
    T = s.num_train_timesteps
    ac = _alphas(s, s.rescale_betas_zero_snr)
    ts = levels.discrete_timesteps(s.timestep_spacing, T, n, s.steps_offset)
    levels.check_range(ts, T, f"{n} steps with timestep_spacing {s.timestep_spacing!r} and steps_offset "
                              f"{s.steps_offset}")
    b = TableBuilder(len(ts) - start, 1)
    for i in range(start, len(ts)):
        t, x = ts[i], b.x
        m = b.model(t, x, _level(ac, t))
        ab_t = ac[t]
        ab_p = ac[ts[i + 1]] if i + 1 < len(ts) else 1.0
        alpha_t = ab_t / ab_p
        beta_t = 1 - alpha_t
        x0, _ = x0_eps(x, m, ab_t, s.prediction_type)
        x = (math.sqrt(ab_p) * beta_t / (1 - ab_t)) * x0 + (math.sqrt(alpha_t) * (1 - ab_p) / (1 - ab_t)) * x
        if t > 0:
            if s.variance_type == "fixed_large":
                std = math.sqrt(beta_t)
            else:  # fixed_small (eq. 7's beta tilde), clamped at 1e-20 like diffusers; fixed_small_log is the same
                std = math.sqrt(max((1 - ab_p) / (1 - ab_t) * beta_t, 1e-20))
            x = x + std * b.noise()
        b.keep(x)
    return b, 1.0


def plms(s: SimpleNamespace, n: int, start: int = 0) -> tuple[TableBuilder, float]:
    """Liu et al. 2022 (PNDM), pseudo linear multistep with skip_prk_steps, as Stable Diffusion runs it.

    Each step is DDIM's transfer phi(x, eps, t -> t - T//n) with eps an Adams-Bashforth combination of the
    latest model outputs (orders 1-4, weights 1; 3,-1 /2; 23,-16,5 /12; 55,-59,37,-9 /24). The first step is
    taken twice: once to get a second model output, then again from the same x with their mean (a Heun step).
    Rows: n + 1. Slots: x and the last three model outputs; after the first row, the x it started from
    (diffusers' cur_sample, which the second row steps from again, whatever the pipeline did to its latents).

    start > 0 (img2img) runs diffusers' PNDMScheduler on timesteps[start:] as it does, which is off: the class
    has no set_begin_index and counts its calls, so its second call always redoes the first step (from
    cur_sample, with the mean of both outputs), wherever the slice begins, while the slice no longer pairs it
    with the repeated timestep. At start = 1 ([a, a, b, ...]) the second call is told its input is at a while
    it is at b, and steps cur_sample (at a) as if from a + T//N; at start >= 2 ([a, b, c, ...]) the warm-up pair
    is right but leaves x at b while the third row is told c, and every later row is one level off. With an
    exact denoiser the run ends 0.1-0.5 away from x0 (tests/test_sampler_strength.py). Followed, not corrected.
    """
    T = s.num_train_timesteps
    ac = _alphas(s, False)
    final = 1.0 if s.set_alpha_to_one else ac[0]
    asc = levels.pndm_timesteps(s.timestep_spacing, T, n, s.steps_offset)
    levels.check_range(asc, T, f"{n} steps with timestep_spacing {s.timestep_spacing!r} and steps_offset "
                               f"{s.steps_offset}")
    ts = np.concatenate([asc[:-1], asc[-2:-1], asc[-1:]])[::-1]
    ratio = T // n

    def transfer(x: Lin, t: int, prev: int, e: Lin) -> Lin:  # PNDM eq. 11 (diffusers' _get_prev_sample)
        ab_t = ac[t]
        ab_p = ac[prev] if prev >= 0 else final
        if s.prediction_type == "v_prediction":
            e = math.sqrt(ab_t) * e + math.sqrt(1 - ab_t) * x
        denom = ab_t * math.sqrt(1 - ab_p) + math.sqrt(ab_t * (1 - ab_t) * ab_p)
        return math.sqrt(ab_p / ab_t) * x - ((ab_p - ab_t) / denom) * e

    ts = ts[start:]
    b = TableBuilder(len(ts), 4)
    ets: list[Lin] = []
    cur: Lin | None = None
    for counter, t in enumerate(ts):
        t, x = int(t), b.x
        m = b.model(t, x, _level(ac, t))
        prev = t - ratio
        if counter != 1:
            ets = ets[-3:] + [m]
        else:
            prev, t = t, t + ratio
        if len(ets) == 1 and counter == 0:
            e, cur = m, x
        elif len(ets) == 1 and counter == 1:
            e, x, cur = (m + ets[-1]) / 2, cur, None
        elif len(ets) == 2:
            e = (3 * ets[-1] - ets[-2]) / 2
        elif len(ets) == 3:
            e = (23 * ets[-1] - 16 * ets[-2] + 5 * ets[-3]) / 12
        else:
            e = (55 * ets[-1] - 59 * ets[-2] + 37 * ets[-3] - 9 * ets[-4]) / 24
        x = transfer(x, t, prev, e)
        b.keep(x, *reversed(ets[-3:]), *([cur] if cur is not None else []))
    return b, 1.0


def lcm(s: SimpleNamespace, n: int, start: int = 0) -> tuple[TableBuilder, float]:
    """Luo et al. 2023 (LCM), multistep consistency sampling: x0 from the consistency function
    f(x, t) = c_skip(t) x + c_out(t) x0_hat(x, t), then re-noised to the next level: x' = sqrt(abar') f + sqrt(1-abar') z.

    The timesteps are n of the original_inference_steps skipping-step levels (k = T // original, t = j k - 1);
    the last row returns f itself (what the pipeline decodes).
    """
    T = s.num_train_timesteps
    orig = s.original_inference_steps
    if orig > T:
        raise InvalidInputError(f"LCM original_inference_steps {orig} exceeds num_train_timesteps {T}; "
                                "fix scheduler/scheduler_config.json")
    if n > orig:
        raise InvalidInputError(f"LCM takes at most original_inference_steps={orig} steps, got {n}; use 1-{orig} "
                                "(LCM models are made for 2-8)")
    ac = _alphas(s, s.rescale_betas_zero_snr)
    final = 1.0 if s.set_alpha_to_one else ac[0]
    origin = (np.arange(1, orig + 1) * (T // orig) - 1)[::-1]
    ts = origin[np.floor(np.linspace(0, len(origin), num=n, endpoint=False)).astype(np.int64)]
    b = TableBuilder(len(ts) - start, 1)
    for i in range(start, len(ts)):
        t, x = ts[i], b.x
        m = b.model(t, x, _level(ac, t))
        prev = ts[i + 1] if i + 1 < len(ts) else t
        ab_t, ab_p = ac[t], (ac[prev] if prev >= 0 else final)
        scaled = float(np.float32(t * s.timestep_scaling))
        c_skip = 0.25 / (scaled**2 + 0.25)  # sigma_data = 0.5
        c_out = scaled / math.sqrt(scaled**2 + 0.25)
        x0, _ = x0_eps(x, m, ab_t, s.prediction_type)
        denoised = c_out * x0 + c_skip * x
        if i != len(ts) - 1:
            x = math.sqrt(ab_p) * denoised + math.sqrt(1 - ab_p) * b.noise()
        else:
            x = denoised
        b.keep(x)
    return b, 1.0
