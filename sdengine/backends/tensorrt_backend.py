"""The TensorRT backend: an engine set (sdengine build) run by the lean CUDA runtime. No torch anywhere here.

The engines are deserialized once (sdengine.runtime.tensorrt.load_engine_set, after the manifest's
checks); their contexts share ONE device block of the largest `device_memory_size`, since the text
encoder, the denoise step and the VAE decoder run one after another on one stream. Buffers, the
ping-pong loop and the whole-loop CUDA graph are sdengine.backends.cuda_backend's.

LoRAs (TensorRTBackend.set_loras) refit the text encoder and denoise-step engines in place through
TensorRT's Refitter, by weight name, for sets built with `sdengine build --refittable`: the set's
manifest carries the export's weight map (checkpoint key -> ONNX initializer names, which TensorRT's
ONNX parser keeps as the engine's weight names), the pristine weights are read from the ONNX export
the set was built from, and the merge is numpy's (sdengine.lora), as on the ONNX Runtime backend.
Written against TensorRT's documented Refitter API and tested on the stand-in module only: not yet
run on hardware.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from .. import lora as sdlora
from ..errors import EngineMismatchError, InvalidInputError, LoraError
from ..manifest import TOKENIZER_2_DIR
from ..runtime.cuda import import_cudart, set_device
from ..runtime.device import CudaDevice, run_all
from ..specs import DENOISE_STEP, TEXT_ENCODER, TEXT_ENCODER_2
from ..tokenizer import ClipTokenizer
from . import reject_unknown_options
from .cuda_backend import NETWORKS, CudaBackend

LORA_GRAPHS = (TEXT_ENCODER, DENOISE_STEP)  # the engines holding weights a LoRA changes
# (graph, {ONNX initializer name}) -> {name: array as stored in the export}
PristineReader = Callable[[str, set], Mapping[str, np.ndarray]]


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
        tokenizer_2 = ClipTokenizer.from_folder(manifest.folder / TOKENIZER_2_DIR) if config.sdxl else None
        return TensorRTBackend(manifest, config, tokenizer, engines, gpu, manifest.ranges, use_graph,
                               tokenizer_2=tokenizer_2)
    except BaseException:
        with contextlib.suppress(Exception):  # the first error is the one to report
            run_all([engine.close for engine in engines.values()] + [gpu.close])
        raise


def source_reader(manifest: Any) -> PristineReader:
    """Reads pristine initializers from the ONNX export the engine set was built from, once its graph's sha256 is
    the one the engine was built from (LoraError otherwise, or when the export is gone)."""
    def read(graph: str, names: set) -> Mapping[str, np.ndarray]:
        from ..errors import ModelLoadError
        from ..manifest import Manifest
        from ..runtime.onnx_files import read_initializers

        try:
            onnx = Manifest.read(manifest.source_folder)
            path = onnx.graph_path(graph)
        except ModelLoadError as exc:
            raise LoraError(f"a LoRA refit reads the pristine weights from the ONNX export {manifest.source_folder} "
                            f"that {manifest.folder} was built from, and it cannot be read ({exc}); restore it, or "
                            f"re-export and rebuild with {manifest.rebuild_command()}") from None
        built = manifest.graphs[graph].onnx_sha256
        if onnx.graphs[graph].get("sha256") != built:
            raise EngineMismatchError(f"{manifest.source_folder} no longer holds the {graph} graph the engine of "
                                      f"{manifest.folder} was built from, so its weights are not the engine's "
                                      f"pristine ones: rebuild with {manifest.rebuild_command()}")
        return read_initializers(path, set(names))[0]
    return read


class TensorRTBackend(CudaBackend):
    """A CudaBackend over an engine set, whose LoRAs are refitted into the engines (set built --refittable)."""

    def __init__(self, manifest: Any, config: Any, tokenizer: ClipTokenizer, engines: Mapping[str, Any],
                 device: Any, ranges: Any = None, use_graph: bool = True,
                 pristine: PristineReader | None = None, tokenizer_2: ClipTokenizer | None = None) -> None:
        super().__init__(config, tokenizer, engines, device, ranges, use_graph, tokenizer_2)
        self.manifest = manifest
        self._pristine = source_reader(manifest) if pristine is None else pristine
        self._lora_base: dict[str, dict[str, np.ndarray]] = {}  # graph -> {parameter: pristine weight}
        self._lora_set: dict[str, frozenset[str]] = {}  # graph -> the parameters now holding merged weights
        self._lora_graphs = LORA_GRAPHS + ((TEXT_ENCODER_2,) if config.sdxl else ())

    def _lora_map(self, graph: str) -> Mapping[str, Mapping[str, Any]]:
        m = self.manifest
        if not m.builder.refittable:
            raise LoraError(f"the engines of {m.folder} were built without --refittable, so TensorRT cannot swap "
                            f"their weights for a LoRA: rebuild them with sdengine build --refittable "
                            f"({m.rebuild_command()} --refittable), or use --backend onnxruntime")
        params = (m.weights or {}).get(graph)
        if params is None:
            raise LoraError(f"{m.folder} records no weight map for its {graph} engine (its ONNX export predates "
                            f"LoRA support): re-export with sdengine export --force, then rebuild with "
                            f"{m.rebuild_command()}")
        return params

    def lora_targets(self) -> dict[str, tuple[int, ...]]:
        """{`unet.<parameter>` / `text_encoder.<parameter>`: shape} of the weights a refit can swap."""
        return {name: tuple(v["shape"]) for graph in self._lora_graphs for name, v in self._lora_map(graph).items()}

    def set_loras(self, loras: Sequence[tuple[Any, float]]) -> None:
        """Merge `loras` (LoraFile, scale) with numpy from the pristine weights and refit the engines in place.

        As the ONNX Runtime backend: every merged weight is recomputed from the pristine one (so a set gives the
        same bits whatever was active before), cast to the weight's dtype in the export (fp16) and transposed
        where the weight map says; a weight a previous set changed and this one does not gets its pristine
        value back, so `[]` restores the engines as built. Everything is merged before any engine is refitted;
        the device is idle during the refit, and the captured whole-loop CUDA graphs are dropped after it.
        A refit that fails part-way leaves the weights it may have touched marked as changed, so the next
        set_loras (or `[]`) rewrites them."""
        touched = set().union(*(lora.targets for lora, _ in loras)) if loras else set()
        if not touched and not any(self._lora_set.values()):
            return
        maps = {graph: self._lora_map(graph) for graph in self._lora_graphs}
        known = set().union(*(set(m) for m in maps.values()))
        if touched - known:
            raise LoraError(f"weights {sorted(touched - known)[:5]} are not single initializers of the export these "
                            f"engines were built from, so a refit cannot set them; use the torch backend for this "
                            f"LoRA")
        plans: dict[str, tuple[frozenset[str], dict[str, np.ndarray]]] = {}
        for graph in self._lora_graphs:
            params = maps[graph]
            mine = frozenset(touched & set(params))
            restore = self._lora_set.get(graph, frozenset()) - mine
            if not mine and not restore:
                continue
            base = self._lora_base.setdefault(graph, {})
            new = sorted((mine | restore) - set(base))
            if new:
                places = {name: params[name]["initializers"][0] for name in new}
                arrays = self._pristine(graph, {init for init, _ in places.values()})
                for name, (init, transposed) in places.items():
                    base[name] = arrays[init].T if transposed else arrays[init]
            values = dict(sdlora.merge(base, loras, only=mine))
            values.update({name: base[name] for name in restore})
            named: dict[str, np.ndarray] = {}
            for name, array in values.items():
                dtype = base[name].dtype
                for init, transposed in params[name]["initializers"]:
                    named[init] = np.ascontiguousarray((array.T if transposed else array).astype(dtype))
            plans[graph] = (mine, named)
        self.device.synchronize()  # no enqueued work may read a weight while it changes
        try:
            for graph, (mine, named) in plans.items():
                self._lora_set[graph] = self._lora_set.get(graph, frozenset()) | mine  # unknown until it succeeds
                self.executors[graph].refit(named)
                self._lora_set[graph] = mine
                base = self._lora_base[graph]
                for name in set(base) - mine:  # no kept copies of weights no LoRA changes
                    del base[name]
        finally:
            self.loop.drop_graphs()
