"""The PyTorch stand-in for a TensorRT engine: proves the lean CUDA runtime on a GPU without TensorRT.

A `TorchExecutor` implements sdengine.runtime.executor.Executor by running a graph's reference module
(sdengine.export.wrappers.build: the same modules, inputs and outputs the export traces) on CUDA, with
the network body in fp16 and the graph's inputs and outputs fp32 (the update too), as an fp16 export.

How it meets the runtime:
- buffers: the runtime's cuda-python buffers, wrapped per execute as tensors through
  `__cuda_array_interface__` (torch.as_tensor; the address is checked, so a silent copy cannot
  happen). The loop rebinds addresses every step. Wrapping enqueues nothing, but torch asks the
  driver which device owns the pointer (cudaPointerGetAttributes); inside a capture that query is
  made in relaxed capture mode, so a capture cannot be invalidated by it;
- stream: torch.cuda.ExternalStream over the runtime's stream handle, made current for the run;
- capture: the runtime captures the whole loop with its own cudaStreamBeginCapture (thread-local
  mode), which PyTorch did not start. Two things keep PyTorch's work inside it correct:
  1. PyTorch's caching allocator checks whether the *current* stream is capturing before it calls
     cudaMalloc and then switches the thread to relaxed capture mode for the call
     (`cudaMallocMaybeCapturing` in c10/cuda/CUDACachingAllocator.cpp), so growing the pool does not
     invalidate the capture;
  2. while the current stream is capturing, allocations go to this executor's private pool
     (a torch.cuda.MemPool, routed to by the allocator calls torch.cuda.use_mem_pool makes in torch
     2.11 and 2.13: `_cuda_beginAllocateCurrentThreadToPool`, `_cuda_endAllocateToPool`,
     `_cuda_releasePool`; use_mem_pool itself is not called, since torch's main branch asserts there
     in a capture torch did not begin; tests/test_torch_fastpath.py pins the versions this was read
     on), as torch.cuda.graph does with its graph pool:
     memory the graph's kernels use as scratch is never handed to a tensor outside the graph, so a
     replay cannot overwrite anyone's data. One pool serves all of an executor's captures: tensors
     made inside a capture never outlive it (outputs are copied into the runtime's buffers), and
     graphs replay one at a time on one stream.
  The loop runs one step uncaptured before each capture (TensorRT asks the same), so lazily made
  state (the cuBLAS workspace, cuDNN plans) exists, outside the pool, before the capture. Do not
  mix with torch.cuda.graph captures in the same process: those clear the cuBLAS workspaces that
  a captured loop keeps using.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from ..config import ModelConfig
from ..errors import CudaError, InvalidInputError, SDEngineError
from ..runtime.cuda import cuda_array_interface, relaxed_capture_mode
from ..specs import GraphSpec, fixed_dims
from .cuda_backend import NETWORKS


class Fp16Body(nn.Module):
    """A child run in fp16: floating tensor inputs cast to fp16, a floating tensor output back to fp32."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net.half()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        def half(x: Any) -> Any:
            return x.half() if isinstance(x, torch.Tensor) and x.is_floating_point() else x

        out = self.net(*(half(a) for a in args), **{k: half(v) for k, v in kwargs.items()})
        return out.float() if isinstance(out, torch.Tensor) and out.is_floating_point() else out


def with_fp16_body(module: nn.Module, body: tuple[str, ...] | None) -> nn.Module:
    """`module` with the children named in `body` (all of it when None) run in fp16."""
    if body is None:
        return Fp16Body(module)
    for child in body:
        setattr(module, child, Fp16Body(getattr(module, child)))
    return module


ALLOCATOR_CALLS = ("_cuda_beginAllocateCurrentThreadToPool", "_cuda_endAllocateToPool", "_cuda_releasePool")
ALLOCATOR_CHECKED_ON = ("2.11", "2.13")  # torch versions whose use_mem_pool makes exactly these calls


@contextlib.contextmanager
def route_allocations(pool_id: tuple[int, int], device_index: int) -> Iterator[None]:
    """This thread's allocations on `device_index` go to pool `pool_id`: torch.cuda.use_mem_pool's own calls.

    begin (which increfs the pool) on entry; end, then release (the decref matching begin) on exit, as
    use_mem_pool does in torch 2.11 and 2.13. The MemPool object keeps its own reference to the pool.
    """
    begin, end, release = (getattr(torch._C, name) for name in ALLOCATOR_CALLS)
    begin(device_index, pool_id)
    try:
        yield
    finally:
        end(device_index, pool_id)
        release(device_index, pool_id)


class _Tensor:
    """A device address seen as a tensor by torch.as_tensor."""

    def __init__(self, ptr: int, shape: tuple[int, ...], dtype: str) -> None:
        self.__cuda_array_interface__ = cuda_array_interface(ptr, shape, dtype)


