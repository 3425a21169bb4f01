"""GET /metrics: Prometheus text read by prometheus_client's own parser, the same names and labels."""

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


def test_metrics_are_prometheus_text(server):
    """/metrics parses with prometheus_client's parser: every family, its type, help, names and labels."""
    from prometheus_client.parser import text_string_to_metric_families

    generate(server.port, {"prompt": "count me", "steps": 1})
    status, headers, raw = http(server.port, "GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain; version=0.0.4")
    families = {f.name: f for f in text_string_to_metric_families(raw.decode())}
    kinds = {name: f.type for name, f in families.items()}
    assert kinds == {
        "sdengine_server_info": "gauge", "sdengine_ready": "gauge", "sdengine_requests": "counter",
        "sdengine_images_generated": "counter", "sdengine_queue_depth": "gauge", "sdengine_running_images": "gauge",
        "sdengine_batches": "counter", "sdengine_batch_images": "histogram", "sdengine_denoise_steps": "counter",
        "sdengine_vae_fp32_fallbacks": "counter", "sdengine_lora_switches": "counter",
        "sdengine_lora_switch_seconds": "histogram", "sdengine_queue_seconds": "histogram",
        "sdengine_compute_seconds": "histogram", "sdengine_request_seconds": "histogram"}
    assert all(f.documentation for f in families.values())
    names = {s.name for f in families.values() for s in f.samples}
    assert not any(n.endswith("_created") for n in names)  # prometheus_client's extra series are off
    info = families["sdengine_server_info"].samples[0]
    assert set(info.labels) == {"version", "backend", "model"} and info.value == 1
    m = metrics(server.port)
    for outcome in ("ok", "invalid", "rejected", "timeout", "cancelled", "unavailable", "error"):
        assert f'sdengine_requests_total{{outcome="{outcome}"}}' in m
    for outcome in ("completed", "abandoned", "failed"):
        assert f'sdengine_batches_total{{outcome="{outcome}"}}' in m
    assert m["sdengine_images_generated_total"] >= 1
    for hist in ("sdengine_queue_seconds", "sdengine_compute_seconds", "sdengine_request_seconds"):
        buckets = [v for k, v in m.items() if k.startswith(hist + "_bucket")]
        assert buckets == sorted(buckets) and buckets[-1] == m[hist + "_count"] >= 1
        assert m[f'{hist}_bucket{{le="+Inf"}}'] == m[hist + "_count"] and m[hist + "_sum"] > 0
    assert m["sdengine_request_seconds_count"] == m['sdengine_requests_total{outcome="ok"}']
    assert [k for k in m if k.startswith("sdengine_batch_images_bucket")] == [
        f'sdengine_batch_images_bucket{{le="{b}"}}' for b in ("1.0", "2.0", "3.0", "4.0", "6.0", "8.0", "12.0", "16.0",
                                                               "+Inf")]


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
    assert service.metrics.value("sdengine_vae_fp32_fallbacks_total") == 2
    assert "sdengine_vae_fp32_fallbacks_total 2.0" in service.metrics.render().decode()
