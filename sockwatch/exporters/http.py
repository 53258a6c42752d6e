"""A small HTTP/1.1 server for /metrics, /healthz and the JSON API.

Why not http.server: a thread per connection lets a few hundred slow clients
(or a slowloris) hold every worker. Here a connection costs a small state
object on one selector thread until its request is complete; only requests
being handled count against ``max_requests`` (the excess gets 503 at once),
every read and write has a deadline, and the handlers run in a small thread
pool so rendering never stalls the accept loop. TLS and basic auth (bcrypt hashes, as in the
Prometheus exporter toolkit's web config) are optional.
"""

from __future__ import annotations

import base64
import concurrent.futures
import hashlib
import heapq
import itertools
import logging
import queue
import selectors
import socket
import ssl
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Callable, Generator, Iterator

log = logging.getLogger("sockwatch.http")

MAX_HEADER_BYTES = 16 * 1024
MAX_OPEN_CONNECTIONS = 1024


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]


@dataclass
class Response:
    status: int
    body: bytes | Generator[bytes, None, None]  # a generator is sent chunked, made in the pool
    content_type: str = "text/plain; charset=utf-8"
    headers: dict[str, str] = field(default_factory=dict)


Handler = Callable[[Request], Response]
REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found",
           405: "Method Not Allowed", 408: "Request Timeout", 431: "Request Header Fields Too Large",
           500: "Internal Server Error", 503: "Service Unavailable"}


class BasicAuth:
    """Checks ``Authorization: Basic`` against bcrypt hashes; remembers successes.

    bcrypt is deliberately slow (tens of ms), so a verified user:password is
    cached by its SHA-256 and a scrape does not pay for it every time.
    """

    def __init__(self, users: dict[str, str]):
        import bcrypt  # only needed when auth is configured

        self._bcrypt = bcrypt
        self.users = dict(users)
        self._ok: set[bytes] = set()

    def allows(self, header: str | None) -> bool:
        if not header or not header.startswith("Basic "):
            return False
        try:
            user, _, password = base64.b64decode(header[6:], validate=True).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return False
        hashed = self.users.get(user)
        if hashed is None:
            return False
        token = hashlib.sha256(f"{user}\0{password}\0{hashed}".encode()).digest()
        if token in self._ok:
            return True
        if self._bcrypt.checkpw(password.encode(), hashed.encode()):
            if len(self._ok) > 1024:
                self._ok.clear()
            self._ok.add(token)
            return True
        return False


