"""The TensorRT backend: an engine set (sdengine build) run by the lean CUDA runtime. No torch anywhere here.

The engines are deserialized once (sdengine.runtime.tensorrt.load_engine_set, after the manifest's
checks); their contexts share ONE device block of the largest `device_memory_size`, since the text
encoder, the denoise step and the VAE decoder run one after another on one stream. Buffers, the
ping-pong loop and the whole-loop CUDA graph are sdengine.backends.cuda_backend's.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InvalidInputError
from ..runtime.cuda import import_cudart, set_device
from ..runtime.device import CudaDevice, run_all
from ..tokenizer import ClipTokenizer
from . import reject_unknown_options
from .cuda_backend import NETWORKS, CudaBackend


def device_index(device: str) -> int:
    """'cuda' -> 0, 'cuda:N' -> N; the CPU is refused (TensorRT engines run on an NVIDIA GPU)."""
    if device == "cuda":
        return 0
    if device.startswith("cuda:") and device[5:].isdigit():
        return int(device[5:])
    raise InvalidInputError(f"the tensorrt backend runs on an NVIDIA GPU (device cuda or cuda:N), not {device!r}; "
                            f"use --backend onnxruntime or --backend torch on the CPU")


def check_available(device: str = "cuda") -> None:
    """BackendUnavailableError unless cuda-python, TensorRT and a CUDA GPU are all here (cheap; loads nothing)."""
    from ..runtime.tensorrt import import_tensorrt

    import_cudart()
    import_tensorrt()
    set_device(device_index(device))


def load(path: str | Path | None, device: str = "cuda", prediction_type: str | None = None,
         use_graph: bool = True, **unknown: Any) -> CudaBackend:
    """A CudaBackend over the engine set at `path`; everything allocated is released if any step fails."""
    reject_unknown_options("tensorrt", unknown, ("prediction_type", "use_graph"))
    check_available(device)
    if path is None:
        raise InvalidInputError("the tensorrt backend needs --model: an engine set folder written by sdengine build")
    from ..runtime.tensorrt import load_engine_set

    gpu = CudaDevice(device_index(device))
    engines: dict = {}
    try:
        manifest, engines = load_engine_set(path, NETWORKS, gpu_name=gpu.info.name,
                                            compute_capability=gpu.info.compute_capability)
        size = max(int(e.device_memory_size) for e in engines.values())
        block = gpu.empty((max(size, 1),), np.uint8)  # freed with the device
        for engine in engines.values():
            engine.set_device_memory(block.ptr, size)
        config = manifest.config.with_prediction_type(prediction_type)  # the engines stay valid
        tokenizer = ClipTokenizer.from_folder(manifest.tokenizer_dir)
        return CudaBackend(config, tokenizer, engines, gpu, manifest.ranges, use_graph)
    except BaseException:
        with contextlib.suppress(Exception):  # the first error is the one to report
            run_all([engine.close for engine in engines.values()] + [gpu.close])
        raise
