"""Decoding of raw ring-buffer / iterator records (sockwatch.records).

Every record the daemon sees goes through ``decode``: a field read at the
wrong offset silently reports garbage, and an exception other than
DecodeError would kill the reader thread instead of being counted.
"""

from __future__ import annotations

import ctypes
import socket

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from recfactory import event, raw, sw_event
from sockwatch import records
from sockwatch.records import Attrib, DecodeError, Kind, Result, Role

FUZZ = settings(max_examples=400, database=None, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])


def test_event_size_matches_ctypes_struct():
    """The decoder's struct format and the ctypes mirror must agree on the record size."""
    assert records.EVENT_SIZE == ctypes.sizeof(records.SwEvent) == 256
    assert len(raw()) == records.EVENT_SIZE


def test_every_field_round_trips_ipv4():
    """Distinct values in every member: a field read at another member's offset shows up."""
    state_ns = {records.TCP_SYN_SENT: 1_000_000_001, records.TCP_ESTABLISHED: 1_000_500_002}
    ev = event(
        kind=Kind.CLOSE, role=Role.CLIENT, result=Result.RESET, attrib=Attrib.FIRST_IO,
        family=socket.AF_INET, saddr="192.168.7.9", daddr="203.0.113.250",
        sport=51234, dport=8443, state=records.TCP_CLOSE, oldstate=records.TCP_ESTABLISHED,
        ts_ns=9_876_543_210, skaddr=0xFFFF8880DEADBEEF, netns=4026532001,
        tgid=4242, tid=4243, comm=b"python3", fd=17, ino=987654, uid=1001, lport=51234,
        flags=records.FLAG_OPEN_SENT, state_ns=state_ns,
        bytes_acked=1_000_001, bytes_received=2_000_002, bytes_sent=3_000_003,
        bytes_retrans=4_004, segs_out=11, segs_in=12, total_retrans=13, srtt_us=1414,
        listen_backlog=15, peer_fin=1,
        accept_wait_ns=16_000_016, rcvq_wait_p50_ns=17_000_017, rcvq_wait_max_ns=18_000_018,
    )
    assert ev.kind is Kind.CLOSE and ev.role is Role.CLIENT
    assert ev.result is Result.RESET and ev.attrib is Attrib.FIRST_IO
    assert (ev.family, ev.saddr, ev.sport) == (socket.AF_INET, "192.168.7.9", 51234)
    assert (ev.daddr, ev.dport) == ("203.0.113.250", 8443)
    assert (ev.state, ev.oldstate) == (records.TCP_CLOSE, records.TCP_ESTABLISHED)
    assert ev.state_name == "UNCONN"
    assert (ev.ts_ns, ev.skaddr, ev.netns) == (9_876_543_210, 0xFFFF8880DEADBEEF, 4026532001)
    assert (ev.tgid, ev.tid, ev.comm, ev.fd, ev.ino, ev.uid) == (
        4242, 4243, "python3", 17, 987654, 1001)
    assert len(ev.state_ns) == records.TCP_STATES
    assert ev.state_ns[records.TCP_SYN_SENT] == 1_000_000_001
    assert ev.state_ns[records.TCP_ESTABLISHED] == 1_000_500_002
    assert sum(1 for t in ev.state_ns if t) == 2
    assert ev.open_ns == 1_000_000_001
    assert (ev.bytes_acked, ev.bytes_received, ev.bytes_sent, ev.bytes_retrans) == (
        1_000_001, 2_000_002, 3_000_003, 4_004)
    assert (ev.segs_out, ev.segs_in, ev.total_retrans, ev.srtt_us, ev.listen_backlog) == (
        11, 12, 13, 1414, 15)
    assert ev.peer_fin is True
    assert (ev.accept_wait_ns, ev.rcvq_wait_p50_ns, ev.rcvq_wait_max_ns) == (
        16_000_016, 17_000_017, 18_000_018)


