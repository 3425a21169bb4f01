"""`sdengine serve`: a real server process on 127.0.0.1, talked to over HTTP, as a client would.

Each server runs the tiny random model with one CPU thread and a few steps. A long request (500
steps) holds the model busy while a test fills the queue, so counts do not depend on timing; it is
then cancelled by closing its connection. Every wait is bounded.
"""

from __future__ import annotations

import base64
import io
import json
import os
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
from PIL import Image

pytest.importorskip("uvicorn")
pytest.importorskip("starlette")

HOST = "127.0.0.1"
START_TIMEOUT = 300.0  # model load under a busy CPU; a few seconds on an idle one
BLOCKER = {"prompt": "hold the model", "steps": 500}  # never finishes within a test: cancelled instead
QUEUE, BATCH = 3, 2


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
    status, headers, raw = http(port, "GET", "/metrics", timeout=30)
    assert status == 200
    out = {}
    for line in raw.decode().splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
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
    """`python -m sdengine.serve` on a free port; the first readiness answer is recorded before waiting."""

    def __init__(self, model: Path, log: Path, *args: str) -> None:
        self.log_path = log
        self._log = open(log, "wb")
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "sdengine.serve", "--model", str(model), "--port", "0",
                                      "--threads", "1", *args], stdout=self._log, stderr=subprocess.STDOUT, env=env)
        match = wait_for(lambda: self.proc.poll() is not None and "exited" or
                         re.search(r"listening on http://127\.0\.0\.1:(\d+)", self.log()), 60, "the listening line")
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
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        self._log.close()


@pytest.fixture
def start_server(tiny_model_dir, tmp_path):
    """Start servers with extra arguments; every one is killed at teardown."""
    servers = []

    def start(*args: str) -> Server:
        server = Server(tiny_model_dir, tmp_path / f"server-{len(servers)}.log", *args)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    s = Server(tiny_model_dir, tmp_path_factory.mktemp("serve") / "server.log", "--max-queue", str(QUEUE),
               "--max-batch", str(BATCH), "--batch-wait-ms", "50", "--max-steps", "500", "--max-pixels",
               str(128 * 128), "--timeout-s", "240")
    try:
        yield s.wait_ready()
    finally:
        s.stop()


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


def grew(before: dict[str, float], after: dict[str, float], key: str) -> float:
    return after[key] - before[key]


