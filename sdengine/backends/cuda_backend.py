"""A backend over the lean CUDA runtime: text encoder, denoise loop and VAE decoder on one CUDA stream.

The three networks are `Executor`s (sdengine.runtime.executor): TensorRT engines (tensorrt_backend) or
the PyTorch stand-in that proves the runtime on a GPU without TensorRT (torch_executor). The denoise
loop (sdengine.runtime.loop) keeps the latent on the device and replays one CUDA graph per shape and
step count. Nothing crosses to the host between the token ids going in and the image coming out.
No torch here.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from ..config import ModelConfig
from ..errors import InvalidInputError, ModelLoadError
from ..runtime.device import CudaDevice, run_all
from ..runtime.executor import Executor
from ..runtime.loop import CachedDenoiseLoop, DenoiseLoop, StepCallback, TextEmbeddings, bind_shapes
from ..samplers.table import Schedule
from ..specs import DENOISE_STEP, DENOISE_STEP_FULL, DENOISE_STEP_SHALLOW, TEXT_ENCODER, TEXT_ENCODER_2, VAE_DECODER, \
    VAE_ENCODER, Range, ShapeRanges, check_dim, dim_ranges, point_dims, shapes
from ..stepcache import StepCache
from ..tokenizer import ClipTokenizer

NETWORKS = (TEXT_ENCODER, DENOISE_STEP, VAE_DECODER, VAE_ENCODER)  # the encoder: image inputs only
REBUILD = "rebuild the engines with sdengine build --batch/--height/--width MIN:OPT:MAX covering it"
REBUILD_CHUNKS = ("re-export with sdengine export --max-prompt-chunks {chunks} or more (the default, 8, reads every "
                  "prompt) and rebuild the engines from it")


class CudaBackend:
    """encode_text / denoise / decode over executors sharing one CudaDevice (its stream and allocations)."""

    def __init__(self, config: ModelConfig, tokenizer: ClipTokenizer, executors: Mapping[str, Executor],
                 device: CudaDevice, ranges: ShapeRanges | None = None, use_graph: bool = True,
                 tokenizer_2: ClipTokenizer | None = None) -> None:
        """SDXL: executors for text_encoder_2 too, and `tokenizer_2` (the second tokenizer, padding with '!')."""
        missing = [name for name in NETWORKS[:3] + ((TEXT_ENCODER_2,) if config.sdxl else ()) if name not in executors]
        if missing:
            raise ModelLoadError(f"the CUDA backend needs executors for {', '.join(missing)}")
        self.config, self.tokenizer, self.device, self.ranges = config, tokenizer, device, ranges
        if config.sdxl and tokenizer_2 is None:
            raise ModelLoadError("an SDXL model needs its second tokenizer (tokenizer_2)")
        self.tokenizer_2 = tokenizer_2
        self.executors = dict(executors)
        self.dims: dict[str, Range] | None = None if ranges is None else dim_ranges(config, ranges)
        self.loop = DenoiseLoop(device, self.executors[DENOISE_STEP], config, use_graph,
                                slots=None if ranges is None else ranges.slots)
        self._buffers: dict[tuple, Any] = {}
        self._use_graph = use_graph
        self._cached_loops: dict[StepCache, CachedDenoiseLoop] = {}  # step caching: one loop per StepCache

    @property
    def cache_branches(self) -> tuple[int, ...]:
        """Step caching's branches these executors run: the export's, when its full and shallow steps are here."""
        have = DENOISE_STEP_FULL in self.executors and DENOISE_STEP_SHALLOW in self.executors
        branch = None if self.ranges is None else self.ranges.cache_branch
        return (branch,) if have and branch is not None else ()

    def _cached_loop(self, cache: StepCache) -> CachedDenoiseLoop:
        if cache.branch not in self.cache_branches:
            raise InvalidInputError(f"these engines hold no step caching steps for cache_branch {cache.branch} "
                                    f"(branches: {list(self.cache_branches) or 'none'}); run without cache_interval")
        if cache not in self._cached_loops:
            self._cached_loops[cache] = CachedDenoiseLoop(
                self.device, self.executors[DENOISE_STEP_FULL], self.executors[DENOISE_STEP_SHALLOW], self.config,
                cache, self._use_graph, slots=None if self.ranges is None else self.ranges.slots)
        return self._cached_loops[cache]

    def _buffer(self, role: str, shape: tuple[int, ...], dtype: Any = np.float32) -> Any:
        """The buffer for `role` at `shape`, allocated on first use and reused after."""
        key = (role, tuple(shape), np.dtype(dtype).str)
        if key not in self._buffers:
            self._buffers[key] = self.device.empty(shape, dtype)
        return self._buffers[key]

    def _check_dim(self, value: int, dim: str, what: str) -> None:
        if self.dims is not None:
            check_dim(value, self.dims[dim], what, REBUILD, "the range {} these engines were built for")

    def _check_latents(self, shape: tuple[int, ...]) -> None:
        if len(shape) != 4 or shape[1] != self.config.vae.latent_channels:
            f = self.config.vae.downscale
            raise InvalidInputError(f"latents must be [images, {self.config.vae.latent_channels}, height/{f}, "
                                    f"width/{f}], got {list(shape)}")
        f = self.config.vae.downscale
        self._check_dim(shape[0], "batch", "images")
        self._check_dim(shape[2] * f, "height", "height")
        self._check_dim(shape[3] * f, "width", "width")

    def encode_text(self, input_ids: np.ndarray, clip_skip: int = 0) -> TextEmbeddings:
        """Token ids [R, 77] -> embeddings [R, 77, D] on the device (valid until the next call with R rows);
        clip_skip: of layer -1-clip_skip, as diffusers."""
        if self.config.sdxl:
            raise InvalidInputError("an SDXL model encodes a prompt with both text encoders: encode_text_sdxl")
        ids = np.asarray(input_ids)
        if ids.ndim != 2:
            raise InvalidInputError(f"token ids must be [rows, {self.config.text_encoder.max_position_embeddings}], "
                                    f"got shape {list(ids.shape)}")
        rows = run_rows = ids.shape[0]
        if self.ranges is not None and self.ranges.static and 2 * rows == self.dims["rows"].max:
            ids, run_rows = np.concatenate([ids, ids]), 2 * rows  # a static engine takes 2B rows: run B twice
        self._check_dim(run_rows, "rows", "text rows (images, times 2 with guidance)")
        te = self.executors[TEXT_ENCODER]
        (ids_name, skip_name), (hidden_name, pooled_name) = te.spec.input_names, te.spec.output_names
        shp = shapes(te.spec, point_dims(self.config, 1, 1, 1, rows=run_rows))
        bind_shapes(te, shp)
        ids_buf = self._buffer(ids_name, shp[ids_name], np.int32)
        self.device.upload(ids_buf, ids.astype(np.int32))
        hidden = self._buffer(hidden_name, shp[hidden_name])
        te.set_address(ids_name, ids_buf.ptr)
        skip = self._buffer(skip_name, shp[skip_name], np.int32)
        self.device.upload(skip, np.array([clip_skip], np.int32))
        te.set_address(skip_name, skip.ptr)
        te.set_address(hidden_name, hidden.ptr)
        te.set_address(pooled_name, self._buffer(pooled_name, shp[pooled_name]).ptr)
        te.execute(self.device.handle)
        return TextEmbeddings(hidden, rows)

    def encode_text_sdxl(self, ids: np.ndarray, ids_2: np.ndarray,
                         clip_skip: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """SDXL: token ids [R, 77] of each tokenizer -> both encoders' hidden states of layer -2-clip_skip
        ([R, 77, D1], [R, 77, D2]) and text_encoder_2's pooled, projected output [R, P], float32 on the host (the
        pipeline weights and concatenates them there, then denoise uploads the context once)."""
        hidden, _ = self._run_text_sdxl(TEXT_ENCODER, ids, clip_skip)
        hidden_2, pooled = self._run_text_sdxl(TEXT_ENCODER_2, ids_2, clip_skip)
        return hidden, hidden_2, pooled

    def _run_text_sdxl(self, name: str, input_ids: np.ndarray, clip_skip: int) -> tuple[np.ndarray, np.ndarray]:
        """One SDXL text encoder executor over token ids [R, 77]: its two outputs' first R rows on the host."""
        ids = np.asarray(input_ids)
        if ids.ndim != 2:
            raise InvalidInputError(f"token ids must be [rows, {self.config.text_encoder.max_position_embeddings}], "
                                    f"got shape {list(ids.shape)}")
        rows = run_rows = ids.shape[0]
        if self.ranges is not None and self.ranges.static and 2 * rows == self.dims["rows"].max:
            ids, run_rows = np.concatenate([ids, ids]), 2 * rows
        self._check_dim(run_rows, "rows", "text rows (images, times 2 with guidance)")
        te = self.executors[name]
        (ids_name, skip_name), outputs = te.spec.input_names, te.spec.output_names
        shp = shapes(te.spec, point_dims(self.config, 1, 1, 1, rows=run_rows))
        bind_shapes(te, shp)
        ids_buf = self._buffer(f"{name}.{ids_name}", shp[ids_name], np.int32)
        self.device.upload(ids_buf, ids.astype(np.int32))
        te.set_address(ids_name, ids_buf.ptr)
        skip = self._buffer(f"{name}.{skip_name}", shp[skip_name], np.int32)
        self.device.upload(skip, np.array([clip_skip], np.int32))
        te.set_address(skip_name, skip.ptr)
        outs = [self._buffer(f"{name}.{out}", shp[out]) for out in outputs]
        for out, buf in zip(outputs, outs):
            te.set_address(out, buf.ptr)
        te.execute(self.device.handle)
        first, second = (self.device.download(buf, rows) for buf in outs)
        return first, second

    def text_to_host(self, context: TextEmbeddings) -> np.ndarray:
        """encode_text's output as float32 numpy [R, 77, D]."""
        return self.device.download(context.buffer, context.rows)

    def _host_context(self, context: np.ndarray) -> TextEmbeddings:
        """Host embeddings [R, 77k, D] (long or weighted prompts) uploaded, checked against the engines' range."""
        array = np.ascontiguousarray(context, dtype=np.float32)
        if self.ranges is not None:
            self.ranges.check_context(array.shape[1], self.config.text_encoder.max_position_embeddings,
                                      REBUILD_CHUNKS)
        buf = self._buffer("host_context", array.shape)
        self.device.upload(buf, array)
        return TextEmbeddings(buf, array.shape[0])

    def denoise(self, latents: np.ndarray, context: TextEmbeddings, schedule: Schedule, guidance_scale: float,
                noise: np.ndarray | None, callback: StepCallback | None = None, condition: Any = None,
                added: Any = None, cache: StepCache | None = None) -> Any:
        """Every row of `schedule`; a view of the final latents on the device (valid until the next call).

        `context`: encode_text's output, or host embeddings [R, 77k, D] (long or weighted prompts); `added`: an
        SDXL model's text_embeds and time_ids (sdengine.backends.AddedConditioning), bound once per call; `cache`:
        step caching, over the full and shallow step executors (CachedDenoiseLoop; unverified on a GPU)."""
        if isinstance(context, np.ndarray):
            context = self._host_context(context)
        if not isinstance(context, TextEmbeddings):
            raise InvalidInputError("context must be what this backend's encode_text returned")
        x = np.ascontiguousarray(latents, dtype=np.float32)
        self._check_latents(x.shape)
        loop = self.loop if cache is None else self._cached_loop(cache)
        return loop.run(x, context, schedule, guidance_scale, noise, callback, condition, added)

    can_decode_fp32 = False  # one fp16 decoder engine per set
    fp32_advice = "the engine set's decoder is fp16; run the model with --backend torch or an fp32 ONNX export"

    def decode(self, latents: Any, fp32: bool = False) -> np.ndarray:
        """Scaled latents (a device buffer from denoise, or numpy) -> float32 images [B, 3, H, W] on the host."""
        if not hasattr(latents, "ptr"):
            array = np.ascontiguousarray(latents, dtype=np.float32)
            self._check_latents(array.shape)
            latents = self._buffer("decode_latent", array.shape)
            self.device.upload(latents, array)
        vae = self.executors[VAE_DECODER]
        (latent_name,), (image_name,) = vae.spec.input_names, vae.spec.output_names
        b, _, lh, lw = latents.shape
        shp = shapes(vae.spec, point_dims(self.config, b, lh, lw))
        bind_shapes(vae, shp)
        image = self._buffer(image_name, shp[image_name])
        vae.set_address(latent_name, latents.ptr)
        vae.set_address(image_name, image.ptr)
        vae.execute(self.device.handle)
        return self.device.download(image)

    def encode_image(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Images [B,3,H,W] in [-1, 1] -> scaled latent mean and std [B,C,h,w] on the host (the VAE encoder)."""
        vae = self.executors.get(VAE_ENCODER)
        if vae is None:
            raise InvalidInputError("this engine set has no VAE encoder, which image inputs need: rebuild it with "
                                    "sdengine build")
        array = np.ascontiguousarray(images, dtype=np.float32)
        f = self.config.vae.downscale
        b, _, h, w = array.shape
        self._check_latents((b, self.config.vae.latent_channels, h // f, w // f))
        shp = shapes(vae.spec, point_dims(self.config, b, h // f, w // f))
        bind_shapes(vae, shp)
        (image_name,), outputs = vae.spec.input_names, vae.spec.output_names
        image = self._buffer("encode_image", shp[image_name])
        self.device.upload(image, array)
        vae.set_address(image_name, image.ptr)
        out = [self._buffer(name, shp[name]) for name in outputs]
        for name, buf in zip(outputs, out):
            vae.set_address(name, buf.ptr)
        vae.execute(self.device.handle)
        mean, std = (self.device.download(buf) for buf in out)
        return mean, std

    def close(self) -> None:
        """Wait, then graphs, executors, every device allocation and the stream; the first error raised last."""
        steps = [self.device.synchronize, self.loop.close] + [loop.close for loop in self._cached_loops.values()] \
            + [e.close for e in self.executors.values()]
        steps.append(self.device.close)
        self._buffers = {}
        run_all(steps)

    def __enter__(self) -> "CudaBackend":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
