"""What `sdengine bench` measures: subjects (backends, diffusers) and the run settings, checked up front.

No torch here: every setting is checked before any model is loaded or any worker started.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

from ..errors import InvalidInputError

PARTS = ("e2e", "tokenizer", "text_encoder", "denoise_step", "vae_decode", "vae_encode", "throughput")
STAGES = PARTS[1:6]
COMPARISONS = ("diffusers", "diffusers-compiled")
COMPILE_MODES = ("auto", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
RANDOM_MODELS = ("tiny", "sd15", "sd21", "tiny_sdxl", "sdxl")  # sdxl: SDXL base 1.0's shapes
DEFAULT_PROMPT = "a red circle on a blue background"  # in the embedded demo model's vocabulary
MAX_STEPS = 1000
CPU_COMPILE_REFUSED = ("--compare diffusers-compiled runs on a CUDA GPU only (--device cuda): on a CPU, "
                       "torch.compile of the demo model's U-Net took about 2 minutes and then ran slower than "
                       "eager (2-core test machine); use --compare diffusers on the CPU")


@dataclass(frozen=True)
class Subject:
    """One thing measured: an sdengine backend (with load options) or diffusers' pipeline."""

    label: str
    kind: str                       # "backend" or "diffusers"
    backend: str | None = None      # a name of sdengine.backends.BACKENDS (kind "backend")
    options: tuple[tuple[str, Any], ...] = ()
    compiled: bool = False          # diffusers: torch.compile on the U-Net (+ CUDA graphs on a GPU)
    model: str | None = None        # what this backend loads, when not the bench's own model/export

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "kind": self.kind, "backend": self.backend, "options": dict(self.options),
                "compiled": self.compiled, "model": self.model}


@dataclass(frozen=True)
class BenchSettings:
    """The run: model, subjects, shapes, repetitions (README, `sdengine bench`)."""

    subjects: tuple[Subject, ...]
    model: str | None = None        # None: the embedded demo model (or the random model)
    random_model: str | None = None
    device: str = "cpu"
    prompt: str = DEFAULT_PROMPT
    steps: int = 20
    height: int | None = None       # None: the model's own size
    width: int | None = None
    guidance: float = 7.5
    seed: int = 0
    runs: int = 10
    warmup: int = 2
    batches: tuple[int, ...] = (1, 2, 4, 8)
    throughput_runs: int = 3
    threads: int | None = field(default_factory=os.cpu_count)
    parts: tuple[str, ...] = PARTS
    compile_mode: str = "auto"
    export_precision: str = "fp32"
    onnx_dir: str | None = None

    def check(self) -> "BenchSettings":
        """InvalidInputError naming the first bad setting."""
        from ..pipeline import MAX_IMAGES_PER_PROMPT, check_guidance, check_size

        def need(ok: bool, message: str) -> None:
            if not ok:
                raise InvalidInputError(message)

        need(bool(self.subjects), "nothing to measure: give --backend and/or --compare")
        labels = [s.label for s in self.subjects]
        need(len(set(labels)) == len(labels), f"subject labels must differ, got {labels}; name them LABEL=BACKEND")
        need(not (self.model and self.random_model), "give --model or --random-model, not both")
        need(self.device == "cpu" or self.device.startswith("cuda"), f"--device must be cpu or cuda, got {self.device}")
        need(1 <= self.steps <= MAX_STEPS, f"--steps must be between 1 and {MAX_STEPS}, got {self.steps}")
        for name in ("height", "width"):
            if getattr(self, name) is not None:
                check_size(f"--{name}", getattr(self, name), 8)
        check_guidance(self.guidance)
        need(0 <= self.seed < 2**32, f"--seed must be in [0, 2**32), got {self.seed}")
        need(self.runs >= 2, f"--runs must be >= 2 (p50 and p95 need several runs), got {self.runs}")
        need(self.warmup >= 0, f"--warmup must be >= 0, got {self.warmup}")
        need(self.throughput_runs >= 1, f"--throughput-runs must be >= 1, got {self.throughput_runs}")
        need(bool(self.batches) and all(1 <= b <= MAX_IMAGES_PER_PROMPT for b in self.batches)
             and len(set(self.batches)) == len(self.batches),
             f"--batches takes distinct sizes between 1 and {MAX_IMAGES_PER_PROMPT}, got {list(self.batches)}")
        need(self.threads is None or self.threads >= 1, f"--threads must be >= 1, got {self.threads}")
        need(bool(self.parts) and set(self.parts) <= set(PARTS), f"--only takes parts of: {', '.join(PARTS)}")
        need(self.compile_mode in COMPILE_MODES, f"--compile-mode must be one of: {', '.join(COMPILE_MODES)}")
        need(self.export_precision in ("fp32", "fp16"), "--export-precision must be fp32 or fp16")
        need(self.random_model is None or self.random_model in RANDOM_MODELS,
             f"--random-model must be one of: {', '.join(RANDOM_MODELS)}")
        need(not (self.device == "cpu" and any(s.compiled for s in self.subjects)), CPU_COMPILE_REFUSED)
        return self

    @property
    def effective_compile_mode(self) -> str:
        """auto: reduce-overhead (default Inductor kernels + CUDA graphs) on a GPU, default on a CPU."""
        if self.compile_mode != "auto":
            return self.compile_mode
        return "reduce-overhead" if self.device.startswith("cuda") else "default"

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "subjects"}
        d.update(batches=list(self.batches), parts=list(self.parts), compile_mode_used=self.effective_compile_mode)
        return d


