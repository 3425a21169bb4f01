"""SDXL's micro-conditioning over HTTP (original_size, crops_coords_top_left, target_size and the negatives) and in
the PNG metadata."""

from __future__ import annotations

import dataclasses
import json

import pytest

from sdengine.metadata import GenerationInfo

PAIRS = {"original_size": [512, 768], "crops_coords_top_left": [16, 32], "target_size": [64, 64],
         "negative_original_size": [256, 256], "negative_crops_coords_top_left": [0, 8],
         "negative_target_size": [96, 64]}


def test_request_fields_validated_batched_and_refused_off_sdxl():
    pytest.importorskip("pydantic")
    from sdengine.serve.schema import Limits, RequestError, validate

    sd = Limits(factor=8, default_size=(64, 64))
    xl = dataclasses.replace(sd, sdxl=True)
    req = validate({"prompt": "a cat", **PAIRS}, xl)
    assert dict(req.micro) == {k: tuple(v) for k, v in PAIRS.items()}
    plain = validate({"prompt": "a cat"}, xl)
    assert plain.micro == () and plain.batch_key != req.batch_key  # one pipeline call takes one set of them
    form = validate({"prompt": "a cat", "target_size": "[64, 128]"}, xl)  # an edit's form text
    assert dict(form.micro) == {"target_size": (64, 128)}
    with pytest.raises(RequestError) as info:
        validate({"prompt": "a cat", "crops_coords_top_left": [0, 0], "target_size": [64, 64]}, sd)
    assert info.value.status == 422 and info.value.param == "crops_coords_top_left"
    assert "crops_coords_top_left, target_size: SDXL's micro-conditioning; this server's model is not SDXL" \
        in info.value.message
    for bad in ([512], [1.5, 2], "512x512", [True, 4], [-1, 4], [4, 99999]):
        with pytest.raises(RequestError) as info:
            validate({"prompt": "a", "original_size": bad}, xl)
        assert info.value.status == 422 and info.value.param == "original_size"
        assert "original_size must be [height, width]: two integers in 0..16384" in info.value.message
    with pytest.raises(RequestError, match=r"crops_coords_top_left must be \[top, left\]"):
        validate({"prompt": "a", "crops_coords_top_left": [0]}, xl)


def test_metadata_keys():
    """Per-field chunks: diffusers' names and (h, w) order, always (values as used); A1111's infotext: only the
    values that differ from their defaults, sizes as WxH like "Size", crops as A1111's SDXL settings name them."""
    ids = (512, 768, 16, 32, 64, 64) + (256, 256, 16, 32, 64, 64)
    info = GenerationInfo("a cat", "", 4, "DDIM", 5.0, 1, 64, 64, "tiny-sdxl", time_ids=ids)
    chunks = info.text_chunks()
    assert json.loads(chunks["original_size"]) == [512, 768] and json.loads(chunks["crops_coords_top_left"]) == [16, 32]
    assert json.loads(chunks["negative_original_size"]) == [256, 256]
    assert json.loads(chunks["negative_target_size"]) == [64, 64]
    fields = chunks["parameters"].splitlines()[-1]
    assert "Original size: 768x512, Crop top: 16, Crop left: 32, Negative original size: 256x256, Version" in fields
    assert "Target size" not in fields and "Negative crop" not in fields
    default = GenerationInfo("a cat", "", 4, "DDIM", 5.0, 1, 96, 64, "tiny-sdxl", time_ids=(64, 96, 0, 0, 64, 96) * 2)
    assert not any(key in default.infotext() for key in ("Original size", "Target size", "Crop"))
    assert "original_size" in default.text_chunks() and "original_size" not in GenerationInfo(
        "a", "", 1, "DDIM", 1.0, 1, 64, 64, "sd").text_chunks()


def test_server_takes_micro_conditioning(tiny_sdxl_dir, tmp_path):
    """An SDXL model served (torch): the fields reach the pipeline (the image changes) and its PNG records them."""
    pytest.importorskip("fastapi")
    from serve_support import Server, decode_png, generate

    server = Server(tiny_sdxl_dir, tmp_path / "server.log", "--warmup-steps", "1").wait_ready()
    try:
        body = {"prompt": "a red cat", "steps": 3, "seed": 5, "size": "64x64"}
        status, _, plain = generate(server.port, body)
        assert status == 200, plain
        status, _, micro = generate(server.port, {**body, "original_size": [512, 768], "crops_coords_top_left": [16, 0]})
        assert status == 200, micro
        a, b = (decode_png(r["data"][0]["b64_json"]) for r in (plain, micro))
        assert a.tobytes() != b.tobytes()
        assert json.loads(b.info["original_size"]) == [512, 768] and json.loads(a.info["original_size"]) == [64, 64]
        assert "Original size: 768x512, Crop top: 16" in b.info["parameters"]
    finally:
        server.stop()
