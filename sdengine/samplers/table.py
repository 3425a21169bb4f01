"""A sampler as a table: one row per model evaluation, `state' = A state + b m + c z` (DESIGN.md).

The state is S slots of latent shape, [S, B, C, h, w]: slot 0 is the latent the U-Net reads, the other
slots hold what a multistep sampler remembers (earlier model outputs or x0 predictions, the sample
before a predictor step). `m` is the guided model output (eps or v: the prediction type is folded into
the coefficients), `z` the row's unit Gaussian noise. Everything is in the variance-preserving latent
space x = sqrt(abar) x0 + sqrt(1 - abar) eps, where Euler's scale_model_input and init_noise_sigma are
a change of variable and disappear. numpy only: the torch-free runtime imports this.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

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
    steps: int                # num_inference_steps as asked (Heun runs 2N-1 rows, PLMS N+1)
    init_scale: float = 1.0   # initial VP latent = init_scale * unit Gaussian (diffusers' init_noise_sigma)
    eta: float = 0.0
    label: str = ""           # A1111's display name, for the images' metadata

    def __post_init__(self) -> None:
        r = self.timesteps.shape[0]
        if self.coefficients.shape != (r, row_width(self.slots)):
            raise ValueError(f"coefficients {self.coefficients.shape} do not fit {r} rows of {self.slots} slots")

    @property
    def num_rows(self) -> int:
        """Model evaluations (rows of the table)."""
        return int(self.timesteps.shape[0])

    @property
    def num_steps(self) -> int:
        """Rows of the table: the loop length every backend runs (kept for the DDIM-era callers)."""
        return self.num_rows

    @property
    def needs_noise(self) -> bool:
        """Whether any row draws fresh noise (c != 0 somewhere)."""
        _, _, c = self.matrices()
        return bool(np.any(c != 0))

    def matrices(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A [R, S, S], b [R, S], c [R, S]."""
        s, rows = self.slots, self.coefficients
        return rows[:, : s * s].reshape(-1, s, s), rows[:, s * s: s * s + s], rows[:, s * s + s:]

    def padded(self, slots: int) -> "Schedule":
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

    def initial_state(self, noise: np.ndarray) -> np.ndarray:
        """[S, *noise.shape]: slot 0 = init_scale * unit noise, the history slots zero."""
        state = np.zeros((self.slots, *noise.shape), np.float32)
        state[0] = self.init_scale * noise
        return state


def fit_slots(schedule: Schedule, slots: int, hint: str) -> Schedule:
    """`schedule` padded to a graph's S slots; InvalidInputError naming the sampler when it needs more.

    `hint` says how to get a graph with enough slots; "{slots}" in it stands for the number needed.
    """
    if schedule.slots > slots:
        raise InvalidInputError(f"the {schedule.label or schedule.name} sampler needs {schedule.slots} state slots "
                                f"and this graph has {slots}; {hint.format(slots=schedule.slots)}")
    return schedule.padded(slots)
