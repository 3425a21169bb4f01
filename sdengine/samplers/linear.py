"""Turning a sampler's loop into coefficient rows: latents as linear combinations, rows by solving for them.

Every latent-shaped quantity a linear sampler handles (the sample, x0 predictions, stored model outputs) is a
fixed linear combination of *atoms*: the initial latent, and each row's model output m_i, noise z_i and blend
p_i. `Lin` is such a combination (a float64 vector over the atoms). A sampler is written as diffusers runs it,
on `Lin`s instead of tensors: ask `TableBuilder.model(t, x, level)` for the model output at x (x must be the
state's slot 0, `TableBuilder.x`: the U-Net reads slot 0), `noise()` for the row's noise, and end the row with
`keep(next_x, *history)`.

`keep` then finds the row: the next state is S combinations of atoms; the coefficients on this row's m and z
are read off, and the rest must be a combination of the current state's slots, found by least squares and
checked to be exact. So a sampler only says *what* it remembers; *how* the slots map to one another falls
out, and a sampler that needed a quantity it did not keep fails here, not at sampling time.

Inpainting changes slot 0 between rows (diffusers' pipelines blend the `latents` they pass to the next `step`
with the noised known image), so after each row the builder adds a fresh atom p_i to slot 0: the slot is then
"anything", as the blended latent is, and a row can only use what diffusers' step uses, its `sample` argument
(slot 0, read afresh from `TableBuilder.x`) and what the scheduler stored (kept explicitly in other slots). A
sampler that recovered a stored quantity from slot 0 (exact without a blend, wrong with one) fails in `keep`.
numpy only.
"""

from __future__ import annotations

import numpy as np

from ..errors import InvalidInputError


class Lin:
    """A latent-shaped quantity as a linear combination of the atoms (float64 coefficients)."""

    __slots__ = ("c",)

    def __init__(self, c: np.ndarray):
        self.c = c

    def __add__(self, other: Lin | int) -> Lin:
        if isinstance(other, int) and other == 0:  # sum() starts at 0
            return self
        return Lin(self.c + other.c)

    __radd__ = __add__

    def __sub__(self, other: Lin) -> Lin:
        return Lin(self.c - other.c)

    def __neg__(self) -> Lin:
        return Lin(-self.c)

    def __mul__(self, k: float) -> Lin:
        return Lin(self.c * float(k))

    __rmul__ = __mul__

    def __truediv__(self, k: float) -> Lin:
        return Lin(self.c / float(k))


class TableBuilder:
    """Collects the rows of one sampler run: `model` opens a row, `keep` closes it."""

    def __init__(self, rows: int, slots: int):
        self.slots = slots
        self._atoms = 1 + 3 * rows  # x_init, then (m_i, z_i, p_i) per row
        self.state = [self._atom(0)] + [self.zero() for _ in range(slots - 1)]
        self.timesteps: list[float] = []
        self.levels: list[tuple[float, float]] = []
        self.rows: list[np.ndarray] = []
        self._m: int | None = None
        self._z: int | None = None

    def _atom(self, k: int) -> Lin:
        c = np.zeros(self._atoms)
        c[k] = 1.0
        return Lin(c)

    def zero(self) -> Lin:
        return Lin(np.zeros(self._atoms))

    @property
    def x(self) -> Lin:
        """Slot 0 now: the latent the next row's U-Net reads and diffusers' next `step` gets as `sample` (before
        the first row the initial latent; after a row what the row left there plus that row's blend atom), in
        the variance-preserving space."""
        return self.state[0]

    def model(self, t: float, x: Lin, level: tuple[float, float]) -> Lin:
        """Open a row: the model output at timestep t for the input x (which must be what slot 0 holds).

        level: the VP (alpha, sigma) diffusers' add_noise uses for this row (at its step index or timestep):
        where img2img starts when this is the first row, and the inpainting blend's level after the row before.
        """
        if self._m is not None:
            raise RuntimeError("the previous row was not closed with keep()")
        i = len(self.timesteps)
        if 3 + 3 * i >= self._atoms:
            raise RuntimeError("more rows than the builder was sized for")
        self._check_same(x, self.state[0], "the model input is not the state's slot 0")
        self.timesteps.append(float(t))
        self.levels.append((float(level[0]), float(level[1])))
        self._m, self._z = 1 + 3 * i, None
        return self._atom(self._m)

    def noise(self) -> Lin:
        """This row's unit Gaussian noise z."""
        if self._m is None or self._z is not None:
            raise RuntimeError("noise() once per row, after model()")
        self._z = self._m + 1
        return self._atom(self._z)

    def keep(self, *slots: Lin) -> None:
        """Close the row: the next state is `slots` (slot 0 first: the next model input, or the final latent)."""
        if self._m is None or not 1 <= len(slots) <= self.slots:
            raise RuntimeError(f"keep() needs 1..{self.slots} slots after model()")
        new = np.stack([s.c for s in slots] + [np.zeros(self._atoms)] * (self.slots - len(slots)))
        if not np.all(np.isfinite(new)):
            raise InvalidInputError(
                "this step count and scheduler config make a step non-finite (diffusers' class gives NaN or inf "
                "there too); use another step count, timestep_spacing or final_sigmas_type")
        b = new[:, self._m].copy()
        c = new[:, self._z].copy() if self._z is not None else np.zeros(self.slots)
        rest = new.copy()
        rest[:, self._m] = 0.0
        if self._z is not None:
            rest[:, self._z] = 0.0
        old = np.stack([s.c for s in self.state])
        a_t, *_ = np.linalg.lstsq(old.T, rest.T, rcond=None)
        a = a_t.T
        err = np.abs(a @ old - rest).max()
        scale = max(1.0, np.abs(rest).max(), np.abs(old).max())
        if not err <= 1e-9 * scale:
            raise RuntimeError(f"row {len(self.rows)}: the next state is not a combination of the current one "
                               f"(residual {err:.3g}): the sampler needs a slot it did not keep")
        self.rows.append(np.concatenate([a.reshape(-1), b, c]))
        new[0, self._m + 2] = 1.0  # this row's blend atom p_i: slot 0 may be replaced before the next row
        self.state = [Lin(r) for r in new]
        self._m = self._z = None

    def table(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(timesteps [R] float64, coefficient rows [R, S(S+2)] float32, levels [R + 1, 2] float64).

        levels[i] is the VP (alpha, sigma) of row i's add_noise level (model(..., level)); levels[R] = (1, 0):
        diffusers' inpainting blends the clean image latents after the last step.
        """
        if self._m is not None:
            raise RuntimeError("the last row was not closed with keep()")
        rows = np.stack(self.rows)
        if not np.all(np.isfinite(rows)) or not np.all(np.isfinite(rows.astype(np.float32))):
            raise InvalidInputError("this step count and scheduler config give non-finite sampler coefficients; "
                                    "use fewer steps or another spacing")
        levels = np.array(self.levels + [(1.0, 0.0)], np.float64)
        return np.asarray(self.timesteps, np.float64), rows.astype(np.float32), levels

    @staticmethod
    def _check_same(a: Lin, b: Lin, what: str) -> None:
        scale = max(1.0, np.abs(b.c).max())
        if not np.abs(a.c - b.c).max() <= 1e-9 * scale:
            raise RuntimeError(what)
