"""The server's settings: one frozen dataclass, checked before anything is loaded."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import InvalidInputError
from ..lora import lora_specs

MAX_STEPS = 1000


@dataclass(frozen=True)
class ServeSettings:
    """What `sdengine serve` was started with (README, "Serving")."""

    model: str | None = None           # None: the embedded demo model
    backend: str = "torch"
    device: str = "cpu"
    threads: int | None = None         # CPU threads of the backend (None: its default)
    host: str = "127.0.0.1"
    port: int = 8000
    max_queue: int = 16                # requests waiting (not running) before 429
    max_batch: int = 4                 # images per denoise loop; also the largest n
    batch_wait_ms: float = 25.0        # how long the oldest request waits for company
    timeout_s: float = 120.0           # queue + compute, per request: 504 past it
    max_pixels: int = 512 * 512        # width * height
    default_steps: int = 20
    max_steps: int = 100
    warmup_steps: int = 2
    loras: tuple[tuple[str, float], ...] = ()            # --lora FILE[:SCALE]: the LoRAs requests may choose
    embeddings: tuple[tuple[str, str | None], ...] = ()  # --embedding FILE[:TOKEN]: always active

    def check(self) -> "ServeSettings":
        """InvalidInputError naming the first bad setting."""
        from ..pipeline import MAX_IMAGES_PER_PROMPT, MAX_SIDE, MIN_SIDE

        def need(ok: bool, message: str) -> None:
            if not ok:
                raise InvalidInputError(message)

        need(0 <= self.port <= 65535, f"--port must be between 0 and 65535, got {self.port}")
        need(self.max_queue >= 1, f"--max-queue must be >= 1, got {self.max_queue}")
        need(1 <= self.max_batch <= MAX_IMAGES_PER_PROMPT,
             f"--max-batch must be between 1 and {MAX_IMAGES_PER_PROMPT}, got {self.max_batch}")
        need(math.isfinite(self.batch_wait_ms) and 0 <= self.batch_wait_ms <= 10_000,
             f"--batch-wait-ms must be between 0 and 10000, got {self.batch_wait_ms}")
        need(math.isfinite(self.timeout_s) and self.timeout_s > 0, f"--timeout-s must be > 0, got {self.timeout_s}")
        need(self.max_pixels >= MIN_SIDE * MIN_SIDE,
             f"--max-pixels must be at least {MIN_SIDE * MIN_SIDE} ({MIN_SIDE}x{MIN_SIDE}), got {self.max_pixels}")
        need(self.max_pixels <= MAX_SIDE * MAX_SIDE, f"--max-pixels must be at most {MAX_SIDE * MAX_SIDE}")
        need(1 <= self.max_steps <= MAX_STEPS, f"--max-steps must be between 1 and {MAX_STEPS}, got {self.max_steps}")
        need(1 <= self.default_steps <= self.max_steps,
             f"--default-steps must be between 1 and --max-steps ({self.max_steps}), got {self.default_steps}")
        need(1 <= self.warmup_steps <= MAX_STEPS, f"--warmup-steps must be between 1 and {MAX_STEPS}")
        need(self.threads is None or self.threads >= 1, f"--threads must be >= 1, got {self.threads}")
        lora_specs(self.loras)  # finite scales, no two files with one name
        return self

    @property
    def lora_names(self) -> tuple[str, ...]:
        """The names requests choose LoRAs by: each file's name without its extension, in --lora order."""
        return tuple(path.stem for path, _ in lora_specs(self.loras))

    @property
    def default_loras(self) -> tuple[tuple[str, float], ...]:
        """The set a request without `loras` gets: the --lora files whose scale is not 0."""
        return tuple((path.stem, scale) for path, scale in lora_specs(self.loras) if scale != 0)
