"""Load test for `sdengine serve`: latency percentiles and images per second at several concurrencies.

Either point it at a running server (--url) or let it start one (--model, default: the embedded demo
model) on a free loopback port. Each concurrency level runs --requests requests from that many
client threads (each sends its next request when the previous one is answered), after --warmup
requests that are not counted. Prints a Markdown table and writes JSON (--json).

    python benchmarks/load_test.py --model models/tiny --concurrency 1 4 16 --requests 48 --json out.json
    python benchmarks/load_test.py --url http://127.0.0.1:8000 --steps 20
    python benchmarks/load_test.py --model models/tiny --ray --replicas 2 --concurrency 1 4 16 --json ray2.json

With --ray the started server is `sdengine serve --ray --replicas N` (a local Ray instance); then /metrics
answers from one replica at a time, so "mean batch" is shown only for one replica.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np


def post(host: str, port: int, body: dict, timeout: float) -> tuple[int, int]:
    """(HTTP status, images returned) for one generation request."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("POST", "/v1/images/generations", body=json.dumps(body),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        raw = resp.read()
        return resp.status, len(json.loads(raw)["data"]) if resp.status == 200 else 0
    finally:
        conn.close()


def get(host: str, port: int, path: str, timeout: float = 30) -> tuple[int, str]:
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    finally:
        conn.close()