def parse_value(text: str) -> Any:
    """An option value: JSON (numbers, true/false, null, lists, quoted strings) or else the plain string."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    try:
        value = json.loads(text)
    except ValueError:
        return text
    if isinstance(value, float) and not math.isfinite(value):
        return text
    return value


def parse_subjects(backends: Sequence[str], compare: Sequence[str], options: Sequence[str],
                   backend_models: Sequence[str], available: Sequence[str]) -> tuple[Subject, ...]:
    """Subjects from `--backend [LABEL=]NAME`, `--compare`, `--option [LABEL:]KEY=VALUE`, `--backend-model`."""
    pairs = []
    for text in backends:
        label, _, name = text.rpartition("=")
        label = label or name
        if name not in available:
            raise InvalidInputError(f"unknown backend {name!r} in --backend {text}; "
                                    f"choose from: {', '.join(available)}")
        pairs.append((label, name))
    labels = {label for label, _ in pairs}
    per_label: dict[str, dict[str, Any]] = {label: {} for label in labels}
    for text in options:
        target, key, value = _split_option(text)
        if target is not None and target not in labels:
            raise InvalidInputError(f"--option {text}: no --backend labelled {target!r} (labels: {', '.join(labels)})")
        for label in [target] if target else labels:
            per_label[label][key] = value
    models = dict(_split_model(text, labels) for text in backend_models)
    subjects = [Subject(label, "backend", name, tuple(sorted(per_label[label].items())), model=models.get(label))
                for label, name in pairs]
    for name in compare:
        if name not in COMPARISONS:
            raise InvalidInputError(f"--compare takes {' or '.join(COMPARISONS)}, got {name!r}")
        subjects.append(Subject(name, "diffusers", compiled=name.endswith("compiled")))
    return tuple(subjects)


def load_options(texts: Sequence[str]) -> dict[str, Any]:
    """`--option KEY=VALUE` texts (no label: one backend) as load options for load_backend."""
    out = {}
    for text in texts:
        target, key, value = _split_option(text)
        if target is not None:
            raise InvalidInputError(f"--option takes KEY=VALUE here, got {text!r}")
        out[key] = value
    return out


def _split_option(text: str) -> tuple[str | None, str, Any]:
    head, eq, value = text.partition("=")
    target, _, key = head.rpartition(":")
    if not eq or not key.strip().isidentifier():
        raise InvalidInputError(f"--option takes [LABEL:]KEY=VALUE with KEY a Python name, got {text!r}")
    return target or None, key.strip(), parse_value(value)


def _split_model(text: str, labels: set[str]) -> tuple[str, str]:
    label, eq, path = text.partition("=")
    if not eq or label not in labels or not path:
        raise InvalidInputError(f"--backend-model takes LABEL=PATH for a --backend label "
                                f"({', '.join(sorted(labels))}), got {text!r}")
    return label, path
