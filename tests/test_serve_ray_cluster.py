"""Ray Serve on a real two-node Ray cluster on this machine (ray.cluster_utils.Cluster, one logical CPU per node,
loopback only): two replicas of the tiny model, one per node, behind Ray's HTTP proxy on the head node.

- spread: 16 requests all answered 200 with the right images, both nodes serving some;
- back-pressure: more concurrent requests than max_ongoing_requests x replicas + max_queued_requests: exactly
  the excess is refused (503 from Ray's proxy);
- fault: the worker node removed while requests are in flight: each request gets a correct 200 or an error
  status promptly, never a wrong image, the head's replica keeps serving, and Ray starts a replacement
  once the node returns;
- shutdown: serve.shutdown() leaves no Serve actor process, ray.shutdown() and the cluster's no Ray process.

One cluster serves the module. The back-pressure test deploys its own application; the spread, fault and
shutdown tests share one (the fault test ends with both nodes serving again). Every wait is bounded.
"""

from __future__ import annotations

import json
import os
import select
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from serve_support import (HOST, RAY_ENV, alive, decode_png, descendants, generate, http, open_generation,
                           wait_for)

ray = pytest.importorskip("ray", reason="ray[serve] is not installed: pip install 'sdengine[ray]'")
serve = pytest.importorskip("ray.serve")

from sdengine.serve.cli import proxy_port  # noqa: E402
from sdengine.serve.proxy import ENV, IMPORT_PATH  # noqa: E402

MB = 1024 * 1024
NODE = dict(num_cpus=1, object_store_memory=80 * MB)
APP = dict(num_replicas=2, cpus_per_replica=1, threads=1, max_steps=500, warmup_steps=1, timeout_s=120,
           health_check_period_s=2)


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    # The proxy on the head node would send every request to the head's replica while it has room (Ray's
    # locality routing): off, so requests through the one proxy spread over both nodes. A deployment
    # spreads clients over the proxies of every node instead (deploy/: proxy_location EveryNode).
    env = {**RAY_ENV, "OMP_NUM_THREADS": "1", "RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING": "0", ENV: IMPORT_PATH}
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)  # inherited by the nodes' processes
    c = Cluster(initialize_head=True, head_node_args={**NODE, "include_dashboard": False})
    try:
        c.worker = c.add_node(**NODE)
        ray.init(address=c.address, logging_level="warning")
        c.port = proxy_port(HOST)  # not from the ephemeral range Ray's own processes draw from
        serve.start(proxy_location="HeadOnly", http_options={"host": HOST, "port": c.port})
        yield c
    finally:
        # After the shutdown test there is nothing left to stop (and serve.shutdown() without Ray would start one).
        for step in (serve.shutdown, ray.shutdown, c.shutdown) if ray.is_initialized() else (c.shutdown,):
            try:
                step()
            except Exception as exc:  # noqa: BLE001 - every step is tried; the test's own failure is the report
                print(f"teardown: {step.__qualname__} failed: {exc}")
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


DEPLOY_TIMEOUT_S = 240


@pytest.fixture(autouse=True)
def two_nodes(cluster):
    """Every test starts on two live nodes: a test that removed the worker and failed before adding it back
    would otherwise leave the next one a single node, where two replicas of one CPU each cannot be placed."""
    if not any(n["Alive"] and n["NodeID"] == cluster.worker.node_id for n in ray.nodes()):
        cluster.worker = cluster.add_node(**NODE)
    wait_for(lambda: sum(n["Alive"] for n in ray.nodes()) == 2, 60, "two live nodes")


def deploy(cluster, model, **options):
    """serve.run, bounded: serve.run itself waits without limit for the application to be RUNNING."""
    import threading

    from sdengine.serve.ray import build_app

    options = {**APP, **options}
    if getattr(cluster, "deployed", None) == options and _running(replicas=options["num_replicas"]):
        return  # the previous test's application, with these options, is still serving on both nodes
    cluster.deployed = None
    app, failure = build_app(str(model), **options), []

    def run():
        try:
            serve.run(app, name="sdengine", route_prefix="/")
        except BaseException as exc:  # noqa: BLE001 - reported by the test below
            failure.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(DEPLOY_TIMEOUT_S)
    if thread.is_alive():
        pytest.fail(f"the application was not RUNNING after {DEPLOY_TIMEOUT_S} s: {serve.status()}")
    if failure:
        raise failure[0]
    wait_for(lambda: http(cluster.port, "GET", "/v2/health/ready", timeout=30)[0] == 200, 120, "readiness")
    cluster.deployed = options


