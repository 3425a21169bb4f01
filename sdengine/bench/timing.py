"""Timers and summary statistics: every timed call ends with the device's own completion wait."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

Wait = Callable[[Any], None]  # blocks until the work that produced its argument has finished


def percentile(samples: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linear between closest ranks (numpy's default method)."""
    if not samples:
        raise ValueError("percentile of no samples")
    ordered = sorted(samples)
    pos = (len(ordered) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@dataclass(frozen=True)
class Summary:
    """Seconds per call over the counted runs, and the uncounted warm-up calls before them."""

    runs: int
    p50_s: float
    p95_s: float
    mean_s: float
    min_s: float
    max_s: float
    samples_s: tuple[float, ...]
    warmup_s: tuple[float, ...]

    @classmethod
    def of(cls, samples: Sequence[float], warmup: Sequence[float] = ()) -> "Summary":
        return cls(len(samples), percentile(samples, 50), percentile(samples, 95), sum(samples) / len(samples),
                   min(samples), max(samples), tuple(samples), tuple(warmup))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["samples_s"], d["warmup_s"] = list(self.samples_s), list(self.warmup_s)
        return d


def timed(fn: Callable[[], Any], wait: Wait) -> float:
    """Seconds from the call to the completion of its work (`wait` on its result, e.g. a device sync)."""
    start = time.perf_counter()
    wait(fn())
    return time.perf_counter() - start


def measure(fn: Callable[[], Any], runs: int, warmup: int, wait: Wait) -> Summary:
    """`warmup` uncounted calls, then `runs` counted ones, each timed to completion."""
    warm = [timed(fn, wait) for _ in range(warmup)]
    return Summary.of([timed(fn, wait) for _ in range(runs)], warm)
