"""sdengine.serve.proxy, the middleware for Ray's HTTP proxy, against a stand-in of the proxy's own app:
Ray's plain-text errors become the server's error shape, a lost replica's request is sent again with its body."""

from __future__ import annotations

import asyncio
import json

import pytest

pytest.importorskip("starlette")

from sdengine.serve import proxy  # noqa: E402


def run(answers: list[tuple[int, bytes, bytes]], body: bytes = b'{"prompt": "a"}') -> tuple[list[dict], list[bytes]]:
    """The middleware over an app answering `answers` in turn (status, content type, body); what the client got
    and the request bodies the app saw."""
    seen, sent = [], []

    async def app(scope, receive, send):
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        seen.append(b"".join(chunks))
        status, kind, text = answers[len(seen) - 1]
        await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", kind)]})
        await send({"type": "http.response.body", "body": text, "more_body": False})

    parts = [body[:5], body[5:]]

    async def receive():
        part = parts.pop(0)
        return {"type": "http.request", "body": part, "more_body": bool(parts)}

    async def send(message):
        sent.append(message)

    async def main():
        await proxy.ProxyErrors(app)({"type": "http", "method": "POST", "path": "/v1/images/generations"}, receive,
                                     send)

    asyncio.run(main())
    return sent, seen


def test_a_lost_replica_is_retried_with_the_same_body(monkeypatch):
    monkeypatch.setattr(proxy, "RETRY_PAUSE_S", 0.0)
    ok = b'{"created": 1, "data": []}'
    sent, seen = run([(500, b"text/plain", b"Internal Server Error"), (200, b"application/json", ok)])
    assert seen == [b'{"prompt": "a"}'] * 2
    assert sent[0]["status"] == 200 and (b"x-sdengine-retried", b"1") in sent[0]["headers"]
    assert sent[1]["body"] == ok


def test_when_retries_fail_or_ray_refuses_the_client_gets_a_503_in_the_servers_shape(monkeypatch):
    monkeypatch.setattr(proxy, "RETRY_PAUSE_S", 0.0)
    sent, seen = run([(500, b"text/plain", b"Internal Server Error")] * 3)
    assert len(seen) == 3  # the first try and two retries
    error = json.loads(sent[1]["body"])["error"]
    assert sent[0]["status"] == 503 and (b"retry-after", b"5") in sent[0]["headers"]
    assert error["type"] == "server_unavailable" and "lost" in error["message"] and "2 retries" in error["message"]
    sent, seen = run([(503, b"text/plain; charset=utf-8", b"Request dropped due to backpressure (...).")])
    assert len(seen) == 1 and sent[0]["status"] == 503
    assert json.loads(sent[1]["body"])["error"]["message"].endswith("Request dropped due to backpressure (...).")


def test_an_exception_of_the_proxy_is_a_lost_replica(monkeypatch):
    """Ray's proxy raises (rather than answering 500) when the replica's actor dies mid-request."""
    monkeypatch.setattr(proxy, "RETRY_PAUSE_S", 0.0)
    calls = []

    async def app(scope, receive, send):
        calls.append(await receive())
        if len(calls) == 1:
            raise RuntimeError("ActorDiedError")
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": b"{}", "more_body": False})

    sent = []

    async def receive():
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message):
        sent.append(message)

    asyncio.run(proxy.ProxyErrors(app)({"type": "http", "path": "/v1/images/generations"}, receive, send))
    assert len(calls) == 2 and sent[0]["status"] == 200 and (b"x-sdengine-retried", b"1") in sent[0]["headers"]


def test_no_answer_from_the_proxy_is_a_lost_replica(monkeypatch):
    """Ray's proxy sends nothing when the replica's actor died (uvicorn would answer 500)."""
    monkeypatch.setattr(proxy, "RETRY_PAUSE_S", 0.0)
    sent, calls = [], []

    async def app(scope, receive, send):
        calls.append(await receive())

    async def receive():
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message):
        sent.append(message)

    asyncio.run(proxy.ProxyErrors(app)({"type": "http", "path": "/v1/images/generations"}, receive, send))
    assert len(calls) == 3 and sent[0]["status"] == 503
    assert "was lost" in json.loads(sent[1]["body"])["error"]["message"]


def test_a_client_that_went_away_is_not_retried(monkeypatch):
    monkeypatch.setattr(proxy, "RETRY_PAUSE_S", 0.0)
    sent, calls = [], []
    messages = [{"type": "http.request", "body": b"{}", "more_body": False}, {"type": "http.disconnect"}]

    async def app(scope, receive, send):
        calls.append(await receive())
        await receive()  # the disconnect: Ray's proxy cancels the request and answers nothing

    async def receive():
        return messages.pop(0)

    async def send(message):
        sent.append(message)

    asyncio.run(proxy.ProxyErrors(app)({"type": "http", "path": "/v1/images/generations"}, receive, send))
    assert len(calls) == 1 and sent == []


def test_the_applications_own_answers_pass_untouched():
    body = json.dumps({"error": {"message": "the queue is full", "type": "rate_limit_error", "param": None,
                                 "code": 429}}).encode()
    for status in (200, 429, 500, 503):
        sent, seen = run([(status, b"application/json", body)])
        assert len(seen) == 1 and sent[0]["status"] == status and sent[1]["body"] == body
        assert all(name != b"x-sdengine-retried" for name, _ in sent[0]["headers"])