class HttpServer:
    """Serves ``routes`` (path -> handler) from one thread, over a selector.

    Each connection is a small state machine (TLS handshake, reading the head,
    waiting for its handler, sending) driven by readiness events; a heap of
    deadlines closes connections that stall. Handlers, and the parts of a
    streamed body, are made in the pool; a finished one is handed back through
    a queue and a wake-up socket. (asyncio did the same for 1.4 MB more RSS.)
    """

    def __init__(self, host: str, port: int, routes: dict[str, Handler], *,
                 max_requests: int = 32, timeout: float = 5.0,
                 tls: tuple[str, str] | None = None, auth: BasicAuth | None = None):
        self.host, self.port = host, port
        self.routes = routes
        self.max_requests = max_requests
        self.timeout = timeout
        self.auth = auth
        self._ssl: ssl.SSLContext | None = None
        if tls:
            self._ssl = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self._ssl.minimum_version = ssl.TLSVersion.TLSv1_2
            self._ssl.load_cert_chain(*tls)
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="http")
        self._inflight = 0
        self._open = 0
        self.rejected = 0  # requests answered 503 because of the cap
        self._selector = selectors.DefaultSelector()
        self._listener: socket.socket | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._done: queue.SimpleQueue[tuple[_Conn, Any]] = queue.SimpleQueue()
        self._deadlines: list[tuple[float, int, _Conn]] = []
        self._stopping = False
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------
    def start(self) -> None:
        """Bind and serve; raises here (not in the thread) if the address is unusable."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        self._listener = socket.create_server((self.host, self.port), family=family,
                                              backlog=MAX_OPEN_CONNECTIONS)
        self._listener.setblocking(False)
        self.port = self._listener.getsockname()[1]
        for sock in (self._wake_r, self._wake_w):
            sock.setblocking(False)
        self._selector.register(self._listener, selectors.EVENT_READ, _ACCEPT)
        self._selector.register(self._wake_r, selectors.EVENT_READ, _WAKE)
        self._thread = threading.Thread(target=self._run, name="http", daemon=True)
        self._thread.start()

    def set_auth(self, auth: BasicAuth | None) -> None:
        self.auth = auth

    def stop(self) -> None:
        if self._thread and self._thread.is_alive():
            self._stopping = True
            self._wake()
            self._thread.join(timeout=5)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"!")
        except OSError:
            pass  # wake-ups pending already (or the server stopped)

    def _run(self) -> None:
        select = self._selector.select
        try:
            while not self._stopping:
                for key, events in select(self._wait_for()):
                    if key.data is _ACCEPT:
                        self._accept()
                    elif key.data is _WAKE:
                        self._handed_back()
                    else:
                        _guarded(key.data, key.data.advance, events)
                self._expire()
        finally:
            for key in list(self._selector.get_map().values()):
                if isinstance(key.data, _Conn):
                    key.data.close()
            self._selector.close()
            for sock in (self._listener, self._wake_r, self._wake_w):
                if sock is not None:
                    sock.close()

    # -- the loop's chores -------------------------------------------------------
    def _accept(self) -> None:
        listener = self._listener
        assert listener is not None, "start() registers it"
        while True:
            try:
                sock, _addr = listener.accept()
            except (BlockingIOError, ConnectionError):
                return
            except OSError as exc:  # out of fds, say: the backlog keeps the rest waiting
                log.warning("accept failed: %s", exc)
                return
            if self._open >= MAX_OPEN_CONNECTIONS:
                sock.close()  # shed load: close without reading
                continue
            sock.setblocking(False)
            if self._ssl is not None:
                sock = self._ssl.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
            _Conn(self, sock)

    def _handed_back(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass
        while True:
            try:
                conn, result = self._done.get_nowait()
            except queue.Empty:
                return
            _guarded(conn, conn.handed_back, result)

    def _wait_for(self) -> float | None:
        """Seconds until the nearest deadline (None: no connection has one)."""
        heap = self._deadlines
        while heap and heap[0][2].deadline != heap[0][0]:
            heapq.heappop(heap)  # the connection moved on (or closed) since
        return max(0.0, heap[0][0] - time.monotonic()) if heap else None

    def _expire(self) -> None:
        now, heap = time.monotonic(), self._deadlines
        while heap and heap[0][0] <= now:
            when, _seq, conn = heapq.heappop(heap)
            if conn.deadline == when:
                conn.close()  # stalled: a slow or silent client

    def _in_pool(self, conn: _Conn, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` in the pool; its result comes back to ``conn.handed_back``."""
        def done(future: concurrent.futures.Future) -> None:
            try:
                result = future.result()
            except BaseException:  # cancelled at shutdown
                result = None
            self._done.put((conn, result))
            self._wake()
        self._pool.submit(fn, *args).add_done_callback(done)

    # -- requests -----------------------------------------------------------------
    def _refusal(self, request: Request) -> Response | None:
        """The answer to a request no handler will see, if it is one."""
        if request.method != "GET":
            return Response(405, b"only GET\n", headers={"Allow": "GET"})
        if request.path not in self.routes:
            return Response(404, b"not found\n")
        if self.auth and not self.auth.allows(request.headers.get("authorization")):
            return Response(401, b"unauthorized\n",
                            headers={"WWW-Authenticate": 'Basic realm="sockwatch"'})
        if self._inflight >= self.max_requests:
            self.rejected += 1
            return Response(503, b"busy: too many concurrent requests\n",
                            headers={"Retry-After": "1"})
        return None


_ACCEPT, _WAKE = object(), object()
_EXHAUSTED = object()  # a streamed body has no more parts
_seq = itertools.count()


