"""`sdengine serve`: argparse at the edge, start-up checks, then uvicorn over a socket bound here.

Binding the socket before uvicorn starts lets `--port 0` pick a free port and the first line on
stdout say which (`listening on http://HOST:PORT`), before the model has loaded.
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import signal
import socket
import sys
from pathlib import Path

from ..errors import InvalidInputError, ModelLoadError, SDEngineError
from .settings import ServeSettings

BACKEND_CHOICES = ("torch", "onnxruntime", "tensorrt")
_NEEDS = {"torch": ("torch", "sdengine[torch]"), "onnxruntime": ("onnxruntime", "sdengine[onnx]"),
          "tensorrt": ("tensorrt", "sdengine[tensorrt]")}


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = ServeSettings()
    p.add_argument("--model", default=None, help="diffusers folder or .safetensors file; with --backend onnxruntime "
                   "a folder from sdengine export (default: the embedded demo model)")
    p.add_argument("--backend", choices=BACKEND_CHOICES, default=d.backend,
                   help="torch (the reference, default), onnxruntime (an exported folder), tensorrt (an engine set "
                        "from sdengine build)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="default: cuda with --backend tensorrt, else cpu")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads of the backend (default: the usable cores less one, at least 1)")
    p.add_argument("--host", default=d.host, help=f"address to listen on (default {d.host})")
    p.add_argument("--port", type=int, default=d.port, help=f"port (default {d.port}; 0 picks a free one)")
    p.add_argument("--max-queue", type=int, default=d.max_queue,
                   help=f"requests waiting for a batch before new ones get 429 (default {d.max_queue})")
    p.add_argument("--max-batch", type=int, default=d.max_batch,
                   help=f"images per denoise loop, and the largest n (default {d.max_batch})")
    p.add_argument("--batch-wait-ms", type=float, default=d.batch_wait_ms,
                   help=f"how long a request waits for others to batch with (default {d.batch_wait_ms:g})")
    p.add_argument("--timeout-s", type=float, default=d.timeout_s,
                   help=f"queue + compute time after which a request gets 504 (default {d.timeout_s:g})")
    p.add_argument("--max-pixels", type=int, default=d.max_pixels,
                   help=f"largest width x height a request may ask for (default {d.max_pixels})")
    p.add_argument("--default-steps", type=int, default=d.default_steps,
                   help=f"steps when a request gives none (default {d.default_steps})")
    p.add_argument("--max-steps", type=int, default=d.max_steps, help=f"most steps per request (default {d.max_steps})")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                   help="a LoRA .safetensors requests may choose by its file name without .safetensors (field "
                        "`loras`); SCALE (default 1) is its scale in the default set, 0 leaves it out of it "
                        "(repeatable)")
    p.add_argument("--embedding", action="append", default=[], metavar="FILE[:TOKEN]",
                   help="a textual inversion embedding, always active: its trigger is TOKEN, else the file's own "
                        "token or the file name (repeatable)")
    ray = p.add_argument_group("Ray Serve (pip install 'sdengine[ray]'; README, \"Serving at scale\")")
    ray.add_argument("--ray", nargs="?", const="local", default=None, metavar="auto|ADDRESS",
                     help="serve on Ray Serve: alone, a Ray instance started here (stopped on exit); auto, the "
                          "running cluster (RAY_ADDRESS or `ray start`'s); or a cluster's ADDRESS (ray://... or "
                          "HOST:PORT). --host/--port are then Ray Serve's HTTP proxy")
    ray.add_argument("--replicas", type=int, default=1, help="replicas, each loading the model once (default 1)")
    ray.add_argument("--autoscale", default=None, metavar="MIN:MAX",
                     help="autoscale between MIN and MAX replicas on ongoing requests (instead of --replicas)")
    ray.add_argument("--gpus-per-replica", type=float, default=None,
                     help="GPUs each replica reserves (default 1 with --device cuda, else 0)")
    ray.add_argument("--cpus-per-replica", type=float, default=1.0, help="CPUs each replica reserves (default 1)")
    ray.add_argument("--max-ongoing-requests", type=int, default=None,
                     help="requests Ray sends one replica at once (default: --max-batch + --max-queue + 8, so the "
                          "replica's own queue answers 429 as the standalone server does)")
    ray.add_argument("--max-queued-requests", type=int, default=-1,
                     help="requests the proxy holds when every replica is full, past which it answers 503 "
                          "(default -1: no limit)")
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps, help=argparse.SUPPRESS)
    p.add_argument("--log-level", choices=("critical", "error", "warning", "info", "debug"), default="info")
    p.add_argument("--access-log", action="store_true", help="log every request (uvicorn's access log)")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `serve` on the `sdengine` command's subparsers."""
    p = subparsers.add_parser("serve", help="HTTP server: OpenAI-shaped image generation with request batching",
                              description="Serve the model over HTTP: POST /v1/images/generations, "
                                          "GET /v2/health/live, /v2/health/ready, /metrics.")
    add_arguments(p)
    return p


