"""Python mirror of bpf/sockwatch.h and the typed records decoded from it.

The ctypes structures below follow the C structs field for field; the loader
compares them with the BTF of the object it loads (``check_layout``), so a
stale object or an edited header fails loudly instead of decoding garbage.
Decoding uses one precompiled ``struct.Struct`` matching that layout: about
a microsecond a record. On bad input ``decode`` raises DecodeError and only
that; ``decode_many`` never raises and counts the malformed records.
"""

from __future__ import annotations

import ctypes
import enum
import socket
import struct
from dataclasses import dataclass
from typing import Iterable, Sequence

COMM_LEN = 16
TCP_STATES = 14


class Kind(enum.IntEnum):
    OPEN = 1
    CLOSE = 2
    SNAPSHOT = 3


class Role(enum.IntEnum):
    UNKNOWN = 0
    CLIENT = 1
    SERVER = 2
    LISTENER = 3


class Result(enum.IntEnum):
    OK = 0
    REFUSED = 1
    TIMEOUT = 2
    RESET = 3
    ABORTED = 4
    UNREACHABLE = 5
    ERROR = 6


class Attrib(enum.IntEnum):
    NONE = 0
    CONNECT = 1
    LISTEN = 2
    ACCEPT = 3
    FIRST_IO = 4
    CLOSE = 5
    LISTENER = 6
    FD_TABLE = 7


class Stat(enum.IntEnum):
    RINGBUF_FULL = 0
    SOCKS_FULL = 1
    UNTRACKED_CLOSE = 2
    SUPPRESSED_CLOSE = 3
    TOTALS_FULL = 4
    LATE_CLOSE = 5
    STACK_HISTS_FULL = 6  # a stack latency not counted: stack_hists map full
    IFACES_FULL = 7  # a packet not counted in its interface's totals: ifaces map full
    RESCUED = 8  # saved by the rescue ring: not a loss
    NESTED_RUNS = 9  # set_state events the kernel skipped for nesting, caught by the twin
    SOCKS_ADDED = 10  # entries put in the socks map (see Probes.socks_fill)
    SOCKS_REMOVED = 11  # entries taken out of it by us (not evicted)


class Total(enum.IntEnum):
    """enum sw_total: what a kernel running total counts."""

    CONNECT = 1
    ACCEPT = 2
    SENT_BYTES = 3
    RECEIVED_BYTES = 4
    RETRANSMITS = 5


class Hist(enum.IntEnum):
    """enum sw_hist: the kernel's log2 histograms."""

    HANDSHAKE_CLIENT = 0
    HANDSHAKE_SERVER = 1
    LIFETIME_CLIENT = 2
    LIFETIME_SERVER = 3
    ACCEPT_QUEUE = 4  # ESTABLISHED -> returned by accept(); connection-level


# Stack latency (bpf/stack.bpf.c): enum sw_dir and enum sw_layer, by contract name.
DIRECTIONS = {0: "tx", 1: "rx"}
LAYERS = {0: "tcp", 1: "qdisc", 2: "driver", 3: "socket"}
HIST_KEY = struct.Struct("<IIBB2x")  # struct sw_hist_key: netns, ifindex, dir, layer
IFACE_KEY = struct.Struct("<II")  # struct sw_iface_key: netns, ifindex
IFACE = struct.Struct("<5Q")  # struct sw_iface: rx pkts, rx bytes, tx pkts, tx bytes, errors


HIST_COUNT = len(Hist)
HIST_SLOTS = 29  # slot k: <= 2**k microseconds for k < 28; slot 28: larger
HIST_STRIDE = 32  # slots per histogram in the map; the sum (ns) is in the last
TOTAL_KEY = struct.Struct("<16sHBB4x")  # struct sw_total_key
LOST_KEY = struct.Struct("<IBB2x")  # struct sw_lost_key: netns, kind, role
OWNER = struct.Struct("<QQIi16s")  # struct sw_owner: skaddr, ino, tgid, fd, comm


@dataclass(frozen=True)
class TotalKey:
    comm: str
    what: Total
    result: int
    port: int


def decode_total_key(raw: bytes) -> TotalKey:
    comm, port, what, result = TOTAL_KEY.unpack(raw)
    return TotalKey(decode_comm(comm), Total(what), result, port)


STAT_COUNT = len(Stat)
FLAG_OPEN_SENT = 1
# In a CLOSE: the socket's OPEN was held back and never sent; the CLOSE stands for both.
FLAG_OPEN_HELD = 2

