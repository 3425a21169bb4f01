"""What the lean CUDA runtime needs from one network: TensorRT's execution model, nothing more.

A TensorRT execution context (sdengine.runtime.tensorrt) and the PyTorch stand-in that proves the
runtime on a GPU without TensorRT (sdengine.backends.torch_executor) both implement it, so the
buffers, the ping-pong loop and the CUDA graph capture are one code path for both. No torch here.
"""

from __future__ import annotations

from typing import Protocol

from ..specs import GraphSpec


class Executor(Protocol):
    """One graph of specs.GRAPHS, run over device addresses the caller owns, on the caller's stream."""

    spec: GraphSpec

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> None:
        """Shape of input `name` for the next launches; InvalidInputError outside the built profile."""

    def output_shape(self, name: str) -> tuple[int, ...]:
        """Shape of output `name` given the input shapes set so far."""

    def set_address(self, name: str, ptr: int) -> None:
        """Device address of input or output `name` for the next launches."""

    def execute(self, stream: int) -> None:
        """Enqueue one run on the raw cudaStream_t handle `stream` (capturable: no host sync inside)."""

    def close(self) -> None:
        """Release what the executor holds (never the caller's buffers)."""
