"""The ASGI application: one FastAPI app over a `Service` (the model, its limits, the batcher, the metrics).

OpenAI-shaped image generation and edits, OpenAI's model list, health (KServe v2 paths), Prometheus
metrics, and FastAPI's own `GET /docs` and `GET /openapi.json`. The same app runs standalone under uvicorn
(`sdengine serve`) and as the ingress of each Ray Serve replica (`sdengine.serve.ray`).

Standalone, the model loads in the model thread after the server starts listening, so readiness can be
watched: /v2/health/ready answers 503 until the model has loaded and run one warm-up image. Under Ray the
replica loads it before taking requests (`Service.load`).

Bodies are read and validated here, not by FastAPI's parameter binding: the limits of the loaded model are
the validation context, a body is refused at 64 KiB (16 MiB for an edit) before it is all read, and every
refusal has OpenAI's error shape (FastAPI's own 422 body never reaches a client).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import inspect
import logging
import time
from pathlib import Path
from typing import Any, Callable

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from .. import __version__
from ..errors import InvalidInputError, NonFiniteOutputError
from ..lora import lora_specs, read_lora
from ..metadata import GenerationInfo, png_bytes
from ..pipeline import model_name
from ..prompts import MAX_PROMPT_CHUNKS, chunk_prompt
from ..stepcache import max_branch
from .batcher import Batcher, BatchAbandoned, Job, ModelThread, QueueFull, Unavailable
from .edits import MAX_UPLOAD_BYTES, parse_edit
from .metrics import CONTENT_TYPE, ServeMetrics
from .schema import (MAX_BODY_BYTES, ErrorBody, GenerationBody, GenerationRequest, ImageData, ImagesResponse, Limits,
                     LoraCard, ModelCard, ModelList, Ready, Live, RequestError, edit_form_schema, error_body,
                     parse_generation)
from .settings import ServeSettings

log = logging.getLogger("uvicorn.error")


def error_response(status: int, message: str, param: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    """OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""
    return JSONResponse(error_body(status, message, param), status_code=status, headers=headers)


def _png_b64(images: list[tuple[Any, GenerationInfo]]) -> list[str]:
    """PNGs carrying their generation parameters (A1111's `parameters` text), base64-encoded."""
    return [base64.b64encode(png_bytes(image, info)).decode("ascii") for image, info in images]


