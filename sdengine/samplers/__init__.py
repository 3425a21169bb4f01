"""Samplers as coefficient tables (DESIGN.md, "Samplers as tables, the step as a graph").

`build_schedule(cfg, name, steps, eta)` gives the table of one sampler run: for each model evaluation the
timestep fed to the U-Net and the coefficients of `state' = A state + b m + c z` (table.py). Each sampler is
diffusers' scheduler class of the same name run on symbolic latents (linear.py), so the table equals
`SamplerClass.from_config(config)` on the same scheduler config: the same timesteps, sigmas and trajectory
(tests/test_samplers.py). numpy only: the torch-free runtime imports this.

| name                 | diffusers class (from_config overrides)                              | slots | rows   |
|----------------------|-----------------------------------------------------------------------|-------|--------|
| ddim                 | DDIMScheduler (eta: Song et al. 2020, eq. 16)                         | 1     | N      |
| ddpm                 | DDPMScheduler                                                         | 1     | N      |
| euler[_karras]       | EulerDiscreteScheduler                                                | 1     | N      |
| euler_a              | EulerAncestralDiscreteScheduler                                       | 1     | N      |
| heun[_karras]        | HeunDiscreteScheduler                                                 | 2     | 2N - 1 |
| dpmpp_2m[_karras]    | DPMSolverMultistepScheduler (algorithm_type dpmsolver++, order 2)     | 2     | N      |
| dpmpp_2m_sde[_karras]| DPMSolverMultistepScheduler (algorithm_type sde-dpmsolver++, order 2) | 2     | N      |
| unipc[_karras]       | UniPCMultistepScheduler (slots: solver_order + 1; default order 2)    | 3     | N      |
| pndm                 | PNDMScheduler (skip_prk_steps: PLMS)                                  | 4     | N + 1  |
| lcm                  | LCMScheduler                                                          | 1     | N      |

Slot 0 is the variance-preserving latent the U-Net reads; after the last row it is the sample diffusers' loop
ends with (what its pipeline decodes; LCM: the last `denoised`). Where diffusers itself breaks, the table does
not follow it: trailing spacing that numpy's arange stretches to n + 1 timesteps (the last one -1) runs the n
asked; a repeated first timestep (Karras sigmas on zero-SNR configs) starts at the first row, not the second;
steps that would be NaN in diffusers (two rows at one level, 0 * inf at sigma 0) are refused with a message.

Image to image and inpainting (`strength` < 1; tests/test_sampler_strength.py): the table is the tail diffusers'
img2img and inpaint pipelines run, timesteps[t_start * order:] with t_start = N - int(N * strength), after
set_begin_index there, from the state set_timesteps leaves (DPM-Solver and UniPC start their warm-up afresh;
lower_order_final still counts from the end of all N steps). `Schedule.levels` gives add_noise's level at the
start and after each row (table.py). Every row reads slot 0 as diffusers' step reads its `sample` and keeps
what the scheduler stores in other slots, so the inpainting blend of slot 0 is followed exactly. Followed as
diffusers does it, though not what one might expect: PNDMScheduler (PLMS) has no set_begin_index and counts its
calls, so at strength < 1 its warm-up pair lands on the wrong timesteps of the sliced list and every later row
assumes a level one step off its input's; DDIM and PLMS step to t - T//N, so with trailing or linspace spacing
(N not dividing T) slot 0 after a row is not at the next row's level, which the blend uses; and diffusers'
StableDiffusionImg2ImgPipeline slices LCM's N-step schedule rather than calling LCMScheduler.set_timesteps with
its strength (as LatentConsistencyModelImg2ImgPipeline does), which the table follows too.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from ..errors import InvalidInputError
from ..schedulers import SchedulerConfig
from . import multistep, sigma, vp
from .classes import resolve
from .table import Schedule, row_width

__all__ = ["SLOTS_MAX", "Sampler", "Schedule", "build_schedule", "canonical_name", "row_width", "sampler",
           "sampler_names"]

SLOTS_MAX = 4
"""The most state slots any sampler needs: PLMS (x and three earlier model outputs); UniPC 3 (at solver_order 3: 4)."""


@dataclass(frozen=True)
class Sampler:
    """One sampler: its names, the diffusers class it equals and the from_config overrides that make it so."""

    name: str                  # canonical, e.g. "dpmpp_2m_karras"
    label: str                 # A1111's display name, e.g. "DPM++ 2M Karras"
    class_name: str            # diffusers class
    overrides: tuple = ()      # (key, value) pairs given to from_config
    slots: int = 1
    karras: str | None = None  # the Karras variant's name, where the class takes use_karras_sigmas

    @property
    def from_config_kwargs(self) -> dict:
        return dict(self.overrides)


def _family(name: str, label: str, class_name: str, slots: int, karras: bool, overrides: tuple = ()
            ) -> list[Sampler]:
    if not karras:
        return [Sampler(name, label, class_name, overrides, slots)]
    kname = f"{name}_karras"
    return [Sampler(name, label, class_name, overrides, slots, karras=kname),
            Sampler(kname, f"{label} Karras", class_name, overrides + (("use_karras_sigmas", True),), slots,
                    karras=kname)]


_DPM2 = (("algorithm_type", "dpmsolver++"), ("solver_order", 2))
_DPM2_SDE = (("algorithm_type", "sde-dpmsolver++"), ("solver_order", 2))
_SAMPLERS: dict[str, Sampler] = {s.name: s for s in [
    *_family("ddim", "DDIM", "DDIMScheduler", 1, False),
    *_family("ddpm", "DDPM", "DDPMScheduler", 1, False),
    *_family("euler", "Euler", "EulerDiscreteScheduler", 1, True),
    *_family("euler_a", "Euler a", "EulerAncestralDiscreteScheduler", 1, False),
    *_family("heun", "Heun", "HeunDiscreteScheduler", 2, True),
    *_family("dpmpp_2m", "DPM++ 2M", "DPMSolverMultistepScheduler", 2, True, _DPM2),
    *_family("dpmpp_2m_sde", "DPM++ 2M SDE", "DPMSolverMultistepScheduler", 2, True, _DPM2_SDE),
    *_family("unipc", "UniPC", "UniPCMultistepScheduler", 3, True),
    *_family("pndm", "PLMS", "PNDMScheduler", 4, False, (("skip_prk_steps", True),)),
    *_family("lcm", "LCM", "LCMScheduler", 1, False),
]}

# Other spellings (after _normalize: lower case, runs of space/-/_ as one _, "++" as "pp"): A1111's labels mostly
# normalize to the canonical names already ("DPM++ 2M Karras" -> dpmpp_2m_karras, "Euler a" -> euler_a).
_ALIASES = {
    "plms": "pndm", "euler_ancestral": "euler_a", "k_euler": "euler", "k_euler_a": "euler_a",
    "k_euler_ancestral": "euler_a", "k_heun": "heun", "k_dpmpp_2m": "dpmpp_2m",
    "ddimscheduler": "ddim", "ddpmscheduler": "ddpm", "eulerdiscretescheduler": "euler",
    "eulerancestraldiscretescheduler": "euler_a", "heundiscretescheduler": "heun",
    "dpmsolvermultistepscheduler": "dpmpp_2m", "unipcmultistepscheduler": "unipc", "pndmscheduler": "pndm",
    "lcmscheduler": "lcm",
}


def _normalize(name: str) -> str:
    return re.sub(r"[\s\-_]+", "_", name.strip().lower()).replace("++", "pp")


def sampler_names() -> tuple[str, ...]:
    """The canonical sampler names, in a stable order."""
    return tuple(_SAMPLERS)


def canonical_name(name: str) -> str:
    """The canonical name of a sampler name or alias (A1111 label, diffusers class name), case-insensitively."""
    key = _normalize(name) if isinstance(name, str) else ""
    key = _ALIASES.get(key, key)
    if key not in _SAMPLERS:
        raise InvalidInputError(f"unknown sampler {name!r}; choose one of: {', '.join(_SAMPLERS)} "
                                "(A1111 names such as 'DPM++ 2M Karras' or 'Euler a' work too)")
    return key


def sampler(name: str) -> Sampler:
    """The Sampler record of a name or alias."""
    return _SAMPLERS[canonical_name(name)]


def _check_steps(steps, T: int) -> int:
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or not 1 <= steps <= T:
        raise InvalidInputError(f"num_inference_steps must be an integer in [1, {T}] (the model's "
                                f"num_train_timesteps), got {steps!r}")
    return int(steps)


def _check_eta(eta, info: Sampler) -> float:
    if isinstance(eta, bool) or not isinstance(eta, (int, float, np.floating, np.integer)) or not math.isfinite(eta) \
            or eta < 0:
        raise InvalidInputError(f"eta must be a finite number >= 0 (DDIM's noise: 0 deterministic, 1 DDPM's), "
                                f"got {eta!r}")
    if eta != 0 and info.class_name != "DDIMScheduler":
        raise InvalidInputError(f"eta is DDIM's setting (Song et al. 2020); {info.label} takes none: leave eta at 0 "
                                "or use the ddim sampler")
    return float(eta)


def _check_strength(strength, n: int) -> int:
    """diffusers' img2img get_timesteps: t_start = N - min(int(N * strength), N); refused where no step runs."""
    if isinstance(strength, bool) or not isinstance(strength, (int, float, np.floating, np.integer)) \
            or not math.isfinite(strength) or not 0 < strength <= 1:
        raise InvalidInputError(f"strength must be a number in (0, 1] (the part of the {n} steps that runs on the "
                                f"noised image; 1: all of them), got {strength!r}")
    init = min(int(n * float(strength)), n)
    if init == 0:
        smallest = 1.0 / n
        while int(n * smallest) < 1:  # 1/N * N can round below 1
            smallest = float(np.nextafter(smallest, 2.0))
        raise InvalidInputError(f"strength {float(strength)!r} runs none of the {n} steps (int({n} * strength) = 0); "
                                f"the smallest strength that runs one step is {smallest!r} (1/{n}), or raise the "
                                "step count")
    return n - init


