"""POST /v1/images/generations, GET /v1/models and the health paths over HTTP, against a standalone server
and a Ray Serve one (the `server` fixture is parametrised over both); the request schema's units."""

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


def test_ready_only_after_load_and_warm_up(server):
    status, _, body = server.first_ready
    if server.kind == "standalone":  # listening before the model loads
        assert status == 503 and json.loads(body) == {"ready": False, "state": "loading"}
        assert "warm-up image" in server.log()
    else:  # Ray: the replica loads and warms up before Ray routes to it; the CLI prints its line then
        assert status == 200 and json.loads(body) == {"ready": True, "state": "ready"}
    assert server.first_live[0] == 200  # alive while loading
    status, _, body = http(server.port, "GET", "/v2/health/ready")
    assert status == 200 and json.loads(body)["ready"] is True
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
    assert grew(before, after, 'sdengine_batch_images_bucket{le="1.0"}') == 1
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
                  GenerationRequest("a", "", 1, 64, 64, 20, 7.5, 0.0, 1, "ddim", loras=(("style", 1.0),)),
                  GenerationRequest("a", "", 1, 64, 64, 20, 7.5, 0.0, 1, "ddim", cache_interval=2)):
        assert other.batch_key != base.batch_key


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
