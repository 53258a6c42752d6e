"""``sockwatch trace``: connection events as they happen (tcplife, tcpconnect and
tcpaccept in one stream): open, close with lifetime and bytes, failures."""

from __future__ import annotations

import json
from typing import TextIO

from sockwatch.records import ConnEvent, Kind
from sockwatch.views import fields
from sockwatch.views.filters import Filter

HEADER = f"{'TIME(s)':<10} {'PID':>7} {'COMM':<16} {'EVENT':<8} {'LOCAL':<24} {'REMOTE':<24} DETAIL"


def _detail(ev: ConnEvent) -> str:
    if ev.kind != Kind.CLOSE:
        return ""
    name = fields.event_name(ev)
    if name == "fail":
        return ev.result.name.lower()
    life = fields.human_seconds(fields.lifetime_ns(ev) / 1e9)
    detail = f"tx {ev.payload_sent} rx {ev.payload_received} life {life}"
    return detail if name != "close" or not ev.result else f"{detail} {ev.result.name.lower()}"


class TracePrinter:
    """Prints events matching ``flt``; counts them so --count can stop the stream."""

    def __init__(self, out: TextIO, flt: Filter, as_json: bool, start_ns: int):
        self.out, self.flt, self.as_json, self.start_ns = out, flt, as_json, start_ns
        self.printed = 0

    def header(self) -> None:
        if not self.as_json:
            self.out.write(HEADER + "\n")
            self.out.flush()

    def __call__(self, events: list[ConnEvent], limit: int | None = None) -> None:
        for ev in events:
            if limit is not None and self.printed >= limit:
                break
            if ev.kind == Kind.SNAPSHOT or not self.flt.matches(ev, ev.tgid, ev.comm):
                continue
            if self.as_json:
                self.out.write(json.dumps(fields.event_dict(ev)) + "\n")
            else:
                t = (ev.ts_ns - self.start_ns) / 1e9
                self.out.write(
                    f"{t:<10.3f} {ev.tgid or '-':>7} {ev.comm or '-':<16} "
                    f"{fields.event_name(ev):<8} {fields.local(ev):<24} "
                    f"{fields.remote(ev):<24} {_detail(ev)}".rstrip()
                    + "\n"
                )
            self.printed += 1
        self.out.flush()