def decode_png(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


# ---- readiness, health, generation ---------------------------------------------------------------------------
def test_ready_only_after_load_and_warm_up(server):
    status, _, body = server.first_ready
    assert status == 503 and json.loads(body) == {"ready": False, "state": "loading"}
    assert server.first_live[0] == 200  # alive while loading
    status, _, body = http(server.port, "GET", "/v2/health/ready")
    assert status == 200 and json.loads(body)["ready"] is True
    assert "warm-up image" in server.log()
    assert metrics(server.port)["sdengine_ready"] == 1


def test_generation_returns_pngs_with_their_seeds(server):
    status, headers, body = generate(server.port, {"prompt": "a red circle", "n": 2, "seed": 7, "steps": 2,
                                                   "size": "64x64", "response_format": "b64_json",
                                                   "negative_prompt": "blurry", "guidance_scale": 5, "eta": 0.5})
    assert status == 200, body
    assert isinstance(body["created"], int) and [d["seed"] for d in body["data"]] == [7, 8]
    images = [decode_png(d["b64_json"]) for d in body["data"]]
    assert all(im.size == (64, 64) and im.format == "PNG" for im in images)
    assert "compute;dur=" in headers["server-timing"]
    # The second image alone, from its own seed: the same picture (the batch only changes float rounding).
    status, _, alone = generate(server.port, {"prompt": "a red circle", "seed": 8, "steps": 2, "size": "64x64",
                                              "negative_prompt": "blurry", "guidance_scale": 5, "eta": 0.5})
    assert status == 200 and alone["data"][0]["seed"] == 8
    diff = np.abs(np.asarray(images[1], np.int16) - np.asarray(decode_png(alone["data"][0]["b64_json"]), np.int16))
    assert diff.max() <= 2
    # No seed: one is drawn and reported.
    status, _, body = generate(server.port, {"prompt": "a blue square", "steps": 1, "size": "64x80"})
    assert status == 200 and isinstance(body["data"][0]["seed"], int)
    assert decode_png(body["data"][0]["b64_json"]).size == (64, 80)


def test_pngs_carry_their_parameters_and_openai_extras_are_accepted(server):
    """A1111's `parameters` text in every PNG; OpenAI's quality and style are accepted and ignored."""
    from a1111_infotext import parse

    status, _, body = generate(server.port, {"prompt": "a red circle", "negative_prompt": "blurry", "seed": 3,
                                             "steps": 2, "guidance_scale": 4, "quality": "hd", "style": "vivid"})
    assert status == 200, body
    fields = parse(decode_png(body["data"][0]["b64_json"]).text["parameters"])
    assert (fields["Prompt"], fields["Negative prompt"], fields["Seed"], fields["Steps"], fields["CFG scale"]) == (
        "a red circle", "blurry", "3", "2", "4")
    assert (fields["Size-1"], fields["Size-2"], fields["Model"]) == ("64", "64", "tiny")


def test_models_lists_the_served_model(server):
    """GET /v1/models: OpenAI's list shape, which OpenAI-compatible tools call first."""
    status, _, raw = http(server.port, "GET", "/v1/models")
    body = json.loads(raw)
    assert status == 200 and body["object"] == "list" and len(body["data"]) == 1
    model = body["data"][0]
    assert model["id"] == "tiny" and model["object"] == "model" and model["owned_by"] == "sdengine"
    assert isinstance(model["created"], int)


# ---- concurrency -----------------------------------------------------------------------------------------------
def test_burst_over_the_queue_gets_429_and_the_rest_succeed(server):
    before = metrics(server.port)
    blocker = Blocker(server.port)
    burst = 8
    with ThreadPoolExecutor(burst) as pool:
        futures = [pool.submit(generate, server.port, {"prompt": f"burst {i}", "steps": 1, "seed": i})
                   for i in range(burst)]
        # Exactly QUEUE requests fit in the queue while the model is busy; the rest are answered at once.
        wait_for(lambda: sum(f.done() for f in futures) == burst - QUEUE, 60, "the 429 answers")
        assert metrics(server.port)["sdengine_queue_depth"] == QUEUE
        blocker.close()
        results = [f.result(timeout=120) for f in futures]
    statuses = sorted(r[0] for r in results)
    assert statuses == [200] * QUEUE + [429] * (burst - QUEUE)
    for status, headers, body in results:
        if status == 429:
            assert int(headers["retry-after"]) >= 1 and "queue is full" in body["error"]["message"]
        else:
            assert len(body["data"]) == 1 and decode_png(body["data"][0]["b64_json"]).size == (64, 64)
    after = metrics(server.port)
    assert grew(before, after, 'sdengine_requests_total{outcome="rejected"}') == burst - QUEUE
    assert grew(before, after, 'sdengine_requests_total{outcome="ok"}') == QUEUE
    assert http(server.port, "GET", "/v2/health/ready")[0] == 200  # still up and ready
    assert generate(server.port, {"prompt": "after the burst", "steps": 1})[0] == 200


def test_compatible_requests_share_one_denoise_loop(server):
    blocker = Blocker(server.port)
    before = metrics(server.port)
    with ThreadPoolExecutor(3) as pool:
        same = [pool.submit(generate, server.port, {"prompt": p, "steps": 2, "seed": 1}) for p in ("a cat", "a dog")]
        wait_for(lambda: metrics(server.port)["sdengine_queue_depth"] == 2, 60, "two queued requests")
        other = pool.submit(generate, server.port, {"prompt": "a cat", "steps": 2, "seed": 1,
                                                    "scheduler": "Euler a"})  # another sampler: another table
        wait_for(lambda: metrics(server.port)["sdengine_queue_depth"] == 3, 60, "three queued requests")
        blocker.close()
        results = [f.result(timeout=120) for f in (*same, other)]
        assert [r[0] for r in results] == [200, 200, 200]
    from a1111_infotext import parse

    assert parse(decode_png(results[2][2]["data"][0]["b64_json"]).text["parameters"])["Sampler"] == "Euler a"
    after = metrics(server.port)
    # Two loops: the two DDIM requests together, then the Euler a one alone.
    assert grew(before, after, "sdengine_batch_images_count") == 2
    assert grew(before, after, "sdengine_batch_images_sum") == 3
    assert grew(before, after, 'sdengine_batch_images_bucket{le="1"}') == 1
    assert grew(before, after, 'sdengine_batches_total{outcome="completed"}') == 2


def test_disconnected_clients_are_cancelled(server):
    before = metrics(server.port)
    blocker = Blocker(server.port)
    waiting = open_generation(server.port, {"prompt": "never run", "steps": 3})
    wait_for(lambda: metrics(server.port)["sdengine_queue_depth"] == 1, 60, "a queued request")
    waiting.close()  # waiting in the queue: dropped before it runs
    wait_for(lambda: metrics(server.port)["sdengine_queue_depth"] == 0, 60, "the queue to empty")
    blocker.close()  # running: its loop stops between two steps
    stopped = metrics(server.port)
    time.sleep(1.0)
    after = metrics(server.port)
    assert after["sdengine_denoise_steps_total"] == stopped["sdengine_denoise_steps_total"]  # nothing runs on
    assert grew(before, after, "sdengine_denoise_steps_total") < BLOCKER["steps"]
    assert grew(before, after, 'sdengine_requests_total{outcome="cancelled"}') == 2
    assert grew(before, after, 'sdengine_batches_total{outcome="abandoned"}') == 1
    assert grew(before, after, "sdengine_batch_images_count") == 1  # "never run" never ran
    assert generate(server.port, {"prompt": "still serving", "steps": 1})[0] == 200


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


# ---- bad input -------------------------------------------------------------------------------------------------
LONG = "cat " * 601  # 601 tokens: 9 chunks of 75, one more than the server reads
BAD = [
    ({"prompt": "a", "size": "65x64"}, 422, "size", "width must be a multiple of 8 (this model's VAE factor)"),
    ({"prompt": "a", "size": "56x64"}, 422, "size", "between 64 and 2048"),
    ({"prompt": "a", "size": "256x256"}, 422, "size", "at most 16384"),
    ({"prompt": "a", "size": "64"}, 422, "size", "WIDTHxHEIGHT"),
    ({"prompt": "a", "size": 64}, 422, "size", "WIDTHxHEIGHT"),
    ({"prompt": "a", "n": 0}, 422, "n", "between 1 and 2"),
    ({"prompt": "a", "n": 3}, 422, "n", "between 1 and 2"),
    ({"prompt": "a", "n": "2"}, 422, "n", "integer"),
    ({"prompt": "a", "steps": 0}, 422, "steps", "between 1 and 500"),
    ({"prompt": "a", "steps": 501}, 422, "steps", "between 1 and 500"),
    ({"prompt": "a", "steps": 2.5}, 422, "steps", "integer"),
    (b'{"prompt": "a", "guidance_scale": NaN}', 422, "guidance_scale", "finite"),
    (b'{"prompt": "a", "guidance_scale": Infinity}', 422, "guidance_scale", "finite"),
    ({"prompt": "a", "guidance_scale": -1}, 422, "guidance_scale", ">= 0"),
    ({"prompt": "a", "guidance_scale": "high"}, 422, "guidance_scale", "number"),
    ({"prompt": "a", "eta": -0.5}, 422, "eta", ">= 0"),
    ({"prompt": "a", "eta": 50, "steps": 10}, 422, "eta", "too large"),
    ({"prompt": ""}, 422, "prompt", "empty"),
    ({"prompt": "   "}, 422, "prompt", "empty"),
    ({"n": 1}, 422, "prompt", "required"),
    ({"prompt": ["a", "b"]}, 422, "prompt", "string"),
    ({"prompt": LONG}, 422, "prompt", "needs 9 chunks of 75 tokens (601 tokens); at most 8"),
    ({"prompt": "a", "negative_prompt": LONG}, 422, "negative_prompt", "needs 9 chunks"),
    ({"prompt": "a", "clip_skip": 2}, 422, "clip_skip", "between 0 and 1"),
    ({"prompt": "a", "clip_skip": "1"}, 422, "clip_skip", "integer"),
    ({"prompt": "a", "prompt_weighting": 1}, 422, "prompt_weighting", "true or false"),
    ({"prompt": "a", "quality": 3}, 422, "quality", "must be a string (it is accepted and ignored)"),
    ({"prompt": "a", "colour": "red"}, 422, "colour", "unknown field"),
    ({"prompt": "a", "scheduler": "dpm"}, 422, "scheduler", "dpmpp_2m_karras"),
    ({"prompt": "a", "scheduler": 2}, 422, "scheduler", "must be a string"),
    ({"prompt": "a", "scheduler": "euler", "eta": 0.5}, 422, "eta", "eta"),
    (b'{"prompt": "a \\ud800 b"}', 422, "prompt", "prompt: "),
    (b'{"prompt": "a", "negative_prompt": "\\udcff"}', 422, "negative_prompt", "negative_prompt: "),
    ({"prompt": "a", "response_format": "url"}, 422, "response_format", "only \"b64_json\""),
    ({"prompt": "a", "seed": -1}, 422, "seed", "between 0"),
    ({"prompt": "a", "seed": 1.5}, 422, "seed", "integer"),
    ({"prompt": "a", "seed": True}, 422, "seed", "integer"),
    (b'{"prompt": "a",', 400, None, "not valid JSON"),
    (b"[1, 2]", 400, None, "JSON object"),
    (b"", 400, None, "empty"),
    (b'{"prompt": "\xff"}', 400, None, "UTF-8"),
    (b"[" * 20000, 400, None, "not valid JSON"),
    (b'{"prompt": "' + b"a" * 70000 + b'"}', 413, None, "limit is 65536"),
]


def test_bad_input_is_refused_with_a_json_error(server):
    before = metrics(server.port)
    for body, status, param, text in BAD:
        got, _, answer = generate(server.port, body, timeout=30)
        assert got == status, (repr(body)[:80], answer)
        error = answer["error"]
        assert text in error["message"] and (error["param"], error["code"]) == (param, status), (repr(body)[:80],
                                                                                                  error)
    after = metrics(server.port)
    assert grew(before, after, 'sdengine_requests_total{outcome="invalid"}') == len(BAD)
    assert after["sdengine_batch_images_count"] == before["sdengine_batch_images_count"]  # nothing ran
    status, _, raw = http(server.port, "GET", "/v1/images/generations")
    assert status == 405 and "error" in json.loads(raw)
    status, _, raw = http(server.port, "GET", "/v1/nothing")
    assert status == 404 and "error" in json.loads(raw)


# ---- metrics ---------------------------------------------------------------------------------------------------
SAMPLE = re.compile(r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{([a-zA-Z_][a-zA-Z0-9_]*="[^"\\]*(\\.[^"\\]*)*",?)*\})? '
                    r'(-?[0-9.e+-]+|\+Inf|NaN)$')


def test_metrics_are_prometheus_text(server):
    generate(server.port, {"prompt": "count me", "steps": 1})
    status, headers, raw = http(server.port, "GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain; version=0.0.4")
    text = raw.decode()
    types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M))
    assert set(re.findall(r"^# HELP (\S+) .+$", text, re.M)) == set(types)
    for name, kind in {"sdengine_requests_total": "counter", "sdengine_images_generated_total": "counter",
                       "sdengine_queue_depth": "gauge", "sdengine_queue_seconds": "histogram",
                       "sdengine_compute_seconds": "histogram", "sdengine_request_seconds": "histogram",
                       "sdengine_batch_images": "histogram", "sdengine_ready": "gauge",
                       "sdengine_lora_switches_total": "counter", "sdengine_lora_switch_seconds": "histogram"}.items():
        assert types.get(name) == kind, name
    for line in text.splitlines():
        assert line.startswith("# ") or SAMPLE.match(line), line
    m = metrics(server.port)
    for outcome in ("ok", "invalid", "rejected", "timeout", "cancelled", "unavailable", "error"):
        assert f'sdengine_requests_total{{outcome="{outcome}"}}' in m
    assert m["sdengine_images_generated_total"] >= 1
    for hist in ("sdengine_queue_seconds", "sdengine_compute_seconds", "sdengine_request_seconds"):
        buckets = [v for k, v in m.items() if k.startswith(hist + "_bucket")]
        assert buckets == sorted(buckets) and buckets[-1] == m[hist + "_count"] >= 1
        assert m[f'{hist}_bucket{{le="+Inf"}}'] == m[hist + "_count"] and m[hist + "_sum"] > 0
    assert m["sdengine_request_seconds_count"] == m['sdengine_requests_total{outcome="ok"}']


