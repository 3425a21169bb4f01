"""`sdengine serve`: argparse at the edge, start-up checks, then uvicorn over a socket bound here.

Binding the socket before uvicorn starts lets `--port 0` pick a free port and the first line on
stdout say which (`listening on http://HOST:PORT`), before the model has loaded.
"""

from __future__ import annotations

import argparse
import importlib.util
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


def run(args: argparse.Namespace) -> int:
    """Serve until SIGTERM/SIGINT; 0 after a graceful drain. Start-up errors raise SDEngineError."""
    settings = settings_from_args(args)
    check_startup(settings)
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