def scrape(host: str, port: int) -> dict[str, float]:
    """The server's /metrics samples (name{labels} -> value), read with prometheus_client's parser."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(get(host, port, "/metrics")[1]):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sample.labels.items())
            out[sample.name + (f"{{{labels}}}" if labels else "")] = sample.value
    return out


def run_level(host: str, port: int, concurrency: int, requests: int, body: dict, timeout: float,
              one_replica: bool = True) -> dict:
    """`requests` requests from `concurrency` threads; latency of each successful one, wall time of all."""
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    images = 0
    lock = threading.Lock()
    remaining = [requests]

    def client(index: int) -> None:
        nonlocal images
        while True:
            with lock:
                if remaining[0] == 0:
                    return
                remaining[0] -= 1
                seed = remaining[0]
            started = time.perf_counter()
            try:
                status, got = post(host, port, {**body, "seed": seed}, timeout)
            except OSError:
                status, got = -1, 0
            elapsed = time.perf_counter() - started
            with lock:
                statuses[status] = statuses.get(status, 0) + 1
                if status == 200:
                    latencies.append(elapsed)
                    images += got

    before = scrape(host, port)
    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    after = scrape(host, port)
    batches = after["sdengine_batch_images_count"] - before["sdengine_batch_images_count"] if one_replica else 0
    batch_images = after["sdengine_batch_images_sum"] - before["sdengine_batch_images_sum"]
    p50, p95, p99 = (float(np.percentile(latencies, q)) if latencies else float("nan") for q in (50, 95, 99))
    return {"concurrency": concurrency, "requests": requests, "ok": statuses.get(200, 0),
            "statuses": {str(k): v for k, v in sorted(statuses.items())}, "wall_s": wall,
            "p50_s": p50, "p95_s": p95, "p99_s": p99, "images_per_s": images / wall,
            "requests_per_s": statuses.get(200, 0) / wall,
            "mean_batch_images": batch_images / batches if batches else float("nan")}


def start_server(args: argparse.Namespace, log_dir: Path) -> tuple[subprocess.Popen, int, Path]:
    """`python -m sdengine.serve` on a free loopback port, returned once it is ready."""
    log = log_dir / "server.log"
    cmd = [sys.executable, "-m", "sdengine.serve", "--port", "0", "--backend", args.backend,
           "--max-batch", str(args.max_batch), "--max-queue", str(max(args.concurrency) * 2),
           "--batch-wait-ms", str(args.batch_wait_ms), "--timeout-s", str(args.timeout_s)]
    if args.model:
        cmd += ["--model", args.model]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.ray:
        cmd += ["--ray", "--replicas", str(args.replicas), "--cpus-per-replica", str(args.cpus_per_replica)]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.Popen(cmd, stdout=open(log, "wb"), stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + args.start_timeout
    port = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited:\n{log.read_text()}")
        if port is None and (m := re.search(r"listening on http://127\.0\.0\.1:(\d+)", log.read_text())):
            port = int(m.group(1))
        if port is not None and get("127.0.0.1", port, "/v2/health/ready")[0] == 200:
            return proc, port, log
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"the server was not ready within {args.start_timeout} s:\n{log.read_text()}")


def versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "platform": platform.platform(), "cpus": str(os.cpu_count())}
    for name in ("sdengine", "torch", "onnxruntime", "uvicorn", "starlette", "fastapi", "ray", "numpy"):
        try:
            from importlib.metadata import version

            out[name] = version(name)
        except Exception:  # noqa: BLE001 - not installed
            pass
    return out


def table(results: list[dict]) -> str:
    lines = ["| concurrency | requests | ok | requests/s | p50 s | p95 s | p99 s | images/s | mean batch |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        lines.append(f"| {r['concurrency']} | {r['requests']} | {r['ok']} | {r['requests_per_s']:.2f} | "
                     f"{r['p50_s']:.3f} | {r['p95_s']:.3f} | {r['p99_s']:.3f} | {r['images_per_s']:.2f} | "
                     f"{r['mean_batch_images']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", help="a running server (default: start one on a free loopback port)")
    p.add_argument("--model", help="model for the server this script starts (default: the embedded demo model)")
    p.add_argument("--backend", default="torch")
    p.add_argument("--threads", type=int, default=None, help="the started server's CPU threads")
    p.add_argument("--max-batch", type=int, default=4)
    p.add_argument("--batch-wait-ms", type=float, default=25)
    p.add_argument("--timeout-s", type=float, default=600)
    p.add_argument("--start-timeout", type=float, default=600)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--requests", type=int, default=48, help="requests per concurrency level")
    p.add_argument("--warmup", type=int, default=2, help="uncounted requests first")
    p.add_argument("--prompt", default="a red circle on a blue background")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--size", default=None, help="WxH (default: the model's)")
    p.add_argument("--n", type=int, default=1, help="images per request")
    p.add_argument("--ray", action="store_true", help="start the server on Ray Serve (sdengine serve --ray)")
    p.add_argument("--replicas", type=int, default=1, help="with --ray: replicas")
    p.add_argument("--cpus-per-replica", type=float, default=1.0, help="with --ray: CPUs each replica reserves")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)

    body = {"prompt": args.prompt, "steps": args.steps, "n": args.n}
    if args.size:
        body["size"] = args.size
    proc = None
    with tempfile.TemporaryDirectory() as tmp:
        if args.url:
            parts = urlsplit(args.url)
            host, port = parts.hostname, parts.port or 80
        else:
            proc, port, _ = start_server(args, Path(tmp))
            host = "127.0.0.1"
        try:
            for _ in range(args.warmup):
                post(host, port, body, args.timeout_s)
            results = [run_level(host, port, c, args.requests, body, args.timeout_s,
                                 one_replica=not args.ray or args.replicas == 1) for c in args.concurrency]
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(timeout=120)
    report = {"command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]), "request": body,
              "server": args.url or {"model": args.model or "embedded demo model", "backend": args.backend,
                                     "max_batch": args.max_batch, "batch_wait_ms": args.batch_wait_ms,
                                     "threads": args.threads,
                                     "ray_replicas": args.replicas if args.ray else None},
              "machine": versions(), "load_average": os.getloadavg(), "results": results}
    print(table(results))
    if args.json:  # NaN (no successful request) is written as null: strict JSON
        clean = json.loads(json.dumps(report), parse_constant=lambda _: None)
        Path(args.json).write_text(json.dumps(clean, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
