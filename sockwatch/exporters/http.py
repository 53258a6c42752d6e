"""A small HTTP/1.1 server for /metrics, /healthz and the JSON API.

Why not http.server: a thread per connection lets a few hundred slow clients
(or a slowloris) hold every worker. Here a connection costs a coroutine until
its request is complete; only requests being handled count against
``max_requests`` (the excess gets 503 at once), every read and write has a
deadline, and the handlers run in a small thread pool so rendering never
stalls the accept loop. TLS and basic auth (bcrypt hashes, as in the
Prometheus exporter toolkit's web config) are optional.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import hashlib
import logging
import ssl
import threading
import urllib.parse
from dataclasses import dataclass, field
from typing import Callable, Generator, Iterator

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
    """Serves ``routes`` (path -> handler) on its own thread and event loop."""

    def __init__(self, host: str, port: int, routes: dict[str, Handler], *,
                 max_requests: int = 32, timeout: float = 5.0,
                 tls: tuple[str, str] | None = None, auth: BasicAuth | None = None):
        self.host, self.port = host, port
        self.routes = routes
        self.max_requests = max_requests
        self.timeout = timeout
        self.auth = auth
        self._ssl = None
        if tls:
            self._ssl = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self._ssl.minimum_version = ssl.TLSVersion.TLSv1_2
            self._ssl.load_cert_chain(*tls)
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="http")
        self._inflight = 0
        self._open = 0
        self.rejected = 0  # requests answered 503 because of the cap
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    # -- lifecycle -------------------------------------------------------------
    def start(self) -> None:
        """Bind and serve; raises here (not in the thread) if the address is unusable."""
        self._thread = threading.Thread(target=self._run, name="http", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error:
            raise self._error

    def _run(self) -> None:
        self._loop = asyncio.new_event_loop()
        try:
            self._server = self._loop.run_until_complete(asyncio.start_server(
                self._serve, self.host, self.port, ssl=self._ssl,
                ssl_handshake_timeout=self.timeout if self._ssl else None,
                limit=MAX_HEADER_BYTES, reuse_address=True))
            self.port = self._server.sockets[0].getsockname()[1]
        except BaseException as exc:  # handed to start()
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        self._loop.run_forever()
        self._server.close()
        self._loop.run_until_complete(self._server.wait_closed())
        self._loop.close()

    def set_auth(self, auth: BasicAuth | None) -> None:
        self.auth = auth

    def stop(self) -> None:
        if self._loop and self._thread and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- one connection -----------------------------------------------------------
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._open += 1
        try:
            if self._open > MAX_OPEN_CONNECTIONS:
                return  # shed load: close without reading
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.timeout)
            except (asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError):
                return
            except asyncio.LimitOverrunError:
                await self._send(writer, Response(431, b"headers too large\n"))
                return
            request = _parse(head)
            if request is None:
                await self._send(writer, Response(400, b"bad request\n"))
                return
            await self._answer(writer, request)
        except (ConnectionError, asyncio.TimeoutError, ssl.SSLError):
            pass  # the client went away or stalled; nothing to answer
        finally:
            self._open -= 1
            writer.close()

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

    async def _answer(self, writer: asyncio.StreamWriter, request: Request) -> None:
        """Handle a request in the pool and send the answer; the request counts
        against ``max_requests`` until its last byte is sent (a streamed body is
        made while it is sent)."""
        refusal = self._refusal(request)
        if refusal is not None:
            await self._send(writer, refusal)
            return
        self._inflight += 1
        try:
            loop = asyncio.get_running_loop()
            resp = await loop.run_in_executor(self._pool, _call, self.routes[request.path],
                                              request)
            await self._send(writer, resp)
        finally:
            self._inflight -= 1

    async def _send(self, writer: asyncio.StreamWriter, resp: Response) -> None:
        streamed = not isinstance(resp.body, bytes)
        head = [f"HTTP/1.1 {resp.status} {REASONS.get(resp.status, '')}",
                f"Content-Type: {resp.content_type}",
                "Transfer-Encoding: chunked" if streamed else f"Content-Length: {len(resp.body)}",
                "Connection: close"]
        head += [f"{k}: {v}" for k, v in resp.headers.items()]
        head_bytes = ("\r\n".join(head) + "\r\n\r\n").encode()
        if not streamed:
            writer.write(head_bytes + resp.body)
            await asyncio.wait_for(writer.drain(), self.timeout)
            return
        parts = resp.body
        writer.write(head_bytes)
        loop = asyncio.get_running_loop()
        try:
            while (part := await loop.run_in_executor(self._pool, _next_part, parts)) is not None:
                if part:
                    writer.write(b"%x\r\n%s\r\n" % (len(part), part))
                    await asyncio.wait_for(writer.drain(), self.timeout)
            writer.write(b"0\r\n\r\n")
            await asyncio.wait_for(writer.drain(), self.timeout)
        finally:
            parts.close()  # a client that went away releases what the body holds


def _next_part(parts: Iterator[bytes]) -> bytes | None:
    """The next part of a streamed body; None at its end. A handler that fails
    half-way cannot change the status any more: the body ends unterminated, so
    the client sees a broken answer, never a short one that looks whole."""
    try:
        return next(parts)
    except StopIteration:
        return None
    except Exception:
        log.exception("streamed answer failed")
        raise ConnectionAbortedError("streamed answer failed") from None


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
