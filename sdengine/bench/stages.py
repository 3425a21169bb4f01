"""The calls each stage times, for sdengine backends (any name in sdengine.backends.BACKENDS).

Stages run exactly what the pipeline runs, on one image with guidance (2 text rows):
- tokenizer: CLIP BPE of the negative and the positive prompt, on the host (SDXL: with both tokenizers);
- text_encoder: encode_text on those rows, until the device has finished (SDXL: encode_text_sdxl, both encoders,
  their outputs on the host as the pipeline has them);
- denoise_loop: every step of the DDIM schedule from fixed initial latents, until the device has finished;
  `denoise_step` is this loop's time divided by the steps (a whole-loop CUDA graph has no per-step point);
- vae_decode: final latents to float images on the host (device-to-host copy included).
e2e is one pipeline call: prompt to PIL images.

Completion: a backend that has a `synchronize()` method, or whose `device` object has one (the CUDA
runtime backend's CudaDevice: its stream), is waited on through it; otherwise a torch CUDA tensor
result is waited on with torch.cuda.synchronize(); other results (numpy, ONNX Runtime buffers: its
Run returns when the work is done) need no wait. No torch import here.
"""

from __future__ import annotations

import sys
from typing import Any, Callable

from ..pipeline import Pipeline, initial_noise, uses_guidance
from ..samplers import build_schedule
from .settings import BenchSettings
from .timing import Wait


def wait_for_value(value: Any) -> None:
    """Block until a torch CUDA tensor's producing work is done; anything else is already complete."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.Tensor) and value.is_cuda:
        torch.cuda.synchronize(value.device)


def backend_wait(backend: Any) -> Wait:
    """The completion wait for a backend's results (see the module docstring)."""
    for owner in (backend, getattr(backend, "device", None)):  # the backend's sync, or its device object's
        sync = getattr(owner, "synchronize", None)
        if callable(sync):
            return lambda _value: sync()
    return wait_for_value


class Stages:
    """Stage calls over inputs computed once, untimed, on first use (subclasses define the four calls)."""

    wait: Wait

    def __init__(self) -> None:
        self._inputs: dict[str, Any] = {}

    def tokenize(self) -> Any:
        raise NotImplementedError

    def encode(self) -> Any:
        raise NotImplementedError

    def denoise(self) -> Any:
        raise NotImplementedError

    def decode(self) -> Any:
        raise NotImplementedError

    def encode_image(self) -> Any:
        raise NotImplementedError

    def _once(self, name: str, make: Callable[[], Any]) -> Any:
        if name not in self._inputs:
            self._inputs[name] = make()
            self.wait(self._inputs[name])
        return self._inputs[name]

    @property
    def ids(self) -> Any:
        return self._once("ids", self.tokenize)

    @property
    def context(self) -> Any:
        return self._once("context", self.encode)

    @property
    def final(self) -> Any:
        return self._once("final", self.denoise)

    def calls(self) -> dict[str, Callable[[], Any]]:
        """Stage name -> the call it times."""
        return {"tokenizer": self.tokenize, "text_encoder": self.encode, "denoise_loop": self.denoise,
                "vae_decode": self.decode, "vae_encode": self.encode_image}


def sample_pixels(height: int, width: int) -> Any:
    """A smooth image [1, 3, H, W] in [-1, 1] for the VAE encoder stage (its content does not change the cost)."""
    import numpy as np

    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    return np.stack([np.sin(6 * x), np.cos(5 * y), x - y])[None].astype(np.float32)


class SdengineStages(Stages):
    """Stage and end-to-end calls over one loaded sdengine backend."""

    def __init__(self, backend: Any, settings: BenchSettings) -> None:
        super().__init__()
        self.backend, self.s = backend, settings
        self.pipe = Pipeline(backend)
        config = backend.config
        self.height = settings.height or config.default_size
        self.width = settings.width or config.default_size
        self.wait = backend_wait(backend)
        self.rows = ["", settings.prompt] if uses_guidance(config, settings.guidance) else [settings.prompt]
        self.schedule = build_schedule(config.scheduler, "ddim", settings.steps, 0.0)
        f = config.vae.downscale
        shape = (config.vae.latent_channels, self.height // f, self.width // f)
        unit, self.noise = initial_noise([settings.seed], shape, self.schedule)
        self.latents = unit * self.schedule.init_scale
        self.pixels = sample_pixels(self.height, self.width)

    def e2e(self, batch: int) -> Any:
        s = self.s
        return self.pipe(s.prompt, num_inference_steps=s.steps, guidance_scale=s.guidance, seed=s.seed,
                         height=self.height, width=self.width, num_images_per_prompt=batch).images

    def tokenize(self) -> Any:
        if self.backend.config.sdxl:  # both tokenizers (the second pads with '!')
            return self.backend.tokenizer(self.rows), self.backend.tokenizer_2(self.rows)
        return self.backend.tokenizer(self.rows)

    def encode(self) -> Any:
        if self.backend.config.sdxl:
            return self._encode_sdxl()
        return self.backend.encode_text(self.ids)

    def _encode_sdxl(self) -> Any:
        """SDXL: both encoders, their hidden states concatenated on the host, the pooled text and the default
        time ids (what the pipeline's _condition_sdxl hands the denoise loop)."""
        import numpy as np

        from ..backends import AddedConditioning
        from ..pipeline import sdxl_time_ids

        hidden, hidden_2, pooled = self.backend.encode_text_sdxl(*self.ids)
        time_ids = np.tile(sdxl_time_ids(self.height, self.width)[0], (len(self.rows), 1))
        return np.concatenate([hidden, hidden_2], axis=-1), AddedConditioning(pooled, time_ids)

    def denoise(self) -> Any:
        if self.backend.config.sdxl:
            context, added = self.context
            return self.backend.denoise(self.latents, context, self.schedule, self.s.guidance, self.noise,
                                        added=added)
        return self.backend.denoise(self.latents, self.context, self.schedule, self.s.guidance, self.noise)

    def decode(self) -> Any:
        return self.backend.decode(self.final)

    def encode_image(self) -> Any:
        return self.backend.encode_image(self.pixels)

    def info(self) -> dict[str, Any]:
        return {"height": self.height, "width": self.width, "text_rows": len(self.rows)}
