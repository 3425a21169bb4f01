"""A sampler as a table: one row per model evaluation, `state' = A state + b m + c z` (DESIGN.md).

The state is S slots of latent shape, [S, B, C, h, w]: slot 0 is the latent the U-Net reads, the other
slots hold what a multistep sampler remembers (earlier model outputs or x0 predictions, the sample
before a predictor step). `m` is the guided model output (eps or v: the prediction type is folded into
the coefficients), `z` the row's unit Gaussian noise. Everything is in the variance-preserving latent
space x = sqrt(abar) x0 + sqrt(1 - abar) eps, where Euler's scale_model_input and init_noise_sigma are
a change of variable and disappear.

Image to image and inpainting (diffusers' StableDiffusionImg2ImgPipeline / StableDiffusionInpaintPipeline with
a 4-channel U-Net): `levels` [R + 1, 2] holds the VP (alpha, sigma) of diffusers' `scheduler.add_noise` at each
point of the loop, so that alpha * x0 + sigma * noise is what it computes there, in VP space:

    img2img start:            state = initial_state(noise, x0)       slot 0 = levels[0] . (x0, noise)
    inpainting, after row i:  slot 0 = mask * slot 0 + (1 - mask) * (levels[i+1, 0] x0 + levels[i+1, 1] noise)

(mask 1 where the image is repainted, as diffusers' mask; levels[R] = (1, 0): the clean image latents after the
last row). A row reads slot 0 where diffusers' step reads its `sample` argument and the other slots where it
reads what the scheduler stored (linear.py), so a blended slot 0 is followed as diffusers follows its blended
latents. numpy only: the torch-free runtime imports this.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from ..errors import InvalidInputError


def row_width(slots: int) -> int:
    """Floats in one coefficient row: A (S x S, row-major), then b (S), then c (S)."""
    return slots * (slots + 2)


@dataclass(frozen=True)
class Schedule:
    """Per-row timesteps [R] and coefficient rows [R, S(S+2)] of one sampler run (R model evaluations)."""

    name: str                 # canonical sampler name, e.g. "dpmpp_2m_karras"
    timesteps: np.ndarray     # [R] float64: what the U-Net is fed at each row (fractional for sigma samplers)
    coefficients: np.ndarray  # [R, S(S+2)] float32: A row-major, b, c
    slots: int                # S
    prediction_type: str      # "epsilon" or "v_prediction" (already folded into the rows)
    steps: int                # num_inference_steps as asked (Heun runs 2N-1 rows, PLMS N+1, at strength 1)
    init_scale: float = 1.0   # text to image: initial VP latent = init_scale * unit Gaussian (init_noise_sigma)
    eta: float = 0.0
    label: str = ""           # A1111's display name, for the images' metadata
    strength: float = 1.0     # img2img/inpainting strength in (0, 1]; 1: every step runs
    start_step: int = 0       # diffusers' t_start: inference steps skipped, N - int(N * strength)
    # [R + 1, 2] float64: VP (alpha, sigma) of diffusers' add_noise before row 0 (levels[0]: the img2img start)
    # and after each row i (levels[i + 1]: the inpainting blend; levels[R] = (1, 0), the clean image)
    levels: np.ndarray = field(kw_only=True)

    def __post_init__(self) -> None:
        r = self.timesteps.shape[0]
        if self.coefficients.shape != (r, row_width(self.slots)):
            raise ValueError(f"coefficients {self.coefficients.shape} do not fit {r} rows of {self.slots} slots")
        if self.levels.shape != (r + 1, 2) or self.levels.dtype != np.float64:
            raise ValueError(f"levels {self.levels.shape} {self.levels.dtype} do not fit {r} rows: [R + 1, 2] "
                             "float64")

    @property
    def num_rows(self) -> int:
        """Model evaluations (rows of the table)."""
        return int(self.timesteps.shape[0])

    @property
    def num_steps(self) -> int:
        """Rows of the table: the loop length every backend runs (kept for the DDIM-era callers)."""
        return self.num_rows

    @property
    def steps_run(self) -> int:
        """Inference steps that run: steps - start_step (diffusers' img2img get_timesteps' second value)."""
        return self.steps - self.start_step

    @property
    def needs_noise(self) -> bool:
        """Whether any row draws fresh noise (c != 0 somewhere)."""
        _, _, c = self.matrices()
        return bool(np.any(c != 0))

    def matrices(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A [R, S, S], b [R, S], c [R, S]."""
        s, rows = self.slots, self.coefficients
        return rows[:, : s * s].reshape(-1, s, s), rows[:, s * s: s * s + s], rows[:, s * s + s:]

    def padded(self, slots: int) -> Schedule:
        """The same sampler over a larger state (extra slots stay zero): for graphs exported with S slots."""
        if slots < self.slots:
            raise ValueError(f"{self.name} needs {self.slots} state slots; {slots} given")
        if slots == self.slots:
            return self
        a, b, c = self.matrices()
        r = self.num_rows
        big = np.zeros((r, slots, slots), np.float32)
        big[:, : self.slots, : self.slots] = a
        pad = np.zeros((r, slots - self.slots), np.float32)
        rows = np.concatenate([big.reshape(r, -1), b, pad, c, pad], axis=1).astype(np.float32)
        return replace(self, coefficients=rows, slots=slots)

    def step(self, i: int, state: np.ndarray, m: np.ndarray, z: np.ndarray | None = None) -> np.ndarray:
        """Row i applied to a numpy state [S, ...] (the reference of what every graph computes), float32."""
        a, b, c = (x[i] for x in self.matrices())
        flat = state.reshape(self.slots, -1)
        out = a @ flat + b[:, None] * m.reshape(1, -1)
        if z is not None:
            out = out + c[:, None] * z.reshape(1, -1)
        return out.reshape(state.shape).astype(np.float32)

    def initial_state(self, noise: np.ndarray, image: np.ndarray | None = None) -> np.ndarray:
        """[S, *noise.shape]: the history slots zero, slot 0 = init_scale * unit noise (text to image) or, given
        the image latents x0, levels[0, 0] * x0 + levels[0, 1] * noise (img2img: diffusers' add_noise at the
        first timestep that runs)."""
        state = np.zeros((self.slots, *noise.shape), np.float32)
        state[0] = self.init_scale * noise if image is None else self.noised(0, image, noise)
        return state

    def noised(self, j: int, image: np.ndarray, noise: np.ndarray) -> np.ndarray:
        """levels[j, 0] * image + levels[j, 1] * noise, float32: the known latent an inpainting blend uses after
        row j - 1 (j = num_rows: the clean image)."""
        alpha, sigma = (np.float32(v) for v in self.levels[j])
        return (alpha * image + sigma * noise).astype(np.float32)

    def blend(self, i: int, latent: np.ndarray, image: np.ndarray, noise: np.ndarray, mask: np.ndarray
              ) -> np.ndarray:
        """Slot 0 after row i as diffusers' 4-channel inpainting loop leaves it: mask * latent + (1 - mask) *
        noised(i + 1, image, noise), float32 (mask 1 where the image is repainted)."""
        mask = np.asarray(mask, np.float32)
        return (mask * latent + (1 - mask) * self.noised(i + 1, image, noise)).astype(np.float32)


def fit_slots(schedule: Schedule, slots: int, hint: str) -> Schedule:
    """`schedule` padded to a graph's S slots; InvalidInputError naming the sampler when it needs more.

    `hint` says how to get a graph with enough slots; "{slots}" in it stands for the number needed.
    """
    if schedule.slots > slots:
        raise InvalidInputError(f"the {schedule.label or schedule.name} sampler needs {schedule.slots} state slots "
                                f"and this graph has {slots}; {hint.format(slots=schedule.slots)}")
    return schedule.padded(slots)
