"""Prometheus text exposition format (version 0.0.4), written out by hand: counters, gauges, histograms.

Only what the server needs: label values are fixed at creation or set by the server, never taken
from a request, so the number of series stays bounded. Thread-safe: the model thread and the event
loop both update it.
"""

from __future__ import annotations

import math
import threading
from typing import Iterable, Sequence

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 120.0, 300.0, 600.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16)


def _number(value: float) -> str:
    if value == math.inf:
        return "+Inf"
    if value == -math.inf:
        return "-Inf"
    if math.isnan(value):
        return "NaN"
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


class _Family:
    kind = ""

    def __init__(self, name: str, help_text: str, labels: Sequence[str] = (), lock: threading.Lock | None = None):
        self.name, self.help, self.label_names = name, help_text, tuple(labels)
        self._lock = lock or threading.Lock()

    def _key(self, labels: dict[str, str]) -> tuple[str, ...]:
        if set(labels) != set(self.label_names):
            raise ValueError(f"{self.name} takes labels {self.label_names}, got {sorted(labels)}")
        return tuple(str(labels[n]) for n in self.label_names)

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Family):
    """A monotonically increasing count, optionally per label values."""

    kind = "counter"

    def __init__(self, *args, initial: Iterable[dict[str, str]] = (), **kwargs):
        super().__init__(*args, **kwargs)
        self._values: dict[tuple[str, ...], float] = {}
        for labels in initial or ([{}] if not self.label_names else []):
            self._values[self._key(labels)] = 0.0

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        if amount < 0:
            raise ValueError("a counter only goes up")
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        with self._lock:
            return self._values.get(self._key(labels), 0.0)

    def render(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        return self.header() + [f"{self.name}{_labels(self.label_names, k)} {_number(v)}" for k, v in items]


class Gauge(Counter):
    """A value that goes up and down."""

    kind = "gauge"

    def set(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = float(value)

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount


class Histogram(_Family):
    """Cumulative buckets, sum and count (no labels)."""

    kind = "histogram"

    def __init__(self, name: str, help_text: str, buckets: Sequence[float], lock: threading.Lock | None = None):
        super().__init__(name, help_text, (), lock)
        self.bounds = tuple(sorted(float(b) for b in buckets)) + (math.inf,)
        self._counts = [0] * len(self.bounds)
        self._sum = 0.0

    def observe(self, value: float) -> None:
        with self._lock:
            for i, bound in enumerate(self.bounds):
                if value <= bound:
                    self._counts[i] += 1
                    break
            self._sum += value

    @property
    def count(self) -> int:
        with self._lock:
            return sum(self._counts)

    def render(self) -> list[str]:
        with self._lock:
            counts, total = list(self._counts), self._sum
        lines, running = self.header(), 0
        for bound, n in zip(self.bounds, counts):
            running += n
            lines.append(f'{self.name}_bucket{{le="{_number(bound)}"}} {running}')
        lines += [f"{self.name}_sum {_number(total)}", f"{self.name}_count {running}"]
        return lines


class Registry:
    """Families in registration order; `render()` is the /metrics body."""

    def __init__(self) -> None:
        self._families: list[_Family] = []

    def add(self, family: _Family) -> _Family:
        if any(f.name == family.name for f in self._families):
            raise ValueError(f"metric {family.name} registered twice")
        self._families.append(family)
        return family

    def render(self) -> str:
        lines: list[str] = []
        for family in self._families:
            lines += family.render()
        return "\n".join(lines) + "\n"


OUTCOMES = ("ok", "invalid", "rejected", "timeout", "cancelled", "unavailable", "error")
BATCH_OUTCOMES = ("completed", "abandoned", "failed")


class ServeMetrics:
    """The server's metric families (README, "Serving": /metrics)."""

    def __init__(self, backend: str, model: str, version: str) -> None:
        r = self.registry = Registry()
        self.info = r.add(Gauge("sdengine_server_info", "Server build and model (value always 1).",
                                ("version", "backend", "model"),
                                initial=[{"version": version, "backend": backend, "model": model}]))
        self.info.set(1, version=version, backend=backend, model=model)
        self.ready = r.add(Gauge("sdengine_ready", "1 once the model has loaded and run its warm-up image."))
        self.requests = r.add(Counter("sdengine_requests_total", "Image generation requests by outcome.",
                                      ("outcome",), initial=[{"outcome": o} for o in OUTCOMES]))
        self.images = r.add(Counter("sdengine_images_generated_total", "Images returned to clients."))
        self.queue_depth = r.add(Gauge("sdengine_queue_depth", "Requests waiting for a batch."))
        self.running_images = r.add(Gauge("sdengine_running_images", "Images in the denoise loop now."))
        self.batches = r.add(Counter("sdengine_batches_total", "Denoise loops run, by outcome.", ("outcome",),
                                     initial=[{"outcome": o} for o in BATCH_OUTCOMES]))
        self.batch_images = r.add(Histogram("sdengine_batch_images", "Images per denoise loop.", BATCH_BUCKETS))
        self.steps = r.add(Counter("sdengine_denoise_steps_total", "Denoise steps run (one per loop iteration)."))
        self.vae_fp32_fallbacks = r.add(Counter("sdengine_vae_fp32_fallbacks_total", "Batches whose decoded images "
                                                "held NaN or infinity and were decoded again in float32."))
        self.lora_switches = r.add(Counter("sdengine_lora_switches_total", "Changes of the active LoRA set between "
                                           "two batches."))
        self.lora_switch_seconds = r.add(Histogram("sdengine_lora_switch_seconds", "Seconds a LoRA set change took "
                                                   "(reading, merging, swapping the weights).", LATENCY_BUCKETS))
        self.queue_seconds = r.add(Histogram("sdengine_queue_seconds", "Seconds a request waited before its "
                                             "batch started.", LATENCY_BUCKETS))
        self.compute_seconds = r.add(Histogram("sdengine_compute_seconds", "Seconds of the batch that served a "
                                               "request (text encoder, denoise loop, decoder).", LATENCY_BUCKETS))
        self.request_seconds = r.add(Histogram("sdengine_request_seconds", "Seconds from request to response, "
                                               "successful requests.", LATENCY_BUCKETS))

    def render(self) -> str:
        return self.registry.render()
