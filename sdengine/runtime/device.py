"""One GPU's working set: a stream and every buffer, staging area and graph made for it. No torch here.

The loop (sdengine.runtime.loop) and the CUDA backends run on a CudaDevice; the calls themselves, each
checked, are sdengine.runtime.cuda's.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from ..errors import InvalidInputError
from .cuda import (CudaGraph, DeviceBuffer, Event, PinnedBuffer, Allocations, Stream, capture, copy_async,
                   memset_async, run_all, set_device)


class CudaDevice:
    """One GPU, one stream, and every buffer and graph made for it: what the loop and the backends run on."""

    def __init__(self, index: int = 0) -> None:
        self.info = set_device(index)
        self.memory = Allocations()
        self.stream = Stream()
        self._staging: dict[int, tuple[PinnedBuffer, Event]] = {}
        self._graphs: list[CudaGraph] = []

    @property
    def handle(self) -> int:
        return self.stream.handle

    def empty(self, shape: Sequence[int], dtype: Any = np.float32) -> DeviceBuffer:
        return self.memory.device(shape, dtype)

    def _stage(self, nbytes: int) -> tuple[PinnedBuffer, Event]:
        """A pinned buffer of `nbytes` whose previous copy has finished."""
        if nbytes not in self._staging:
            self._staging[nbytes] = (self.memory.pinned((nbytes,), np.uint8), Event(timing=False))
        stage, done = self._staging[nbytes]
        done.synchronize()
        return stage, done

    def upload(self, dst: DeviceBuffer, array: np.ndarray) -> None:
        """Enqueue host -> device of `array` (cast to dst's dtype, dst's shape) through a pinned buffer."""
        data = np.ascontiguousarray(array, dtype=dst.dtype)
        if data.shape != dst.shape:
            raise InvalidInputError(f"cannot upload an array of shape {data.shape} into a buffer of {dst.shape}")
        stage, done = self._stage(dst.nbytes)
        stage.array[:] = data.reshape(-1).view(np.uint8)
        copy_async(dst.ptr, stage.ptr, dst.nbytes, "HostToDevice", self.stream)
        done.record(self.stream)

    def download(self, src: DeviceBuffer, rows: int | None = None) -> np.ndarray:
        """Wait for the stream and return a host copy of `src` (its first `rows` rows when given)."""
        shape = src.shape if rows is None else (rows, *src.shape[1:])
        nbytes = int(np.prod(shape, dtype=np.int64)) * src.dtype.itemsize
        stage, done = self._stage(nbytes)
        copy_async(stage.ptr, src.ptr, nbytes, "DeviceToHost", self.stream)
        done.record(self.stream)
        self.stream.synchronize()
        return stage.array.view(src.dtype).reshape(shape).copy()

    def copy(self, dst: int, src: int, nbytes: int) -> None:
        """Enqueue a device -> device copy of `nbytes` between two addresses."""
        copy_async(dst, src, nbytes, "DeviceToDevice", self.stream)

    def zero(self, buf: DeviceBuffer) -> None:
        memset_async(buf.ptr, 0, buf.nbytes, self.stream)

    def capture(self, enqueue: Callable[[], None]) -> CudaGraph:
        """`enqueue`'s work on this device's stream as one graph, destroyed at close."""
        graph = capture(self.stream, enqueue)
        self._graphs.append(graph)
        return graph

    def synchronize(self) -> None:
        self.stream.synchronize()

    def close(self) -> None:
        """Wait for the stream, then destroy graphs, events, buffers and the stream; first error raised last."""
        if self.stream.raw is None:
            return
        steps: list[Callable[[], None]] = [self.stream.synchronize]
        steps += [g.destroy for g in self._graphs] + [e.destroy for _, e in self._staging.values()]
        steps += [self.memory.close, self.stream.destroy]
        self._graphs, self._staging = [], {}
        run_all(steps)

    def __enter__(self) -> "CudaDevice":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
