"""Multistep exponential-integrator samplers in the VP space: DPM-Solver++ 2M (and its SDE form), UniPC.

Both work with alpha_t = 1/sqrt(1 + sigma^2), sigma_t = sigma alpha_t and the half log-SNR
lambda_t = log(alpha_t / sigma_t) = -log(sigma), on data predictions x0_hat (DPM-Solver++ and UniPC's
predict_x0), and remember the last one or more of them in history slots. diffusers' samples are VP latents,
so the U-Net reads slot 0 unchanged.

`start` is the first row that runs (img2img: t_start, with set_begin_index): the loop runs from that step index
with the warm-up fresh (lower_order_nums 0, no stored outputs, no corrector on the first row), while the
"last steps" of lower_order_final count from the end of the whole run, as diffusers' step_index does. A row's
level (add_noise: sigmas[step_index], as alpha_t, sigma_t) is its own sigma.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np

from ..errors import InvalidInputError
from . import levels
from .linear import Lin, TableBuilder


def _lam(sigma: float) -> tuple[float, float, float]:
    """(alpha_t, sigma_t, lambda_t) of a sigma level; lambda is +inf at sigma = 0 (the clean end)."""
    alpha, sig = levels.vp(sigma)
    lam = math.log(alpha) - math.log(sig) if sig > 0 else math.inf
    return alpha, sig, lam


def _x0(x: Lin, m: Lin, sigma: float, prediction_type: str) -> Lin:
    alpha, sig = levels.vp(sigma)
    if prediction_type == "epsilon":
        return (x - sig * m) / alpha
    return alpha * x - sig * m


def _eps(x: Lin, m: Lin, sigma: float, prediction_type: str) -> Lin:
    alpha, sig = levels.vp(sigma)
    if prediction_type == "epsilon":
        return m
    return alpha * m + sig * x


def _coinciding(i: int, count: int) -> None:
    """Two rows at the same level (h = 0) are a step of length zero. Karras sigmas with final_sigmas_type
    "sigma_min" end on such a pair, and diffusers' last step there returns x; anywhere else its solvers divide
    0 by 0 (NaN): refused."""
    if i != count - 1:
        raise InvalidInputError(f"{count} steps with this scheduler config put two steps at the same noise level "
                                "(repeated timesteps); use fewer steps or another timestep_spacing")


def multistep_levels(s: SimpleNamespace, n: int, karras: bool, dpm: bool) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps int64, sigmas float32 [len+1]) as DPMSolverMultistep (dpm) / UniPCMultistep set_timesteps."""
    T = s.num_train_timesteps
    rescale = s.rescale_betas_zero_snr
    ac = levels.train_alphas_cumprod(T, s.beta_start, s.beta_end, s.beta_schedule, rescale=rescale,
                                     clamp_last=rescale)
    sig32 = levels.train_sigmas(ac)
    log_sig = np.log(sig32)
    last = T
    if dpm:  # levels below lambda_min_clipped are cut from the top of the range (for cosine schedules)
        lam32 = (np.log(np.sqrt(ac)) - np.log(np.sqrt(np.float32(1.0) - ac))).astype(np.float32)
        last = T - int(np.searchsorted(lam32[::-1], np.float32(s.lambda_min_clipped)))
    ts = levels.multistep_timesteps(s.timestep_spacing, T, n, s.steps_offset, last)
    levels.check_range(ts, T, f"{n} steps with timestep_spacing {s.timestep_spacing!r} and steps_offset "
                              f"{s.steps_offset}")
    if karras:
        lo = getattr(s, "sigma_min", None)
        hi = getattr(s, "sigma_max", None)
        sigmas = levels.karras_sigmas(float(sig32[0]) if lo is None else lo,
                                      float(sig32[-1]) if hi is None else hi, n)
        ts = levels.sigma_to_t(sigmas, log_sig)
        if not dpm or s.beta_schedule != "squaredcos_cap_v2":
            ts = ts.round()
        ts = ts.astype(np.int64)
        final = sigmas[-1] if not dpm else sig32[0]
    else:
        sigmas = levels.interp_sigmas(ts, sig32)
        final = sig32[0]
    last_sigma = final if s.final_sigmas_type == "sigma_min" else 0.0
    return ts, np.concatenate([sigmas, [last_sigma]]).astype(np.float32)


