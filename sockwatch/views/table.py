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
# --latency: the kernel's per-socket summaries (receive-queue wait p50/max, accept-queue
# wait) and the handshake time from the state timestamps.
LATENCY_COLUMNS = ("RCVQ-P50", "RCVQ-MAX", "ACCEPT-WAIT", "HANDSHAKE")
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


def _latency_cells(row: Row) -> tuple[str, ...]:
    def us(key: str) -> str:
        value = row.get(key)  # absent in rows from an older daemon
        return fields.human_duration(None if value is None else value / 1e6)

    return (us("rcvq_wait_p50_us"), us("rcvq_wait_max_us"), us("accept_wait_us"),
            fields.human_duration(fields.handshake_s(row)))


def render(rows: list[Row], out: TextIO, as_json: bool, latency: bool = False) -> None:
    """``latency`` adds the LATENCY_COLUMNS to the text table (JSON rows always have them)."""
    rows = ordered(rows)
    if as_json:
        json.dump(rows, out, indent=1)
        out.write("\n")
        return
    header = COLUMNS + LATENCY_COLUMNS if latency else COLUMNS
    cells = [header] + [_cells(r) + (_latency_cells(r) if latency else ()) for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for r in cells:
        out.write("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() + "\n")