# Names as ss prints them, indexed by the kernel's TCP state number.
TCP_STATE_NAMES = (
    "UNKNOWN", "ESTAB", "SYN-SENT", "SYN-RECV", "FIN-WAIT-1", "FIN-WAIT-2",
    "TIME-WAIT", "UNCONN", "CLOSE-WAIT", "LAST-ACK", "LISTEN", "CLOSING",
    "NEW-SYN-RECV", "BOUND-INACTIVE",
)  # fmt: skip
TCP_ESTABLISHED = 1
TCP_SYN_SENT = 2
TCP_CLOSE = 7
TCP_LISTEN = 10


class SwSock(ctypes.Structure):
    """struct sw_sock"""

    _fields_ = [
        ("open_ns", ctypes.c_uint64),
        ("tgid", ctypes.c_uint32),
        ("fd", ctypes.c_int32),
        ("role", ctypes.c_uint8),
        ("attrib", ctypes.c_uint8),
        ("flags", ctypes.c_uint8),
        ("__pad", ctypes.c_uint8),
        ("lport", ctypes.c_uint16),
        ("__pad2", ctypes.c_uint16),
        ("ino", ctypes.c_uint64),
        ("tid", ctypes.c_uint32),
        ("uid", ctypes.c_uint32),
        ("state_stamp", ctypes.c_uint32 * TCP_STATES),
        ("comm", ctypes.c_char * COMM_LEN),
        ("accept_wait_ns", ctypes.c_uint64),
    ]


class SwEvent(ctypes.Structure):
    """struct sw_event"""

    _fields_ = [
        ("ts_ns", ctypes.c_uint64),
        ("skaddr", ctypes.c_uint64),
        ("kind", ctypes.c_uint8),
        ("result", ctypes.c_uint8),
        ("state", ctypes.c_uint8),
        ("oldstate", ctypes.c_uint8),
        ("netns", ctypes.c_uint32),
        ("sock", SwSock),
        ("bytes_acked", ctypes.c_uint64),
        ("bytes_received", ctypes.c_uint64),
        ("bytes_sent", ctypes.c_uint64),
        ("bytes_retrans", ctypes.c_uint64),
        ("segs_out", ctypes.c_uint32),
        ("segs_in", ctypes.c_uint32),
        ("total_retrans", ctypes.c_uint32),
        ("srtt_us", ctypes.c_uint32),
        ("listen_backlog", ctypes.c_uint32),
        ("family", ctypes.c_uint16),
        ("sport", ctypes.c_uint16),
        ("dport", ctypes.c_uint16),
        ("peer_fin", ctypes.c_uint8),
        ("__pad", ctypes.c_uint8 * 5),
        ("saddr", ctypes.c_uint8 * 16),
        ("daddr", ctypes.c_uint8 * 16),
        ("rcvq_wait_p50_ns", ctypes.c_uint64),
        ("rcvq_wait_max_ns", ctypes.c_uint64),
    ]


EVENT_SIZE = ctypes.sizeof(SwEvent)
COMM_OFFSET = SwEvent.sock.offset + SwSock.comm.offset
_SPORT = struct.Struct("<H")
_SPORT_OFFSET = SwEvent.sport.offset
_INO = struct.Struct("<Q")
_INO_OFFSET = SwEvent.sock.offset + SwSock.ino.offset


def layout(struct_type: type[ctypes.Structure]) -> list[tuple[str, int, int]]:
    """(name, offset, size) of each member, as the C compiler lays it out."""
    return [
        (name, getattr(struct_type, name).offset, getattr(struct_type, name).size)
        for name, _ in struct_type._fields_
    ]


def layout_mismatches(
    expected: list[tuple[str, int, int]], actual: list[tuple[str, int, int]]
) -> list[str]:
    """Human-readable differences between two struct layouts; empty when equal."""
    out = []
    exp, act = {n: (o, s) for n, o, s in expected}, {n: (o, s) for n, o, s in actual}
    for name in sorted(set(exp) | set(act)):
        if exp.get(name) != act.get(name):
            out.append(f"{name}: python {exp.get(name)} vs object {act.get(name)}")
    return out


