"""Build records the way the kernel does: fill a ``struct sw_event`` and hand over its bytes.

Unit tests go through the real byte layout (``records.SwEvent`` -> ``bytes`` ->
``records.decode``) so a table or view test also exercises the decoder the
daemon uses, and nothing here needs a kernel.
"""

from __future__ import annotations

import socket

from sockwatch import records
from sockwatch.records import Attrib, Kind, Result, Role

NETNS = 4026531840  # the usual inode of the initial network namespace


def _packed_addr(family: int, addr: str) -> bytes:
    raw = socket.inet_pton(family, addr)
    return raw.ljust(16, b"\0")


def sw_event(
    *,
    kind: int = Kind.OPEN,
    role: int = Role.CLIENT,
    result: int = Result.OK,
    attrib: int = Attrib.CONNECT,
    family: int = socket.AF_INET,
    saddr: str = "10.0.0.1",
    daddr: str = "10.0.0.2",
    sport: int = 40000,
    dport: int = 443,
    state: int = records.TCP_ESTABLISHED,
    oldstate: int = records.TCP_SYN_SENT,
    ts_ns: int = 2_000_000_000,
    skaddr: int = 0xFFFF888000001000,
    netns: int = NETNS,
    tgid: int = 1234,
    tid: int = 1235,
    comm: bytes = b"curl",
    fd: int = -1,
    ino: int = 55555,
    uid: int = 1000,
    lport: int = 0,
    flags: int = 0,
    state_ns: dict[int, int] | None = None,
    bytes_acked: int = 0,
    bytes_received: int = 0,
    bytes_sent: int = 0,
    bytes_retrans: int = 0,
    segs_out: int = 0,
    segs_in: int = 0,
    total_retrans: int = 0,
    srtt_us: int = 0,
    listen_backlog: int = 0,
    peer_fin: int = 0,
    open_ns: int | None = None,
    accept_wait_ns: int = 0,
    rcvq_wait_p50_ns: int = 0,
    rcvq_wait_max_ns: int = 0,
) -> records.SwEvent:
    """A filled ``struct sw_event``; ``state_ns`` maps TCP state -> first-entry time.

    ``open_ns`` defaults to the earliest state time, as the kernel sets it when it
    starts tracking a socket (0 for a socket that predates sockwatch).
    """
    ev = records.SwEvent()
    s = ev.sock
    s.open_ns = open_ns if open_ns is not None else min(
        (t for t in (state_ns or {}).values() if t), default=0)
    for st, t in (state_ns or {}).items():
        s.state_stamp[st] = records.state_stamp(s.open_ns, t) if t else 0
    s.ino, s.tgid, s.tid, s.fd, s.uid = ino, tgid, tid, fd, uid
    s.lport, s.role, s.attrib, s.flags = lport, int(role), int(attrib), flags
    s.comm = comm
    ev.ts_ns, ev.skaddr = ts_ns, skaddr
    ev.bytes_acked, ev.bytes_received = bytes_acked, bytes_received
    ev.bytes_sent, ev.bytes_retrans = bytes_sent, bytes_retrans
    ev.segs_out, ev.segs_in, ev.total_retrans = segs_out, segs_in, total_retrans
    ev.srtt_us, ev.netns, ev.listen_backlog = srtt_us, netns, listen_backlog
    if family in (socket.AF_INET, socket.AF_INET6):
        ev.saddr[:] = list(_packed_addr(family, saddr))
        ev.daddr[:] = list(_packed_addr(family, daddr))
    ev.family, ev.sport, ev.dport = family, sport, dport
    ev.kind, ev.result, ev.state, ev.oldstate = int(kind), int(result), state, oldstate
    ev.peer_fin = peer_fin
    s.accept_wait_ns = accept_wait_ns
    ev.rcvq_wait_p50_ns, ev.rcvq_wait_max_ns = rcvq_wait_p50_ns, rcvq_wait_max_ns
    return ev


def raw(**kw) -> bytes:
    """The bytes of one record, exactly as the ring buffer would deliver them."""
    return bytes(sw_event(**kw))


def event(**kw) -> records.ConnEvent:
    """A decoded record (through the real decoder)."""
    return records.decode(raw(**kw))


def merge(tbl, *rows: bytes) -> None:
    """Merge walk rows into a table as the monitor does, in one chunk."""
    blob = b"".join(rows)
    tbl.merge_snapshot(blob, range(0, len(blob), records.EVENT_SIZE))
