"""Peak memory of one benchmark process: host (VmHWM) and GPU (torch's allocator, or cudaMemGetInfo).

Host: Linux's VmHWM (peak resident set) from /proc/self/status, reset to the current resident size by
writing "5" to /proc/self/clear_refs (Linux >= 4.0). Where that write is refused, a thread samples
VmRSS every 10 ms instead (it can miss a peak shorter than that); the method used is reported.

GPU: torch paths report torch.cuda.max_memory_allocated/max_memory_reserved (exact, but only what
torch's caching allocator holds); every CUDA run also samples cudaMemGetInfo (cuda-python) every 10 ms:
memory in use on the whole device, other processes and the CUDA context included. The sampler is
written against the documented cuda-python API and has not run on a GPU yet (unverified).
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path
from typing import Any, Callable

from ..errors import SDEngineError

MIB = 1 << 20
STATUS, CLEAR_REFS = Path("/proc/self/status"), Path("/proc/self/clear_refs")
INTERVAL_S = 0.01


def _status_kib(field: str) -> int | None:
    """A `field:   N kB` line of /proc/self/status, in KiB (None off Linux)."""
    try:
        for line in STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


class Sampler:
    """Calls `read` every INTERVAL_S on a daemon thread and keeps the largest value."""

    def __init__(self, read: Callable[[], int]) -> None:
        self.read, self.peak, self.error = read, read(), None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="bench-memory-sampler", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        try:
            while not self._stop.wait(INTERVAL_S):
                self.peak = max(self.peak, self.read())
        except Exception as exc:  # a failing probe stops sampling; the measurement goes on
            self.error = f"{type(exc).__name__}: {exc}"

    def reset(self) -> None:
        self.peak = self.read()

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


class HostPeak:
    """Peak resident memory of this process since the last reset()."""

    def __init__(self) -> None:
        self.sampler: Sampler | None = None
        self.method = "VmHWM (/proc/self/status), reset through /proc/self/clear_refs"
        if _status_kib("VmHWM") is None:
            self.method = "unavailable (no /proc/self/status)"

    def reset(self) -> None:
        """Start a new peak from the current resident size."""
        if self.sampler is not None:
            self.sampler.reset()
            return
        try:
            CLEAR_REFS.write_text("5")
        except OSError:
            if _status_kib("VmRSS") is not None:
                self.method = f"VmRSS sampled every {INTERVAL_S * 1000:g} ms (clear_refs refused)"
                self.sampler = Sampler(lambda: _status_kib("VmRSS") or 0)

    def peak_mib(self) -> float | None:
        if self.sampler is not None:
            self.sampler.peak = max(self.sampler.peak, _status_kib("VmRSS") or 0)
            return self.sampler.peak / 1024
        kib = _status_kib("VmHWM")
        return None if kib is None else kib / 1024

    def stop(self) -> None:
        if self.sampler is not None:
            self.sampler.stop()


class GpuPeak:
    """Peak GPU memory on a CUDA run: torch's allocator where torch uses CUDA, and cudaMemGetInfo samples."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")
        self.sampler: Sampler | None = None
        self.error: str | None = None
        if self.cuda:
            try:  # a probe that fails must not fail the measurement: the error is reported instead
                from ..runtime.cuda import memory_info  # unverified: no GPU where this was written

                def used() -> int:
                    free, total = memory_info()
                    return total - free

                self.sampler = Sampler(used)
            except (SDEngineError, ImportError) as exc:
                self.error = str(exc)

    @staticmethod
    def _torch_cuda() -> Any:
        torch = sys.modules.get("torch")  # never import torch here: torch-free paths stay torch-free
        return torch if torch is not None and torch.cuda.is_initialized() else None

    def reset(self) -> None:
        if self.sampler is not None:
            self.sampler.reset()
        torch = self._torch_cuda()
        if torch is not None:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def report(self) -> dict[str, Any]:
        """MiB figures since the last reset, with the method of each; empty on the CPU."""
        if not self.cuda:
            return {}
        out: dict[str, Any] = {}
        torch = self._torch_cuda()
        if torch is not None:
            out["torch_max_allocated_mib"] = torch.cuda.max_memory_allocated() / MIB
            out["torch_max_reserved_mib"] = torch.cuda.max_memory_reserved() / MIB
        error = self.error or (self.sampler.error if self.sampler is not None else None)
        if error is not None:
            out["device_used_error"] = error
        if self.sampler is not None:
            out["device_used_peak_mib"] = self.sampler.peak / MIB
            out["device_used_method"] = (f"cudaMemGetInfo total-free sampled every {INTERVAL_S * 1000:g} ms: "
                                         f"the whole GPU, CUDA context and other processes included")
        return out

    def close(self) -> None:
        if self.sampler is not None:
            self.sampler.stop()


def device_name(device: str) -> str | None:
    """The GPU's name on a CUDA run (cudaGetDeviceProperties, else torch), None on the CPU."""
    if not device.startswith("cuda"):
        return None
    index = int(device.split(":", 1)[1]) if ":" in device else 0
    try:
        from ..runtime.cuda import device_properties

        return device_properties(index).name
    except (SDEngineError, ImportError) as exc:
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available():
            return torch.cuda.get_device_name(index)
        return f"unknown ({exc})"