class TorchExecutor:
    """One graph's reference module as an Executor over caller-owned device addresses."""

    def __init__(self, spec: GraphSpec, module: nn.Module | None, config: ModelConfig, device_index: int = 0) -> None:
        self.spec, self.module, self.config = spec, module, config
        self.device = torch.device("cuda", device_index)
        self._inputs = {t.name: t for t in spec.inputs}
        self._outputs = {t.name: t for t in spec.outputs}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._ptrs: dict[str, int] = {}
        self._streams: dict[int, Any] = {}
        self._pool: Any = None

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> None:
        """Shape of input `name`: its rank and fixed dimensions must be the spec's."""
        if name not in self._inputs:
            raise InvalidInputError(f"{name!r} is not an input of {self.spec.name} (inputs: {', '.join(self._inputs)})")
        dims, shape = self._inputs[name].dims, tuple(int(d) for d in shape)
        fixed = fixed_dims(self.config)
        want = [d if isinstance(d, int) else fixed.get(d) for d in dims]
        if len(shape) != len(dims) or any(w is not None and w != s for w, s in zip(want, shape)) or min(shape) < 1:
            raise InvalidInputError(f"{self.spec.name} input {name} cannot take shape {shape} (dims {dims})")
        self._shapes[name] = shape

    def _symbols(self) -> dict[str, int]:
        values = dict(fixed_dims(self.config))
        for name, shape in self._shapes.items():
            values.update({d: s for d, s in zip(self._inputs[name].dims, shape) if isinstance(d, str)})
        f = self.config.vae.downscale
        if "latent_height" in values:
            values.update(height=values["latent_height"] * f, width=values["latent_width"] * f)
        return values

    def output_shape(self, name: str) -> tuple[int, ...]:
        """Shape of output `name` from the input shapes set so far."""
        values = self._symbols()
        try:
            return tuple(d if isinstance(d, int) else values[d] for d in self._outputs[name].dims)
        except KeyError as exc:
            raise SDEngineError(f"cannot tell the shape of {self.spec.name} output {name}: set the input shapes "
                                f"first (missing {exc})") from None

    def set_address(self, name: str, ptr: int) -> None:
        if name not in self._inputs and name not in self._outputs:
            raise InvalidInputError(f"{name!r} is not a tensor of {self.spec.name}")
        self._ptrs[name] = int(ptr)

    def _tensor(self, name: str) -> torch.Tensor:
        """The tensor at the address bound to `name` (no copy)."""
        if name not in self._ptrs:
            raise SDEngineError(f"no address was set for {self.spec.name} tensor {name}")
        spec = self._inputs.get(name) or self._outputs[name]
        shape = self._shapes[name] if name in self._inputs else self.output_shape(name)
        ptr = self._ptrs[name]
        tensor = torch.as_tensor(_Tensor(ptr, shape, spec.dtype), device=self.device)
        if tensor.data_ptr() != ptr:
            raise CudaError(f"torch.as_tensor copied {self.spec.name} tensor {name} instead of wrapping it")
        return tensor

    @contextlib.contextmanager
    def _capture_pool(self, capturing: bool) -> Iterator[None]:
        """Route allocations to this executor's private pool while the current stream is capturing."""
        if not capturing:
            yield
            return
        if self._pool is None:
            self._pool = torch.cuda.MemPool()
        with route_allocations(self._pool.id, self.device.index or 0):
            yield

    def _bound(self, capturing: bool) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The input and output tensors at the bound addresses (relaxed capture mode while capturing)."""
        with relaxed_capture_mode() if capturing else contextlib.nullcontext():
            return [self._tensor(n) for n in self.spec.input_names], [self._tensor(n) for n in self.spec.output_names]

    def execute(self, stream: int) -> None:
        """Run the module on `stream` over the bound addresses; outputs are written in place."""
        if self.module is None:
            raise SDEngineError(f"the {self.spec.name} executor was closed")
        ext = self._streams.get(stream)
        if ext is None:
            ext = self._streams[stream] = torch.cuda.ExternalStream(stream, device=self.device)
        with torch.cuda.device(self.device), torch.cuda.stream(ext), torch.inference_mode():
            capturing = torch.cuda.is_current_stream_capturing()
            inputs, outputs = self._bound(capturing)
            with self._capture_pool(capturing):
                out = self.module(*inputs)
                out = out if isinstance(out, tuple) else (out,)
                if len(out) != len(outputs):
                    raise SDEngineError(f"the {self.spec.name} module gave {len(out)} outputs, the spec has "
                                        f"{len(outputs)}")
                for dst, value in zip(outputs, out):
                    dst.copy_(value)

    def close(self) -> None:
        """Drop the module, streams and private pool (the runtime's buffers are not ours)."""
        self.module, self._streams, self._pool = None, {}, None


def torch_executors(components: Any, device_index: int = 0,
                    names: Sequence[str] = NETWORKS) -> dict[str, TorchExecutor]:
    """One TorchExecutor per graph over loaded components (sdengine.models.loading.Components)."""
    from ..export.wrappers import build

    out = {}
    for name in names:
        gm = build(name, components)
        module = with_fp16_body(gm.module, gm.body).to(torch.device("cuda", device_index)).eval()
        out[name] = TorchExecutor(gm.spec, module, components.config, device_index)
    torch.cuda.synchronize(device_index)  # weights were made on torch's stream; the runtime's does not wait for it
    return out
