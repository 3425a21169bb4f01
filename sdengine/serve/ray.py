"""Serving on Ray Serve: the same FastAPI app as the ingress of every replica, one model per replica.

    from ray import serve
    from sdengine.serve.ray import build_app

    serve.run(build_app("path/to/model", num_replicas=2, max_batch=4), route_prefix="/")

or a Ray Serve config file (`serve deploy deploy/serve.yaml`, `serve run deploy/serve.yaml`) naming
`sdengine.serve.ray:app_builder` with the same options as `args` (README, "Serving at scale").

Each replica is one Ray actor holding one `Service`: it loads the model once and warms it up in its
constructor, so Ray routes to a replica only once it can serve; it batches with the standalone server's
own batcher (one denoise loop per compatible batch, the LoRA set switched between batches). The batcher
is kept rather than Ray's `@serve.batch`: it groups requests by their batch key (size, sampler, steps, LoRA
set, ...) and counts images rather than requests, stops a loop between two steps once every client has
gone, answers 429 with Retry-After from its own queue, and keeps one code path for both ways of serving;
`@serve.batch` batches whatever arrives together and would need all of that rebuilt around it.

Back-pressure: a replica's batcher answers 429 when its queue (`max_queue`) is full, as the standalone
server does. Ray sends a replica at most `max_ongoing_requests` requests at once (default: the replica's
batch and queue plus `ONGOING_HEADROOM`, so the batcher's 429 and the health and metrics paths are
reached), and holds at most `max_queued_requests` more in each proxy's queue when every replica is full;
past that Ray's proxy answers 503 with Retry-After (Ray's own plain-text body). Ray's health check calls
`check_health`, which fails unless the service is ready (loaded, warmed up, not draining or failed).
Every response names the replica and node that served it (headers `x-sdengine-replica`, `x-sdengine-node`).

Importing this module imports ray.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ray
from ray import serve

from ..errors import InvalidInputError
from .settings import ServeSettings

REPLICA_HEADER, NODE_HEADER = "x-sdengine-replica", "x-sdengine-node"
ONGOING_HEADROOM = 8  # requests past batch + queue a replica takes: 429 answers, health, metrics
SETTINGS_FIELDS = {f.name for f in dataclasses.fields(ServeSettings)} - {"host", "port"}


class SDEngineReplica:
    """One Ray Serve replica: a `Service` loaded in the constructor; its FastAPI app is the ingress."""

    async def __init__(self, settings: ServeSettings) -> None:
        from .app import Service

        self.service = Service(settings)
        await self.service.load()  # raises on failure: Ray reports the replica's start-up error
        context = serve.get_replica_context()
        self.service.headers = [(REPLICA_HEADER.encode(), context.replica_id.unique_id.encode()),
                                (NODE_HEADER.encode(), ray.get_runtime_context().get_node_id().encode())]

    def __serve_build_asgi_app__(self) -> Any:
        from .app import create_app

        return create_app(self.service)

    async def check_health(self) -> None:
        """Ray's health check: the pipeline's own readiness (GET /v2/health/ready answers the same)."""
        if self.service.state != "ready":
            raise RuntimeError(f"sdengine replica not ready: {self.service.state}"
                               + (f" ({self.service.error})" if self.service.error else ""))


def deployment_options(settings: ServeSettings, *, num_replicas: int = 1, autoscale: tuple[int, int] | None = None,
                       gpus_per_replica: float = 0.0, cpus_per_replica: float = 1.0,
                       max_ongoing_requests: int | None = None, max_queued_requests: int = -1,
                       max_replicas_per_node: int | None = None, health_check_period_s: float = 10.0,
                       name: str = "sdengine") -> dict[str, Any]:
    """The Ray Serve deployment options (checked): replicas or autoscaling, resources, back-pressure."""
    def need(ok: bool, message: str) -> None:
        if not ok:
            raise InvalidInputError(message)

    need(num_replicas >= 1, f"--replicas must be >= 1, got {num_replicas}")
    need(gpus_per_replica >= 0 and cpus_per_replica >= 0, "--gpus-per-replica and --cpus-per-replica must be >= 0")
    need(max_queued_requests == -1 or max_queued_requests >= 0,
         f"max_queued_requests must be -1 (no limit) or >= 0, got {max_queued_requests}")
    ongoing = settings.max_batch + settings.max_queue + ONGOING_HEADROOM if max_ongoing_requests is None \
        else max_ongoing_requests
    need(ongoing >= 1, f"max_ongoing_requests must be >= 1, got {ongoing}")
    options: dict[str, Any] = dict(name=name, max_ongoing_requests=ongoing, max_queued_requests=max_queued_requests,
                                   ray_actor_options={"num_cpus": cpus_per_replica, "num_gpus": gpus_per_replica},
                                   health_check_period_s=health_check_period_s,
                                   graceful_shutdown_timeout_s=settings.timeout_s + 5)
    if autoscale is not None:
        low, high = autoscale
        need(0 <= low <= high and high >= 1, f"--autoscale MIN:MAX needs 0 <= MIN <= MAX, MAX >= 1, got {low}:{high}")
        options["autoscaling_config"] = {"min_replicas": low, "max_replicas": high,
                                         "initial_replicas": max(low, 1),
                                         "target_ongoing_requests": settings.max_batch + settings.max_queue // 2}
    else:
        options["num_replicas"] = num_replicas
    if max_replicas_per_node is not None:
        options["max_replicas_per_node"] = max_replicas_per_node
    return options


def build_app(model: str | None = None, backend: str = "torch", *, num_replicas: int = 1,
              autoscale: tuple[int, int] | None = None, gpus_per_replica: float | None = None,
              cpus_per_replica: float = 1.0, max_ongoing_requests: int | None = None, max_queued_requests: int = -1,
              max_replicas_per_node: int | None = None, health_check_period_s: float = 10.0,
              name: str = "sdengine", **server_options: Any) -> Any:
    """A Ray Serve application (for `serve.run`) serving `model` with `backend`; `server_options` are the
    standalone server's settings (max_batch, max_queue, batch_wait_ms, timeout_s, max_pixels, default_steps,
    max_steps, threads, device, loras, embeddings, warmup_steps). A TensorRT backend runs on CUDA and takes
    one GPU per replica unless `gpus_per_replica` says otherwise."""
    unknown = sorted(set(server_options) - SETTINGS_FIELDS)
    if unknown:
        raise InvalidInputError(f"unknown server option(s): {', '.join(unknown)}; accepted: "
                                f"{', '.join(sorted(SETTINGS_FIELDS))}")
    options = dict(server_options)
    options.setdefault("device", "cuda" if backend == "tensorrt" else "cpu")
    options["loras"] = tuple((str(p), float(s)) for p, s in options.get("loras", ()))
    options["embeddings"] = tuple((str(p), t) for p, t in options.get("embeddings", ()))
    settings = ServeSettings(model=None if model is None else str(model), backend=backend, **options).check()
    if gpus_per_replica is None:
        gpus_per_replica = 1.0 if settings.device == "cuda" else 0.0
    if isinstance(autoscale, str):
        autoscale = parse_autoscale(autoscale)
    deployment = serve.deployment(serve.ingress()(SDEngineReplica), **deployment_options(
        settings, num_replicas=num_replicas, autoscale=autoscale, gpus_per_replica=gpus_per_replica,
        cpus_per_replica=cpus_per_replica, max_ongoing_requests=max_ongoing_requests,
        max_queued_requests=max_queued_requests, max_replicas_per_node=max_replicas_per_node,
        health_check_period_s=health_check_period_s, name=name))
    return deployment.bind(settings)


def app_builder(args: dict[str, Any]) -> Any:
    """The application builder a Ray Serve config names (`import_path: sdengine.serve.ray:app_builder`):
    `args` are build_app's keyword arguments (`loras` as [[FILE, SCALE], ...])."""
    return build_app(**dict(args or {}))


def parse_autoscale(text: str) -> tuple[int, int]:
    """--autoscale MIN:MAX."""
    low, sep, high = text.partition(":")
    if not sep or not low.isdigit() or not high.isdigit():
        raise InvalidInputError(f"--autoscale takes MIN:MAX replicas such as 1:4, got {text!r}")
    return int(low), int(high)
