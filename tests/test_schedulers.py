"""SchedulerConfig and the DDIM table against diffusers' DDIMScheduler as an independent oracle.

The other samplers are checked the same way in tests/test_samplers.py.
"""

import dataclasses
import math

import numpy as np
import pytest

from sdengine.errors import InvalidInputError, UnsupportedModelError
from sdengine.samplers import build_schedule
from sdengine.schedulers import SchedulerConfig, alphas_cumprod, ddim_schedule

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
DDIMScheduler = diffusers.DDIMScheduler

SD15 = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
            set_alpha_to_one=False, clip_sample=False, timestep_spacing="leading")
SD15_PNDM = {"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
             "beta_start": 0.00085, "num_train_timesteps": 1000, "set_alpha_to_one": False,
             "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None, "clip_sample": False}

# Measured max |x_ours - x_diffusers| / max |x_diffusers| after 20 steps (the table is computed in float64 from
# diffusers' own float32 alphas_cumprod, then rounded to float32; the state is float32), seed 0:
# eps/eta0 3.2e-7, eps/eta1 3.8e-7, v/eta0 4.5e-7, v/eta1 3.6e-7, trailing/eta0.5 3.7e-7 (seed 1);
# trailing v eta 0.5, 20 and 7 steps, worst over seeds 0-9: 7.4e-7.
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
    sched = build_schedule(SchedulerConfig.from_diffusers(ref.config), "ddim", steps, eta=eta)
    np.testing.assert_array_equal(sched.timesteps, ref.timesteps.numpy())

    x_ref = torch.from_numpy(x0.copy())
    for i, t in enumerate(ref.timesteps):
        m = torch.from_numpy(fake_model(x_ref.numpy(), int(t), fixed).astype(np.float32))
        x_ref = ref.step(m, t, x_ref, eta=eta, variance_noise=torch.from_numpy(noises[i])).prev_sample

    state = sched.initial_state(x0)
    for i, t in enumerate(sched.timesteps):
        state = sched.step(i, state, fake_model(state[0], int(t), fixed).astype(np.float32), noises[i])
    assert state.dtype == np.float32
    x_ref = x_ref.numpy()
    return float(np.abs(state[0] - x_ref).max() / np.abs(x_ref).max())


@pytest.mark.parametrize("spacing,steps", [("leading", 20), ("leading", 50), ("trailing", 20),
                                           ("linspace", 20), ("trailing", 7), ("linspace", 7),
                                           ("leading", 7), ("trailing", 1), ("linspace", 1)])
def test_timesteps_match_diffusers(spacing, steps):
    ref = oracle(timestep_spacing=spacing)
    ref.set_timesteps(steps)
    s = build_schedule(SchedulerConfig.from_diffusers(ref.config), "ddim", steps)
    assert s.num_rows == steps and s.slots == 1 and s.name == "ddim" and s.label == "DDIM"
    np.testing.assert_array_equal(s.timesteps, ref.timesteps.numpy())
    assert np.all(np.diff(s.timesteps) < 0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_trajectory_matches_diffusers(prediction_type, eta):
    rel = run_both({"prediction_type": prediction_type}, 20, eta)
    print(f"parity ddim {prediction_type} eta {eta}: {rel:.2e}")
    assert rel < REL_TOL, rel


@pytest.mark.parametrize("seed", range(10))
def test_trailing_trajectory_matches_diffusers(seed):
    # 7 does not divide 1000: diffusers steps from t to t - 1000 // 7 (not to the next trailing timestep); so do we
    for steps in (20, 7):
        rel = run_both({"timestep_spacing": "trailing", "prediction_type": "v_prediction"}, steps, 0.5, seed=seed)
        assert rel < REL_TOL, rel


def test_alphas_cumprod_linear_scaled_linear_cosine_zero_snr():
    for kw in ({"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02}, {},
               {"beta_schedule": "squaredcos_cap_v2"}, {"rescale_betas_zero_snr": True}):
        ours = alphas_cumprod(SchedulerConfig(**kw))
        assert ours.dtype == np.float64 and ours.shape == (1000,)
        ref = oracle(**kw).alphas_cumprod.double().numpy()  # float32 in diffusers
        # measured max rel 9.3e-7 (scaled_linear), 2.4e-5 (zero SNR: at abar ~ 1e-5, float32 cancellation there)
        np.testing.assert_allclose(ours, ref, rtol=5e-6 if not kw.get("rescale_betas_zero_snr") else 1e-4,
                                   atol=1e-9)
    assert alphas_cumprod(SchedulerConfig(rescale_betas_zero_snr=True))[-1] == 0.0


def test_config_from_diffusers_keeps_what_the_file_says():
    sd15 = SchedulerConfig.from_diffusers(SD15_PNDM)
    assert sd15 == SchedulerConfig()  # the defaults are SD 1.5's file
    assert sd15.timestep_spacing is None and sd15.rescale_betas_zero_snr is None  # not in the file
    ddim = SchedulerConfig.from_diffusers(oracle().config)  # a full DDIMScheduler config
    assert ddim.timestep_spacing == "leading" and ddim.rescale_betas_zero_snr is False
    v = oracle(prediction_type="v_prediction", timestep_spacing="trailing")
    got = SchedulerConfig.from_diffusers(v.config)
    assert got.prediction_type == "v_prediction" and got.timestep_spacing == "trailing"
    bare = SchedulerConfig.from_diffusers({})
    assert bare.num_train_timesteps == 1000 and bare.prediction_type == "epsilon"
    assert bare.beta_start is None and bare.steps_offset is None and bare.set_alpha_to_one is None
    lcm = SchedulerConfig.from_diffusers({"original_inference_steps": 50, "timestep_scaling": 10, "steps_offset": 1.0,
                                          "disable_corrector": [1, 2]})
    assert lcm.original_inference_steps == 50 and lcm.timestep_scaling == 10.0 and lcm.steps_offset == 1
    assert lcm.disable_corrector == (1, 2)


def test_config_asdict_round_trip():
    cfg = SchedulerConfig.from_diffusers({**SD15_PNDM, "disable_corrector": [0], "use_karras_sigmas": True,
                                          "prediction_type": "v_prediction"})
    assert SchedulerConfig(**dataclasses.asdict(cfg)) == cfg
    assert dataclasses.replace(cfg, prediction_type="epsilon").prediction_type == "epsilon"


def test_config_to_diffusers_round_trip():
    cfg = SchedulerConfig(prediction_type="v_prediction", timestep_spacing="linspace", steps_offset=0)
    d = cfg.to_diffusers()
    ref = DDIMScheduler.from_config(d)
    assert ref.config.clip_sample is False and ref.config.timestep_spacing == "linspace"
    assert SchedulerConfig.from_diffusers(d) == cfg
    full = SchedulerConfig.from_diffusers(ref.config)  # now with every DDIM key: the same DDIM schedule
    np.testing.assert_array_equal(build_schedule(full, "ddim", 20).coefficients,
                                  build_schedule(cfg, "ddim", 20).coefficients)


@pytest.mark.parametrize("bad", [{"trained_betas": [0.1] * 1000}, {"beta_schedule": "sigmoid"},
                                 {"prediction_type": "sample"}, {"thresholding": True},
                                 {"use_exponential_sigmas": True}, {"steps_offset": -1}])
def test_config_unsupported(bad):
    with pytest.raises(UnsupportedModelError):
        SchedulerConfig.from_diffusers({**SD15_PNDM, **bad})


def test_config_errors_list_supported():
    with pytest.raises(UnsupportedModelError, match="scaled_linear, linear, squaredcos_cap_v2"):
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
        build_schedule(SchedulerConfig(), "ddim", steps, eta=eta)


def test_range_edges():
    assert build_schedule(SchedulerConfig(), "ddim", 1).num_rows == 1
    assert build_schedule(SchedulerConfig(), "ddim", 999).timesteps[0] == 999
    assert build_schedule(SchedulerConfig(timestep_spacing="trailing"), "ddim", 1000).num_rows == 1000


def test_noise_coefficients():
    s0 = build_schedule(SchedulerConfig(), "ddim", 20, eta=0.0)
    assert s0.coefficients.dtype == np.float32 and s0.coefficients.shape == (20, 3)
    c = s0.matrices()[2]
    assert np.all(c == 0) and not s0.needs_noise and s0.init_scale == 1.0
    s1 = build_schedule(SchedulerConfig(), "ddim", 20, eta=1.0)
    c1 = s1.matrices()[2][:, 0]
    assert s1.needs_noise and np.all(c1[:-1] > 0)
    s1_one = build_schedule(SchedulerConfig(set_alpha_to_one=True), "ddim", 20, eta=1.0)
    assert s1_one.matrices()[2][-1, 0] == 0


def test_legacy_ddim_schedule_still_works():
    """ddim_schedule (3 coefficients per step) stays until its callers have moved; for 'leading' spacing it is
    the same DDIM as build_schedule."""
    old = ddim_schedule(SchedulerConfig(), 20, eta=0.5)
    new = build_schedule(SchedulerConfig(), "ddim", 20, eta=0.5)
    np.testing.assert_array_equal(old.timesteps, new.timesteps)
    np.testing.assert_allclose(old.coefficients, new.coefficients, rtol=1e-5, atol=1e-6)