@pytest.mark.parametrize(
    "saddr, daddr",
    [
        ("2001:db8::1", "2001:db8:ffff::abcd"),
        ("::1", "::1"),
        ("::ffff:10.1.2.3", "fe80::1234:56ff:fe78:9abc"),
    ],
)
def test_ipv6_addresses_round_trip(saddr, daddr):
    """IPv6 uses all 16 address bytes; the text form must be what inet_ntop gives."""
    ev = event(family=socket.AF_INET6, saddr=saddr, daddr=daddr, sport=1, dport=65535)
    norm = lambda a: socket.inet_ntop(socket.AF_INET6, socket.inet_pton(socket.AF_INET6, a))  # noqa: E731
    assert (ev.saddr, ev.daddr) == (norm(saddr), norm(daddr))
    assert (ev.sport, ev.dport) == (1, 65535)
    assert records.format_endpoint(ev.family, ev.saddr, ev.sport) == f"[{norm(saddr)}]:1"


def test_ipv4_uses_only_first_four_address_bytes():
    """The kernel leaves bytes 4..15 alone for IPv4; stale bytes there must not leak in."""
    ev = sw_event(family=socket.AF_INET, saddr="127.0.0.1", daddr="127.0.0.2")
    ev.saddr[4:16] = [0xAA] * 12
    decoded = records.decode(bytes(ev))
    assert decoded.saddr == "127.0.0.1"
    assert records.format_endpoint(decoded.family, decoded.saddr, 80) == "127.0.0.1:80"


def test_unknown_family_decodes_without_addresses():
    """A family that is neither AF_INET nor AF_INET6 must not crash the decoder."""
    ev = event(family=socket.AF_UNIX, sport=1, dport=2)
    assert (ev.saddr, ev.daddr) == ("", "")


def test_extreme_integer_values_round_trip():
    """u64 counters and u32/u16 fields at their maxima must not be sign-extended or truncated."""
    ev = event(ts_ns=2**64 - 1, skaddr=2**64 - 1, bytes_sent=2**64 - 1, ino=2**64 - 1,
               tgid=2**32 - 1, uid=2**32 - 1, netns=2**32 - 1, srtt_us=2**32 - 1,
               sport=65535, dport=65535)
    assert ev.ts_ns == ev.skaddr == ev.bytes_sent == ev.ino == 2**64 - 1
    assert ev.tgid == ev.uid == ev.netns == ev.srtt_us == 2**32 - 1
    assert ev.sport == ev.dport == 65535


@pytest.mark.parametrize("fd", [-1, 0, 3, 2**31 - 1])
def test_fd_is_signed(fd):
    """fd is __s32 and -1 means unknown: it must not come back as 4294967295."""
    assert event(fd=fd).fd == fd


@pytest.mark.parametrize(
    "comm, expected",
    [
        (b"curl", "curl"),
        (b"", ""),
        (b"exactly15chars_", "exactly15chars_"),
        (b"sixteen_chars_xx", "sixteen_chars_xx"),  # no terminator at all
    ],
)
def test_comm_nul_padding(comm, expected):
    """comm is a NUL-padded char[16]; the name stops at the first NUL."""
    assert event(comm=comm).comm == expected


def test_comm_ignores_bytes_after_first_nul():
    """The kernel copies comm with strncpy semantics; whatever follows the NUL is not part of it."""
    ev = sw_event()
    ctypes.memmove(ctypes.addressof(ev) + records.COMM_OFFSET, b"ab\0zzzzzz", 9)
    assert records.decode(bytes(ev)).comm == "ab"


def test_comm_invalid_utf8_is_replaced_not_raised():
    """Task names are arbitrary bytes; a non-UTF-8 name must not make a record malformed."""
    assert event(comm=b"\xff\xfeab").comm == "\ufffd\ufffdab"


