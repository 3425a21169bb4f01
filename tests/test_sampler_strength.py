"""Image to image and inpainting tables (`build_schedule(..., strength)`, `Schedule.levels`) against diffusers.

diffusers' StableDiffusionImg2ImgPipeline and StableDiffusionInpaintPipeline (4-channel U-Net) are reimplemented
around the scheduler, as they call it: set_timesteps(N); get_timesteps (t_start = N - int(N * strength), the
timesteps from t_start * order on, set_begin_index there); the start `add_noise(x0, noise, timesteps[:1])`; per
step scale_model_input and step(...).prev_sample; inpainting then blends `(1 - mask) * add_noise(x0, noise,
[timesteps[i + 1]]) + mask * latents` (the clean x0 after the last step). Ours: `initial_state(noise, x0)`, the
rows, and `Schedule.blend(i, ...)` (levels[i + 1]) on slot 0. Same deterministic stand-in model as
tests/test_samplers.py, same per-row noise for the stochastic samplers.

Measured worst max|ours - diffusers| / max|diffusers| (final latent or any row's U-Net input), over strengths
0.3, 0.5, 0.75, 1 and 7, 10, 20 steps on SD 1.5's PNDM config (epsilon) and a trailing v-prediction one,
OMP_NUM_THREADS=1 and 2 alike (`pytest -s` prints every `parity strength ...` line):

  img2img     worst 9.9e-7 (dpmpp_2m_sde_karras, sd15, 7 steps, strength 1.0); every sampler <= 9.9e-7
  inpainting  worst 1.0e-6 (dpmpp_2m_karras, sd15, 20 steps, strength 0.75); every sampler <= 1.0e-6
  DDIM eta 0.7 (img2img and inpainting, both configs): worst 2.5e-7
  config variants (inpainting, strength 0.5 and 0.8, 7 and 10 steps): worst 6.3e-6 (cosine betas, heun_karras:
  diffusers' float32 second-order step near sigma 0, see tests/test_samplers.py); all others <= 8.9e-7
(720 runs; the same figures bit for bit under both thread counts). Before the tables modelled the blend (a
fresh atom in slot 0 after each row, linear.py), Heun, UniPC and PLMS read values diffusers stores (sample and
slope, last_sample, cur_sample) back out of slot 0, which the blend changes: inpainting then measured 2.7e-1,
4.4e-1 and 2.8e-2 (sd15, 10 steps, strength 1).

Where slot 0 is not at the level diffusers blends with (test_levels_follow_the_latent, an exact denoiser; all
other samplers and cases within 1.2e-6, the float32 rows): PLMS at strength < 1 (diffusers' PNDMScheduler has no
set_begin_index and counts its calls from the sliced list: 0.14-0.47 off); DDIM and PLMS with trailing or
linspace spacing where N does not divide T (they step to t - T//N, not to the next timestep: up to 9e-3, 2e-2);
DDIM and PLMS after the last row with set_alpha_to_one false (they end at abar_0, 0.03 off the clean image
diffusers blends there). PLMS on v-prediction is not exact for an exact denoiser (it extrapolates raw v outputs
of earlier levels), so this check cannot tell there; LCM's last denoised output is 1e-6 off x0 (c_skip).
"""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
from test_samplers import CONFIGS as CONFIGS_ALL
from test_samplers import (
    REL_TOL,
    SD15_PNDM,
    SHAPE,
    VARIANTS,
    NoiseFeed,
    check_timesteps,
    diffusers_scheduler,
    fake_model,
    rel,
)

from sdengine.errors import InvalidInputError
from sdengine.samplers import SLOTS_MAX, build_schedule, sampler_names
from sdengine.schedulers import SchedulerConfig

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
diffusers.utils.logging.set_verbosity_error()
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

CONFIGS = {
    "sd15": SD15_PNDM,
    "trailing_v": {**SD15_PNDM, "timestep_spacing": "trailing", "prediction_type": "v_prediction"},
}
STRENGTHS = (0.3, 0.5, 0.75, 1.0)
STEPS = (10, 20, 7)
SAMPLERS = sampler_names()
MASK_SHAPE = (SHAPE[0], 1, *SHAPE[2:])  # diffusers' mask: [B, 1, h, w] at latent size, broadcast over channels


