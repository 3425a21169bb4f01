"""POST /v1/images/edits (multipart) over HTTP, against a standalone server and a Ray Serve one."""

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
