"""Which diffusers scheduler class each sampler is, and that class's defaults for the keys a config may lack.

`resolve(cfg, class_name, **overrides)` is what `SamplerClass.from_config(config, **overrides)` would set:
the config's value where it has one (not None), else the class's own `__init__` default. Keys a class does not
take are absent from its namespace (diffusers ignores them too), except sigma_min and sigma_max: diffusers keeps
a config's unknown keys in `.config`, and every `_convert_to_karras` reads those two from there, so they bound
the Karras sigmas of Heun and DPM-Solver as well, although neither class takes them as arguments. tests/test_samplers.py checks these defaults
against the classes' signatures.
"""

from __future__ import annotations

from dataclasses import fields
from types import SimpleNamespace

from ..schedulers import SchedulerConfig

_BASE = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
         "prediction_type": "epsilon", "steps_offset": 0}

CLASS_DEFAULTS: dict[str, dict] = {
    "DDIMScheduler": dict(_BASE, clip_sample=True, set_alpha_to_one=True, timestep_spacing="leading",
                          rescale_betas_zero_snr=False),
    "DDPMScheduler": dict(_BASE, variance_type="fixed_small", clip_sample=True, timestep_spacing="leading",
                          rescale_betas_zero_snr=False),
    "EulerDiscreteScheduler": dict(_BASE, interpolation_type="linear", use_karras_sigmas=False, sigma_min=None,
                                   sigma_max=None, timestep_spacing="linspace", timestep_type="discrete",
                                   rescale_betas_zero_snr=False, final_sigmas_type="zero"),
    "EulerAncestralDiscreteScheduler": dict(_BASE, timestep_spacing="linspace", rescale_betas_zero_snr=False),
    "HeunDiscreteScheduler": dict(_BASE, beta_start=0.00085, beta_end=0.012, use_karras_sigmas=False,
                                  clip_sample=False, timestep_spacing="linspace", sigma_min=None, sigma_max=None),
    "DPMSolverMultistepScheduler": dict(_BASE, solver_order=2, algorithm_type="dpmsolver++", solver_type="midpoint",
                                        lower_order_final=True, euler_at_final=False, use_karras_sigmas=False,
                                        final_sigmas_type="zero", lambda_min_clipped=-float("inf"),
                                        variance_type=None, timestep_spacing="linspace",
                                        rescale_betas_zero_snr=False, sigma_min=None, sigma_max=None),
    "UniPCMultistepScheduler": dict(_BASE, solver_order=2, predict_x0=True, solver_type="bh2",
                                    lower_order_final=True, disable_corrector=(), use_karras_sigmas=False,
                                    timestep_spacing="linspace", final_sigmas_type="zero",
                                    rescale_betas_zero_snr=False, sigma_min=None, sigma_max=None),
    "PNDMScheduler": dict(_BASE, skip_prk_steps=False, set_alpha_to_one=False, timestep_spacing="leading"),
    "LCMScheduler": dict(_BASE, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         original_inference_steps=50, clip_sample=False, set_alpha_to_one=True,
                         timestep_spacing="leading", timestep_scaling=10.0, rescale_betas_zero_snr=False),
}

# Config values a class rewrites in its __init__ (diffusers maps the other solver family's names to its own).
_SOLVER_TYPE_MAP = {
    "DPMSolverMultistepScheduler": {"logrho": "midpoint", "bh1": "midpoint", "bh2": "midpoint"},
    "UniPCMultistepScheduler": {"midpoint": "bh2", "heun": "bh2", "logrho": "bh2"},
}
_ALGORITHM_MAP = {"deis": "dpmsolver++"}

_CONFIG_KEYS = {f.name for f in fields(SchedulerConfig)}


def resolve(cfg: SchedulerConfig, class_name: str, **overrides) -> SimpleNamespace:
    """The settings `class_name.from_config(cfg, **overrides)` runs with, for the keys sdengine reads."""
    out = {}
    for key, default in CLASS_DEFAULTS[class_name].items():
        value = getattr(cfg, key) if key in _CONFIG_KEYS else None
        out[key] = default if value is None else value
    for key, value in overrides.items():
        if key not in CLASS_DEFAULTS[class_name]:
            raise KeyError(f"{class_name} has no setting {key}")
        out[key] = value
    if "solver_type" in out:
        out["solver_type"] = _SOLVER_TYPE_MAP[class_name].get(out["solver_type"], out["solver_type"])
    if "algorithm_type" in out:
        out["algorithm_type"] = _ALGORITHM_MAP.get(out["algorithm_type"], out["algorithm_type"])
    return SimpleNamespace(**out)
