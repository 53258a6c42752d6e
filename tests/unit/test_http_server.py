"""The daemon's HTTP server over real loopback sockets, no privileges needed:
what a client gets for malformed, refused, stalled and excess requests. (TLS,
basic auth and floods of hundreds of clients run against the daemon in
tests/kernel/test_daemon.py.)"""

from __future__ import annotations

import socket
import threading
import time
import urllib.error
import urllib.request
from typing import Callable

import pytest

from sockwatch.exporters.http import MAX_HEADER_BYTES, HttpServer, Response

TIMEOUT = 0.3


@pytest.fixture
def serve():
    servers: list[HttpServer] = []

    def start(routes, **kw) -> HttpServer:
        server = HttpServer("127.0.0.1", 0, routes, timeout=TIMEOUT, **kw)
        server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def raw(server: HttpServer, data: bytes, wait: float = 3.0) -> bytes:
    """Send ``data`` and read until the server closes (or ``wait`` passes)."""
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(data)
        s.settimeout(wait)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


def status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def test_answers_and_refusals(serve):
    server = serve({"/ok": lambda req: Response(200, repr(req.query).encode())})
    ok = raw(server, b"GET /ok?a=1&b=2 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status(ok) == 200 and ok.endswith(b"{'a': '1', 'b': '2'}")
    assert b"\r\nConnection: close\r\n" in ok
    assert status(raw(server, b"GET /nope HTTP/1.1\r\n\r\n")) == 404
    post = raw(server, b"POST /ok HTTP/1.1\r\n\r\n")
    assert status(post) == 405 and b"\r\nAllow: GET\r\n" in post
    assert status(raw(server, b"nonsense\r\n\r\n")) == 400


def settles(done: Callable[[], bool], within: float = 2.0) -> bool:
    """``done()`` becomes true within ``within`` seconds (the server thread catches up)."""
    deadline = time.monotonic() + within
    while not done() and time.monotonic() < deadline:
        time.sleep(0.01)
    return done()


def test_an_oversized_head_gets_431_not_a_reset(serve):
    """The answer comes before the rest of the head is read: the server takes what
    arrived before closing, so the client reads the 431 instead of a reset."""
    server = serve({"/ok": lambda req: Response(200, b"ok")})
    head = b"GET /ok HTTP/1.1\r\nX-Big: " + b"a" * MAX_HEADER_BYTES + b"\r\n\r\n"
    assert status(raw(server, head)) == 431


@pytest.mark.parametrize("sent", [b"", b"GET /ok HTTP/1.1\r\n"])
def test_a_stalled_client_is_closed_at_the_deadline(serve, sent):
    server = serve({"/ok": lambda req: Response(200, b"ok")})
    t = time.monotonic()
    assert raw(server, sent) == b""  # closed without an answer
    assert TIMEOUT * 0.9 <= time.monotonic() - t < TIMEOUT + 1.0
    assert settles(lambda: server._open == 0)


def test_requests_over_the_cap_get_503_at_once_and_slots_come_back(serve):
    release = threading.Event()

    def slow(req):
        release.wait(5)
        return Response(200, b"slow")

    server = serve({"/slow": slow, "/ok": lambda req: Response(200, b"ok")}, max_requests=2)
    url = f"http://127.0.0.1:{server.port}"
    answers: list[bytes] = []
    held = [threading.Thread(target=lambda: answers.append(urllib.request.urlopen(
        url + "/slow", timeout=5).read())) for _ in range(2)]
    for t in held:
        t.start()
    assert settles(lambda: server._inflight == 2)
    t0 = time.monotonic()
    with pytest.raises(urllib.error.HTTPError) as busy:
        urllib.request.urlopen(url + "/ok", timeout=5)
    assert busy.value.code == 503 and busy.value.headers["Retry-After"] == "1"
    assert time.monotonic() - t0 < 1.0 and server.rejected == 1
    release.set()
    for t in held:
        t.join()
    assert answers == [b"slow", b"slow"]
    assert urllib.request.urlopen(url + "/ok", timeout=5).read() == b"ok"
    # a slot comes back when the server sees the client close, just after the answer
    assert settles(lambda: server._inflight == 0)


def test_a_silent_crowd_does_not_delay_a_request(serve):
    """Idle connections cost the server a state object each, not a worker."""
    server = serve({"/ok": lambda req: Response(200, b"ok")})
    crowd = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(200)]
    try:
        t = time.monotonic()
        body = urllib.request.urlopen(f"http://127.0.0.1:{server.port}/ok", timeout=5).read()
        assert body == b"ok" and time.monotonic() - t < TIMEOUT
    finally:
        for s in crowd:
            s.close()


def test_an_address_in_use_fails_at_start(serve):
    first = serve({"/ok": lambda req: Response(200, b"ok")})
    with pytest.raises(OSError):
        HttpServer("127.0.0.1", first.port, {}).start()


def test_a_bug_in_one_connection_does_not_stop_the_server(serve, monkeypatch, caplog):
    server = serve({"/ok": lambda req: Response(200, b"ok")})
    refusal = HttpServer._refusal

    def buggy(self, request):
        if request.path == "/boom":
            raise RuntimeError("bug")
        return refusal(self, request)

    monkeypatch.setattr(HttpServer, "_refusal", buggy)
    assert raw(server, b"GET /boom HTTP/1.1\r\n\r\n") == b""  # closed, unanswered
    assert "HTTP connection failed" in caplog.text
    assert status(raw(server, b"GET /ok HTTP/1.1\r\n\r\n")) == 200
    assert settles(lambda: server._open == 0)


def test_a_body_larger_than_the_socket_buffers_reaches_a_late_reader(serve):
    """Sending stops whenever the kernel's send buffer is full and goes on once the
    client has read: each time the server must wait for the socket to be writable
    (waiting for it to be readable instead stalled until the deadline cut the
    answer short)."""
    body = bytes(range(256)) * (128 << 10)  # 32 MiB: many times the socket buffers
    server = serve({"/big": lambda req: Response(200, body)})
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(b"GET /big HTTP/1.1\r\n\r\n")
        s.settimeout(5)
        time.sleep(TIMEOUT / 2)  # the server fills the buffers and has to wait
        got = bytearray()
        while chunk := s.recv(1 << 20):
            got += chunk
    assert status(got) == 200 and got.endswith(body)
