"""EventLog: the last ``capacity`` records, numbered, for /api/events.

It keeps the event thread's batches as they come and cuts records out only when
asked, so what it answers is checked against the plain rule: every record ever
appended gets the next sequence number, the newest ``capacity`` are kept (of a
burst larger than the log, its end), and ``after(seq)`` returns the kept ones
numbered above ``seq``.
"""

from __future__ import annotations

import dataclasses
import random
import threading
import time

import pytest
from prometheus_client import CollectorRegistry

from fakeprobes import FakeProbes, monitor_over
from recfactory import raw
from sockwatch import records
from sockwatch.exporters import api
from sockwatch.exporters.api import EventLog, build_routes
from sockwatch.exporters.http import Request
from sockwatch.views import fields

HEADER = 8  # the ring buffer's record header: offsets point past it


@pytest.mark.parametrize("seed", range(6))
def test_after_returns_the_newest_records_numbered_in_order(seed):
    rnd = random.Random(seed)
    capacity = rnd.choice((1, 5, 40))
    log, every = EventLog(capacity), []
    for _ in range(12):
        recs = [raw(ts_ns=len(every) + i + 1, skaddr=rnd.randrange(1, 1 << 40))
                for i in range(rnd.choice((0, 1, 3, capacity - 1, capacity, 2 * capacity + 3)))]
        every += recs
        blob = b"".join(b"\0" * HEADER + r for r in recs)
        stride = records.EVENT_SIZE + HEADER
        offsets = range(HEADER, len(blob), stride)
        log.append(blob, offsets if rnd.randrange(2) else list(offsets))
        kept = {seq: r for seq, r in enumerate(every, 1)}
        kept = {seq: r for seq, r in kept.items() if seq > len(every) - capacity}
        for after in {0, len(every) - capacity - 1, len(every) - 2, len(every), len(every) + 1,
                      rnd.randrange(0, len(every) + 2)}:
            last, events = log.after(after, wait=0)
            assert last == len(every)
            assert events == [fields.event_dict(records.decode(r))
                              for seq, r in kept.items() if seq > after]


def test_reading_the_stream_has_the_kernel_send_every_open_for_a_while(monkeypatch):
    """A reader of /api/events (trace --url) wants each OPEN as it happens: the
    route asks the monitor, which tells the kernel at its next drain, and holds
    OPENs back again once no reader has come for EVERY_OPEN_AFTER_READ_S."""
    told: list[bool] = []
    probes = FakeProbes([], {}, {}, enabled=False)
    probes.hold_opens = told.append  # type: ignore[method-assign]
    mon = monitor_over(probes, lambda ns: {})
    mon.cfg = dataclasses.replace(mon.cfg, hold_opens=True)
    mon._holding = True
    routes = build_routes(mon, CollectorRegistry(auto_describe=False), EventLog(),
                          threading.Event())
    mon.poll_raw()
    assert told == []  # holding, as configured
    assert routes["/api/events"](Request("GET", "/api/events", {}, {})).status == 200
    mon.poll_raw()
    mon.poll_raw()
    assert told == [False]
    now = time.monotonic()
    monkeypatch.setattr(time, "monotonic", lambda: now + api.EVERY_OPEN_AFTER_READ_S + 1)
    mon.poll_raw()
    assert told == [False, True]