# ---- start-up errors -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args, text", [
    (["--backend", "tensorrt"], "--backend onnxruntime"),
    (["--model", "/no/such/model"], "does not exist"),
    (["--max-batch", "0"], "--max-batch"),
    (["--timeout-s", "nan"], "--timeout-s"),
    (["--max-pixels", "100"], "--max-pixels"),
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


# ---- in-process units: limits from an engine profile, metrics text -----------------------------------------
def test_batch_key_separates_sampler_tables():
    from sdengine.serve.schema import GenerationRequest

    base = GenerationRequest("a", "", 1, 64, 64, 20, 7.5, 0.0, 1, "ddim")
    same = GenerationRequest("b", "x", 2, 64, 64, 20, 7.5, 0.0, 9, "ddim")
    assert base.batch_key == same.batch_key
    for other in (GenerationRequest("a", "", 1, 64, 64, 20, 7.5, 0.0, 1, "euler_a"),
                  GenerationRequest("a", "", 1, 64, 64, 21, 7.5, 0.0, 1, "ddim"),
                  GenerationRequest("a", "", 1, 64, 64, 20, 7.5, 0.3, 1, "ddim"),
                  GenerationRequest("a", "", 1, 64, 64, 20, 7.5, 0.0, 1, "ddim", chunks=2),
                  GenerationRequest("a", "", 1, 64, 64, 20, 7.5, 0.0, 1, "ddim", clip_skip=1),
                  GenerationRequest("a", "", 1, 64, 64, 20, 7.5, 0.0, 1, "ddim", prompt_weighting=False),
                  GenerationRequest("a", "", 1, 64, 64, 20, 7.5, 0.0, 1, "ddim", loras=(("style", 1.0),))):
        assert other.batch_key != base.batch_key


