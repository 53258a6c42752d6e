"""``sockwatch table``: the live table, like ``ss -tanp`` with owners, bytes and age.

Renders row dicts (``fields.connection_dict``), so a table drawn from this
process's own probes and one fetched from a daemon's API look the same.
"""

from __future__ import annotations

import json
import time
from typing import Any, TextIO

from sockwatch.tables import Connection
from sockwatch.views import fields
from sockwatch.views.filters import Filter

COLUMNS = ("PID", "PROCESS", "FD", "ROLE", "STATE", "LOCAL", "REMOTE", "SENT", "RECV", "AGE")
Row = dict[str, Any]


def rows_of(conns: list[Connection], flt: Filter) -> list[Row]:
    """The matching connections as row dicts."""
    now = time.monotonic_ns()
    return [fields.connection_dict(c, now) for c in conns if flt.matches(c.ev, c.tgid, c.comm)]


def ordered(rows: list[Row]) -> list[Row]:
    """Listeners first, then by owner and local port, as people scan ss output."""
    return sorted(rows, key=lambda r: (r["role"] != "listener", r["pid"] or 0,
                                       r["local_port"], r["remote_port"]))


def _endpoint(row: Row, side: str) -> str:
    addr, port = row[f"{side}_addr"], row[f"{side}_port"]
    return f"[{addr}]:{port}" if row["family"] == "ipv6" else f"{addr}:{port}"


def _cells(row: Row) -> tuple[str, ...]:
    state = row["result"].upper() if "result" in row else row["state"]
    return (
        str(row["pid"] or "-"),
        row["process"] or "-",
        "-" if row["fd"] is None else str(row["fd"]),
        row["role"],
        state,
        _endpoint(row, "local"),
        _endpoint(row, "remote"),
        fields.human_bytes(row["bytes_sent"]),
        fields.human_bytes(row["bytes_received"]),
        fields.human_seconds(row["age_s"]),
    )


def render(rows: list[Row], out: TextIO, as_json: bool) -> None:
    rows = ordered(rows)
    if as_json:
        json.dump(rows, out, indent=1)
        out.write("\n")
        return
    cells = [COLUMNS] + [_cells(r) for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(COLUMNS))]
    for r in cells:
        out.write("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() + "\n")
