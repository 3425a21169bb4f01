"""The numpy DDIM schedule against diffusers' DDIMScheduler as an independent oracle."""

import math

import numpy as np
import pytest

from sdengine.errors import InvalidInputError, UnsupportedModelError
from sdengine.schedulers import SchedulerConfig, alphas_cumprod, ddim_schedule

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
DDIMScheduler = diffusers.DDIMScheduler

SD15 = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
            set_alpha_to_one=False, clip_sample=False, timestep_spacing="leading")
SD15_PNDM = {"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
             "beta_start": 0.00085, "num_train_timesteps": 1000, "set_alpha_to_one": False,
             "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None, "clip_sample": False}

# Measured max |x_ours - x_diffusers| / max |x_diffusers| after 20 steps (diffusers keeps betas and
# alphas_cumprod in float32, we in float64), seed 0: eps/eta0 5.9e-7, eps/eta1 4.6e-7,
# v/eta0 6.2e-7, v/eta1 6.7e-7, trailing/eta0.5 8.3e-7 (seed 1); worst over seeds 0-9: 1.5e-6.
REL_TOL = 5e-6


def oracle(**overrides):
    return DDIMScheduler(**{**SD15, **overrides})


def fake_model(x, t, fixed):
    """A deterministic stand-in for the guided U-Net output m = f(x, t)."""
    return 0.7 * np.tanh(x) + 0.01 * (t / 1000.0) * fixed


def run_both(cfg_kw, steps, eta, seed=0):
    rng = np.random.default_rng(seed)
    shape = (2, 4, 8, 8)
    x0 = rng.standard_normal(shape).astype(np.float32)
    fixed = rng.standard_normal(shape).astype(np.float32)
    noises = rng.standard_normal((steps, *shape)).astype(np.float32)

    ref = oracle(**cfg_kw)
    ref.set_timesteps(steps)
    sched = ddim_schedule(SchedulerConfig.from_diffusers(ref.config), steps, eta=eta)
    np.testing.assert_array_equal(sched.timesteps, ref.timesteps.numpy())

    x_ref = torch.from_numpy(x0.copy())
    for i, t in enumerate(ref.timesteps):
        m = torch.from_numpy(fake_model(x_ref.numpy(), int(t), fixed).astype(np.float32))
        x_ref = ref.step(m, t, x_ref, eta=eta, variance_noise=torch.from_numpy(noises[i])).prev_sample

    x = x0.copy()
    for i, t in enumerate(sched.timesteps):
        a, b, c = sched.coefficients[i]
        m = fake_model(x, int(t), fixed).astype(np.float32)
        x = a * x + b * m + c * noises[i]
    assert x.dtype == np.float32
    x_ref = x_ref.numpy()
    return float(np.abs(x - x_ref).max() / np.abs(x_ref).max())


@pytest.mark.parametrize("spacing,steps", [("leading", 20), ("leading", 50), ("trailing", 20),
                                           ("linspace", 20), ("trailing", 7), ("linspace", 7)])
def test_timesteps_match_diffusers(spacing, steps):
    ref = oracle(timestep_spacing=spacing)
    ref.set_timesteps(steps)
    cfg = SchedulerConfig(timestep_spacing=spacing)
    s = ddim_schedule(cfg, steps)
    assert s.timesteps.dtype == np.int64 and s.num_steps == steps
    np.testing.assert_array_equal(s.timesteps, ref.timesteps.numpy())
    assert np.all(np.diff(s.timesteps) < 0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_trajectory_matches_diffusers(prediction_type, eta):
    rel = run_both({"prediction_type": prediction_type}, 20, eta)
    assert rel < REL_TOL, rel


def test_trailing_trajectory_matches_diffusers():
    rel = run_both({"timestep_spacing": "trailing"}, 20, 0.5, seed=1)
    assert rel < REL_TOL, rel


def test_alphas_cumprod_linear_and_scaled_linear():
    for kw in ({"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02}, {}):
        ours = alphas_cumprod(SchedulerConfig(**kw))
        assert ours.dtype == np.float64 and ours.shape == (1000,)
        ref = oracle(**kw).alphas_cumprod.double().numpy()  # float32 in diffusers
        np.testing.assert_allclose(ours, ref, rtol=5e-6, atol=0)  # measured max rel 9.3e-7


def test_config_from_diffusers():
    expected = SchedulerConfig()
    assert SchedulerConfig.from_diffusers(oracle().config) == expected
    assert SchedulerConfig.from_diffusers(SD15_PNDM) == expected
    v = oracle(prediction_type="v_prediction", timestep_spacing="trailing")
    assert SchedulerConfig.from_diffusers(v.config) == SchedulerConfig(
        prediction_type="v_prediction", timestep_spacing="trailing")


def test_config_to_diffusers_round_trip():
    cfg = SchedulerConfig(prediction_type="v_prediction", timestep_spacing="linspace", steps_offset=0)
    ref = DDIMScheduler.from_config(cfg.to_diffusers())
    assert ref.config.clip_sample is False
    assert SchedulerConfig.from_diffusers(ref.config) == cfg


@pytest.mark.parametrize("bad", [{"trained_betas": [0.1] * 1000}, {"beta_schedule": "squaredcos_cap_v2"},
                                 {"prediction_type": "sample"}, {"rescale_betas_zero_snr": True}])
def test_config_unsupported(bad):
    with pytest.raises(UnsupportedModelError):
        SchedulerConfig.from_diffusers({**SD15_PNDM, **bad})


def test_config_errors_list_supported():
    with pytest.raises(UnsupportedModelError, match="scaled_linear, linear"):
        SchedulerConfig(beta_schedule="cosine")
    with pytest.raises(UnsupportedModelError, match="epsilon, v_prediction"):
        SchedulerConfig(prediction_type="x0")
    with pytest.raises(UnsupportedModelError, match="leading, trailing, linspace"):
        SchedulerConfig(timestep_spacing="karras")


@pytest.mark.parametrize("steps,eta", [(0, 0.0), (1001, 0.0), (20, -0.1), (20, math.nan), (20, math.inf),
                                       (20.0, 0.0), (1000, 0.0), (20, 1.5)])
def test_invalid_inputs(steps, eta):
    # 1000 'leading' steps with steps_offset 1 would reach t=1000, past the trained range.
    with pytest.raises(InvalidInputError):
        ddim_schedule(SchedulerConfig(), steps, eta=eta)


def test_range_edges():
    assert ddim_schedule(SchedulerConfig(), 1).num_steps == 1
    assert ddim_schedule(SchedulerConfig(), 999).timesteps[0] == 999
    assert ddim_schedule(SchedulerConfig(timestep_spacing="trailing"), 1000).num_steps == 1000


def test_noise_coefficients():
    s0 = ddim_schedule(SchedulerConfig(), 20, eta=0.0)
    assert s0.coefficients.dtype == np.float32 and s0.coefficients.shape == (20, 3)
    assert np.all(s0.coefficients[:, 2] == 0) and not s0.needs_noise
    assert s0.init_noise_sigma == 1.0
    s1 = ddim_schedule(SchedulerConfig(), 20, eta=1.0)
    assert s1.needs_noise and np.all(s1.coefficients[:-1, 2] > 0)
    s1_one = ddim_schedule(SchedulerConfig(set_alpha_to_one=True), 20, eta=1.0)
    assert s1_one.coefficients[-1, 2] == 0
