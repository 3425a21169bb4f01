"""Middleware for Ray Serve's HTTP proxy: Ray's own errors in the server's error shape, and one retry when
the replica serving a request is lost.

Ray's proxy answers some requests itself, in plain text: 503 when every replica is full and its queue holds
`max_queued_requests` ("Request dropped due to backpressure ..."), 503 when no replica is running; when the
replica handling a request died (its node was lost) it sends nothing, and uvicorn answers 500 "Internal Server
Error". This middleware, loaded into each proxy by
Ray's hook (environment variable RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=sdengine.serve.proxy:middlewares
on every node's `ray start`; `sdengine serve --ray` sets it for the Ray it starts), turns them into the
standalone server's contract:

- a request whose replica died is sent again (after `RETRY_PAUSE_S`, up to `RETRIES` times; a generation
  with its seed gives the same image anywhere): the answer then carries `x-sdengine-retried: N`;
- when that does not succeed, and for Ray's own 503s, the client gets a 503 with OpenAI's error shape
  `{"error": {"message", "type": "server_unavailable", "param": null, "code": 503}}` and Retry-After.

Responses of the application itself (JSON) pass through untouched. Only request bodies up to
`MAX_REPLAY_BYTES` are kept for a retry; a larger one is streamed through and not retried.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, Callable

from .edits import MAX_UPLOAD_BYTES

ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
IMPORT_PATH = "sdengine.serve.proxy:middlewares"
RETRIES = 2
RETRY_PAUSE_S = 1.0
MAX_REPLAY_BYTES = MAX_UPLOAD_BYTES + 64 * 1024
RETRIED_HEADER = b"x-sdengine-retried"


def middlewares() -> list:
    """Ray's proxy callback: the Starlette middlewares every proxy applies."""
    from starlette.middleware import Middleware

    return [Middleware(ProxyErrors)]


def _error(status: int, message: str, retry_after: str = "5") -> tuple[dict, dict]:
    body = json.dumps({"error": {"message": message, "type": "server_unavailable", "param": None,
                                 "code": status}}).encode()
    start = {"type": "http.response.start", "status": status,
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                         (b"retry-after", retry_after.encode())]}
    return start, {"type": "http.response.body", "body": body, "more_body": False}


class ProxyErrors:
    """Pure ASGI middleware (see the module's docstring)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope.get("path", "").startswith("/-/"):  # Ray's own /-/healthz, /-/routes
            return await self.app(scope, receive, send)
        chunks, size, complete = [], 0, False
        while not complete and size <= MAX_REPLAY_BYTES:
            message = await receive()
            if message["type"] != "http.request":  # the client went away while sending
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            complete = not message.get("more_body", False)
        for attempt in range(RETRIES + 1):
            last = attempt == RETRIES or not complete
            outcome = await self._attempt(scope, chunks, complete, receive, send, attempt, last)
            if outcome is None:
                return
            await asyncio.sleep(RETRY_PAUSE_S)

    async def _attempt(self, scope: dict, chunks: list[bytes], complete: bool, receive: Callable, send: Callable,
                       attempt: int, last: bool) -> str | None:
        """One pass through the proxy; "retry" when its replica was lost and another try is allowed."""
        replay, gone = list(chunks), []

        async def replayed() -> dict:
            if replay:
                body = replay.pop(0)
                return {"type": "http.request", "body": body, "more_body": bool(replay) or not complete}
            message = await receive()
            if message["type"] == "http.disconnect":
                gone.append(True)
            return message

        held: dict[str, Any] = {}

        async def intercept(message: dict) -> None:
            if message["type"] == "http.response.start":
                headers = dict(message.get("headers", []))
                own = not headers.get(b"content-type", b"").startswith(b"application/json")
                if own and message["status"] in (500, 503):  # Ray's proxy speaking, not the application
                    held.update(status=message["status"], headers=headers, body=b"")
                    return
                if attempt:
                    message = {**message, "headers": [*message.get("headers", []),
                                                      (RETRIED_HEADER, str(attempt).encode())]}
                await send(message)
            elif message["type"] == "http.response.body" and held:
                held["body"] += message.get("body", b"")
            else:
                await send(message)

        started = False

        async def watch(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await intercept(message)

        try:
            await self.app(scope, replayed, watch)
        except Exception as exc:  # noqa: BLE001 - the proxy raises when the replica's actor died mid-request
            if started and not held:
                raise
            held.update(status=500, headers={}, body=f"{type(exc).__name__}".encode())
        if gone:  # the client went away: nothing to answer, nothing to retry
            return None
        if not started and not held:  # Ray's proxy returned without answering: the replica died (RayActorError)
            held.update(status=500, headers={}, body=b"the replica's actor died")
        if not held:
            return None
        if held["status"] == 500 and not last:
            return "retry"
        text = held["body"].decode(errors="replace").strip() or "unavailable"
        if held["status"] == 500:
            message = (f"the replica serving this request was lost ({text}) and {attempt} retr"
                       f"{'y' if attempt == 1 else 'ies'} failed; retry shortly")
        else:
            message = f"every replica is busy or none is running: {text}"
        retry_after = held["headers"].get(b"retry-after", b"5").decode()
        for message_out in _error(503, message, retry_after):
            await send(message_out)
        return None
