"""``sockwatch table``: the live table, like ``ss -tanp`` with owners, bytes and age."""

from __future__ import annotations

import json
import time
from typing import TextIO

from sockwatch.records import Role
from sockwatch.tables import Connection
from sockwatch.views import fields
from sockwatch.views.filters import Filter

COLUMNS = ("PID", "PROCESS", "FD", "ROLE", "STATE", "LOCAL", "REMOTE", "SENT", "RECV", "AGE")


def select(conns: list[Connection], flt: Filter) -> list[Connection]:
    rows = [c for c in conns if flt.matches(c.ev, c.tgid, c.comm)]
    # listeners first, then by owner and local port, as people scan ss output
    rows.sort(key=lambda c: (c.ev.role != Role.LISTENER, c.tgid, c.ev.sport, c.ev.dport))
    return rows


def _row(conn: Connection, now_ns: int) -> tuple[str, ...]:
    d = fields.connection_dict(conn, now_ns)
    state = d.get("result", d["state"]).upper() if conn.closed_ns else d["state"]
    return (
        str(d["pid"] or "-"),
        d["process"] or "-",
        "-" if d["fd"] is None else str(d["fd"]),
        d["role"],
        state,
        fields.local(conn.ev),
        fields.remote(conn.ev),
        fields.human_bytes(d["bytes_sent"]),
        fields.human_bytes(d["bytes_received"]),
        fields.human_seconds(d["age_s"]),
    )


def render(conns: list[Connection], out: TextIO, as_json: bool) -> None:
    now = time.monotonic_ns()
    if as_json:
        json.dump([fields.connection_dict(c, now) for c in conns], out, indent=1)
        out.write("\n")
        return
    rows = [COLUMNS] + [_row(c, now) for c in conns]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    for r in rows:
        out.write("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() + "\n")