def test_long_prompts_and_clip_skip_are_served(server):
    """A 2-chunk weighted prompt with clip_skip: served, recorded in the PNG; the same image as alone in a batch."""
    from a1111_infotext import parse

    prompt = " ".join(["red"] * 75) + " a (circle:1.3)"
    body = {"prompt": prompt, "seed": 4, "steps": 2, "clip_skip": 1, "negative_prompt": "blurry"}
    status, _, answer = generate(server.port, body)
    assert status == 200, answer
    fields = parse(decode_png(answer["data"][0]["b64_json"]).text["parameters"])
    assert fields["Prompt"] == prompt and fields["Clip skip"] == "2"
    status, _, plain = generate(server.port, {**body, "prompt_weighting": False})
    assert status == 200, plain
    assert plain["data"][0]["b64_json"] != answer["data"][0]["b64_json"]


def test_limits_follow_the_engine_profile():
    from types import SimpleNamespace

    from sdengine.config import ModelConfig
    from sdengine.serve.app import limits_for
    from sdengine.serve.schema import RequestError, parse_generation
    from sdengine.serve.settings import ServeSettings
    from sdengine.specs import Range, ShapeRanges
    from sdengine.tokenizer import ClipTokenizer

    config = ModelConfig.tiny()
    ranges = ShapeRanges(Range(1, 1, 2), Range(64, 64, 96), Range(64, 64, 128))
    pipe = SimpleNamespace(config=config, tokenizer=ClipTokenizer.default(), backend=SimpleNamespace(ranges=ranges))
    limits, max_batch = limits_for(pipe, ServeSettings(max_batch=4))
    assert max_batch == 2 and limits.max_images == 2
    assert parse_generation(b'{"prompt": "a", "size": "128x96"}', limits).width == 128
    for size, text in (("136x64", "width 136 is outside the loaded engine's range 64..128"),
                       ("64x104", "height 104 is outside the loaded engine's range 64..96")):
        with pytest.raises(RequestError, match=text):
            parse_generation(json.dumps({"prompt": "a", "size": size}).encode(), limits)
    with pytest.raises(RequestError, match="between 1 and 2"):
        parse_generation(b'{"prompt": "a", "n": 3}', limits)
    short = ShapeRanges(Range(1, 1, 2), Range(64, 64, 96), Range(64, 64, 128), chunks=2)
    pipe = SimpleNamespace(config=config, tokenizer=ClipTokenizer.default(), backend=SimpleNamespace(ranges=short))
    limits, _ = limits_for(pipe, ServeSettings(max_batch=4))
    assert parse_generation(json.dumps({"prompt": "cat " * 150}).encode(), limits).chunks == 2
    with pytest.raises(RequestError, match="prompt needs 3 chunks of 75 tokens; this server reads at most 2"):
        parse_generation(json.dumps({"prompt": "cat " * 151}).encode(), limits)


