"""`sdengine serve` as a process: start-up errors, a model that fails to load, timeouts, SIGTERM."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from serve_support import (BATCH, BLOCKER, HOST, IMAGE, EDIT_MASK, QUEUE, START_TIMEOUT, Blocker, Server,  # noqa: F401
                           decode_png, edit, generate, grew, http, huge_png_header, metrics, open_generation, png,
                           wait_for)
from serve_support import alive, descendants, ray_only

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")


def test_timeout_gives_504_and_stops_the_loop(start_server):
    s = start_server("--timeout-s", "3", "--max-steps", "500").wait_ready()
    started = time.monotonic()
    status, _, body = generate(s.port, BLOCKER)
    assert status == 504 and "3 s" in body["error"]["message"], body
    assert 3 <= time.monotonic() - started < 60
    wait_for(lambda: metrics(s.port)['sdengine_batches_total{outcome="abandoned"}'] == 1, 60, "the loop to stop")
    assert metrics(s.port)['sdengine_requests_total{outcome="timeout"}'] == 1
    assert generate(s.port, {"prompt": "quick", "steps": 1})[0] == 200


def test_sigterm_finishes_running_work_and_exits_0(start_server):
    s = start_server("--max-steps", "500").wait_ready()
    with ThreadPoolExecutor(2) as pool:
        running = pool.submit(generate, s.port, {"prompt": "finish me", "steps": 100})
        wait_for(lambda: metrics(s.port)["sdengine_denoise_steps_total"] >= 1, 60, "the loop to start")
        queued = pool.submit(generate, s.port, {"prompt": "queued", "steps": 3})
        wait_for(lambda: metrics(s.port)["sdengine_queue_depth"] == 1, 60, "a queued request")
        s.proc.send_signal(signal.SIGTERM)
        status, _, body = queued.result(timeout=60)
        assert status == 503 and "shutting down" in body["error"]["message"]
        status, _, body = running.result(timeout=120)
        assert status == 200 and len(body["data"]) == 1  # the running batch completed
    assert s.proc.wait(timeout=60) == 0, s.log()
    with pytest.raises(OSError):  # no longer listening
        socket.create_connection((HOST, s.port), timeout=5).close()


@pytest.mark.parametrize("args, text", [
    (["--backend", "tensorrt"], "--backend onnxruntime"),
    (["--model", "/no/such/model"], "does not exist"),
    (["--max-batch", "0"], "--max-batch"),
    (["--timeout-s", "nan"], "--timeout-s"),
    (["--max-pixels", "100"], "--max-pixels"),
    (["--replicas", "2"], "--replicas configure Ray Serve: add --ray"),
])
def test_startup_errors_are_one_line(args, text, tiny_model_dir):
    args = ["--model", str(tiny_model_dir), *args] if "--model" not in args else args
    r = subprocess.run([sys.executable, "-m", "sdengine.serve", "--port", "0", *args], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and text in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_a_model_that_fails_to_load_exits_non_zero(start_server, tmp_path):
    (tmp_path / "empty").mkdir()
    s = start_server("--model", str(tmp_path / "empty"))  # the later --model wins
    assert s.first_ready[0] == 503
    assert s.proc.wait(timeout=START_TIMEOUT) == 2
    assert "sdengine serve: error:" in s.log()


@ray_only
def test_ray_cli_serves_and_sigterm_leaves_no_ray_process(start_server):
    """`sdengine serve --ray`: a local Ray instance, one replica; SIGTERM deletes the app, stops Ray, exits 0."""
    s = start_server("--max-steps", "500", kind="ray").wait_ready()
    status, headers, body = generate(s.port, {"prompt": "a red circle", "steps": 2, "seed": 1})
    assert status == 200 and len(body["data"]) == 1, body
    assert headers["x-sdengine-replica"] and headers["x-sdengine-node"]
    pids = descendants(s.proc.pid)
    titles = " ".join(Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="replace") for p in alive(pids))
    assert "gcs_server" in titles and "raylet" in titles and "ServeReplica" in titles
    s.proc.send_signal(signal.SIGTERM)
    assert s.proc.wait(timeout=180) == 0, s.log()
    wait_for(lambda: not alive(pids), 60, "every Ray process the command started to exit")


def test_ray_proxy_port_is_free_and_outside_the_ephemeral_range(monkeypatch):
    """`--ray --port 0`: the proxy's port is bound only after ray.init, whose processes and connections draw ports
    from the kernel's ephemeral range (a CI run lost the proxy's port that way: "Address already in use"). So it is
    picked between Ray's worker ports and that range, free when picked; a taken port is skipped."""
    from sdengine.serve import cli

    low = cli.ephemeral_low()
    for _ in range(5):
        port = cli.proxy_port(HOST)
        assert cli.RAY_WORKER_PORTS_END < port < low
        cli.bind(HOST, port).close()  # free
    monkeypatch.setattr(cli, "ephemeral_low", lambda: cli.RAY_WORKER_PORTS_END + 3)  # two candidates
    first, second = cli.RAY_WORKER_PORTS_END + 1, cli.RAY_WORKER_PORTS_END + 2
    with socket.socket() as taken:
        taken.bind((HOST, first))
        taken.listen(1)
        assert {cli.proxy_port(HOST) for _ in range(10)} == {second}
    monkeypatch.setattr(cli, "ephemeral_low", lambda: cli.RAY_WORKER_PORTS_END + 1)  # no candidate: a port-0 pick
    assert cli.proxy_port(HOST) >= low