def _running(replicas: int) -> bool:
    app = serve.status().applications.get("sdengine")
    if app is None or app.status != "RUNNING":
        return False
    return all(d.replica_states == {"RUNNING": replicas} for d in app.deployments.values())


def close_to(body: dict, expected: np.ndarray) -> bool:
    """The response's one image is the expected one (batching changes float rounding only)."""
    got = np.asarray(decode_png(body["data"][0]["b64_json"]), np.int16)
    return got.shape == expected.shape and int(np.abs(got - expected).max()) <= 2


def test_back_pressure_refuses_exactly_the_excess(cluster, tiny_model_dir):
    """Requests that hold a replica for a minute or more (800 steps at 128x128), sent one a second: the first
    max_ongoing_requests x replicas + max_queued_requests wait, each one past them is answered 503 at once;
    closing the held ones frees the replicas. (Sent a second apart: Ray counts its queue as requests pass
    through its router, so requests arriving in the same instant can be counted a little off, as Ray's own
    code notes.)"""
    ongoing, queued, replicas, extra = 2, 2, 2, 3
    # A replica queue larger than max_ongoing_requests: Ray's limits bind before the replica's own 429.
    deploy(cluster, tiny_model_dir, max_batch=1, max_queue=8, max_ongoing_requests=ongoing,
           max_queued_requests=queued, max_steps=1000)
    capacity = ongoing * replicas + queued
    hold = {"prompt": "hold a replica", "steps": 800, "size": "128x128"}
    held, started = [], time.monotonic()
    try:
        for i in range(capacity):
            held.append(open_generation(cluster.port, {**hold, "seed": i}))
            time.sleep(1.0)
        for i in range(extra):
            status, headers, raw = http(cluster.port, "POST", "/v1/images/generations", {**hold, "seed": 9 + i}, 60)
            # Ray's proxy refused it; its middleware (sdengine.serve.proxy) answers in the server's error shape.
            assert status == 503 and "retry-after" in headers, (status, raw[:300])
            error = json.loads(raw)["error"]
            assert (error["code"], error["type"], error["param"]) == (503, "server_unavailable", None)
            assert "dropped due to backpressure" in error["message"], error
            assert f"max_queued_requests={queued}" in error["message"], error
        answered = [sock.recv(300) for sock in select.select(held, [], [], 0)[0]]
        assert not answered, answered  # the held requests are all still waiting: none refused
        assert time.monotonic() - started < 55  # well within a held request's own time
    finally:
        for sock in held:
            sock.close()  # the held requests are cancelled: their loops stop between two steps
    wait_for(lambda: http(cluster.port, "POST", "/v1/images/generations", {"prompt": "after", "steps": 1}, 120)[0]
             == 200, 180, "the replicas to take requests again")


SHARED = dict(max_batch=2, max_queue=12)  # the spread, fault and shutdown tests share one deployment


def test_two_replicas_on_two_nodes_serve_correct_images(cluster, tiny_model_dir, tiny_pipeline):
    deploy(cluster, tiny_model_dir, **SHARED)
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda seed: generate(cluster.port, {"prompt": "a red circle", "steps": 2,
                                                                     "seed": seed}, timeout=120), range(16)))
    nodes = {}
    images = tiny_pipeline(["a red circle"] * 16, num_inference_steps=2, seed=list(range(16))).images
    for seed, (status, headers, body) in enumerate(results):
        assert status == 200, body
        assert body["data"][0]["seed"] == seed and close_to(body, np.asarray(images[seed], np.int16)), seed
        nodes.setdefault(headers["x-sdengine-node"], set()).add(headers["x-sdengine-replica"])
    alive_nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert set(nodes) == alive_nodes and len(nodes) == 2, nodes  # both nodes served some
    assert all(len(replicas) == 1 for replicas in nodes.values())  # one replica per node