def dpmpp_2m(s: SimpleNamespace, n: int, karras: bool, sde: bool, start: int = 0) -> tuple[TableBuilder, float]:
    """Lu et al. 2022, DPM-Solver++(2M) (Alg. 2): with h = lambda' - lambda and r = h_prev / h,
    x' = (sigma'/sigma) x - alpha' (e^-h - 1) (D + (D - D_prev) / (2r))    (midpoint; first order: D only);
    SDE form (sde-dpmsolver++, their eq. for the SDE solver):
    x' = (sigma'/sigma) e^-h x + alpha' (1 - e^-2h) (D + (D - D_prev) / (2r)) + sigma' sqrt(1 - e^-2h) z.
    Slots: x and the previous data prediction D_prev.
    """
    if s.variance_type is not None:
        raise InvalidInputError(f"DPM-Solver with variance_type {s.variance_type!r} (learned variance) is not "
                                "supported")
    ts, sig = multistep_levels(s, n, karras, dpm=True)
    sig = sig.astype(np.float64)
    count = len(ts)
    b = TableBuilder(count - start, 2)
    prev_d: Lin | None = None
    for i in range(start, count):
        t, x = ts[i], b.x
        m = b.model(t, x, levels.vp(sig[i]))
        final = i == count - 1 and (s.euler_at_final or (s.lower_order_final and count < 15)
                                    or s.final_sigmas_type == "zero")
        d = _x0(x, m, sig[i], s.prediction_type)
        a_t, s_t, l_t = _lam(sig[i + 1])
        _, s_s, l_s = _lam(sig[i])
        h = l_t - l_s
        if h == 0:
            _coinciding(i, count)  # the last step may stay put (diffusers' step is x there); others are NaN
            prev_d = d
            b.keep(x, d)
            continue
        e_h = math.exp(-h)
        second = prev_d is not None and not final  # diffusers: lower_order_nums >= 1 and not lower_order_final
        if second:
            _, _, l_p = _lam(sig[i - 1])
            d1 = (d - prev_d) / ((l_s - l_p) / h)  # (D - D_prev) / r
        if not sde:
            x = (s_t / s_s) * x - (a_t * (e_h - 1.0)) * d
            if second and s.solver_type == "midpoint":
                x = x - (0.5 * a_t * (e_h - 1.0)) * d1
            elif second:  # heun
                x = x + (a_t * ((e_h - 1.0) / h + 1.0)) * d1
        else:
            e_2h = math.exp(-2.0 * h)
            x = (s_t / s_s * e_h) * x + (a_t * (1 - e_2h)) * d
            if second and s.solver_type == "midpoint":
                x = x + (0.5 * a_t * (1 - e_2h)) * d1
            elif second:
                x = x + (a_t * ((1.0 - e_2h) / (-2.0 * h) + 1.0)) * d1
            x = x + (s_t * math.sqrt(1.0 - e_2h)) * b.noise()
        prev_d = d
        b.keep(x, d)
    return b, 1.0


def _unipc_coefficients(order: int, rks: list[float], hh: float, bh2: bool, corrector: bool
                        ) -> tuple[float, float, np.ndarray]:
    """(h phi_1(hh), B(h), rhos) of Zhao et al. 2023: the predictor solves R[:-1,:-1] rho = b[:-1] (rho = 1/2 at
    order 2), the corrector the full R rho = b (rho = 1/2 at order 1), R_ij = r_j^i, b_i = i! phi_{i+1}(hh) / B(h)."""
    h_phi_1 = math.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    factorial = 1
    b_h = math.expm1(hh) if bh2 else hh
    rk = np.array(list(rks) + [1.0])
    R, bb = [], []
    for i in range(1, order + 1):
        R.append(rk ** (i - 1))
        bb.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    R, bb = np.array(R), np.array(bb)
    if corrector:
        rhos = np.array([0.5]) if order == 1 else np.linalg.solve(R, bb)
    else:
        rhos = np.array([0.5]) if order == 2 else (np.linalg.solve(R[:-1, :-1], bb[:-1]) if order > 2 else np.array([]))
    return h_phi_1, b_h, rhos