def test_metrics_renderer():
    from sdengine.serve.metrics import Counter, Histogram, Registry

    r = Registry()
    c = r.add(Counter("x_total", "Things.", ("kind",), initial=[{"kind": "a"}]))
    h = r.add(Histogram("y_seconds", "Time.", (0.1, 1)))
    c.inc(kind='b"\\')
    for v in (0.05, 0.5, 5):
        h.observe(v)
    assert r.render().splitlines() == [
        "# HELP x_total Things.", "# TYPE x_total counter", 'x_total{kind="a"} 0', 'x_total{kind="b\\"\\\\"} 1',
        "# HELP y_seconds Time.", "# TYPE y_seconds histogram", 'y_seconds_bucket{le="0.1"} 1',
        'y_seconds_bucket{le="1"} 2', 'y_seconds_bucket{le="+Inf"} 3', "y_seconds_sum 5.55", "y_seconds_count 3"]


def test_fp32_decoder_fallbacks_are_counted():
    """A batch whose images were decoded again in float32 counts once in sdengine_vae_fp32_fallbacks_total."""
    from sdengine.metadata import GenerationInfo
    from sdengine.pipeline import PipelineResult
    from sdengine.serve.app import Service
    from sdengine.serve.schema import GenerationRequest
    from sdengine.serve.settings import ServeSettings

    info = GenerationInfo("a", "", 2, "DDIM", 7.5, 1, 64, 64, "m")
    service = Service(ServeSettings())
    for fallback in (True, False, True):
        service.pipeline = lambda *a, fallback=fallback, **k: PipelineResult(["image"], [1], [info], fallback)
        request = GenerationRequest("a", "", 1, 64, 64, 2, 7.5, 0.0, 1)
        assert service._compute([request], lambda step, total: None) == [("image", info)]
    assert service.metrics.vae_fp32_fallbacks.value() == 2
    assert "sdengine_vae_fp32_fallbacks_total 2" in service.metrics.render()


