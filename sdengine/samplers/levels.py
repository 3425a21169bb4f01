"""Noise levels as diffusers' scheduler classes compute them: training alphas_cumprod, inference timesteps, sigmas.

diffusers keeps betas and alphas_cumprod in float32 tensors and picks timesteps with numpy from them; a rounding
difference there would change an integer timestep, so the arrays are reproduced bit for bit (tests compare them
with each class's own), and only the sampler coefficients after them are computed in float64.

Sigma space (Karras et al. 2022): sigma = sqrt((1 - abar) / abar); the variance-preserving latent is
x_vp = x_sigma / sqrt(1 + sigma^2), with alpha = 1 / sqrt(1 + sigma^2) and sigma_vp = sigma * alpha.
numpy only.
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import InvalidInputError

F32 = np.float32


def torch_linspace_f32(start: float, end: float, n: int) -> np.ndarray:
    """torch.linspace(start, end, n, dtype=torch.float32), bit for bit.

    torch's CPU kernel rounds start, end and the step to float32, then computes start + step * i for the first
    half and end - step * (n - 1 - i) for the second, each with one rounding (a fused multiply-add).
    """
    a, b = F32(start), F32(end)
    if n == 1:
        return np.array([a], F32)
    step = F32((b - a) / F32(n - 1))
    i = np.arange(n)
    lo = np.float64(a) + np.float64(step) * i
    hi = np.float64(b) - np.float64(step) * (n - 1 - i)
    return np.where(i < n // 2, lo, hi).astype(F32)


def _cosine_betas(T: int) -> np.ndarray:
    """diffusers' betas_for_alpha_bar (squaredcos_cap_v2; Nichol & Dhariwal 2021, eq. 17), float32."""
    f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    return np.array([min(1 - f((i + 1) / T) / f(i / T), 0.999) for i in range(T)], F32)


def _cumprod_f32(x: np.ndarray) -> np.ndarray:
    """torch.cumprod of a float32 tensor: accumulated in float64, each product rounded to float32."""
    return np.cumprod(x.astype(np.float64)).astype(F32)


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Lin et al. 2023, Algorithm 1, in diffusers' float32 operations: shift and scale sqrt(abar) to end at 0."""
    s = np.sqrt(_cumprod_f32(F32(1.0) - betas))
    s0, sT = s[0], s[-1]
    s = (s - sT) * (s0 / (s0 - sT))
    ab = s * s
    alphas = np.concatenate([ab[:1], ab[1:] / ab[:-1]]).astype(F32)
    return (F32(1.0) - alphas).astype(F32)


def train_alphas_cumprod(T: int, beta_start: float, beta_end: float, beta_schedule: str, rescale: bool = False,
                         clamp_last: bool = False) -> np.ndarray:
    """A diffusers scheduler's float32 alphas_cumprod [T].

    clamp_last: the sigma schedulers (Euler, Euler a, DPM-Solver, UniPC) set abar_{T-1} = 2**-24 after the
    zero-SNR rescale, so that sigma stays finite (4096); DDIM, DDPM and LCM keep abar_{T-1} = 0.
    """
    if beta_schedule == "linear":
        betas = torch_linspace_f32(beta_start, beta_end, T)
    elif beta_schedule == "scaled_linear":
        betas = torch_linspace_f32(beta_start**0.5, beta_end**0.5, T) ** 2
    elif beta_schedule == "squaredcos_cap_v2":
        betas = _cosine_betas(T)
    else:  # SchedulerConfig refuses others
        raise ValueError(beta_schedule)
    betas = betas.astype(F32)
    if rescale:
        betas = _rescale_zero_terminal_snr(betas)
    ac = _cumprod_f32(F32(1.0) - betas)
    if rescale and clamp_last:
        ac[-1] = F32(2.0**-24)
    return ac


def train_sigmas(ac: np.ndarray) -> np.ndarray:
    """sigma_t = sqrt((1 - abar_t) / abar_t), float32 like diffusers' tensors."""
    return np.sqrt((F32(1.0) - ac) / ac).astype(F32)


# --- timestep spacing (Lin et al. 2023, Table 2), each as diffusers' classes compute it ---------------------------


def trailing(start: int, T: int, n: int) -> np.ndarray:
    """round(arange(start, 0, -T/n)) (descending, float64), without a last element that rounds to 0.

    For some n (61, 103, ... of T = 1000) float rounding makes numpy's arange return n + 1 values, the last
    ~1e-13, which diffusers turns into timestep -1 (it then reads alphas_cumprod[-1], the noisiest level, as if
    it were the cleanest): such an element is dropped, so n steps run n rows.
    """
    ts = np.round(np.arange(start, 0, -T / n))
    return ts[ts >= 1]