@pytest.mark.parametrize("kind", list(Kind))
@pytest.mark.parametrize("role", list(Role))
def test_enums_decode_to_members(kind, role):
    """Each valid kind/role value decodes to the enum member, not a bare int."""
    ev = event(kind=kind, role=role)
    assert ev.kind is kind and ev.role is role


@pytest.mark.parametrize("result", list(Result))
@pytest.mark.parametrize("attrib", list(Attrib))
def test_result_and_attrib_decode_to_members(result, attrib):
    ev = event(result=result, attrib=attrib)
    assert ev.result is result and ev.attrib is attrib


def test_payload_sent_excludes_retransmissions():
    """tcpi_bytes_sent counts retransmitted bytes again; payload must count them once."""
    ev = event(bytes_sent=15_000, bytes_retrans=2_500)
    assert ev.payload_sent == 12_500
    assert event(bytes_sent=4096, bytes_retrans=0).payload_sent == 4096


def test_payload_received_subtracts_peer_fin():
    """tcpi_bytes_received counts the peer's FIN as one byte of sequence space."""
    assert event(bytes_received=1001, peer_fin=1).payload_received == 1000
    assert event(bytes_received=1001, peer_fin=0).payload_received == 1001
    # a FIN with no payload (or a counter not yet moved) never goes negative
    assert event(bytes_received=0, peer_fin=1).payload_received == 0


def test_open_ns_is_first_nonzero_state_time():
    """open_ns is the first state seen; 0 for a socket that predates sockwatch."""
    assert event(state_ns={}).open_ns == 0
    ev = event(state_ns={records.TCP_ESTABLISHED: 700, records.TCP_SYN_SENT: 500,
                         records.TCP_CLOSE: 900})
    assert ev.open_ns == 500


@pytest.mark.parametrize("delta", [-records.EVENT_SIZE, -1, 1, records.EVENT_SIZE])
def test_wrong_size_raises_decode_error(delta):
    """A short or long record (ring buffer or iterator framing bug) is malformed, not decoded."""
    data = (raw() * 2)[: records.EVENT_SIZE + delta]
    with pytest.raises(DecodeError, match="bytes"):
        records.decode(data)


def test_memoryview_input_is_accepted():
    """The iterator path hands memoryview slices, not bytes."""
    data = raw(sport=1111) + raw(sport=2222)
    view = memoryview(data)[records.EVENT_SIZE:]
    assert records.decode(view).sport == 2222


def _with_byte(field: ctypes._CData, value: int, base: records.SwEvent | None = None) -> bytes:
    ev = base or sw_event()
    buf = bytearray(bytes(ev))
    buf[field.offset] = value
    return bytes(buf)


@pytest.mark.parametrize(
    "field, value",
    [
        (records.SwEvent.kind, 99),
        (records.SwEvent.kind, 0),
        (records.SwEvent.result, 7),
        (records.SwEvent.result, 255),
    ],
)
def test_enum_out_of_range_raises_decode_error(field, value):
    """An out-of-range enum is a malformed record: DecodeError exactly, never a bare ValueError."""
    with pytest.raises(DecodeError) as info:
        records.decode(_with_byte(field, value))
    assert type(info.value) is DecodeError


@pytest.mark.parametrize("member, value", [("role", 9), ("attrib", 7), ("attrib", 200)])
def test_sock_enum_out_of_range_raises_decode_error(member, value):
    """role and attrib live in the nested sw_sock; out of range there is malformed too."""
    offset = getattr(records.SwSock, member).offset  # sock is at offset 0 of sw_event
    buf = bytearray(raw())
    buf[offset] = value
    with pytest.raises(DecodeError) as info:
        records.decode(bytes(buf))
    assert type(info.value) is DecodeError