def build_schedule(cfg: SchedulerConfig, name: str, steps: int, eta: float = 0.0, strength: float = 1.0
                   ) -> Schedule:
    """The coefficient table of sampler `name` for `steps` inference steps on a model with scheduler config `cfg`.

    Equals diffusers' `SamplerClass.from_config(cfg)` run for `steps` steps, including the class's own defaults
    for keys the config lacks and `use_karras_sigmas` when the config sets it. Raises InvalidInputError for an
    unknown name, a step count, eta or strength this sampler cannot take, or a config setting it cannot honour.

    strength < 1 (image to image, inpainting): the rows diffusers' img2img and inpaint pipelines run, the
    timesteps from t_start * order on (t_start = N - int(N * strength)) after set_begin_index there, with the
    scheduler's state as set_timesteps leaves it; `levels` says where add_noise puts the image (table.py).
    """
    info = sampler(name)
    n = _check_steps(steps, cfg.num_train_timesteps)
    eta = _check_eta(eta, info)
    t_start = _check_strength(strength, n)
    if cfg.use_karras_sigmas and info.karras and info.name != info.karras:  # as from_config would
        info = _SAMPLERS[info.karras]
    s = resolve(cfg, info.class_name, **info.from_config_kwargs)
    if getattr(s, "clip_sample", False) and cfg.clip_sample is not None:
        # diffusers would clamp x0 to [-1, 1]: not linear. A config without the key is taken as False, as
        # diffusers' Stable Diffusion pipelines force it (their __init__ rewrites clip_sample=True to False).
        raise InvalidInputError(f"the scheduler config sets clip_sample=true, which {info.label} would apply to x0 "
                                "(not a linear step); set it false in scheduler/scheduler_config.json")
    karras = info.name.endswith("_karras")
    slots = info.slots
    start = t_start * (2 if info.class_name == "HeunDiscreteScheduler" else 1)  # * scheduler.order
    try:
        with np.errstate(all="ignore"):  # a non-finite coefficient is refused by the builder, with a message
            b, init, slots = _run(info, s, n, eta, karras, slots, start)
    except (ZeroDivisionError, OverflowError) as exc:  # e.g. two rows at the same level: h = 0 in DPM-Solver
        raise InvalidInputError(f"{n} steps of {info.label} with this scheduler config give coinciding noise levels "
                                f"({exc}); use fewer steps") from None
    timesteps, rows, levels = b.table()
    return Schedule(info.name, timesteps, rows, slots, s.prediction_type, n, float(init), eta, info.label,
                    float(strength), t_start, levels=levels)


def _run(info: Sampler, s, n: int, eta: float, karras: bool, slots: int, start: int):
    """(builder, init_scale, slots) of one sampler run from row `start` of diffusers' timesteps."""
    kind = info.class_name
    if kind == "DDIMScheduler":
        return (*vp.ddim(s, n, eta, start), slots)
    if kind == "DDPMScheduler":
        return (*vp.ddpm(s, n, start), slots)
    if kind == "PNDMScheduler":
        return (*vp.plms(s, n, start), slots)
    if kind == "LCMScheduler":
        return (*vp.lcm(s, n, start), slots)
    if kind == "EulerDiscreteScheduler":
        return (*sigma.euler(s, n, karras, start), slots)
    if kind == "EulerAncestralDiscreteScheduler":
        return (*sigma.euler_ancestral(s, n, start), slots)
    if kind == "HeunDiscreteScheduler":
        return (*sigma.heun(s, n, karras, start), slots)
    if kind == "DPMSolverMultistepScheduler":
        return (*multistep.dpmpp_2m(s, n, karras, sde=info.name.startswith("dpmpp_2m_sde"), start=start), slots)
    return multistep.unipc(s, n, karras, start)