def test_a_node_lost_under_load_then_replaced(cluster, tiny_model_dir, tiny_pipeline):
    steps, count = 30, 12
    # The surviving replica's own queue (SHARED: 12) holds every request: the lost node's share is retried
    # there, and a smaller queue would answer some of them 429 (the batcher's documented back-pressure), not
    # the outcome under test.
    deploy(cluster, tiny_model_dir, **SHARED)
    head = ray.get_runtime_context().get_node_id()
    images = tiny_pipeline(["a red circle"] * count, num_inference_steps=steps, seed=list(range(count))).images
    expected = {seed: np.asarray(image, np.int16) for seed, image in enumerate(images)}  # one batch: 12 seeds
    with ThreadPoolExecutor(count) as pool:
        started = time.monotonic()
        futures = [pool.submit(http, cluster.port, "POST", "/v1/images/generations",
                               {"prompt": "a red circle", "steps": steps, "seed": seed}, 150) for seed in range(count)]
        wait_for(lambda: sum(f.done() for f in futures) >= 1 or time.monotonic() - started > 3, 60, "work to start")
        cluster.remove_node(cluster.worker, allow_graceful=False)  # killed, as a lost machine
        results = [f.result(timeout=200) for f in futures]
    outcomes = {"ok": 0, "retried": 0, "failed": 0}
    for seed, (status, headers, raw) in enumerate(results):
        assert headers.get("content-type") == "application/json", (status, raw[:300])
        body = json.loads(raw)
        if status == 200:
            assert close_to(body, expected[seed]), seed  # never a wrong image
            outcomes["ok"] += 1
            outcomes["retried"] += "x-sdengine-retried" in headers
        else:  # a clear 503 in the server's error shape, promptly (no hang)
            assert status == 503 and body["error"]["type"] == "server_unavailable", (status, body)
            assert "replica serving this request was lost" in body["error"]["message"], body
            outcomes["failed"] += 1
    assert time.monotonic() - started < 200
    print(f"\nnode lost under load: {outcomes['ok']} of {count} answered 200 ({outcomes['retried']} of them after a "
          f"retry on the surviving replica), {outcomes['failed']} answered 503")
    # The head's replica keeps serving.
    for seed in range(4):
        status, headers, body = generate(cluster.port, {"prompt": "a red circle", "steps": 2, "seed": seed}, 120)
        assert status == 200 and headers["x-sdengine-node"] == head, (status, body)
    # The node returns: Ray starts a replacement replica there.
    cluster.worker = cluster.add_node(**NODE)
    new_node = cluster.worker.node_id

    def served_by_new_node():
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda s: generate(cluster.port, {"prompt": "a red circle", "steps": 2,
                                                                      "seed": s}, 120), range(4)))
        return any(a[0] == 200 and a[1]["x-sdengine-node"] == new_node for a in answers)

    wait_for(served_by_new_node, 240, "a replacement replica on the returned node")


def test_serve_shutdown_leaves_no_serve_process(cluster, tiny_model_dir):
    from ray._private import ray_constants

    deploy(cluster, tiny_model_dir, **SHARED)
    raylets = [proc.process.pid for node in cluster.list_all_nodes()
               for proc in node.all_processes.get(ray_constants.PROCESS_TYPE_RAYLET, [])]
    workers = set().union(*(descendants(pid) for pid in raylets))
    serve_pids = {pid for pid in workers if _title(pid).startswith(("ray::ServeReplica", "ray::ServeController",
                                                                     "ray::ProxyActor"))}
    assert len([p for p in serve_pids if _title(p).startswith("ray::ServeReplica")]) == 2, serve_pids
    serve.shutdown()
    wait_for(lambda: not alive(serve_pids), 60, "the Serve actors' processes to exit")
    everything = workers | set(raylets) | {proc.process.pid for node in cluster.list_all_nodes()
                                           for procs in node.all_processes.values() for proc in procs}
    ray.shutdown()
    cluster.shutdown()
    wait_for(lambda: not alive(everything), 60, "every Ray process of the cluster to exit")


def _title(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""