def unipc(s: SimpleNamespace, n: int, karras: bool, start: int = 0) -> tuple[TableBuilder, float, int]:
    """Zhao et al. 2023, UniPC: the UniP-p predictor x' = (sigma'/sigma) x - alpha' h phi_1 D - alpha' B(h)
    sum rho_k D1_k (D1_k = (D_k - D) / r_k), then at the next level, once the model has been evaluated there,
    the UniC corrector redoes the step with the new data prediction included (order + 1 accuracy) and the
    predictor continues from the corrected x. The model is evaluated only at predicted points (the corrector
    costs no evaluation). Slots: x, the next row's corrector less its term in the next data prediction (it
    reads diffusers' stored last_sample and outputs, not the latents the pipeline passes back, which inpainting
    blends), and the last `solver_order - 1` data predictions.
    """
    order = s.solver_order
    if order > 3:
        raise InvalidInputError(f"UniPC with solver_order {order} needs {order + 1} state slots; sdengine supports "
                                "solver_order 1-3")
    ts, sig = multistep_levels(s, n, karras, dpm=False)
    sig = sig.astype(np.float64)
    count = len(ts)
    bh2 = s.solver_type == "bh2"
    x0 = s.predict_x0
    b = TableBuilder(count - start, order + 1)
    outputs: list[Lin] = []  # newest last, at most `order`
    last_sample: Lin | None = None
    this_order = 0
    lower_nums = 0

    def update(x_from: Lin, i_from: int, i_to: int, hist_idx: list[int], hist: list[Lin], m0: Lin, k: int,
               corrector_m: Lin | None) -> Lin:
        a_t, s_t, l_t = _lam(sig[i_to])
        a_s, s_s, l_s = _lam(sig[i_from])
        h = l_t - l_s
        if h == 0:
            _coinciding(i_from, count)
            return x_from  # the last predictor between equal levels: diffusers' step is x
        rks, d1s = [], []
        for j, mi in zip(hist_idx, hist):
            _, _, l_j = _lam(sig[j])
            rk = (l_j - l_s) / h
            rks.append(rk)
            d1s.append((mi - m0) / rk)
        hh = -h if x0 else h
        h_phi_1, b_h, rhos = _unipc_coefficients(k, rks, hh, bh2, corrector_m is not None)
        if x0:
            base, w = (s_t / s_s) * x_from - (a_t * h_phi_1) * m0, a_t * b_h
        else:
            base, w = (a_t / a_s) * x_from - (s_t * h_phi_1) * m0, s_t * b_h
        res = sum(float(r) * d for r, d in zip(rhos, d1s))
        if corrector_m is not None:
            res = res + float(rhos[-1]) * (corrector_m - m0)
        return base - w * res if not isinstance(res, int) else base

    for i in range(start, count):
        t, sample = ts[i], b.x
        m = b.model(t, sample, levels.vp(sig[i]))
        conv = _x0(sample, m, sig[i], s.prediction_type) if x0 else _eps(sample, m, sig[i], s.prediction_type)
        if i > 0 and (i - 1) not in s.disable_corrector and last_sample is not None:
            k = this_order
            hist = [outputs[-(j + 1)] for j in range(1, k)]
            sample = update(last_sample, i - 1, i, [i - 1 - j for j in range(1, k)], hist, outputs[-1], k, conv)
        outputs = (outputs + [conv])[-order:]
        k = min(order, count - i) if s.lower_order_final else order
        this_order = min(k, lower_nums + 1)
        last_sample = sample
        hist = [outputs[-(j + 1)] for j in range(1, this_order)]
        nxt = update(sample, i, i + 1, [i - j for j in range(1, this_order)], hist, outputs[-1], this_order, None)
        lower_nums = min(lower_nums + 1, order)
        corrector = b.zero()  # the next row's corrector with a zero new output: linear, so a slot holds it
        if i + 1 < count and i not in s.disable_corrector:
            hist = [outputs[-(j + 1)] for j in range(1, this_order)]
            corrector = update(last_sample, i, i + 1, [i - j for j in range(1, this_order)], hist, outputs[-1],
                               this_order, b.zero())
        b.keep(nxt, corrector, *reversed(outputs[len(outputs) - (order - 1):]))
    return b, 1.0, order + 1
