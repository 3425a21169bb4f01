"""The request queue and the micro-batching worker: compatible requests share one denoise loop.

Requests whose `batch_key` (width, height, steps, guidance, eta) is equal run together, up to
`max_batch` images: prompts, negative prompts and seeds are per image, so the pipeline takes them
as lists. The oldest waiting request picks the key of the next batch (no request waits behind a
stream of others), and the batch waits at most `batch_wait_s` from that request's arrival for
company. One daemon thread runs every model call: the model is not thread-safe, and the event loop
keeps answering health checks and metrics meanwhile.

Cancellation: a request whose client disconnected or whose deadline passed is `abandoned`. Waiting,
it is dropped from the queue at once; running, the step callback raises between two denoise steps
once every request of the batch is abandoned (the others' images are still wanted otherwise).
"""

from __future__ import annotations

import asyncio
import logging
import math
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from .metrics import ServeMetrics
from .schema import GenerationRequest

log = logging.getLogger("uvicorn.error")
StepCallback = Callable[[int, int], None]
Compute = Callable[[list[GenerationRequest], StepCallback], list[Any]]


class QueueFull(Exception):
    """The queue holds max_queue requests: answer 429, retry after `retry_after` seconds."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"the queue is full; retry after {retry_after} s")
        self.retry_after = retry_after


class Unavailable(Exception):
    """The server is shutting down (or not ready): answer 503."""


class BatchAbandoned(Exception):
    """Every request of a batch went away: its loop stopped between two steps."""


@dataclass(eq=False)
class Job:
    """One request in the queue or in a batch; `future` resolves to its images."""

    request: GenerationRequest
    deadline: float                     # time.monotonic() after which the request has timed out
    future: asyncio.Future
    enqueued: float = field(default_factory=time.monotonic)
    started: float | None = None
    finished: float | None = None
    abandoned: bool = False             # set on the event loop, read by the model thread

    def gone(self, now: float) -> bool:
        return self.abandoned or now >= self.deadline


class ModelThread:
    """One daemon thread that runs every model call, in order; results come back as asyncio futures."""

    def __init__(self, name: str = "sdengine-model") -> None:
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable, *args: Any) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._calls.put((loop, future, fn, args))
        return future

    def close(self) -> None:
        self._calls.put(None)

    def _serve(self) -> None:
        while (call := self._calls.get()) is not None:
            loop, future, fn, args = call
            try:
                outcome, value = "result", fn(*args)
            except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine
                outcome, value = "exception", exc
            try:
                loop.call_soon_threadsafe(_resolve, future, outcome, value)
            except RuntimeError:  # the loop has closed: nobody is waiting any more
                return


def _resolve(future: asyncio.Future, outcome: str, value: Any) -> None:
    if not future.done():
        future.set_result(value) if outcome == "result" else future.set_exception(value)


class Batcher:
    """A bounded FIFO of jobs and the worker coroutine that turns them into batches."""

    def __init__(self, compute: Compute, model_thread: ModelThread, metrics: ServeMetrics, *, max_batch: int,
                 max_queue: int, batch_wait_s: float) -> None:
        self.compute, self.model_thread, self.metrics = compute, model_thread, metrics
        self.max_batch, self.max_queue, self.batch_wait_s = max_batch, max_queue, batch_wait_s
        self.draining = False
        self.batch_seconds = 1.0  # running mean of a batch's duration, for Retry-After
        self._pending: list[Job] = []
        self._wakeup = asyncio.Event()

    @property
    def depth(self) -> int:
        return len(self._pending)

    def retry_after(self) -> int:
        """Seconds until the queue has likely room again: the batches ahead of a new request."""
        batches = math.ceil((len(self._pending) + 1) / self.max_batch)
        return max(1, math.ceil(self.batch_seconds * batches))

    def submit(self, job: Job) -> None:
        """Queue a job, or raise QueueFull / Unavailable."""
        if self.draining:
            raise Unavailable("the server is shutting down")
        if len(self._pending) >= self.max_queue:
            raise QueueFull(self.retry_after())
        self._pending.append(job)
        self._changed()

    def abandon(self, job: Job) -> None:
        """The client went away or timed out: drop the job if waiting; a running batch checks the flag."""
        job.abandoned = True
        if job in self._pending:
            self._pending.remove(job)
            self._changed()
        if not job.future.done():
            job.future.cancel()

    def drain(self) -> None:
        """Stop taking work: waiting jobs get Unavailable; the running batch completes."""
        self.draining = True
        for job in self._pending:
            if not job.future.done():
                job.future.set_exception(Unavailable("the server is shutting down; retry on another replica"))
        self._pending.clear()
        self._changed()

    def _changed(self) -> None:
        self.metrics.queue_depth.set(len(self._pending))
        self._wakeup.set()

    def _compatible_images(self, key: tuple) -> int:
        return sum(j.request.n for j in self._pending if j.request.batch_key == key)

    def _take(self, key: tuple) -> list[Job]:
        """Waiting jobs with `key`, oldest first, up to max_batch images; they leave the queue."""
        batch, images = [], 0
        for job in list(self._pending):
            if job.request.batch_key == key and images + job.request.n <= self.max_batch:
                batch.append(job)
                images += job.request.n
                self._pending.remove(job)
        self._changed()
        return batch

    async def run(self) -> None:
        """The worker: forever, wait for a batch to fill (or its wait to pass), then run it."""
        while True:
            if not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            head = self._pending[0]
            key = head.request.batch_key
            wait = head.enqueued + self.batch_wait_s - time.monotonic()
            if wait > 0 and self._compatible_images(key) < self.max_batch:
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), wait)
                except asyncio.TimeoutError:
                    pass
                continue
            await self._run(self._take(key))

    async def _run(self, batch: list[Job]) -> None:
        started = time.monotonic()
        images = sum(j.request.n for j in batch)
        for job in batch:
            job.started = started
            self.metrics.queue_seconds.observe(started - job.enqueued)
        self.metrics.batch_images.observe(images)
        self.metrics.running_images.set(images)
        outcome = "failed"
        try:
            results = await self.model_thread.submit(self._compute, batch)
            outcome = "completed"
        except BatchAbandoned as exc:
            outcome = "abandoned"
            self._fail(batch, exc)
        except Exception as exc:  # noqa: BLE001 - every waiting request gets the error
            log.exception("batch of %d image(s) failed", images)
            self._fail(batch, exc)
        finally:
            finished = time.monotonic()
            self.metrics.running_images.set(0)
            self.metrics.batches.labels(outcome=outcome).inc()
            self.batch_seconds = 0.8 * self.batch_seconds + 0.2 * (finished - started)
        if outcome != "completed":
            return
        offset = 0
        for job in batch:
            job.finished = finished
            mine = results[offset: offset + job.request.n]
            offset += job.request.n
            if not job.future.done():
                job.future.set_result(mine)

    @staticmethod
    def _fail(batch: list[Job], exc: BaseException) -> None:
        for job in batch:
            if not job.future.done():
                job.future.set_exception(exc)

    def _compute(self, batch: list[Job]) -> list[Any]:
        """In the model thread: the pipeline over the batch, stopped between steps once nobody waits."""
        steps = self.metrics.steps

        def callback(step: int, total: int) -> None:
            steps.inc()
            if all(j.gone(time.monotonic()) for j in batch):
                raise BatchAbandoned(f"every request went away; stopped after step {step} of {total}")

        if all(j.gone(time.monotonic()) for j in batch):
            raise BatchAbandoned("every request went away before the batch started")
        return self.compute([j.request for j in batch], callback)
