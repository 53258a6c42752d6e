"""Routes of the daemon's HTTP server: /metrics, /healthz and the JSON API.

The JSON API is what ``sockwatch table|trace|latency --url`` read, so the
CLI shows the same rows whether it attaches itself or asks a running daemon. Handlers only read: they copy under the monitor's lock and
format outside it.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import threading
import time
from typing import Any, Callable, Generator, Iterable, Sequence

from prometheus_client import CollectorRegistry
from prometheus_client import exposition as text_format
from prometheus_client.openmetrics import exposition as openmetrics_format

from sockwatch.exporters.http import Handler, Request, Response
from sockwatch.monitor import Monitor
from sockwatch.tables import Connection
from sockwatch import records
from sockwatch.views import fields
from sockwatch.views import probes as probes_view
from sockwatch.views.filters import Filter

JSON = "application/json"
# How long the kernel sends every OPEN at once after the last read of /api/events
# (longer than a reader's longest wait, 30 s, between two reads).
EVERY_OPEN_AFTER_READ_S = 60.0
# What /api/processes needs of each live row: owner, state and counters.
_BY_PROCESS = records.field_reader("state", "sock.tgid", "bytes_received", "bytes_sent",
                                   "bytes_retrans", "total_retrans", "peer_fin").unpack_from


class EventLog:
    """The most recent connection events with sequence numbers, for /api/events.

    The event thread hands over raw batches, and they are kept as handed over
    (the batch, its offsets and the sequence number of its first record): no
    copy or object per record on the hot path. Records are cut out and decoded
    only when a client asks for them.
    """

    def __init__(self, capacity: int = 10000):
        self.capacity = capacity
        # (sequence number of the first record kept, blob, offsets of the kept records)
        self._batches: collections.deque[tuple[int, bytes, Sequence[int]]] = collections.deque()
        self._held = 0  # records kept, at most capacity
        self._seq = 0
        self._cond = threading.Condition()

    def append(self, blob: bytes, offsets: Sequence[int]) -> None:
        """Called from the event thread with each applied batch."""
        kept = offsets[max(0, len(offsets) - self.capacity):]  # a burst larger than the log: its end
        with self._cond:
            self._seq += len(offsets) - len(kept)
            if kept:
                self._batches.append((self._seq + 1, blob, kept))
                self._seq += len(kept)
                self._held += len(kept)
            while self._held > self.capacity:
                first, old, old_offsets = self._batches[0]
                extra = self._held - self.capacity
                if extra >= len(old_offsets):
                    self._batches.popleft()
                    self._held -= len(old_offsets)
                else:
                    self._batches[0] = (first + extra, old, old_offsets[extra:])
                    self._held -= extra
            self._cond.notify_all()

    def after(self, seq: int, wait: float) -> tuple[int, list[dict[str, Any]]]:
        """Events with a sequence number above ``seq``, waiting up to ``wait`` for one."""
        with self._cond:
            self._cond.wait_for(lambda: self._seq > seq, timeout=wait)
            last, batches = self._seq, list(self._batches)
        size = records.EVENT_SIZE
        raws = [blob[off : off + size] for first, blob, offsets in batches
                for off in offsets[max(0, seq + 1 - first):]]
        events, _bad = records.decode_many(raws)
        return last, fields.event_dicts(events)


class SharedRender:
    """One render at a time, shared by every request that arrives while it runs.

    A scrape costs time proportional to the table; without this, N concurrent
    scrapers wait N renders. Requests that arrive during a render get its result
    (no older than their arrival plus one render); nothing is cached beyond that.
    """

    def __init__(self, render: Callable[[], bytes]):
        self._render = render
        self._cond = threading.Condition()
        self._busy = False
        self._generation = 0
        self._result = b""
        self._error: Exception | None = None

    def get(self) -> bytes:
        with self._cond:
            if self._busy:
                seen = self._generation
                self._cond.wait_for(lambda: self._generation != seen)
                if self._error is not None:
                    raise self._error
                return self._result
            self._busy = True
        body, error = b"", None
        try:
            body = self._render()
            return body
        except Exception as exc:  # the waiters fail the same way (500), not with b""
            error = exc
            raise
        finally:
            with self._cond:
                self._result, self._error, self._busy = body, error, False
                self._generation += 1
                self._cond.notify_all()


class BadQuery(ValueError):
    pass


def _int(query: dict[str, str], key: str, low: int, high: int) -> int | None:
    if key not in query:
        return None
    try:
        value = int(query[key])
    except ValueError:
        raise BadQuery(f"{key} must be an integer") from None
    if not low <= value <= high:
        raise BadQuery(f"{key} must be between {low} and {high}")
    return value


def _filter(query: dict[str, str]) -> Filter:
    state = None
    if "state" in query:
        state = fields.normalize_state(query["state"])
        if state is None:
            raise BadQuery(f"unknown state {query['state']!r}")
    pid = _int(query, "pid", 1, 1 << 22)
    return Filter(pids=frozenset([pid]) if pid else frozenset(), comm=query.get("comm"),
                  port=_int(query, "port", 1, 65535), state=state)


def _json(obj: Any, status: int = 200) -> Response:
    return Response(status, json.dumps(obj).encode(), JSON)


def _json_array(batches: Iterable[list[Any]]) -> Generator[bytes, None, None]:
    """A JSON array made and sent a batch at a time: at 200k live connections the
    whole list as objects would take hundreds of megabytes."""
    sep = b"["
    for batch in batches:
        if batch:
            yield sep + json.dumps(batch)[1:-1].encode()
            sep = b","
    yield b"]" if sep == b"," else b"[]"


def build_routes(monitor: Monitor, registry: CollectorRegistry, events: EventLog,
                 healthy: threading.Event) -> dict[str, Handler]:
    """All routes, closed over the monitor they read."""

    renders = {
        "openmetrics": SharedRender(lambda: openmetrics_format.generate_latest(registry)),
        "text": SharedRender(lambda: text_format.generate_latest(registry)),
    }

    def metrics(req: Request) -> Response:
        if "application/openmetrics-text" in req.headers.get("accept", ""):
            return Response(200, renders["openmetrics"].get(),
                            openmetrics_format.CONTENT_TYPE_LATEST)
        return Response(200, renders["text"].get(), text_format.CONTENT_TYPE_LATEST)

    def healthz(req: Request) -> Response:
        if healthy.is_set() and monitor.probes is not None:
            return Response(200, b"ok\n")
        return Response(503, b"not ready: probes not attached or event loop stopped\n")

    def connections(req: Request) -> Response:
        try:
            flt = _filter(req.query)
        except BadQuery as exc:
            return _json({"error": str(exc)}, 400)
        batches: Iterable[list[Connection]]
        if req.query.get("closed") in ("1", "true"):
            with monitor.lock:
                batches = [monitor.table.recently_closed()]
        else:
            # refresh=1: walk the kernel first, for live byte counters as of now
            # (what `sockwatch top --url` computes rates from); otherwise as of the
            # last periodic walk.
            fresh = req.query.get("refresh") in ("1", "true")
            if not fresh:
                monitor.sync()
            batches = monitor.connection_batches(refresh=fresh, where=flt.row_matches)
        return Response(200, _json_array(
            [fields.connection_dict(c, time.monotonic_ns()) for c in batch
             if flt.matches(c.ev, c.tgid, c.comm)] for batch in batches), JSON)

    def processes(req: Request) -> Response:
        monitor.sync()
        monitor.resolve_owners(fds=False)
        by_pid: dict[int, dict[str, Any]] = {}
        with monitor.lock:
            for (state, tgid, b_recv, b_sent, b_retr, retrans, fin), name in \
                    monitor.table.scan(_BY_PROCESS):
                if not tgid:
                    continue
                summary = by_pid.setdefault(tgid, {
                    "pid": tgid,
                    "process": name if isinstance(name, str) else records.decode_comm(name),
                    "states": {},
                    "bytes_sent": 0, "bytes_received": 0, "retransmits": 0})
                name = fields.state_name(state)
                summary["states"][name] = summary["states"].get(name, 0) + 1
                summary["bytes_sent"] += b_sent - b_retr
                summary["bytes_received"] += max(0, b_recv - fin)
                summary["retransmits"] += retrans
        for pid, summary in by_pid.items():
            info = monitor.processes.lookup(pid)
            if info:
                summary.update(user=info.user, cmdline=list(info.cmdline), cgroup=info.cgroup)
        return _json(sorted(by_pid.values(), key=lambda r: r["pid"]))

    def probes(req: Request) -> Response:
        p = monitor.probes
        if p is None:
            return _json({"error": "probes not attached"}, 503)
        return _json(probes_view.as_dict(p.features, p.plan, None, p.stack_enabled))

    def api_latency(req: Request) -> Response:
        if monitor.probes is None:
            return _json({"error": "probes not attached"}, 503)
        return _json(monitor.latency())

    def loss(req: Request) -> Response:
        if monitor.probes is None:
            return _json({"error": "probes not attached"}, 503)
        return _json(dataclasses.asdict(monitor.loss()))

    def api_events(req: Request) -> Response:
        try:
            after = _int(req.query, "after", 0, 1 << 62) or 0
            wait = _int(req.query, "wait", 0, 30) or 0
        except BadQuery as exc:
            return _json({"error": str(exc)}, 400)
        # A stream reader (trace --url) wants each OPEN as it happens, not only
        # those of connections that outlive a drain: until it has been gone a while.
        monitor.send_every_open(EVERY_OPEN_AFTER_READ_S)
        seq, evs = events.after(after, wait)
        return _json({"seq": seq, "events": evs})

    return {"/metrics": metrics, "/healthz": healthz, "/api/connections": connections,
            "/api/processes": processes, "/api/probes": probes, "/api/events": api_events,
            "/api/latency": api_latency, "/api/loss": loss}