def t_start(n: int, strength: float) -> int:
    """StableDiffusionImg2ImgPipeline.get_timesteps."""
    return max(n - min(int(n * strength), n), 0)


def run_diffusers(name, d, steps, strength, x0, noise, fixed, noises, mask, monkeypatch, eta=0.0):
    """The img2img pipeline's loop (inpainting's when mask is given): (timesteps, final latent, U-Net inputs)."""
    sch = diffusers_scheduler(name, d)
    sch.set_timesteps(steps)
    start = t_start(steps, strength)
    timesteps = sch.timesteps[start * sch.order:]
    if hasattr(sch, "set_begin_index"):
        sch.set_begin_index(start * sch.order)
    feed = NoiseFeed(noises)
    module = sys.modules[type(sch).__module__]
    if hasattr(module, "randn_tensor"):
        monkeypatch.setattr(module, "randn_tensor", feed)
    image, noise_t = torch.from_numpy(x0), torch.from_numpy(noise)
    mask_t = None if mask is None else torch.from_numpy(mask)
    latents = sch.add_noise(image, noise_t, timesteps[:1])
    inputs = []
    for i, t in enumerate(timesteps):
        feed.row = i
        inp = sch.scale_model_input(latents, t)
        inputs.append(inp.numpy().copy())
        m = torch.from_numpy(fake_model(inp.numpy(), float(t), fixed))
        kw = {"eta": eta} if name == "ddim" else {}
        latents = sch.step(m, t, latents, **kw, return_dict=False)[0]
        if mask_t is not None:  # StableDiffusionInpaintPipeline, num_channels_unet == 4
            proper = image
            if i < len(timesteps) - 1:
                proper = sch.add_noise(proper, noise_t, torch.tensor([timesteps[i + 1]]))
            latents = (1 - mask_t) * proper + mask_t * latents
    return timesteps.numpy(), latents.numpy(), inputs


def run_ours(schedule, x0, noise, fixed, noises, mask):
    state = schedule.initial_state(noise, x0)
    inputs = []
    for i, t in enumerate(schedule.timesteps):
        inputs.append(state[0].copy())
        state = schedule.step(i, state, fake_model(state[0], float(t), fixed), noises[i])
        if mask is not None:
            state[0] = schedule.blend(i, state[0], x0, noise, mask)
    return state[0], inputs


def parity(name, d, steps, strength, inpaint, monkeypatch, eta=0.0, seed=0):
    rng = np.random.default_rng(seed)
    x0, noise, fixed = rng.standard_normal((3, *SHAPE)).astype(np.float32)
    mask = rng.uniform(0, 1, MASK_SHAPE).astype(np.float32) if inpaint else None
    schedule = build_schedule(SchedulerConfig.from_diffusers(d), name, steps, eta, strength)
    noises = rng.standard_normal((schedule.num_rows, *SHAPE)).astype(np.float32)
    ts, ref, ref_inputs = run_diffusers(name, d, steps, strength, x0, noise, fixed, noises, mask, monkeypatch, eta)
    assert len(ts) == schedule.num_rows, (len(ts), schedule.num_rows)
    check_timesteps(schedule.timesteps, ts)  # (a): scheduler.timesteps[t_start * order:]
    got, inputs = run_ours(schedule, x0, noise, fixed, noises, mask)
    r_in = max(rel(a, b) for a, b in zip(inputs, ref_inputs))
    return rel(got, ref), r_in, schedule


@pytest.mark.parametrize("name", SAMPLERS)
def test_strength_parity_with_diffusers(name, monkeypatch):
    """(b) img2img and (c) 4-channel inpainting, every strength, step count and config."""
    worst = 0.0
    for config, d in CONFIGS.items():
        for steps in STEPS:
            for strength in STRENGTHS:
                for inpaint in (False, True):
                    r, r_in, s = parity(name, d, steps, strength, inpaint, monkeypatch)
                    kind = "inpaint" if inpaint else "img2img"
                    print(f"parity strength {name:20s} {config:10s} steps {steps:2d} strength {strength:4.2f} "
                          f"{kind:7s} rows {s.num_rows:2d} final {r:.2e} inputs {r_in:.2e}")
                    assert s.steps == steps and s.start_step == t_start(steps, strength)
                    assert s.steps_run == steps - s.start_step and s.strength == strength
                    assert r < REL_TOL and r_in < REL_TOL, (config, steps, strength, kind, r, r_in)
                    worst = max(worst, r, r_in)
    print(f"parity strength {name} worst {worst:.2e}")


