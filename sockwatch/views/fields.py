"""How connections and events look to people and scripts: one place for both.

Byte counts are application payload (see ``ConnEvent.payload_sent``); the
kernel's raw tcp_info counters are also given under ``tcpi_*`` so they can be
compared with ``ss -i`` field for field.
"""

from __future__ import annotations

import dataclasses
import socket
from typing import Any, Iterable

from sockwatch.records import (
    TCP_CLOSE,
    TCP_ESTABLISHED,
    TCP_STATE_NAMES,
    TCP_SYN_SENT,
    Attrib,
    ConnEvent,
    Kind,
    Result,
    Role,
    format_endpoint,
    state_name,
)
from sockwatch.tables import Connection

FAMILY_NAMES = {socket.AF_INET: "ipv4", socket.AF_INET6: "ipv6"}
# Looked up, not computed per row: a view of 200k connections makes a dict each.
_ROLE_NAMES = {r: r.name.lower() for r in Role}
_ATTRIB_NAMES = {a: a.name.lower() for a in Attrib}

# ss's state names, accepted by --state in either spelling.
STATE_ALIASES = {
    "established": "ESTAB",
    "syn-sent": "SYN-SENT",
    "syn-recv": "SYN-RECV",
    "fin-wait-1": "FIN-WAIT-1",
    "fin-wait-2": "FIN-WAIT-2",
    "time-wait": "TIME-WAIT",
    "closed": "UNCONN",
    "close-wait": "CLOSE-WAIT",
    "last-ack": "LAST-ACK",
    "listen": "LISTEN",
    "listening": "LISTEN",
    "closing": "CLOSING",
}


def normalize_state(name: str) -> str | None:
    """ss spelling of a state name given either way, or None if unknown."""
    key = name.strip().lower()
    if key in STATE_ALIASES:
        return STATE_ALIASES[key]
    upper = key.upper()
    return upper if upper in STATE_ALIASES.values() or upper == "ESTAB" else None


def event_name(ev: ConnEvent) -> str:
    """connect / accept / listen / fail / close / unlisten, as trace prints them."""
    if ev.kind == Kind.OPEN:
        return {Role.CLIENT: "connect", Role.SERVER: "accept", Role.LISTENER: "listen"}.get(
            ev.role, "open"
        )
    if ev.role == Role.LISTENER:
        return "unlisten"
    if ev.oldstate == TCP_SYN_SENT and ev.result != Result.OK:
        return "fail"
    return "close"


def local(ev: ConnEvent) -> str:
    return format_endpoint(ev.family, ev.saddr, ev.sport)


def remote(ev: ConnEvent) -> str:
    return format_endpoint(ev.family, ev.daddr, ev.dport)


def lifetime_ns(ev: ConnEvent) -> int:
    opened = ev.open_ns
    return ev.ts_ns - opened if opened and ev.ts_ns >= opened else 0


def _common(ev: ConnEvent) -> dict[str, Any]:
    opened = ev.open_ns
    return {
        "netns": ev.netns,
        "family": FAMILY_NAMES.get(ev.family, str(ev.family)),
        "local_addr": ev.saddr,
        "local_port": ev.sport,
        "remote_addr": ev.daddr,
        "remote_port": ev.dport,
        "role": _ROLE_NAMES[ev.role],
        "attribution": _ATTRIB_NAMES[ev.attrib],
        "ino": ev.ino,
        "uid": ev.uid,
        "bytes_sent": ev.payload_sent,
        "bytes_received": ev.payload_received,
        "segs_out": ev.segs_out,
        "segs_in": ev.segs_in,
        "retransmits": ev.total_retrans,
        "rtt_us": ev.srtt_us,
        "tcpi_bytes_acked": ev.bytes_acked,
        "tcpi_bytes_received": ev.bytes_received,
        "tcpi_bytes_sent": ev.bytes_sent,
        "tcpi_bytes_retrans": ev.bytes_retrans,
        # seconds after the first state we saw, for each state it went through
        "state_times": {
            TCP_STATE_NAMES[i]: round((t - opened) / 1e9, 6)
            for i, t in enumerate(ev.state_ns)
            if t
        },
        # the kernel's per-socket latency summaries (stack probes); 0 there means not
        # measured. In events too: top takes the accept wait of short connections from them.
        "rcvq_wait_p50_us": _us(ev.rcvq_wait_p50_ns),
        "rcvq_wait_max_us": _us(ev.rcvq_wait_max_ns),
        "accept_wait_us": _us(ev.accept_wait_ns),
    }


