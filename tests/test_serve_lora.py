"""LoRAs and embeddings given at start-up (`--lora`, `--embedding`) and the request field `loras`."""

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

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")


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