@pytest.mark.parametrize("variant", ["sd21v", "zsnr_v", "cosine_betas", "final_sigma_min", "unipc_order3",
                                     "unipc_bh1_disable_corrector", "dpm_no_lower_order_final",
                                     "dpm_heun_euler_at_final", "karras_bounds", "linspace_alpha_one"])
def test_strength_config_variants(variant, monkeypatch):
    """Inpainting at strength 0.5 and 0.8 on tests/test_samplers.py's other configs (zero SNR, cosine betas, UniPC
    order 3 and disable_corrector, DPM-Solver's lower_order_final off, ...), for the samplers that read them."""
    d, names = (CONFIGS_ALL[variant], SAMPLERS) if variant in CONFIGS_ALL else VARIANTS[variant]
    worst = (0.0, "", 0, 0.0)
    for name in names:
        for steps in (10, 7):
            for strength in (0.5, 0.8):
                r, r_in, _ = parity(name, d, steps, strength, True, monkeypatch)
                assert r < REL_TOL and r_in < REL_TOL, (name, steps, strength, r, r_in)
                worst = max(worst, (max(r, r_in), name, steps, strength))
    print(f"parity strength variant {variant} ({len(names)} samplers, inpainting) worst {worst[0]:.2e} "
          f"({worst[1]}, {worst[2]} steps, strength {worst[3]})")


def test_ddim_eta_strength(monkeypatch):
    for inpaint in (False, True):
        for config, d in CONFIGS.items():
            r, r_in, s = parity("ddim", d, 10, 0.5, inpaint, monkeypatch, eta=0.7)
            print(f"parity strength ddim eta 0.7 {config} inpaint {inpaint} final {r:.2e} inputs {r_in:.2e}")
            assert s.needs_noise and r < REL_TOL and r_in < REL_TOL


def test_rows_and_levels():
    """Rows per strength (Heun: 2 (N - t_start) - 1, PLMS: N + 1 - t_start), levels' shape and ends, and that
    padding carries them."""
    cfg = SchedulerConfig.from_diffusers(SD15_PNDM)
    for name in SAMPLERS:
        for strength, start in ((1.0, 0), (0.75, 3), (0.5, 5), (0.3, 7), (0.1, 9)):
            s = build_schedule(cfg, name, 10, strength=strength)
            left = 10 - start
            want = {"heun": 2 * left - 1, "heun_karras": 2 * left - 1, "pndm": left + 1}.get(name, left)
            assert s.num_rows == want and s.start_step == start and s.steps_run == left, (name, strength)
            assert s.levels.shape == (s.num_rows + 1, 2) and s.levels.dtype == np.float64
            assert tuple(s.levels[-1]) == (1.0, 0.0)
            np.testing.assert_allclose((s.levels[:-1] ** 2).sum(1), 1.0, rtol=1e-12)  # VP: alpha^2 + sigma^2 = 1
            full = build_schedule(cfg, name, 10)
            # the tail of the full run's timesteps and levels (diffusers slices timesteps[t_start * order:])
            np.testing.assert_array_equal(s.timesteps, full.timesteps[full.num_rows - s.num_rows:])
            np.testing.assert_array_equal(s.levels, full.levels[full.num_rows - s.num_rows:])
            p = s.padded(SLOTS_MAX)
            assert p.levels is s.levels and p.strength == s.strength and p.start_step == s.start_step
    # the VP samplers start at sqrt(abar) of the first remaining timestep
    ac = diffusers.DDIMScheduler.from_config(SD15_PNDM).alphas_cumprod.double().numpy()
    s = build_schedule(cfg, "ddim", 20, strength=0.5)
    t0 = int(s.timesteps[0])
    np.testing.assert_allclose(s.levels[0], [math.sqrt(ac[t0]), math.sqrt(1 - ac[t0])], rtol=1e-7)


