"""Shared by the server's tests: a raw HTTP client, server processes (standalone or on Ray Serve), metrics read
with prometheus_client's own parser, the blocker request, PNG and multipart helpers, and the fixtures.

Each server runs the tiny random model with one CPU thread and a few steps. A long request (500 steps) holds
the model busy while a test fills the queue, so counts do not depend on timing; it is then cancelled by
closing its connection. Every wait is bounded.

The HTTP suite (tests/test_serve_generations.py, tests/test_serve_edits.py) runs against both ways of
serving: `sdengine serve` standalone (uvicorn) and `sdengine serve --ray` (a local Ray instance, one Ray
Serve replica, the same FastAPI app as its ingress). One server of each kind serves the whole session.
"""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

HOST = "127.0.0.1"
START_TIMEOUT = 300.0  # model load under a busy CPU; a few seconds on an idle one
BLOCKER = {"prompt": "hold the model", "steps": 500}  # never finishes within a test: cancelled instead
QUEUE, BATCH = 3, 2
SERVER_ARGS = ("--max-queue", str(QUEUE), "--max-batch", str(BATCH), "--batch-wait-ms", "50", "--max-steps", "500",
               "--max-pixels", str(128 * 128), "--timeout-s", "240")
HAVE_RAY = importlib.util.find_spec("ray") is not None
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_DISABLE_USAGE_STATS": "1"}
ray_only = pytest.mark.skipif(not HAVE_RAY, reason="ray[serve] is not installed: pip install 'sdengine[ray]'")


# ---- a tiny HTTP client over raw sockets (no client library: the bytes on the wire are the test) -------------
def http(port: int, method: str, path: str, body: bytes | dict | None = None, timeout: float = 120.0,
         headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """One request on a fresh connection: (status, lower-cased headers, body)."""
    import http.client

    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        hdrs = {"Content-Type": "application/json", **(headers or {})}
        conn.request(method, path, body=data, headers=hdrs)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def generate(port: int, body: bytes | dict, timeout: float = 120.0) -> tuple[int, dict[str, str], dict]:
    status, headers, raw = http(port, "POST", "/v1/images/generations", body, timeout)
    return status, headers, json.loads(raw) if raw else {}


def open_generation(port: int, body: dict) -> socket.socket:
    """Send a generation request and leave it waiting; closing the socket is the client going away."""
    data = json.dumps(body).encode()
    sock = socket.create_connection((HOST, port), timeout=30)
    sock.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
    return sock


def metrics(port: int) -> dict[str, float]:
    """/metrics read by prometheus_client's parser: {'name{label="value",...}': value}."""
    from prometheus_client.parser import text_string_to_metric_families

    status, headers, raw = http(port, "GET", "/metrics", timeout=30)
    assert status == 200
    out = {}
    for family in text_string_to_metric_families(raw.decode()):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sample.labels.items())
            out[sample.name + (f"{{{labels}}}" if labels else "")] = sample.value
    return out


def wait_for(predicate, timeout: float = 120.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


# ---- server processes --------------------------------------------------------------------------------------
class Server:
    """`python -m sdengine.serve` on a free port; the first readiness answer is recorded before waiting.
    `kind` "ray" adds --ray (a local Ray instance started by the command, one replica)."""

    def __init__(self, model: Path, log: Path, *args: str, kind: str = "standalone") -> None:
        self.log_path, self.kind = log, kind
        self._log = open(log, "wb")
        env = {**os.environ, "OMP_NUM_THREADS": "1", **RAY_ENV}
        if kind == "ray":
            args = ("--ray", "--replicas", "1", *args)
        self.proc = subprocess.Popen([sys.executable, "-m", "sdengine.serve", "--model", str(model), "--port", "0",
                                      "--threads", "1", *args], stdout=self._log, stderr=subprocess.STDOUT, env=env)
        match = wait_for(lambda: self.proc.poll() is not None and "exited" or
                         re.search(r"listening on http://127\.0\.0\.1:(\d+)", self.log()),
                         START_TIMEOUT if kind == "ray" else 60, "the listening line")
        assert match != "exited", self.log()
        self.port = int(match.group(1))
        self.first_ready = http(self.port, "GET", "/v2/health/ready", timeout=30)
        self.first_live = http(self.port, "GET", "/v2/health/live", timeout=30)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self) -> "Server":
        def ready():
            assert self.proc.poll() is None, f"server exited:\n{self.log()}"
            return http(self.port, "GET", "/v2/health/ready", timeout=30)[0] == 200

        wait_for(ready, START_TIMEOUT, "readiness")
        return self

    def stop(self) -> None:
        """Kill a standalone server; a Ray one gets SIGTERM (it shuts Ray down), then is killed if still there."""
        if self.proc.poll() is None and self.kind == "ray":
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                pass
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        self._log.close()