def settings_from_args(args: argparse.Namespace) -> ServeSettings:
    from ..embeddings import parse_spec
    from ..lora import parse_cli_lora

    device = args.device or ("cuda" if args.backend == "tensorrt" else "cpu")
    return ServeSettings(model=args.model, backend=args.backend, device=device, threads=args.threads,
                         host=args.host, port=args.port, max_queue=args.max_queue, max_batch=args.max_batch,
                         batch_wait_ms=args.batch_wait_ms, timeout_s=args.timeout_s, max_pixels=args.max_pixels,
                         default_steps=args.default_steps, max_steps=args.max_steps,
                         warmup_steps=args.warmup_steps,
                         loras=tuple(parse_cli_lora(text) for text in getattr(args, "lora", [])),
                         embeddings=tuple(parse_spec(text) for text in getattr(args, "embedding", []))).check()


def check_startup(settings: ServeSettings) -> None:
    """What can be checked before listening: the backend exists here, the model path exists, deps import."""
    from ..backends import BACKENDS

    if settings.backend not in BACKENDS:
        raise InvalidInputError(f"backend {settings.backend!r} is not available in this sdengine; choose one of: "
                                f"{', '.join(BACKENDS)}")
    module, extra = _NEEDS[settings.backend]
    if importlib.util.find_spec(module) is None:
        other = " on an NVIDIA GPU host, or use --backend onnxruntime" if settings.backend == "tensorrt" else ""
        raise SDEngineError(f"the {settings.backend} backend needs {module}: pip install '{extra}'{other}")
    for module in ("uvicorn", "starlette", "python_multipart", "fastapi", "pydantic", "prometheus_client"):
        if importlib.util.find_spec(module) is None:
            raise SDEngineError(f"sdengine serve needs {module}: pip install 'sdengine[serve]'")
    if settings.backend == "onnxruntime":  # the export folder's manifest, read without loading any graph
        from ..manifest import Manifest

        if settings.model is None:
            raise InvalidInputError("--backend onnxruntime needs --model: a folder written by sdengine export")
        Manifest.read(settings.model)
    elif settings.backend == "tensorrt":  # TensorRT, cuda-python and a GPU, then the set's manifest
        from ..backends.tensorrt_backend import check_available
        from ..engine_manifest import read

        check_available(settings.device)
        if settings.model is None:
            raise InvalidInputError("--backend tensorrt needs --model: an engine set written by sdengine build")
        read(settings.model)
    elif settings.model is None:
        from ..demo import embedded_model_path

        embedded_model_path()
    elif not Path(settings.model).expanduser().exists():
        raise ModelLoadError(f"--model {settings.model} does not exist: give a diffusers folder, a .safetensors "
                             f"file or (--backend onnxruntime) a folder from sdengine export")
    check_lora_files(settings)


def check_lora_files(settings: ServeSettings) -> None:
    """Each --lora is a readable safetensors file and each --embedding an embedding, before listening (the
    LoRAs' keys are checked against the model's weights once it has loaded)."""
    from ..embeddings import read_embedding
    from ..lora import lora_specs, read_safetensors_numpy

    for path, _ in lora_specs(settings.loras):
        try:
            tensors, _, _ = read_safetensors_numpy(path)
        except SDEngineError as exc:
            raise type(exc)(f"--lora: {exc}") from None
        if not tensors:
            raise InvalidInputError(f"--lora {path}: the file holds no tensors")
    for path, token in settings.embeddings:
        try:
            read_embedding(path, token)
        except SDEngineError as exc:
            raise type(exc)(f"--embedding: {exc}") from None


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: a free one)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        raise SDEngineError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


RAY_WORKER_PORTS_END = 19999  # Ray's default max_worker_port: its workers listen on 10002-19999


