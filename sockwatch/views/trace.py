"""``sockwatch trace``: connection events as they happen (tcplife, tcpconnect and
tcpaccept in one stream): open, close with lifetime and bytes, failures.

Prints event dicts (``fields.event_dict``), whether they come from this
process's probes or from a daemon's /api/events.
"""

from __future__ import annotations

import json
from typing import Any, TextIO

from sockwatch.records import ConnEvent, Kind
from sockwatch.views import fields
from sockwatch.views.filters import Filter

HEADER = f"{'TIME(s)':<10} {'PID':>7} {'COMM':<16} {'EVENT':<8} {'LOCAL':<24} {'REMOTE':<24} DETAIL"
Event = dict[str, Any]


def dicts_of(events: list[ConnEvent], flt: Filter) -> list[Event]:
    return fields.event_dicts(ev for ev in events
                              if ev.kind != Kind.SNAPSHOT and flt.matches(ev, ev.tgid, ev.comm))


def _endpoint(e: Event, side: str) -> str:
    addr, port = e[f"{side}_addr"], e[f"{side}_port"]
    return f"[{addr}]:{port}" if e["family"] == "ipv6" else f"{addr}:{port}"


def _detail(e: Event) -> str:
    name = e["event"]
    if name == "fail":
        return e["result"]
    if name not in ("close", "unlisten"):
        return ""
    life = fields.human_seconds(e["lifetime_s"])
    detail = f"tx {e['bytes_sent']} rx {e['bytes_received']} life {life}"
    return detail if e["result"] == "ok" else f"{detail} {e['result']}"


class TracePrinter:
    """Prints events; counts them so --count can stop the stream."""

    def __init__(self, out: TextIO, as_json: bool, start_ns: int | None):
        """``start_ns`` None: times count from the first event (a remote daemon's clock)."""
        self.out, self.as_json, self.start_ns = out, as_json, start_ns
        self.printed = 0

    def header(self) -> None:
        if not self.as_json:
            self.out.write(HEADER + "\n")
            self.out.flush()

    def __call__(self, events: list[Event], limit: int | None = None) -> None:
        for e in events:
            if limit is not None and self.printed >= limit:
                break
            if self.as_json:
                self.out.write(json.dumps(e) + "\n")
            else:
                if self.start_ns is None:
                    self.start_ns = e["ts_ns"]
                t = (e["ts_ns"] - self.start_ns) / 1e9
                self.out.write(
                    f"{t:<10.3f} {e['pid'] or '-':>7} {e['process'] or '-':<16} "
                    f"{e['event']:<8} {_endpoint(e, 'local'):<24} "
                    f"{_endpoint(e, 'remote'):<24} {_detail(e)}".rstrip() + "\n"
                )
            self.printed += 1
        self.out.flush()
