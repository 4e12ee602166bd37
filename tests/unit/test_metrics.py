"""The metrics endpoint's own rules: address parsing, and a scrape that
finds the event loop busy fails in bounded time (HTTP 503) instead of
hanging, and the next one succeeds."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
import types
import urllib.error
import urllib.request

import pytest

from fleeced import metrics


@pytest.mark.parametrize(("text", "expected"), [
    ("127.0.0.1:9632", ("127.0.0.1", 9632)),
    ("[::1]:1", ("::1", 1)),
    (":65535", (None, 65535)),
    ("host.example:80", ("host.example", 80)),
])
def test_parse_address(text: str, expected: tuple[str | None, int]) -> None:
    assert metrics.parse_address(text) == expected


@pytest.mark.parametrize(("text", "message"), [
    ("9632", "is not ADDR:PORT"),
    ("::1:9632", "is not ADDR:PORT"),
    ("h:0", "port 0 is out of range"),
    ("h:65536", "port 65536 is out of range"),
    ("h:", "is not ADDR:PORT"),
])
def test_parse_address_refuses(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        metrics.parse_address(text)


def _idle_daemon() -> types.SimpleNamespace:
    server = types.SimpleNamespace(exports={}, reply_budget=1, reply_bytes=0, native_reply_bytes=0,
                                   connection_count=0, in_flight=lambda name: 0,
                                   sync_stats=lambda: None)
    return types.SimpleNamespace(config=types.SimpleNamespace(data_plane="native"), disks={},
                                 attachments={}, lost_sessions={}, server=server)


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@pytest.mark.asyncio
async def test_a_busy_loop_fails_the_scrape_in_bounded_time() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = metrics.MetricsServer(_idle_daemon(), "127.0.0.1", port)
    await server.start()
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        got: list[tuple[int, str, float]] = []

        def scrape() -> None:
            t0 = time.monotonic()
            status, body = _get(url)
            got.append((status, body, time.monotonic() - t0))

        t = threading.Thread(target=scrape)
        t.start()
        # The loop is stuck (this join blocks it) until the scrape has
        # given up waiting for it.
        t.join(30)
        assert not t.is_alive()
        ((status, body, took),) = got
        assert status == 503 and "did not answer" in body, (status, body)
        assert took < metrics.SNAPSHOT_TIMEOUT + 2.0
        status, body = await asyncio.to_thread(_get, url)
        assert status == 200 and "fleeced_connections 0.0" in body, body
    finally:
        await server.close()