class Service:
    """The model, its limits, the batcher and the metrics; `state` is loading, ready, failed or draining."""

    def __init__(self, settings: ServeSettings, loader: Callable[[ServeSettings], Any] | None = None) -> None:
        self.settings = settings
        self.loader = loader or _load_pipeline
        self.metrics = ServeMetrics(settings.backend, str(settings.model or "embedded demo model"), __version__)
        self.model_id = "sdengine-demo" if settings.model is None else model_name(settings.model)
        self.created = int(time.time())
        self.state = "loading"
        self.error: BaseException | None = None
        self.on_fatal: Callable[[], None] = lambda: None  # set by the CLI: stop the server
        self.pipeline: Any = None
        self.lora_paths = {path.stem: path for path, _ in lora_specs(settings.loras)}
        self.active_loras: tuple[tuple[str, float], ...] | None = settings.default_loras  # None: unknown
        self.limits: Limits | None = None
        self.batcher: Batcher | None = None
        self._thread: ModelThread | None = None
        self._tasks: list[asyncio.Task] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self.headers: list[tuple[bytes, bytes]] = []  # added to every response (Ray: the replica and node)

    # ---- life cycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        """From the app's lifespan: load in the background (readiness says when), unless `load` has run."""
        if self._thread is None:
            self._begin()
            self._tasks.append(asyncio.create_task(self._load()))

    async def load(self) -> None:
        """Load the model and run the warm-up image now (a Ray replica, before it takes requests); the error
        of a failed load is raised."""
        self._begin()
        await self._load()
        if self.error is not None:
            raise self.error

    def _begin(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = ModelThread()

    async def _load(self) -> None:
        started = time.monotonic()
        try:
            self.pipeline = await self._thread.submit(self.loader, self.settings)
            self.limits, max_batch = limits_for(self.pipeline, self.settings)
            loaded = time.monotonic()
            log.info("model loaded in %.1f s; running the warm-up image", loaded - started)
            await self._thread.submit(self._warm_up)
        except Exception as exc:  # noqa: BLE001 - reported by the CLI as a one-line start-up error
            self.state, self.error = "failed", exc
            log.error("model failed to load: %s", exc)
            self.on_fatal()
            return
        if self.state != "loading":  # draining began meanwhile
            return
        s = self.settings
        self.batcher = Batcher(self._compute, self._thread, self.metrics, max_batch=max_batch,
                               max_queue=s.max_queue, batch_wait_s=s.batch_wait_ms / 1000)
        self._tasks.append(asyncio.create_task(self.batcher.run()))
        self.state = "ready"
        self.metrics.ready.set(1)
        log.info("ready: warm-up image in %.1f s; serving up to %d image(s) per batch", time.monotonic() - loaded,
                 max_batch)

    def _warm_up(self) -> None:
        width, height = self.limits.default_size
        image = {}
        if self.pipeline.config.inpainting:  # an inpainting model always takes an image and a mask
            import numpy as np

            image = dict(image=np.zeros((height, width, 3), np.uint8), mask_image=np.ones((height, width), np.float32))
        self.pipeline("warm-up", num_inference_steps=self.settings.warmup_steps, seed=0, width=width, height=height,
                      **image)

    def begin_drain(self) -> None:
        """From the signal handler: stop taking requests, let the running batch finish."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        if self.state in ("ready", "loading"):
            log.info("shutting down: finishing the running batch, answering 503 to waiting requests")
            self.state = "draining"
            self.metrics.ready.set(0)
        if self.batcher is not None:
            self.batcher.drain()

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._thread is not None:
            self._thread.close()

    # ---- model thread -----------------------------------------------------------------------------
    def _compute(self, requests: list[GenerationRequest], callback: Callable[[int, int], None]) -> list:
        first = requests[0]
        if first.loras != self.active_loras:  # every request of a batch has the same set (its batch_key)
            self.active_loras = None  # a failed switch leaves the weights unknown: the next batch sets them again
            seconds = self.pipeline.set_loras({self.lora_paths[name]: scale for name, scale in first.loras})
            self.active_loras = first.loras
            self.metrics.lora_switches.inc()
            self.metrics.lora_switch_seconds.observe(seconds)
        result = self.pipeline([r.prompt for r in requests for _ in range(r.n)],
                               negative_prompt=[r.negative_prompt for r in requests for _ in range(r.n)],
                               num_inference_steps=first.steps, guidance_scale=first.guidance_scale, eta=first.eta,
                               seed=[s for r in requests for s in r.seeds], width=first.width, height=first.height,
                               callback=callback, scheduler=first.scheduler, image=first.image,
                               mask_image=first.mask, strength=first.strength,
                               prompt_weighting=first.prompt_weighting, clip_skip=first.clip_skip,
                               **dict(first.micro),  # SDXL: one batch shares its micro-conditioning (batch_key)
                               **({} if first.cache_interval == 1 else dict(cache_interval=first.cache_interval,
                                                                            cache_branch=first.cache_branch)))
        if result.vae_fp32_fallback:
            self.metrics.vae_fp32_fallbacks.inc()
        return list(zip(result.images, result.infos))

    # ---- routes -----------------------------------------------------------------------------------
    def live(self) -> Live:
        return Live(live=True)

    def ready(self) -> Ready:
        return Ready(ready=self.state == "ready", state=self.state)

    def models(self) -> ModelList:
        """OpenAI's model list (GET /v1/models): the one model this server holds."""
        default = dict(self.settings.default_loras)
        loras = [LoraCard(name=name, default_scale=default.get(name, 0.0)) for name in self.settings.lora_names]
        return ModelList(data=[ModelCard(id=self.model_id, created=self.created, loras=loras)])

    async def generate(self, request: Request) -> Response:
        """POST /v1/images/generations (JSON)."""
        return await self._serve(request, self._parse_generation)

    async def edit(self, request: Request) -> Response:
        """POST /v1/images/edits (multipart: image, mask and the generation fields)."""
        return await self._serve(request, lambda r: parse_edit(r, self.limits, _read_body))

    async def _parse_generation(self, request: Request) -> GenerationRequest:
        body = await _read_body(request)
        # Off the event loop: tokenizing a 64 KiB prompt takes a noticeable fraction of a second.
        return await asyncio.to_thread(parse_generation, body, self.limits)

    async def _serve(self, request: Request, parse: Callable[[Request], Any]) -> Response:
        started = time.monotonic()
        outcome, response = "error", None
        try:
            outcome, response = await self._generate(request, started, parse)
        except asyncio.CancelledError:  # the request's task was cancelled (Ray: its client went away)
            outcome = "cancelled"
            raise
        except Exception:  # noqa: BLE001
            log.exception("generation request failed")
            response = error_response(500, "internal error while generating; see the server log")
        finally:
            self.metrics.requests.labels(outcome=outcome).inc()
        if outcome == "ok":
            self.metrics.request_seconds.observe(time.monotonic() - started)
        return response

    async def _generate(self, request: Request, started: float, parse: Callable[[Request], Any]
                        ) -> tuple[str, Response]:
        if self.state != "ready":
            message = ("the server is shutting down" if self.state == "draining" else
                       "the model is still loading; retry shortly" if self.state == "loading" else
                       "the model failed to load")
            return "unavailable", error_response(503, message, headers={"Retry-After": "5"})
        try:
            req = await parse(request)
        except RequestError as exc:
            return "invalid", error_response(exc.status, exc.message, exc.param)
        except ClientDisconnect:
            return "cancelled", Response(status_code=499)
        job = Job(req, deadline=started + self.settings.timeout_s, future=asyncio.get_running_loop().create_future())
        try:
            self.batcher.submit(job)
        except QueueFull as exc:
            return "rejected", error_response(429, f"{exc}: {self.batcher.depth} request(s) are waiting",
                                              headers={"Retry-After": str(exc.retry_after)})
        except Unavailable as exc:
            return "unavailable", error_response(503, str(exc), headers={"Retry-After": "5"})
        return await self._wait(request, job, started)

    async def _wait(self, request: Request, job: Job, started: float) -> tuple[str, Response]:
        watch = asyncio.ensure_future(_disconnected(request))
        try:
            done, _ = await asyncio.wait({job.future, watch}, timeout=max(0.0, job.deadline - time.monotonic()),
                                         return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:  # the request's task was cancelled (Ray: the client went away)
            self.batcher.abandon(job)
            raise
        finally:
            watch.cancel()
        if job.future not in done:
            self.batcher.abandon(job)
            if watch in done:
                return "cancelled", Response(status_code=499)
            return "timeout", self._timeout(job)
        try:
            images = job.future.result()
        except BatchAbandoned:
            return ("timeout", self._timeout(job)) if time.monotonic() >= job.deadline else \
                ("cancelled", Response(status_code=499))
        except Unavailable as exc:
            return "unavailable", error_response(503, str(exc), headers={"Retry-After": "5"})
        except InvalidInputError as exc:  # a limit the backend found that the schema did not know
            return "invalid", error_response(422, str(exc))
        except NonFiniteOutputError as exc:  # the model overflowed and no float32 retry could repair it
            return "error", error_response(500, str(exc))
        self.metrics.compute_seconds.observe(job.finished - job.started)
        encoded = await asyncio.to_thread(_png_b64, images)
        self.metrics.images.inc(len(encoded))
        timing = (f"queue;dur={1000 * (job.started - job.enqueued):.1f}, "
                  f"compute;dur={1000 * (job.finished - job.started):.1f}, "
                  f"total;dur={1000 * (time.monotonic() - started):.1f}")
        body = ImagesResponse(created=int(time.time()),
                              data=[ImageData(b64_json=b, seed=s) for b, s in zip(encoded, job.request.seeds)])
        return "ok", JSONResponse(body.model_dump(), headers={"Server-Timing": timing})

    def _timeout(self, job: Job) -> Response:
        where = "in the queue" if job.started is None else "while generating"
        return error_response(504, f"the request took longer than the server's limit of "
                                   f"{self.settings.timeout_s:g} s (timed out {where})")


async def _read_body(request: Request, limit: int = MAX_BODY_BYTES) -> bytes:
    """The body, refusing more than `limit` bytes before reading it all."""
    length = request.headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise RequestError(400, f"invalid Content-Length {length!r}")
        if int(length) > limit:
            raise RequestError(413, f"request body is {length} bytes; the limit is {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"request body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def _disconnected(request: Request) -> None:
    """Returns when the client disconnects (the body has been read: the next ASGI message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _load_pipeline(settings: ServeSettings) -> Any:
    """In the model thread: load the pipeline with the settings' backend, device and threads."""
    from ..backends import default_threads
    from ..pipeline import load_pipeline

    options: dict[str, Any] = {}
    if settings.backend in ("torch", "onnxruntime"):  # TensorRT runs on the GPU: no CPU threads to set
        options["threads"] = settings.threads or default_threads()
    pipe = load_pipeline(settings.model, backend=settings.backend, device=settings.device, **options)
    if settings.loras:  # every file against the model's weights now, so a request's choice cannot fail later
        targets = pipe.backend.lora_targets()
        for path, _ in lora_specs(settings.loras):
            read_lora(path, targets)
        pipe.set_loras({Path(path).expanduser(): scale for path, scale in settings.loras if scale != 0})
    for path, token in settings.embeddings:
        pipe.load_textual_inversion(path, token)
    return pipe


def _cache_branches(backend: Any) -> tuple[int, ...] | None:
    """Step caching's branches the backend runs: any (None) on torch, an export's own, none without support."""
    denoise = getattr(backend, "denoise", None)
    if denoise is not None and "cache" not in inspect.signature(denoise).parameters:
        return ()
    return getattr(backend, "cache_branches", None)


def limits_for(pipeline: Any, settings: ServeSettings) -> tuple[Limits, int]:
    """Request limits from the loaded model (VAE factor, engine profile, tokenizer) and the settings."""
    config, tokenizer = pipeline.config, pipeline.tokenizer
    ranges = getattr(pipeline.backend, "ranges", None)  # an ONNX/TensorRT export's shape profile
    max_batch, size = settings.max_batch, (config.default_size, config.default_size)
    max_chunks = MAX_PROMPT_CHUNKS if ranges is None else ranges.chunks
    width_range = height_range = None
    if ranges is not None:
        max_batch = min(max_batch, ranges.batch.max)
        width_range, height_range = (ranges.width.min, ranges.width.max), (ranges.height.min, ranges.height.max)
        if max_batch < settings.max_batch:
            log.warning("--max-batch %d is over the engine profile's %d images: using %d", settings.max_batch,
                        ranges.batch.max, max_batch)
        size = (ranges.width.opt, ranges.height.opt) if config.default_size not in ranges.width \
            or config.default_size not in ranges.height else size
    limits = Limits(factor=config.vae.downscale, default_size=size, width_range=width_range,
                    height_range=height_range, max_pixels=settings.max_pixels, max_images=max_batch,
                    default_steps=settings.default_steps, max_steps=settings.max_steps,
                    max_prompt_chunks=max_chunks, count_chunks=lambda text, weighting: chunk_prompt(
                        tokenizer, text, weighting, MAX_PROMPT_CHUNKS).chunks,
                    clip_layers=min(te.num_hidden_layers for te in (config.text_encoder, config.text_encoder_2) if te),
                    scheduler=config.scheduler, slots=None if ranges is None else ranges.slots,
                    inpainting=config.inpainting, loras=settings.lora_names,
                    default_loras=settings.default_loras, sdxl=config.sdxl, max_cache_branch=max_branch(config.unet),
                    cache_branches=_cache_branches(pipeline.backend))
    if size[0] * size[1] > settings.max_pixels:
        raise InvalidInputError(f"--max-pixels {settings.max_pixels} is below the model's own size "
                                f"{size[0]}x{size[1]}; raise it")
    return limits, max_batch


ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "the body is not a JSON object (or not multipart, for an edit), or "
                                             "its Content-Length is invalid"},
    413: {"model": ErrorBody, "description": f"the body is over {MAX_BODY_BYTES} bytes "
                                             f"({MAX_UPLOAD_BYTES} for an edit)"},
    422: {"model": ErrorBody, "description": "a field is unknown, of the wrong type or out of range; "
                                             "`param` names it"},
    429: {"model": ErrorBody, "description": "the queue is full: retry after the Retry-After header's seconds"},
    500: {"model": ErrorBody, "description": "the generation failed (the server log says why)"},
    503: {"model": ErrorBody, "description": "the model is loading, failed to load, or the server is shutting "
                                             "down (Retry-After: 5)"},
    504: {"model": ErrorBody, "description": "queue and compute took longer than the server's --timeout-s"},
}
DESCRIPTION = """OpenAI's image API (POST /v1/images/generations, POST /v1/images/edits, GET /v1/models) with
sdengine's extension fields, request batching, KServe v2 health paths and Prometheus metrics. Every error
has OpenAI's shape `{"error": {"message", "type", "param", "code"}}`."""


class ResponseHeaders:
    """Pure ASGI middleware: the service's `headers` on every HTTP response (a Ray replica names itself)."""

    def __init__(self, app: Any, service: Service) -> None:
        self.app, self.service = app, service

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or not self.service.headers:
            return await self.app(scope, receive, send)

        async def add(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *self.service.headers]}
            await send(message)

        await self.app(scope, receive, add)