class _Conn:
    """One client connection, advanced by the server's loop thread only.

    Phases: the TLS handshake (when TLS is on), reading the request head, waiting
    for the pool (the handler, or a streamed body's next part), sending. Each
    phase that waits on the client has a deadline; an admitted request counts
    against ``max_requests`` until its connection closes, so a streamed body
    holds its slot while it is sent (as it is made meanwhile).
    """

    def __init__(self, server: HttpServer, sock: socket.socket):
        self.server, self.sock = server, sock
        self.head = bytearray()
        self.out = memoryview(b"")
        self.parts: Iterator[bytes] | None = None
        self.admitted = False
        self.closed = False
        self.deadline = 0.0
        self.events = 0
        self.shaking = server._ssl is not None
        server._open += 1
        self._wait_on(selectors.EVENT_READ)
        self._set_deadline()

    def _set_deadline(self) -> None:
        self.deadline = time.monotonic() + self.server.timeout
        heapq.heappush(self.server._deadlines, (self.deadline, next(_seq), self))

    def _wait_on(self, events: int) -> None:
        """Wait for ``events`` on the socket (0: for the pool, not the socket)."""
        if events == self.events:
            return
        selector = self.server._selector
        if not self.events:
            selector.register(self.sock, events, self)
        elif not events:
            selector.unregister(self.sock)
        else:
            selector.modify(self.sock, events, self)
        self.events = events

    def advance(self, _ready: int = 0) -> None:
        """Go as far as the socket lets us (it is ready for what we waited on, or
        there is something new to send), then wait for what blocked us."""
        try:
            if self.shaking:
                self.sock.do_handshake()
                self.shaking = False
                self._set_deadline()  # the head has its own deadline
            if self.out:
                self._send()
            elif self.parts is None and not self.admitted:
                self._read()
        except BlockingIOError:  # the kernel's buffer: full while sending, empty while reading
            self._wait_on(selectors.EVENT_WRITE if self.out else selectors.EVENT_READ)
        except ssl.SSLWantReadError:
            self._wait_on(selectors.EVENT_READ)
        except ssl.SSLWantWriteError:
            self._wait_on(selectors.EVENT_WRITE)
        except OSError:  # the client went away, or spoke no TLS: nothing to answer
            self.close()

    def _read(self) -> None:
        while True:
            data = self.sock.recv(4096)
            if not data:
                self.close()
                return
            self.head += data
            end = self.head.find(b"\r\n\r\n", 0, MAX_HEADER_BYTES)
            if end >= 0:
                self._dispatch(_parse(bytes(self.head[: end + 4])))
                return
            if len(self.head) >= MAX_HEADER_BYTES:
                self.respond(Response(431, b"headers too large\n"))
                return

    def _dispatch(self, request: Request | None) -> None:
        if request is None:
            self.respond(Response(400, b"bad request\n"))
            return
        refusal = self.server._refusal(request)
        if refusal is not None:
            self.respond(refusal)
            return
        self.admitted = True
        self.server._inflight += 1
        self.deadline = 0.0  # the handler has no deadline
        self._wait_on(0)
        self.server._in_pool(self, _call, self.server.routes[request.path], request)

    def respond(self, resp: Response) -> None:
        streamed = not isinstance(resp.body, bytes)
        head = [f"HTTP/1.1 {resp.status} {REASONS.get(resp.status, '')}",
                f"Content-Type: {resp.content_type}",
                "Transfer-Encoding: chunked" if streamed else f"Content-Length: {len(resp.body)}",
                "Connection: close"]
        head += [f"{k}: {v}" for k, v in resp.headers.items()]
        head_bytes = ("\r\n".join(head) + "\r\n\r\n").encode()
        if streamed:
            self.parts = resp.body  # type: ignore[assignment]
            self._queue(head_bytes)
        else:
            self._queue(head_bytes + resp.body)  # type: ignore[operator]

    def handed_back(self, result: Any) -> None:
        """What the pool made for us: the handler's Response, or the next part."""
        if self.closed:
            return
        if isinstance(result, Response):
            self.respond(result)
        elif result is _EXHAUSTED:
            self.parts = None
            self._queue(b"0\r\n\r\n")
        elif result is None:  # the body failed half way: end it unterminated
            self.close()
        elif result:
            self._queue(b"%x\r\n%s\r\n" % (len(result), result))
        else:
            self._next_part()

    def _queue(self, data: bytes) -> None:
        self.out = memoryview(data)
        self._set_deadline()
        self.advance()

    def _send(self) -> None:
        while self.out:
            sent = self.sock.send(self.out)
            self.out = self.out[sent:]
            self._set_deadline()  # progress: the deadline is per write, as a drain's
        if self.parts is not None:
            self._next_part()
        else:
            self.close()  # the whole answer is out (Connection: close)

    def _next_part(self) -> None:
        self.deadline = 0.0  # making the part has no deadline; sending it has
        self._wait_on(0)
        self.server._in_pool(self, _next_part, self.parts)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.deadline = 0.0
        self._wait_on(0)
        server = self.server
        server._open -= 1
        if self.admitted:
            server._inflight -= 1
        try:
            # What the client sent beyond the head (it was refused early, say) would
            # make close() send RST, and a reset can discard our answer before the
            # client reads it: take what has arrived first (bounded, never waits).
            for _ in range(16):
                if not self.sock.recv(65536):
                    break
        except (OSError, ValueError):
            pass
        if self.parts is not None:
            # A client that went away releases what the body holds; in the pool,
            # since the generator may be running there right now.
            server._pool.submit(_close_parts, self.parts)
            self.parts = None
        try:
            self.sock.close()
        except OSError:
            pass


def _guarded(conn: _Conn, step: Callable[[Any], None], arg: Any) -> None:
    """Run one step of a connection; a bug there closes that connection, not the
    server (asyncio logged such an exception and served on, and so do we)."""
    try:
        step(arg)
    except Exception:
        log.exception("HTTP connection failed")
        conn.close()


def _close_parts(parts: Iterator[bytes]) -> None:
    try:
        parts.close()  # type: ignore[attr-defined]
    except ValueError:
        pass  # still running in another worker: it finishes, and is dropped then


def _next_part(parts: Iterator[bytes]) -> bytes | object | None:
    """The next part of a streamed body; _EXHAUSTED at its end, None if it failed.
    A handler that fails half-way cannot change the status any more: the body
    ends unterminated, so the client sees a broken answer, never a short one
    that looks whole."""
    try:
        return next(parts)
    except StopIteration:
        return _EXHAUSTED
    except Exception:
        log.exception("streamed answer failed")
        return None


def _call(handler: Handler, request: Request) -> Response:
    try:
        return handler(request)
    except Exception:  # a bug in one handler must not take the server down
        log.exception("handler for %s failed", request.path)
        return Response(500, b"internal error\n")


def _parse(head: bytes) -> Request | None:
    try:
        lines = head.decode("latin-1").split("\r\n")
        method, target, _version = lines[0].split(" ", 2)
    except ValueError:
        return None
    url = urllib.parse.urlsplit(target)
    query = {k: v[-1] for k, v in urllib.parse.parse_qs(url.query).items()}
    headers = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return Request(method.upper(), url.path, query, headers)