def test_the_readme_client_snippet_saves_the_images(server, tmp_path):
    """The README's curl | python3 snippet, run on a response of this server (Python >= 3.10 syntax)."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    request = json.loads(re.search(r"-d '(\{\"prompt\": \"a red circle.*?\})'", readme).group(1))
    code = re.search(r"\| python3 -c '(.*?)'\n", readme, re.S).group(1)
    status, _, raw = http(server.port, "POST", "/v1/images/generations", {**request, "steps": 2})
    assert status == 200
    r = subprocess.run([sys.executable, "-c", code], input=raw, capture_output=True, cwd=tmp_path, timeout=60)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img-1.png", "img-2.png"]


# ---- POST /v1/images/edits ------------------------------------------------------------------------------------
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


def test_openai_client_generates_images(server):
    """The official openai client's images.generate against the server, with sdengine's fields as extra_body."""
    openai = pytest.importorskip("openai")
    from a1111_infotext import parse

    client = openai.OpenAI(base_url=f"http://{HOST}:{server.port}/v1", api_key="unused", max_retries=0)
    result = client.images.generate(prompt="a blue square", n=2, size="64x64", response_format="b64_json",
                                    extra_body={"steps": 2, "seed": 7, "scheduler": "dpmpp_2m"})
    images = [decode_png(d.b64_json) for d in result.data]
    assert [im.size for im in images] == [(64, 64)] * 2
    assert [parse(im.text["parameters"])["Seed"] for im in images] == ["7", "8"]
    assert parse(images[0].text["parameters"])["Sampler"] == "DPM++ 2M"


def test_openai_client_edits_an_image(server):
    """The official openai client's images.edit against the server: a PNG of the asked size with its parameters."""
    openai = pytest.importorskip("openai")
    from a1111_infotext import parse

    client = openai.OpenAI(base_url=f"http://{HOST}:{server.port}/v1", api_key="unused", max_retries=0)
    result = client.images.edit(image=("in.png", IMAGE, "image/png"), mask=("mask.png", png(EDIT_MASK), "image/png"),
                                prompt="a red circle", n=2, size="64x64", response_format="b64_json",
                                extra_body={"steps": 2, "seed": 5, "scheduler": "euler_a"})
    images = [decode_png(d.b64_json) for d in result.data]
    assert [im.size for im in images] == [(64, 64)] * 2
    fields = parse(images[0].text["parameters"])
    assert (fields["Sampler"], fields["Denoising strength"], fields["Seed"]) == ("Euler a", "1", "5")
    assert fields["Source image"].startswith("64x64 ") and "Mask hash" in fields
    status, body = edit(server.port, {"prompt": "a red circle", "steps": "2", "strength": "0.5", "seed": "1"},
                        {"image": IMAGE})  # no mask, no transparency: image to image
    assert status == 200 and decode_png(body["data"][0]["b64_json"]).size == (64, 64), body


EDIT_BAD = [
    ({"prompt": "a"}, {}, 422, "image", "image is required"),
    ({"prompt": "a"}, {"image": b"not an image"}, 422, "image", "not a readable image"),
    ({"prompt": "a"}, {"image": b""}, 422, "image", "image is required"),
    ({"prompt": "a"}, {"image": huge_png_header()}, 422, "image", "the limit is 16384"),
    ({"prompt": "a"}, {"image": png(np.zeros((200, 200, 3), np.uint8))}, 422, "image", "the limit is 16384"),
    ({"prompt": "a"}, {"image": IMAGE, "mask": png(EDIT_MASK[:32])}, 422, "mask", "give a mask of the image's size"),
    ({"prompt": "a"}, {"image": IMAGE, "mask": png(np.zeros((64, 64), np.uint8))}, 422, "mask", "no alpha channel"),
    ({"prompt": "a", "strength": "0"}, {"image": IMAGE}, 422, "strength", "(0, 1]"),
    ({"prompt": "a", "strength": "1.5"}, {"image": IMAGE}, 422, "strength", "(0, 1]"),
    ({"prompt": "a", "strength": "0.01", "steps": "10"}, {"image": IMAGE}, 422, "strength", "strength"),
    ({"prompt": "a", "steps": "two"}, {"image": IMAGE}, 422, "steps", "must be an integer"),
    ({"prompt": "a", "colour": "red"}, {"image": IMAGE}, 422, "colour", "unknown field"),
]


