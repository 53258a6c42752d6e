"""Where ``sockwatch top`` gets its data: this process's own probes, or a daemon.

Both produce the same ``Sample`` of plain dicts (the JSON API's shapes), so the
model and the screen cannot tell them apart; the header says which one it is.
A sample holds cumulative counters only: rates are the model's business.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from sockwatch import records
from sockwatch.client import DaemonClient
from sockwatch.kernel import loader
from sockwatch.monitor import Monitor
from sockwatch.views import fields
from sockwatch.views.filters import Filter

MAX_HELD_EVENTS = 200_000  # events kept between two samples (a flood while nobody samples)


@dataclass
class Sample:
    """What one refresh read: everything cumulative, stamped with when it was read."""

    taken: float  # time.monotonic() of this process
    connections: list[dict[str, Any]]  # fields.connection_dict rows
    events: list[dict[str, Any]]  # fields.event_dict rows since the previous sample
    users: dict[int, str]  # pid -> user name
    loss: dict[str, int]  # monitor.Loss as a dict
    modes: dict[str, str]  # hook -> attach mode
    latency: dict[str, Any] = field(default_factory=dict)  # Monitor.latency() shape
    events_dropped: int = 0  # events that arrived but were not kept (see MAX_HELD_EVENTS)


class Source(Protocol):
    label: str  # for the header: "probes (tp_btf)" or "daemon http://..."

    def sample(self) -> Sample: ...

    def close(self) -> None: ...


def _modes(hooks: list[dict[str, Any]]) -> dict[str, str]:
    return {h["hook"]: h["mode"] for h in hooks}


class LocalSource:
    """Attaches the probes in this process; a thread drains the ring buffer."""

    def __init__(self, cfg: loader.LoaderConfig, flt: Filter):
        self.monitor = Monitor(cfg)
        self._flt = flt
        self._events: list[records.ConnEvent] = []
        self._dropped = 0
        self._held = threading.Lock()
        self._stop = threading.Event()
        self.monitor.start()
        self.label = "probes attached here"
        plan = self.monitor.probes.plan  # type: ignore[union-attr]
        self._modes = {h.hook: h.mode for h in plan.hooks}
        self._thread = threading.Thread(target=self.monitor.run, name="top-events",
                                        args=(self._stop, self._keep), daemon=True)
        self._thread.start()

    def _keep(self, events: list[records.ConnEvent]) -> None:
        flt = self._flt
        kept = [ev for ev in events if flt.matches(ev, ev.tgid, ev.comm)]
        with self._held:
            room = MAX_HELD_EVENTS - len(self._events)
            self._dropped += max(0, len(kept) - room)
            self._events.extend(kept[:max(0, room)])

    def sample(self) -> Sample:
        mon = self.monitor
        mon.flush(self._keep)  # everything the kernel reported up to now
        with self._held:
            events, self._events = self._events, []
            dropped, self._dropped = self._dropped, 0
        mon.reconcile()  # every row's counters as of now: the rates' end point
        now_ns = time.monotonic_ns()
        taken = time.monotonic()
        # a batch of decoded records at a time: at 100k connections all of them at
        # once would be 60 MB more at the peak, only to be made into dicts
        rows = [fields.connection_dict(c, now_ns)
                for batch in mon.connection_batches(refresh=False, where=self._flt.row_matches)
                for c in batch if self._flt.matches(c.ev, c.tgid, c.comm)]
        users = {}
        for pid in {r["pid"] for r in rows if r["pid"]}:
            info = mon.processes.lookup(pid)
            if info:
                users[pid] = info.user
        loss = mon.loss()
        return Sample(taken, rows, fields.event_dicts(events), users,
                      dataclasses.asdict(loss), self._modes,
                      mon.latency(), dropped)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.monitor.close()


class RemoteSource:
    """Reads a running daemon's JSON API (``sockwatch daemon``)."""

    def __init__(self, url: str, flt: Filter, timeout: float = 10.0):
        self.client = DaemonClient(url, timeout=timeout)
        self._flt = flt
        self.label = f"daemon {self.client.base}"
        # the first answer says whether a daemon is there at all (one clear line if not)
        self._modes = _modes(self.client.get("/api/probes")["hooks"])
        self._seq = self.client.get("/api/events", after=1 << 62)["seq"]  # from now on

    def sample(self) -> Sample:
        get = self.client.get
        got = get("/api/events", after=self._seq)
        # a gap in sequence numbers: the daemon's log wrapped between two samples
        dropped = max(0, got["seq"] - self._seq - len(got["events"]))
        self._seq = got["seq"]
        conns = get("/api/connections", refresh=1, comm=self._flt.comm, port=self._flt.port)
        taken = time.monotonic()
        users = {p["pid"]: p.get("user", "?") for p in get("/api/processes")}
        return Sample(taken, [c for c in conns if self._flt.dict_matches(c)],
                      [e for e in got["events"] if self._flt.dict_matches(e)], users,
                      get("/api/loss"), self._modes, get("/api/latency"), dropped)

    def close(self) -> None:
        pass