def ephemeral_low() -> int:
    """The lowest port the kernel hands to outgoing connections and port-0 binds (Linux: ip_local_port_range)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default (macOS and Windows start at 49152)


def proxy_port(host: str, tries: int = 64) -> int:
    """A free port for Ray Serve's proxy, which binds it only after ray.init has started the cluster's processes.

    A port-0 pick comes from the kernel's ephemeral range, where every connection and port-0 listener Ray opens in
    between draws too, so one of them can take it first ("Address already in use"). So: a free port between Ray's
    worker ports and the ephemeral range; a port-0 pick only when that range is empty or full."""
    ports = list(range(RAY_WORKER_PORTS_END + 1, ephemeral_low()))
    random.shuffle(ports)
    for port in ports[:tries]:
        try:
            bind(host, port).close()
        except SDEngineError:
            continue
        return port
    probe = bind(host, 0)
    port = probe.getsockname()[1]
    probe.close()
    return port


def run(args: argparse.Namespace) -> int:
    """Serve until SIGTERM/SIGINT; 0 after a graceful drain. Start-up errors raise SDEngineError."""
    settings = settings_from_args(args)
    if getattr(args, "ray", None) is None:
        ray_flags = (("--replicas", "replicas", 1), ("--autoscale", "autoscale", None),
                     ("--gpus-per-replica", "gpus_per_replica", None),
                     ("--max-ongoing-requests", "max_ongoing_requests", None),
                     ("--max-queued-requests", "max_queued_requests", -1))
        given = [flag for flag, name, default in ray_flags if getattr(args, name, default) != default]
        if given:
            raise InvalidInputError(f"{', '.join(given)} configure Ray Serve: add --ray (README, \"Serving at scale\")")
    check_startup(settings)
    if getattr(args, "ray", None) is not None:
        return run_ray(args, settings)
    import uvicorn

    from .app import Service, create_app

    service = Service(settings)
    config = uvicorn.Config(create_app(service), log_level=args.log_level, access_log=args.access_log,
                            lifespan="on", timeout_graceful_shutdown=settings.timeout_s + 5)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:  # SIGTERM/SIGINT: stop taking work before uvicorn drains
            service.begin_drain()
            super().handle_exit(sig, frame)

    server = Server(config)
    service.on_fatal = lambda: setattr(server, "should_exit", True)
    sock = bind(settings.host, settings.port)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"sdengine serve: listening on http://{shown}:{port} (loading the model; "
          f"GET /v2/health/ready says when it is ready)", flush=True)
    # uvicorn re-raises the signal it caught once it has shut down; after a graceful drain we exit 0.
    previous = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run(sockets=[sock])
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        sock.close()
    if service.error is not None:
        error = service.error
        raise error if isinstance(error, SDEngineError) else ModelLoadError(f"the model failed to load: {error}")
    return 0


class _Stop(Exception):
    """SIGTERM or SIGINT while serving on Ray."""


def run_ray(args: argparse.Namespace, settings: ServeSettings) -> int:
    """Serve on Ray Serve until SIGTERM/SIGINT, then delete the application (and stop a Ray started here)."""
    if importlib.util.find_spec("ray") is None or importlib.util.find_spec("ray.serve") is None:
        raise SDEngineError("--ray needs Ray Serve: pip install 'sdengine[ray]'")
    import os

    from .proxy import ENV, IMPORT_PATH
    from .ray import build_app, parse_autoscale

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault(ENV, IMPORT_PATH)  # the proxies of a Ray started here: Ray's errors in our shape

    autoscale = None if args.autoscale is None else parse_autoscale(args.autoscale)
    app = build_app(settings.model, settings.backend, num_replicas=args.replicas, autoscale=autoscale,
                    gpus_per_replica=args.gpus_per_replica, cpus_per_replica=args.cpus_per_replica,
                    max_ongoing_requests=args.max_ongoing_requests, max_queued_requests=args.max_queued_requests,
                    **{f: getattr(settings, f) for f in ("device", "threads", "max_queue", "max_batch",
                                                        "batch_wait_ms", "timeout_s", "max_pixels", "default_steps",
                                                        "max_steps", "warmup_steps", "loras", "embeddings")})
    port = settings.port
    if port == 0:  # Ray's proxy takes a fixed port: pick a free one now
        port = proxy_port(settings.host)
    import ray
    from ray import serve

    local = args.ray == "local"

    def stop(*_: object) -> None:
        raise _Stop()

    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        if local:
            ray.init(include_dashboard=False, object_store_memory=256 * 1024 * 1024, logging_level="warning",
                     configure_logging=False)
        else:
            ray.init(address=args.ray, logging_level="warning", configure_logging=False)
        for s in previous:  # after ray.init, which sets its own handlers
            signal.signal(s, stop)
        serve.start(http_options={"host": settings.host, "port": port})
        print(f"sdengine serve: starting {args.replicas if autoscale is None else args.autoscale} replica(s) on Ray "
              f"Serve (each loads the model)", flush=True)
        serve.run(app, name="sdengine", route_prefix="/", blocking=False)
        shown = f"[{settings.host}]" if ":" in settings.host else settings.host
        print(f"sdengine serve: listening on http://{shown}:{port} (Ray Serve; ready)", flush=True)
        while True:
            signal.pause()
    except _Stop:
        pass
    except RuntimeError as exc:  # the application failed to deploy (a replica's constructor raised)
        raise ModelLoadError(f"Ray Serve could not start the application: {str(exc).splitlines()[0]}") from None
    finally:
        for s in previous:
            signal.signal(s, signal.SIG_IGN)  # a second signal does not interrupt the shutdown
        if ray.is_initialized():
            if local:
                serve.shutdown()
            else:
                serve.delete("sdengine")
            ray.shutdown()
        for s, handler in previous.items():
            signal.signal(s, handler)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m sdengine.serve`: the same arguments as `sdengine serve`."""
    parser = argparse.ArgumentParser(prog="sdengine serve", description="Serve the model over HTTP.")
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except SDEngineError as exc:
        print(f"sdengine serve: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"sdengine serve: error: {exc}", file=sys.stderr)
        return 1