def connection_dict(conn: Connection, now_ns: int) -> dict[str, Any]:
    """A table row for --json and the API."""
    ev = conn.ev
    d: dict[str, Any] = {"pid": conn.tgid or None, "process": conn.comm or None}
    d["fd"] = conn.fd if conn.fd >= 0 else None
    d["state"] = state_name(ev.state)
    d.update(_common(ev))
    opened = ev.open_ns
    end = conn.closed_ns or now_ns
    d["age_s"] = round((end - opened) / 1e9, 6) if opened else None
    d["seen_by"] = conn.seen_by
    if conn.closed_ns:
        d["result"] = "reconciled" if conn.reconciled else ev.result.name.lower()
        d["last_state"] = state_name(ev.oldstate)
    if ev.role == Role.LISTENER:
        d["backlog"] = ev.listen_backlog
    return d


def _us(ns: int) -> float | None:
    return round(ns / 1000, 3) if ns else None


def handshake_s(row: dict[str, Any]) -> float | None:
    """SYN_SENT (client) or SYN_RECV (server) -> ESTABLISHED, from a row's state_times."""
    times = row["state_times"]
    start = times.get("SYN-SENT", times.get("SYN-RECV"))
    if start is None or "ESTAB" not in times:
        return None
    return round(times["ESTAB"] - start, 6)


def event_dicts(events: Iterable[ConnEvent]) -> list[dict[str, Any]]:
    """The trace lines of ``events``. A CLOSE whose OPEN the kernel held back (the
    connection closed before the next drain) gives the connect or accept line it
    stands for first, stamped when the connection was established, with the
    counters an OPEN has (none yet)."""
    out = []
    for ev in events:
        if ev.open_held:
            established = ev.state_ns[TCP_ESTABLISHED]
            out.append(event_dict(dataclasses.replace(
                ev, kind=Kind.OPEN, ts_ns=established or ev.open_ns, state=TCP_ESTABLISHED,
                oldstate=TCP_ESTABLISHED, result=Result.OK, open_held=False, bytes_acked=0,
                bytes_received=0, bytes_sent=0, bytes_retrans=0, peer_fin=False, segs_out=0,
                segs_in=0, total_retrans=0, srtt_us=0)))
        out.append(event_dict(ev))
    return out


def event_dict(ev: ConnEvent) -> dict[str, Any]:
    """One trace line for --json."""
    d: dict[str, Any] = {
        "ts_ns": ev.ts_ns,
        "event": event_name(ev),
        "pid": ev.tgid or None,
        "tid": ev.tid or None,
        "process": ev.comm or None,
        "fd": ev.fd if ev.fd >= 0 else None,
    }
    d.update(_common(ev))
    if ev.kind == Kind.CLOSE:
        d["result"] = ev.result.name.lower()
        d["last_state"] = state_name(ev.oldstate)
        d["lifetime_s"] = round(lifetime_ns(ev) / 1e9, 6)
    else:
        d["state"] = state_name(ev.state if ev.state != TCP_CLOSE else ev.oldstate)
    return d


def human_bytes(n: int) -> str:
    for unit in ("B", "K", "M", "G", "T"):
        if n < 1024 or unit == "T":
            return f"{n}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def human_duration(s: float | None) -> str:
    """Like human_seconds, with microseconds for the short waits of the latency views."""
    if s is not None and s < 1e-3:
        return f"{s * 1e6:.0f}us"
    return human_seconds(s)


def human_seconds(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 1:
        return f"{s * 1000:.1f}ms"
    if s < 120:
        return f"{s:.1f}s"
    if s < 7200:
        return f"{s / 60:.0f}m"
    return f"{s / 3600:.0f}h"