# One flat format for the whole event, in member order (all naturally aligned).
_EVENT_STRUCT = struct.Struct(
    "<QQBBBBI"  # ts_ns, skaddr, kind, result, state, oldstate, netns
    "QIiBBBxHxxQII" f"{TCP_STATES}I" "16s" "Q"  # sw_sock
    "QQQQ" "IIIII" "HHH" "B5x" "16s16s" "QQ"
)  # fmt: skip
assert _EVENT_STRUCT.size == EVENT_SIZE, (_EVENT_STRUCT.size, EVENT_SIZE)

_FORMATS = {ctypes.c_uint64: "Q", ctypes.c_uint32: "I", ctypes.c_int32: "i",
            ctypes.c_uint16: "H", ctypes.c_uint8: "B"}


STAMP_SHIFT = 30  # SW_STAMP_SHIFT
_STAMP_SPAN = 1 << STAMP_SHIFT
_STAMP_UNITS = (1, 1000, 1000_000, 1000_000_000)  # ns per step, by the stamp's top two bits


def state_stamp(open_ns: int, at_ns: int) -> int:
    """``at_ns`` as the state stamp of a socket opened at ``open_ns``, as the kernel
    side makes it (stamp_of in lifecycle.bpf.c; see SW_STAMP_SHIFT in sockwatch.h)."""
    d = max(0, at_ns - open_ns)
    if d < _STAMP_SPAN - 1:
        return d + 1
    for scale in (1, 2, 3):
        d //= 1000
        if d < _STAMP_SPAN:
            return scale << STAMP_SHIFT | d
    return 3 << STAMP_SHIFT | (_STAMP_SPAN - 1)


def state_time(open_ns: int, stamp: int) -> int:
    """The CLOCK_MONOTONIC time a state stamp stands for; 0 for a state never entered."""
    scale, value = stamp >> STAMP_SHIFT, stamp & (_STAMP_SPAN - 1)
    if not scale:
        return open_ns + value - 1 if stamp else 0
    return open_ns + value * _STAMP_UNITS[scale]


def field_reader(*names: str) -> struct.Struct:
    """A Struct that unpacks just these scalar fields (``sock.x`` for nested ones)
    from a record, at the offsets ctypes computes for the C layout."""
    parts, pos = ["<"], 0
    for name in names:
        outer, _, inner = name.rpartition(".")
        base = getattr(SwEvent, outer).offset if outer else 0
        struct_type = SwSock if outer else SwEvent
        desc = getattr(struct_type, inner)
        ctype = dict(struct_type._fields_)[inner]
        offset = base + desc.offset
        if offset < pos:
            raise ValueError(f"{name} must come after the previous field")
        parts.append(f"{offset - pos}x" if offset > pos else "")
        parts.append(_FORMATS[ctype])
        pos = offset + desc.size
    return struct.Struct("".join(parts))


# The hot fields: what the table needs to apply a record without decoding it.
HOT = field_reader("ts_ns", "skaddr", "kind", "result", "state", "oldstate", "netns",
                   "sock.open_ns", "sock.tgid", "sock.fd", "sock.role", "sock.attrib")
# What a scrape needs of each live row.
LIVE = field_reader("state", "sock.role", "bytes_received", "bytes_sent", "bytes_retrans",
                    "total_retrans", "sport", "peer_fin")


def _addr(family: int, raw: bytes) -> str:
    if family == socket.AF_INET:
        return socket.inet_ntop(socket.AF_INET, raw[:4])
    if family == socket.AF_INET6:
        return socket.inet_ntop(socket.AF_INET6, raw)
    return ""


@dataclass(frozen=True, slots=True)
class ConnEvent:
    """One decoded record: what the kernel knew about one socket at ``ts_ns``."""

    kind: Kind
    ts_ns: int
    skaddr: int
    netns: int
    family: int
    saddr: str
    sport: int
    daddr: str
    dport: int
    state: int
    oldstate: int
    role: Role
    result: Result
    attrib: Attrib
    tgid: int
    tid: int
    comm: str
    fd: int
    ino: int
    uid: int
    state_ns: tuple[int, ...]
    bytes_acked: int
    bytes_received: int
    bytes_sent: int
    bytes_retrans: int
    peer_fin: bool
    segs_out: int
    segs_in: int
    total_retrans: int
    srtt_us: int
    listen_backlog: int
    open_ns: int  # first state we saw (0: the socket predates sockwatch)
    # Latency summaries; 0 = unknown. accept_wait_ns is exact with precise accept,
    # else an upper bound (measured at the owner's first use of the socket).
    accept_wait_ns: int = 0
    rcvq_wait_p50_ns: int = 0
    rcvq_wait_max_ns: int = 0
    open_held: bool = False  # a CLOSE whose OPEN was never sent: it stands for both

    @property
    def state_name(self) -> str:
        return state_name(self.state)

    @property
    def payload_sent(self) -> int:
        """Application bytes transmitted once (retransmissions not counted twice)."""
        return self.bytes_sent - self.bytes_retrans

    @property
    def payload_received(self) -> int:
        """Application bytes received: tcpi_bytes_received counts the peer's FIN too."""
        return max(0, self.bytes_received - self.peer_fin)