def discrete_timesteps(spacing: str, T: int, n: int, offset: int) -> np.ndarray:
    """DDIMScheduler / DDPMScheduler.set_timesteps: n integer timesteps, descending."""
    if spacing == "linspace":
        return np.linspace(0, T - 1, n).round()[::-1].astype(np.int64)
    if spacing == "leading":
        return (np.arange(0, n) * (T // n)).round()[::-1].astype(np.int64) + offset
    return trailing(T, T, n).astype(np.int64) - 1


def sigma_timesteps(spacing: str, T: int, n: int, offset: int) -> np.ndarray:
    """Euler / Euler a / Heun set_timesteps: n float32 timesteps, descending (linspace: not rounded)."""
    if spacing == "linspace":
        return np.linspace(0, T - 1, n, dtype=F32)[::-1].copy()
    if spacing == "leading":
        return (np.arange(0, n) * (T // n)).round()[::-1].astype(F32) + F32(offset)
    return trailing(T, T, n).astype(F32) - F32(1)


def multistep_timesteps(spacing: str, T: int, n: int, offset: int, last: int | None = None) -> np.ndarray:
    """DPMSolverMultistep / UniPCMultistep set_timesteps: n + 1 points with the last (t = 0) dropped, int64.

    last: DPM-Solver's last_timestep (T less the levels cut by lambda_min_clipped); UniPC uses T.
    """
    last = T if last is None else last
    if spacing == "linspace":
        return np.linspace(0, last - 1, n + 1).round()[::-1][:-1].astype(np.int64)
    if spacing == "leading":
        return (np.arange(0, n + 1) * (last // (n + 1))).round()[::-1][:-1].astype(np.int64) + offset
    return trailing(last, T, n).astype(np.int64) - 1


def pndm_timesteps(spacing: str, T: int, n: int, offset: int) -> np.ndarray:
    """PNDMScheduler._timesteps: n integer timesteps, ascending."""
    if spacing == "linspace":
        return np.linspace(0, T - 1, n).round().astype(np.int64)
    if spacing == "leading":
        return (np.arange(0, n) * (T // n)).round().astype(np.int64) + offset
    return trailing(T, T, n)[::-1].astype(np.int64) - 1


def check_range(ts: np.ndarray, T: int, what: str) -> None:
    """Refuse timesteps outside the trained range 0..T-1 (diffusers indexes out of range or extrapolates)."""
    if ts.size and (ts.max() > T - 1 or ts.min() < 0):
        bad = ts.max() if ts.max() > T - 1 else ts.min()
        raise InvalidInputError(f"{what} reach timestep {float(bad):g}, outside the trained range 0..{T - 1}; "
                                "use fewer steps")


# --- sigmas ------------------------------------------------------------------------------------------------------


def interp_sigmas(timesteps: np.ndarray, sigmas32: np.ndarray) -> np.ndarray:
    """The training sigmas linearly interpolated at (fractional) timesteps, float64 (np.interp, as diffusers)."""
    return np.interp(timesteps, np.arange(0, len(sigmas32)), sigmas32)


def sigma_to_t(sigmas: np.ndarray, log_sigmas32: np.ndarray) -> np.ndarray:
    """The fractional timestep of each sigma: linear interpolation in log sigma (diffusers' _sigma_to_t)."""
    sigmas = np.asarray(sigmas, np.float64)
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    dists = log_sigma - log_sigmas32[:, np.newaxis]
    low_idx = np.cumsum((dists >= 0), axis=0).argmax(axis=0).clip(max=log_sigmas32.shape[0] - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas32[low_idx], log_sigmas32[high_idx]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    return (1 - w) * low_idx + w * high_idx


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022, eq. 5: sigma_i = (max^(1/rho) + i/(n-1) (min^(1/rho) - max^(1/rho)))^rho, float64."""
    ramp = np.linspace(0, 1, n)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def vp(sigma: float) -> tuple[float, float]:
    """(alpha, sigma_vp) of a sigma-space level: alpha = 1/sqrt(1+sigma^2), sigma_vp = sigma * alpha."""
    alpha = 1.0 / math.sqrt(sigma * sigma + 1.0)
    return alpha, sigma * alpha
