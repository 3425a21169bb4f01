"""The server's Prometheus metrics, kept by prometheus_client in a registry of the server's own.

Label values are fixed at creation or set by the server, never taken from a request, so the number of
series stays bounded. prometheus_client is thread-safe: the model thread and the event loop both update
these. The `_created` series prometheus_client would add per counter and histogram are switched off: the
exposition keeps the names and labels it had (README, "Serving": /metrics).
"""

from __future__ import annotations

import os

os.environ.setdefault("PROMETHEUS_DISABLE_CREATED_SERIES", "True")  # read by prometheus_client at import

import prometheus_client  # noqa: E402
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest  # noqa: E402

prometheus_client.disable_created_metrics()  # also when prometheus_client was imported before this module
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # the text format generate_latest writes
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 120.0, 300.0, 600.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16)
OUTCOMES = ("ok", "invalid", "rejected", "timeout", "cancelled", "unavailable", "error")
BATCH_OUTCOMES = ("completed", "abandoned", "failed")


class ServeMetrics:
    """The server's metric families (README, "Serving": /metrics), in a registry of their own."""

    def __init__(self, backend: str, model: str, version: str) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.info = Gauge("sdengine_server_info", "Server build and model (value always 1).",
                          ("version", "backend", "model"), registry=r)
        self.info.labels(version=version, backend=backend, model=model).set(1)
        self.ready = Gauge("sdengine_ready", "1 once the model has loaded and run its warm-up image.", registry=r)
        self.requests = Counter("sdengine_requests_total", "Image generation requests by outcome.", ("outcome",),
                                registry=r)
        for outcome in OUTCOMES:
            self.requests.labels(outcome=outcome)
        self.images = Counter("sdengine_images_generated_total", "Images returned to clients.", registry=r)
        self.queue_depth = Gauge("sdengine_queue_depth", "Requests waiting for a batch.", registry=r)
        self.running_images = Gauge("sdengine_running_images", "Images in the denoise loop now.", registry=r)
        self.batches = Counter("sdengine_batches_total", "Denoise loops run, by outcome.", ("outcome",), registry=r)
        for outcome in BATCH_OUTCOMES:
            self.batches.labels(outcome=outcome)
        self.batch_images = Histogram("sdengine_batch_images", "Images per denoise loop.", buckets=BATCH_BUCKETS,
                                      registry=r)
        self.steps = Counter("sdengine_denoise_steps_total", "Denoise steps run (one per loop iteration).",
                             registry=r)
        self.vae_fp32_fallbacks = Counter("sdengine_vae_fp32_fallbacks_total", "Batches whose decoded images held "
                                          "NaN or infinity and were decoded again in float32.", registry=r)
        self.lora_switches = Counter("sdengine_lora_switches_total", "Changes of the active LoRA set between two "
                                     "batches.", registry=r)
        self.lora_switch_seconds = Histogram("sdengine_lora_switch_seconds", "Seconds a LoRA set change took "
                                             "(reading, merging, swapping the weights).", buckets=LATENCY_BUCKETS,
                                             registry=r)
        self.queue_seconds = Histogram("sdengine_queue_seconds", "Seconds a request waited before its batch "
                                       "started.", buckets=LATENCY_BUCKETS, registry=r)
        self.compute_seconds = Histogram("sdengine_compute_seconds", "Seconds of the batch that served a request "
                                         "(text encoder, denoise loop, decoder).", buckets=LATENCY_BUCKETS, registry=r)
        self.request_seconds = Histogram("sdengine_request_seconds", "Seconds from request to response, successful "
                                         "requests.", buckets=LATENCY_BUCKETS, registry=r)

    def value(self, name: str, **labels: str) -> float:
        """One sample's value (0 when absent), e.g. value("sdengine_requests_total", outcome="ok")."""
        return self.registry.get_sample_value(name, labels) or 0.0

    def render(self) -> bytes:
        """The /metrics body: Prometheus text format 0.0.4."""
        return generate_latest(self.registry)