def create_app(service: Service) -> FastAPI:
    """The FastAPI app over `service`; its lifespan starts the service (standalone: loads in the background)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    async def http_error(request: Request, exc: HTTPException) -> Response:
        return error_response(exc.status_code, f"{exc.detail}: {request.method} {request.url.path}",
                              headers=getattr(exc, "headers", None))

    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        return error_response(422, "; ".join(str(e.get("msg")) for e in exc.errors()) or "invalid request")

    app = FastAPI(title="sdengine", version=__version__, description=DESCRIPTION, lifespan=lifespan,
                  exception_handlers={HTTPException: http_error, RequestValidationError: validation_error})
    app.add_middleware(ResponseHeaders, service=service)
    json_body = {"requestBody": {"required": True, "content": {"application/json": {
        "schema": GenerationBody.model_json_schema()}}}}
    form_body = {"requestBody": {"required": True, "content": {"multipart/form-data": {
        "schema": edit_form_schema()}}}}
    errors = {k: ERRORS[k] for k in (400, 413, 422, 429, 500, 503, 504)}

    @app.post("/v1/images/generations", response_model=ImagesResponse, responses=errors, openapi_extra=json_body,
              summary="Generate images from a prompt")
    async def generations(request: Request) -> Response:
        return await service.generate(request)

    @app.post("/v1/images/edits", response_model=ImagesResponse, responses=errors, openapi_extra=form_body,
              summary="Edit an image: inpaint under a mask, or image to image")
    async def edits(request: Request) -> Response:
        return await service.edit(request)

    @app.get("/v1/models", response_model=ModelList, summary="The model this server holds, and its LoRAs")
    async def models() -> ModelList:
        return service.models()

    @app.get("/v2/health/live", response_model=Live, summary="Liveness: the process answers")
    async def live() -> Live:
        return service.live()

    @app.get("/v2/health/ready", response_model=Ready, summary="Readiness: the model has loaded and warmed up",
             responses={503: {"model": Ready, "description": "loading, failed or shutting down"}})
    async def ready() -> Response:
        state = service.ready()
        return JSONResponse(state.model_dump(), status_code=200 if state.ready else 503)

    @app.get("/metrics", response_class=Response, summary="Prometheus metrics (text format 0.0.4)",
             responses={200: {"content": {"text/plain": {}}, "description": "the metrics"}})
    async def metrics() -> Response:
        return Response(service.metrics.render(), media_type=CONTENT_TYPE)

    return app