def state_name(state: int) -> str:
    return TCP_STATE_NAMES[state] if 0 <= state < len(TCP_STATE_NAMES) else str(state)


class DecodeError(ValueError):
    """A record that cannot be a struct sw_event."""


# Enum members by value: a dict lookup costs a tenth of calling the enum, and a
# view of 200k connections decodes four per row.
_MEMBERS = tuple({m.value: m for m in enum_type} for enum_type in (Kind, Role, Result, Attrib))


def _state_times(open_ns: int, stamps: Sequence[int]) -> tuple[int, ...]:
    """``state_time`` of each stamp, called only for the states entered (two or
    three of the fourteen, typically)."""
    return tuple([state_time(open_ns, stamp) if stamp else 0 for stamp in stamps])


def decode(raw: bytes | memoryview) -> ConnEvent:
    """Decode one record; raises DecodeError (and only that) on malformed input."""
    if len(raw) != EVENT_SIZE:
        raise DecodeError(f"record is {len(raw)} bytes, expected {EVENT_SIZE}")
    (ts, skaddr, kind, result, state, oldstate, netns,
     open_ns, tgid, fd, role, attrib, flags, _lport, ino, tid, uid, *rest) = _EVENT_STRUCT.unpack(raw)
    (comm, accept_wait, acked, received, sent, retrans_bytes, segs_out, segs_in, retrans, srtt,
     backlog, family, sport, dport, peer_fin, saddr, daddr, rcvq_p50, rcvq_max) = rest[TCP_STATES:]
    kinds, roles, results, attribs = _MEMBERS
    try:
        kind_, role_, result_, attrib_ = kinds[kind], roles[role], results[result], attribs[attrib]
    except KeyError as exc:
        raise DecodeError(f"enum value {exc.args[0]} out of range (kind {kind}, role {role}, "
                          f"result {result}, attrib {attrib})") from None
    # positional, in field order: a view of 200k connections builds 200k of these
    return ConnEvent(
        kind_, ts, skaddr, netns, family, _addr(family, saddr), sport, _addr(family, daddr),
        dport, state, oldstate, role_, result_, attrib_, tgid, tid, decode_comm(comm), fd, ino,
        uid, _state_times(open_ns, rest[:TCP_STATES]), acked, received, sent,
        retrans_bytes, bool(peer_fin), segs_out, segs_in, retrans, srtt, backlog, open_ns,
        accept_wait, rcvq_p50, rcvq_max, kind == Kind.CLOSE and bool(flags & FLAG_OPEN_HELD))


def decode_comm(raw: bytes) -> str:
    """A task name as the kernel stores it: NUL-padded, not always UTF-8."""
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")


def needs_tuple_from(raw: bytes) -> bool:
    """The record lacks the local port or inode (a close the kernel did not track)."""
    return not (_SPORT.unpack_from(raw, _SPORT_OFFSET)[0] and _INO.unpack_from(raw, _INO_OFFSET)[0])


def with_tuple_of(raw: bytes, earlier: bytes) -> bytes:
    """``raw`` with its missing local port and inode taken from an earlier record."""
    out = bytearray(raw)
    for fmt, off in ((_SPORT, _SPORT_OFFSET), (_INO, _INO_OFFSET)):
        if not fmt.unpack_from(out, off)[0]:
            fmt.pack_into(out, off, fmt.unpack_from(earlier, off)[0])
    return bytes(out)


def decode_many(raws: Iterable[bytes | memoryview]) -> tuple[list[ConnEvent], int]:
    """Decode a batch; returns the records and how many were malformed."""
    out, bad = [], 0
    for raw in raws:
        try:
            out.append(decode(raw))
        except DecodeError:
            bad += 1
    return out, bad


def format_endpoint(family: int, addr: str, port: int) -> str:
    """``addr:port`` as ss prints it, with IPv6 in brackets."""
    if family == socket.AF_INET6:
        return f"[{addr}]:{port}"
    return f"{addr}:{port}"