def test_bad_edits_are_refused_with_a_json_error(server):
    before = metrics(server.port)
    for fields, files, status, param, text in EDIT_BAD:
        got, body = edit(server.port, fields, files, timeout=30)
        error = body["error"]
        assert (got, error["param"]) == (status, param) and text in error["message"], (fields, list(files), body)
    over = edit(server.port, {"prompt": "a"}, {"image": b"\0" * (17 * 1024 * 1024)}, timeout=60)
    assert over[0] == 413 and "the limit is 16777216" in over[1]["error"]["message"]
    status, _, raw = http(server.port, "POST", "/v1/images/edits", {"prompt": "a"})
    assert status == 400 and "multipart/form-data" in json.loads(raw)["error"]["message"]
    after = metrics(server.port)
    assert after["sdengine_batch_images_count"] == before["sdengine_batch_images_count"]  # nothing ran


# ---- LoRAs and embeddings given at start-up --------------------------------------------------------------------
@pytest.fixture(scope="module")
def lora_server(tiny_model_dir, tiny_pipeline, tmp_path_factory):
    """A server with two LoRAs (style in the default set at 1, detail out of it at 0) and an embedding."""
    from lora_support import TEXT_MODULES, UNET_MODULES, low_rank, write_kohya, write_peft
    from safetensors.numpy import save_file

    folder = tmp_path_factory.mktemp("serve-lora")
    targets = tiny_pipeline.backend.lora_targets()
    modules = {"unet": UNET_MODULES, "text_encoder": TEXT_MODULES}
    style = write_kohya(folder / "style.safetensors", low_rank(targets, modules, 2, 1), alpha=2.0)
    detail = write_peft(folder / "detail.safetensors", low_rank(targets, modules, 2, 2))
    save_file({"emb_params": np.random.default_rng(0).standard_normal((2, 32)).astype(np.float32)},
              str(folder / "shiny.safetensors"))
    s = Server(tiny_model_dir, folder / "server.log", "--lora", str(style), "--lora", f"{detail}:0",
               "--embedding", f"{folder / 'shiny.safetensors'}:<shiny>", "--max-queue", "4", "--max-batch", "2",
               "--batch-wait-ms", "50", "--max-steps", "500", "--timeout-s", "240")
    try:
        s.wait_ready()
        s.files = {"style": style, "detail": detail, "shiny": folder / "shiny.safetensors"}
        s.model = tiny_model_dir
        yield s
    finally:
        s.stop()


def png_loras(body: dict) -> list[list]:
    """Each image's LoRAs as its PNG's `loras` chunk lists them: [[name, scale, sha256], ...]."""
    out = []
    for d in body["data"]:
        chunk = decode_png(d["b64_json"]).text.get("loras")
        out.append([[x["name"], x["scale"], x["sha256"]] for x in json.loads(chunk)] if chunk else [])
    return out


def pixels(body: dict, i: int = 0) -> np.ndarray:
    return np.asarray(decode_png(body["data"][i]["b64_json"]), np.int16)


def test_lora_sets_per_request_and_the_default_set(lora_server):
    import hashlib

    from a1111_infotext import parse

    sha = {name: hashlib.sha256(path.read_bytes()).hexdigest() for name, path in lora_server.files.items()}
    port, base = lora_server.port, {"prompt": "a red circle", "steps": 2, "seed": 5}
    results = {}
    for label, loras in (("default", None), ("style", {"style": 1}), ("file name", {"style.safetensors": 1.0}),
                         ("none", {}), ("zero", {"style": 0}), ("both", {"detail": 0.5, "style": -0.7})):
        status, _, body = generate(port, {**base, **({} if loras is None else {"loras": loras})})
        assert status == 200, body
        results[label] = body
    assert png_loras(results["default"]) == [[["style", 1.0, sha["style"]]]]
    assert parse(decode_png(results["default"]["data"][0]["b64_json"]).text["parameters"])["Lora hashes"] == \
        f"style: {sha['style'][:10]}"
    assert png_loras(results["none"]) == png_loras(results["zero"]) == [[]]
    assert png_loras(results["both"]) == [[["style", -0.7, sha["style"]], ["detail", 0.5, sha["detail"]]]]
    assert np.array_equal(pixels(results["default"]), pixels(results["style"]))
    assert np.array_equal(pixels(results["style"]), pixels(results["file name"]))
    assert np.array_equal(pixels(results["none"]), pixels(results["zero"]))
    assert np.abs(pixels(results["default"]) - pixels(results["none"])).max() > 8
    assert np.abs(pixels(results["both"]) - pixels(results["style"])).max() > 8
    # The same request to a pipeline in this process with the same LoRA and embedding: the same image.
    import sdengine

    status, _, body = generate(port, {**base, "prompt": "a <shiny> circle"})
    assert status == 200, body
    pipe = sdengine.load_pipeline(lora_server.model, loras={lora_server.files["style"]: 1.0}, threads=1)
    pipe.load_textual_inversion(lora_server.files["shiny"], "<shiny>")
    direct = np.asarray(pipe("a <shiny> circle", num_inference_steps=2, seed=5).images[0], np.int16)
    assert np.abs(pixels(body) - direct).max() <= 1
    assert np.abs(pixels(body) - pixels(results["default"])).max() > 0
    # GET /v1/models lists the LoRAs a request may choose, with their scale in the default set.
    model = json.loads(http(port, "GET", "/v1/models")[2])["data"][0]
    assert model["loras"] == [{"name": "style", "default_scale": 1.0}, {"name": "detail", "default_scale": 0.0}]