def decode_png(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def grew(before: dict[str, float], after: dict[str, float], key: str) -> float:
    return after[key] - before[key]


class Blocker:
    """A 500-step request that holds the model until closed (then its loop stops between two steps)."""

    def __init__(self, port: int) -> None:
        self.port = port
        before = metrics(port)["sdengine_denoise_steps_total"]
        self.sock = open_generation(port, BLOCKER)
        wait_for(lambda: metrics(port)["sdengine_denoise_steps_total"] > before, 120, "the blocker's first step")

    def close(self) -> None:
        abandoned = metrics(self.port)['sdengine_batches_total{outcome="abandoned"}']
        self.sock.close()
        wait_for(lambda: metrics(self.port)['sdengine_batches_total{outcome="abandoned"}'] > abandoned, 120,
                 "the blocker's loop to stop")


# ---- fixtures (imported by tests/conftest.py: shared by every module) -----------------------------------------------------------------
@pytest.fixture
def start_server(tiny_model_dir, tmp_path):
    """Start standalone servers with extra arguments; every one is killed at teardown."""
    servers = []

    def start(*args: str, kind: str = "standalone") -> Server:
        server = Server(tiny_model_dir, tmp_path / f"server-{len(servers)}.log", *args, kind=kind)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="session", params=["standalone", pytest.param("ray", marks=ray_only)])
def server(request, tiny_model_dir, tmp_path_factory):
    """One server of each kind for the session's HTTP suite, with a small queue and batch."""
    s = Server(tiny_model_dir, tmp_path_factory.mktemp(f"serve-{request.param}") / "server.log", *SERVER_ARGS,
               kind=request.param)
    try:
        yield s.wait_ready()
    finally:
        s.stop()


# ---- POST /v1/images/edits --------------------------------------------------------------------------------------
def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def huge_png_header(width: int = 100_000, height: int = 100_000) -> bytes:
    """A PNG whose header claims width x height pixels (a decompression bomb's first bytes)."""
    import struct
    import zlib

    data = bytearray(png(np.zeros((8, 8, 3), np.uint8)))
    start = data.index(b"IHDR")
    data[start + 4:start + 12] = struct.pack(">II", width, height)
    data[start + 17:start + 21] = struct.pack(">I", zlib.crc32(bytes(data[start:start + 17])))
    return bytes(data)


IMAGE = png(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
EDIT_MASK = np.full((64, 64, 4), 255, np.uint8)
EDIT_MASK[16:48, 16:48, 3] = 0  # transparent: edited (OpenAI's convention)


def edit(port: int, fields: dict, files: dict, timeout: float = 120.0) -> tuple[int, dict]:
    """A multipart POST /v1/images/edits with `files` {name: bytes}."""
    import uuid

    boundary = uuid.uuid4().hex
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in fields.items()]
    parts += [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"; filename="{k}.png"\r\n'
              f"Content-Type: image/png\r\n\r\n".encode() + v + b"\r\n" for k, v in files.items()]
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    status, _, raw = http(port, "POST", "/v1/images/edits", body, timeout,
                          headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    return status, json.loads(raw) if raw else {}


# ---- processes ---------------------------------------------------------------------------------------------------
def descendants(pid: int) -> set[int]:
    """Every live process under `pid` (Linux /proc), recursively."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parent = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def alive(pids: set[int]) -> set[int]:
    """The pids that still exist and are not zombies."""
    out = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            out.add(pid)
    return out
