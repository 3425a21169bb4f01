"""The OpenAPI document FastAPI writes for the server: every field, limit and error code, and no trace of
FastAPI's own 422 body; GET /docs and GET /openapi.json over HTTP."""

from __future__ import annotations

import json

import pytest

from serve_support import http

pytest.importorskip("fastapi")

GENERATION_FIELDS = {"prompt", "negative_prompt", "n", "size", "response_format", "seed", "steps", "guidance_scale",
                     "eta", "scheduler", "prompt_weighting", "clip_skip", "loras", "model", "user", "quality", "style",
                     "original_size", "crops_coords_top_left", "target_size", "negative_original_size",
                     "negative_crops_coords_top_left", "negative_target_size", "cache_interval", "cache_branch"}
ERROR_CODES = {"400", "413", "422", "429", "500", "503", "504"}


@pytest.fixture(scope="module")
def document():
    from sdengine.serve.app import Service, create_app
    from sdengine.serve.settings import ServeSettings

    return create_app(Service(ServeSettings())).openapi()


def _schema(document, path, kind):
    return document["paths"][path]["post"]["requestBody"]["content"][kind]["schema"]


def test_every_field_and_limit_is_documented(document):
    body = _schema(document, "/v1/images/generations", "application/json")
    props = body["properties"]
    assert set(props) == GENERATION_FIELDS and body["required"] == ["prompt"]
    assert body["additionalProperties"] is False  # unknown fields are refused
    assert all(props[name].get("description") for name in props), [n for n in props if "description" not in props[n]]
    assert (props["n"]["minimum"], props["n"]["maximum"], props["n"]["default"]) == (1, 16, 1)
    steps = props["steps"]["anyOf"][0]
    assert (steps["type"], steps["minimum"], steps["maximum"]) == ("integer", 1, 1000)
    seed = props["seed"]["anyOf"][0]
    assert (seed["minimum"], seed["maximum"]) == (0, float(2**63 - 1))  # pydantic writes this bound as a float
    assert (props["guidance_scale"]["minimum"], props["guidance_scale"]["default"]) == (0, 7.5)
    assert props["eta"]["minimum"] == 0 and props["clip_skip"]["minimum"] == 0
    assert props["size"]["anyOf"][0]["pattern"] == "^([0-9]{1,5})x([0-9]{1,5})$"
    assert props["response_format"]["anyOf"][0]["const"] == "b64_json"
    assert props["loras"]["anyOf"][0] == {"type": "object", "additionalProperties": {"type": "number"}}
    assert props["scheduler"]["default"] == "ddim" and props["prompt_weighting"]["default"] is True
    form = _schema(document, "/v1/images/edits", "multipart/form-data")
    assert set(form["properties"]) == GENERATION_FIELDS | {"image", "mask", "strength"}
    assert form["properties"]["image"]["format"] == form["properties"]["mask"]["format"] == "binary"
    assert set(form["required"]) == {"image", "prompt"}
    strength = form["properties"]["strength"]["anyOf"][0]
    assert (strength["exclusiveMinimum"], strength["maximum"]) == (0, 1)


def test_every_error_code_has_the_openai_error_shape(document):
    error = {"$ref": "#/components/schemas/ErrorBody"}
    for path in ("/v1/images/generations", "/v1/images/edits"):
        responses = document["paths"][path]["post"]["responses"]
        assert set(responses) == {"200"} | ERROR_CODES, path
        for code in ERROR_CODES:
            assert responses[code]["content"]["application/json"]["schema"] == error, (path, code)
            assert responses[code]["description"]
        assert responses["200"]["content"]["application/json"]["schema"] == \
            {"$ref": "#/components/schemas/ImagesResponse"}
    detail = document["components"]["schemas"]["ErrorDetail"]
    assert set(detail["properties"]) == {"message", "type", "param", "code"}
    assert document["components"]["schemas"]["ErrorBody"]["required"] == ["error"]
    # FastAPI's own validation error body is nowhere: no route lets FastAPI validate, none documents it.
    text = json.dumps(document)
    assert "HTTPValidationError" not in text and "ValidationError" not in document["components"]["schemas"]
    ready = document["paths"]["/v2/health/ready"]["get"]["responses"]
    assert ready["503"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Ready"}
    assert set(document["paths"]) == {"/v1/images/generations", "/v1/images/edits", "/v1/models", "/v2/health/live",
                                      "/v2/health/ready", "/metrics"}
    model = document["components"]["schemas"]["ModelCard"]["properties"]
    assert set(model) == {"id", "object", "created", "owned_by", "loras"}


def test_docs_and_openapi_json_are_served(server):
    status, headers, raw = http(server.port, "GET", "/openapi.json")
    assert status == 200 and headers["content-type"].startswith("application/json")
    served = json.loads(raw)
    assert served["info"]["title"] == "sdengine" and "/v1/images/generations" in served["paths"]
    status, headers, raw = http(server.port, "GET", "/docs")
    assert status == 200 and headers["content-type"].startswith("text/html") and b"swagger" in raw.lower()