def _oracle_deviation(schedule, prediction_type: str) -> tuple[list[float], float]:
    """Run the table on coefficient vectors over (x0, noise, z_0, ...) with an exact denoiser (it knows x0: eps =
    (x - a x0) / s for x = a x0 + s (unit noise)); per row i < R - 1, how far slot 0 after it is from levels[i+1]
    (|a - alpha| + |s - sigma|), and the same after the last row against the level it really ends at (0, 0)."""
    r = schedule.num_rows
    k = 2 + r
    state = np.zeros((schedule.slots, k))
    state[0, 0], state[0, 1] = schedule.levels[0]
    a_mat, b_vec, c_vec = (x.astype(np.float64) for x in schedule.matrices())
    devs = []
    for i in range(r):
        x = state[0]
        a, s = x[0], float(np.linalg.norm(x[1:]))
        eps = np.concatenate([[0.0], x[1:] / s])
        x0 = np.eye(k)[0]
        m = eps if prediction_type == "epsilon" else a * eps - s * x0
        z = np.eye(k)[2 + i]
        state = a_mat[i] @ state + b_vec[i][:, None] * m + c_vec[i][:, None] * z
        a2, s2 = state[0, 0], float(np.linalg.norm(state[0, 1:]))
        devs.append(abs(a2 - schedule.levels[i + 1, 0]) + abs(s2 - schedule.levels[i + 1, 1]))
    return devs[:-1], devs[-1]


def test_levels_follow_the_latent():
    """Slot 0 after row i is the VP latent at levels[i + 1] (what diffusers' inpainting blends it with), for an
    exact denoiser: every sampler, Heun's interleaved rows and PLMS's repeated first timestep included, except
    where diffusers' own step lands elsewhere (listed below, and in the module docstring)."""
    for config, d in CONFIGS.items():
        cfg = SchedulerConfig.from_diffusers(d)
        pred = d.get("prediction_type", "epsilon")
        for name in SAMPLERS:
            for steps in (10, 7):
                for strength in STRENGTHS:
                    s = build_schedule(cfg, name, steps, strength=strength)
                    devs, last = _oracle_deviation(s, pred)
                    worst = max(devs, default=0.0)
                    print(f"levels {name:20s} {config:10s} steps {steps:2d} strength {strength:4.2f} "
                          f"rows {worst:.1e} last {last:.1e}")
                    if name == "pndm" and (strength < 1 or pred == "v_prediction"):
                        # strength < 1: the sliced PLMS list (its second call steps from the first call's
                        # timestep + T//N, not from where the sample is; later rows are one level off).
                        # v-prediction: PLMS extrapolates raw v outputs of earlier levels as if they were eps,
                        # not exact for an exact denoiser (a sampler error, not a level mismatch)
                        assert worst > 1e-2
                        continue
                    if name == "ddim" and config == "trailing_v" and 1000 % steps:
                        assert worst > 1e-3  # DDIM steps to t - T//N, the next row is at the next timestep
                    else:
                        assert worst < 1e-5, (name, config, steps, strength, worst)  # float32 rows
                    if name in ("ddim", "pndm"):  # set_alpha_to_one false: they end at abar_0, not at x0
                        assert 0.02 < last < 0.04
                    else:  # LCM: c_skip(t) x in its last denoised output, 1e-6 here
                        assert last < 1e-5, (name, config, steps, strength, last)


def _error(cfg, name, steps, strength, match):
    with pytest.raises(InvalidInputError, match=match) as info:
        build_schedule(cfg, name, steps, strength=strength)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_bad_strength():
    cfg = SchedulerConfig()
    for bad in (0, 0.0, -0.5, 1.5, 1.0000001, math.nan, math.inf, -math.inf, True, "0.5", None):
        _error(cfg, "euler", 20, bad, "strength must be a number in")
    msg = _error(cfg, "ddim", 10, 0.05, "runs none of the 10 steps")
    assert "0.1 (1/10)" in msg
    assert build_schedule(cfg, "ddim", 10, strength=0.1).num_rows == 1
    # 49 * (1/49) rounds below 1: the suggestion is the next float up, and it runs one step
    msg = _error(cfg, "heun", 49, 1 / 49, "runs none of the 49 steps")
    smallest = float(msg.split("one step is ")[1].split(" ")[0])
    assert smallest > 1 / 49 and build_schedule(cfg, "heun", 49, strength=smallest).num_rows == 1
    assert build_schedule(cfg, "pndm", 49, strength=smallest).num_rows == 2
    for ok in (1, np.float32(0.5), np.float64(0.25)):
        assert build_schedule(cfg, "euler", 20, strength=ok).strength == float(ok)
