"""Streamed answers: /api/connections at 200k live sockets is sent a batch at a
time (chunked), so the daemon never holds the whole answer. Over a real
loopback socket, no privileges needed."""

from __future__ import annotations

import http.client
import json
import time
import urllib.request

import pytest

from sockwatch.exporters.api import _json_array
from sockwatch.exporters.http import HttpServer, Response


def _serve(routes):
    server = HttpServer("127.0.0.1", 0, routes)
    server.start()
    return server


def test_streamed_body_arrives_whole_and_the_slot_is_released():
    made = []

    def parts():
        for i in range(50):
            made.append(i)
            yield b"x" * 1000

    server = _serve({"/s": lambda req: Response(200, parts())})
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/s", timeout=5) as r:
            assert r.headers["Transfer-Encoding"] == "chunked"
            assert r.read() == b"x" * 50_000
        assert made == list(range(50))
        deadline = time.monotonic() + 5  # the server's bookkeeping follows the last byte
        while server._inflight and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server._inflight == 0
    finally:
        server.stop()


def test_a_body_that_fails_half_way_never_looks_complete():
    def parts():
        yield b"[1,"
        raise RuntimeError("table went away")

    server = _serve({"/s": lambda req: Response(200, parts())})
    try:
        with pytest.raises(http.client.IncompleteRead):
            with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/s", timeout=5) as r:
                r.read()
    finally:
        server.stop()


@pytest.mark.parametrize("batches", [[], [[]], [[1, 2]], [[1], [], [{"a": 2}, 3]]])
def test_json_array_of_batches_is_one_json_array(batches):
    body = b"".join(_json_array(iter(batches)))
    assert json.loads(body) == [x for batch in batches for x in batch]