def test_decode_many_counts_malformed_and_keeps_order():
    """A batch keeps the good records in order and counts the bad ones instead of failing."""
    bad_kind = bytearray(raw(sport=3))
    bad_kind[records.SwEvent.kind.offset] = 99
    batch = [raw(sport=1), raw(sport=2)[:-1], bytes(bad_kind), b"", raw(sport=4)]
    events, bad = records.decode_many(batch)
    assert [e.sport for e in events] == [1, 4]
    assert bad == 3
    assert records.decode_many([]) == ([], 0)


_REAL = raw(kind=Kind.CLOSE, family=socket.AF_INET6, saddr="2001:db8::1", daddr="::1",
            comm=b"nginx", state_ns={1: 5, 7: 9}, peer_fin=1, bytes_received=10)


def _decode_only_decode_errors(data: bytes) -> None:
    try:
        ev = records.decode(data)
    except DecodeError:
        return
    # anything that decodes is a well-formed record of the right size
    assert len(data) == records.EVENT_SIZE
    assert isinstance(ev, records.ConnEvent)
    assert ev.payload_received >= 0
    _ = (ev.state_name, ev.open_ns, ev.payload_sent)  # derived fields must not raise


@FUZZ
@given(st.binary(max_size=3 * records.EVENT_SIZE))
@example(_REAL)
@example(_REAL[:-1])
@example(b"")
def test_fuzz_any_length_only_decode_error(data):
    """Arbitrary bytes (any length) either decode or raise DecodeError, nothing else."""
    _decode_only_decode_errors(data)


@FUZZ
@given(st.binary(min_size=records.EVENT_SIZE, max_size=records.EVENT_SIZE))
@example(_REAL)
@example(b"\xff" * records.EVENT_SIZE)
@example(b"\0" * records.EVENT_SIZE)
def test_fuzz_exact_size_only_decode_error(data):
    """Random bytes of exactly EVENT_SIZE: enums, addresses and comm are all garbage."""
    _decode_only_decode_errors(data)


@FUZZ
@given(
    st.lists(
        st.tuples(st.integers(0, records.EVENT_SIZE - 1), st.integers(0, 255)), max_size=40
    ),
    st.sampled_from([socket.AF_INET, socket.AF_INET6, 0, 65535]),
)
@example([], socket.AF_INET6)
def test_fuzz_mutated_real_record_only_decode_error(mutations, family):
    """Flipping bytes of a valid record reaches the success path (addresses, comm) too."""
    buf = bytearray(_REAL)
    buf[records.SwEvent.family.offset : records.SwEvent.family.offset + 2] = family.to_bytes(
        2, "little")
    for off, val in mutations:
        buf[off] = val
    _decode_only_decode_errors(bytes(buf))


@pytest.mark.parametrize("offset, unit", [
    (0, 1), (1, 1), (999_999_999, 1), (2**30 - 2, 1),  # the first second: exact
    (2**30 - 1, 1000), (61 * 10**9 + 123_456, 1000),  # up to 17 minutes: microseconds
    (2**30 * 1000, 10**6), (3 * 86400 * 10**9 + 7, 10**6),  # up to 12 days: milliseconds
    (2**30 * 10**6, 10**9), (400 * 86400 * 10**9, 10**9),  # beyond: seconds
])
def test_state_stamp_keeps_each_time_to_its_unit(offset, unit):
    """State times travel as 32-bit stamps relative to open_ns: a time comes back
    rounded down to the unit its distance from open_ns allows, never later."""
    open_ns = 5_000_000_000
    back = records.state_time(open_ns, records.state_stamp(open_ns, open_ns + offset))
    assert back == open_ns + offset - offset % unit


def test_state_stamp_zero_means_never_and_far_times_saturate():
    assert records.state_time(123, 0) == 0
    assert records.state_stamp(123, 123) != 0  # entered at open_ns itself
    assert records.state_stamp(500, 400) == records.state_stamp(500, 500)  # never before open
    far = records.state_time(0, records.state_stamp(0, 10**20))
    assert far == (2**30 - 1) * 10**9  # 34 years: the largest stamp