def test_interleaved_lora_sets_batch_apart_and_switch_between_batches(lora_server):
    """Four queued requests, two sets interleaved: two batches, each request the image of its own set."""
    port = lora_server.port
    blocker = Blocker(port)  # the default set (style) is active
    requests = [{"prompt": f"shape {i}", "steps": 2, "seed": 10 + i, "loras": {} if i % 2 else {"detail": 0.8}}
                for i in range(4)]
    before = metrics(port)
    with ThreadPoolExecutor(4) as pool:
        futures = []
        for body in requests:  # in this order: the queue's head picks each batch
            futures.append(pool.submit(generate, port, body))
            wait_for(lambda: metrics(port)["sdengine_queue_depth"] == len(futures), 60, "the request to queue")
        blocker.close()
        batched = [f.result(timeout=240) for f in futures]
    after = metrics(port)
    assert grew(before, after, 'sdengine_batches_total{outcome="completed"}') == 2  # sets never share a loop
    assert grew(before, after, "sdengine_lora_switches_total") == 2  # style -> detail -> none
    assert after["sdengine_lora_switch_seconds_count"] == after["sdengine_lora_switches_total"]
    for body, (status, _, got) in zip(requests, batched):
        assert status == 200, got
        assert [[x[0], x[1]] for x in png_loras(got)[0]] == [[n, s] for n, s in body["loras"].items()]
        status, _, alone = generate(port, body)
        assert status == 200 and np.abs(pixels(got) - pixels(alone)).max() <= 2
    assert metrics(port)["sdengine_lora_switches_total"] > after["sdengine_lora_switches_total"]


def test_bad_lora_requests_are_refused(lora_server):
    port = lora_server.port
    for loras, text in (({"nope": 1}, "available: style, detail"), ([["style", 1]], "must be an object"),
                        ({"style": "1"}, "finite number"), ({"style": True}, "finite number"),
                        ({"style": 1, "style.safetensors": 1}, "given twice")):
        status, _, body = generate(port, {"prompt": "a cat", "steps": 1, "loras": loras})
        assert status == 422 and body["error"]["param"] == "loras" and text in body["error"]["message"], body
    status, _, body = generate(port, b'{"prompt": "a cat", "loras": {"style": Infinity}}')
    assert status == 422 and "finite" in body["error"]["message"]
    # Edits take the set as a JSON text field.
    status, body = edit(port, {"prompt": "a cat", "steps": 2, "seed": 1, "loras": '{"detail": 1}'},
                        {"image": png(np.full((64, 64, 3), 128, np.uint8))})
    assert status == 200 and [x[0] for x in png_loras(body)[0]] == ["detail"], body
    status, body = edit(port, {"prompt": "a cat", "loras": "{style"}, {"image": png(np.zeros((64, 64, 3), np.uint8))})
    assert status == 422 and body["error"]["param"] == "loras"


def test_unreadable_lora_or_embedding_fails_start_up_in_one_line(tiny_model_dir, tmp_path):
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"not a safetensors file")
    good = tmp_path / "a.safetensors"
    for args, text in ((["--lora", str(bad)], "--lora:"), (["--lora", str(tmp_path / "missing.safetensors")],
                                                            "does not exist"),
                       (["--embedding", str(bad)], "--embedding:"), (["--lora", f"{good}:nan"], "finite"),
                       (["--lora", str(good), "--lora", f"{tmp_path / 'x' / 'a.safetensors'}"], "two LoRAs")):
        r = subprocess.run([sys.executable, "-m", "sdengine.serve", "--model", str(tiny_model_dir), "--port", "0",
                            *args], capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and text in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_a_lora_that_does_not_fit_the_model_fails_the_load(start_server, tmp_path):
    from safetensors.numpy import save_file

    other = tmp_path / "sdxl.safetensors"
    save_file({"lora_unet_input_blocks_4_1_proj_in.lora_up.weight": np.zeros((8, 2), np.float32),
               "lora_unet_input_blocks_4_1_proj_in.lora_down.weight": np.zeros((2, 8), np.float32)}, str(other))
    s = start_server("--lora", str(other))
    assert s.proc.wait(timeout=START_TIMEOUT) == 2
    assert "sdengine serve: error:" in s.log() and "match no weight" in s.log()
