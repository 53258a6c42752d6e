"""How records look to people and scripts: state names, event names, JSON dicts, filters.

These are the contract of ``--json`` output and of ``--state``: a renamed key or
a byte count that silently switches between payload and sequence space breaks
every script built on sockwatch.
"""

from __future__ import annotations

import socket

import pytest

from recfactory import event
from sockwatch import records
from sockwatch.records import Attrib, Kind, Result, Role
from sockwatch.tables import Connection
from sockwatch.views import fields
from sockwatch.views.filters import Filter

SYN_SENT, ESTAB, CLOSE, LISTEN = (records.TCP_SYN_SENT, records.TCP_ESTABLISHED,
                                  records.TCP_CLOSE, records.TCP_LISTEN)
FIN_WAIT1, TIME_WAIT = 4, 6


# -- state names -----------------------------------------------------------------


@pytest.mark.parametrize(
    "given, expected",
    [
        ("established", "ESTAB"),
        ("ESTABLISHED", "ESTAB"),
        ("ESTAB", "ESTAB"),
        ("estab", "ESTAB"),
        ("listen", "LISTEN"),
        ("LISTEN", "LISTEN"),
        ("time-wait", "TIME-WAIT"),
        ("TIME-WAIT", "TIME-WAIT"),
        ("syn-sent", "SYN-SENT"),
        ("syn-recv", "SYN-RECV"),
        ("fin-wait-1", "FIN-WAIT-1"),
        ("fin-wait-2", "FIN-WAIT-2"),
        ("close-wait", "CLOSE-WAIT"),
        ("last-ack", "LAST-ACK"),
        ("closing", "CLOSING"),
        ("closed", "UNCONN"),
        ("UNCONN", "UNCONN"),
        ("  Established ", "ESTAB"),
    ],
)
def test_normalize_state_accepts_ss_names_both_ways(given, expected):
    """--state takes ss's filter names and ss's column spellings alike."""
    assert fields.normalize_state(given) == expected


@pytest.mark.parametrize("junk", ["bogus", "", "   ", "estab1", "time_wait", "ESTABLISHED!",
                                  "syn", "12"])
def test_normalize_state_rejects_junk(junk):
    assert fields.normalize_state(junk) is None


def test_every_normalized_state_is_a_name_state_name_can_produce():
    """A --state value that no row can ever have would filter out everything silently."""
    produced = {records.state_name(i) for i in range(records.TCP_STATES)}
    for alias in fields.STATE_ALIASES:
        assert fields.normalize_state(alias) in produced


# -- event names ------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind, role, result, oldstate, expected",
    [
        (Kind.OPEN, Role.CLIENT, Result.OK, SYN_SENT, "connect"),
        (Kind.OPEN, Role.SERVER, Result.OK, 3, "accept"),
        (Kind.OPEN, Role.LISTENER, Result.OK, CLOSE, "listen"),
        (Kind.OPEN, Role.UNKNOWN, Result.OK, ESTAB, "open"),
        (Kind.CLOSE, Role.CLIENT, Result.REFUSED, SYN_SENT, "fail"),
        (Kind.CLOSE, Role.CLIENT, Result.TIMEOUT, SYN_SENT, "fail"),
        (Kind.CLOSE, Role.CLIENT, Result.UNREACHABLE, SYN_SENT, "fail"),
        (Kind.CLOSE, Role.CLIENT, Result.ABORTED, SYN_SENT, "fail"),
        (Kind.CLOSE, Role.CLIENT, Result.OK, ESTAB, "close"),
        (Kind.CLOSE, Role.CLIENT, Result.RESET, ESTAB, "close"),
        (Kind.CLOSE, Role.SERVER, Result.OK, TIME_WAIT, "close"),
        (Kind.CLOSE, Role.LISTENER, Result.OK, LISTEN, "unlisten"),
    ],
)
def test_event_name(kind, role, result, oldstate, expected):
    """Names trace prints: a connect that never got established is a failure, not a close."""
    ev = event(kind=kind, role=role, result=result, oldstate=oldstate,
               state=CLOSE if kind == Kind.CLOSE else ESTAB)
    assert fields.event_name(ev) == expected


# -- dicts for --json and the API ---------------------------------------------------

CONN_KEYS = {
    "pid", "process", "fd", "state", "netns", "family", "local_addr", "local_port",
    "remote_addr", "remote_port", "role", "attribution", "ino", "uid", "bytes_sent",
    "bytes_received", "segs_out", "segs_in", "retransmits", "rtt_us", "tcpi_bytes_acked",
    "tcpi_bytes_received", "tcpi_bytes_sent", "tcpi_bytes_retrans", "state_times", "age_s",
    "seen_by", "rcvq_wait_p50_us", "rcvq_wait_max_us", "accept_wait_us",
}
LATENCY_KEYS = {"rcvq_wait_p50_us", "rcvq_wait_max_us", "accept_wait_us"}


def _known_record(**kw):
    base = dict(
        kind=Kind.OPEN, role=Role.CLIENT, attrib=Attrib.CONNECT, family=socket.AF_INET,
        saddr="10.1.1.1", sport=40001, daddr="10.2.2.2", dport=443, state=ESTAB,
        oldstate=SYN_SENT, ts_ns=4_000_000_000, netns=4026531840, ino=777, uid=1000,
        state_ns={SYN_SENT: 1_000_000_000, ESTAB: 1_250_000_000},
        bytes_sent=15_000, bytes_retrans=2_000, bytes_acked=13_001,
        bytes_received=8_001, peer_fin=1, segs_out=20, segs_in=18, total_retrans=3,
        srtt_us=1500, tgid=321, tid=322, comm=b"curl", fd=4,
    )
    base.update(kw)
    return event(**base)


def _conn(ev, **kw):
    d = dict(ev=ev, tgid=ev.tgid, comm=ev.comm, fd=ev.fd, alive_since_ns=ev.open_ns or ev.ts_ns,
             seen_by="event")
    d.update(kw)
    return Connection(**d)


def test_connection_dict_for_known_record():
    """Bytes are payload; tcpi_* are the kernel's raw tcp_info counters, for comparison with ss -i."""
    d = fields.connection_dict(_conn(_known_record()), now_ns=3_500_000_000)
    assert set(d) == CONN_KEYS
    assert (d["pid"], d["process"], d["fd"], d["state"]) == (321, "curl", 4, "ESTAB")
    assert (d["family"], d["local_addr"], d["local_port"]) == ("ipv4", "10.1.1.1", 40001)
    assert (d["remote_addr"], d["remote_port"]) == ("10.2.2.2", 443)
    assert (d["role"], d["attribution"], d["ino"], d["uid"]) == ("client", "connect", 777, 1000)
    assert d["bytes_sent"] == 13_000  # 15000 sent incl. 2000 retransmitted
    assert d["bytes_received"] == 8_000  # the peer's FIN is not payload
    assert (d["tcpi_bytes_sent"], d["tcpi_bytes_retrans"]) == (15_000, 2_000)
    assert (d["tcpi_bytes_received"], d["tcpi_bytes_acked"]) == (8_001, 13_001)
    assert (d["segs_out"], d["segs_in"], d["retransmits"], d["rtt_us"]) == (20, 18, 3, 1500)
    assert d["state_times"] == {"SYN-SENT": 0.0, "ESTAB": 0.25}
    assert d["age_s"] == pytest.approx(2.5)
    assert d["seen_by"] == "event" and d["netns"] == 4026531840


def test_connection_dict_unknowns_are_null():
    """Unknown pid/fd/age are null in JSON, never 0 or -1 that scripts would mistake for data."""
    ev = _known_record(tgid=0, comm=b"", fd=-1, state_ns={}, family=socket.AF_INET6,
                       saddr="::1", daddr="::1")
    d = fields.connection_dict(_conn(ev), now_ns=9_000_000_000)
    assert d["pid"] is None and d["process"] is None and d["fd"] is None
    assert d["age_s"] is None and d["state_times"] == {}
    assert d["family"] == "ipv6"


def test_connection_dict_closed_and_reconciled_rows():
    """Closed rows say how they ended; rows removed by reconciliation say so instead."""
    ev = _known_record(kind=Kind.CLOSE, state=CLOSE, oldstate=FIN_WAIT1, result=Result.RESET,
                       ts_ns=6_000_000_000)
    d = fields.connection_dict(_conn(ev, closed_ns=6_000_000_000), now_ns=99_000_000_000)
    assert (d["result"], d["last_state"]) == ("reset", "FIN-WAIT-1")
    assert d["age_s"] == pytest.approx(5.0)  # until the close, not until now
    rec = fields.connection_dict(_conn(ev, closed_ns=7_000_000_000, reconciled=True), 0)
    assert rec["result"] == "reconciled"
    assert "result" not in fields.connection_dict(_conn(_known_record()), 0)


def test_connection_dict_listener_has_backlog():
    ev = _known_record(role=Role.LISTENER, state=LISTEN, listen_backlog=511, daddr="0.0.0.0",
                       dport=0)
    d = fields.connection_dict(_conn(ev), 0)
    assert d["backlog"] == 511 and d["state"] == "LISTEN" and d["role"] == "listener"
    assert "backlog" not in fields.connection_dict(_conn(_known_record()), 0)


def test_event_dict_open_and_close():
    """Trace JSON: opens carry the state, closes the result, last state and lifetime."""
    d = fields.event_dict(_known_record())
    assert set(d) == (CONN_KEYS - {"age_s", "seen_by"}) | {"ts_ns", "event", "tid"}
    assert (d["event"], d["state"], d["pid"], d["tid"], d["fd"]) == ("connect", "ESTAB", 321,
                                                                    322, 4)
    assert d["bytes_sent"] == 13_000 and d["tcpi_bytes_sent"] == 15_000
    close = fields.event_dict(_known_record(kind=Kind.CLOSE, state=CLOSE, oldstate=ESTAB,
                                            result=Result.OK, ts_ns=3_000_000_000))
    assert close["event"] == "close" and close["result"] == "ok"
    assert close["last_state"] == "ESTAB" and "state" not in close
    assert close["lifetime_s"] == pytest.approx(2.0)
    # an OPEN whose state is already CLOSE reports the state it was in
    d = fields.event_dict(_known_record(state=CLOSE, oldstate=ESTAB))
    assert d["state"] == "ESTAB"


def test_a_close_whose_open_was_held_gives_the_open_line_first():
    """Views show the connect or accept a held CLOSE stands for: at the time the
    connection was established, with no counters yet, then the close itself."""
    held = dict(kind=Kind.CLOSE, state=CLOSE, oldstate=ESTAB, result=Result.OK,
                ts_ns=3_000_000_000, flags=records.FLAG_OPEN_HELD)
    for role, name in ((Role.CLIENT, "connect"), (Role.SERVER, "accept")):
        opened, closed = fields.event_dicts([_known_record(role=role, **held)])
        assert (opened["event"], opened["ts_ns"], opened["state"]) == (name, 1_250_000_000,
                                                                        "ESTAB")
        assert opened["bytes_sent"] == opened["bytes_received"] == opened["retransmits"] == 0
        assert (opened["pid"], opened["fd"], opened["local_port"]) == (321, 4, 40001)
        assert closed == fields.event_dict(_known_record(role=role, **held))
        assert closed["bytes_sent"] == 13_000
    # a CLOSE of a connection announced before (the flag is not set) is one line,
    # and the flag means nothing on other kinds
    assert len(fields.event_dicts([_known_record(**{**held, "flags": 0})])) == 1
    assert len(fields.event_dicts([_known_record(flags=records.FLAG_OPEN_HELD)])) == 1


def test_lifetime_is_zero_when_open_time_unknown():
    """A close of a socket that predates sockwatch has no lifetime, not a negative one."""
    assert fields.lifetime_ns(_known_record(kind=Kind.CLOSE, state_ns={})) == 0
    assert fields.lifetime_ns(_known_record(ts_ns=1, state_ns={SYN_SENT: 5})) == 0


@pytest.mark.parametrize(
    "n, text",
    [(0, "0B"), (1023, "1023B"), (1024, "1.0K"), (1536, "1.5K"), (5 * 1024**2, "5.0M"),
     (3 * 1024**3, "3.0G"), (2 * 1024**4, "2.0T"), (5000 * 1024**4, "5000.0T")],
)
def test_human_bytes(n, text):
    assert fields.human_bytes(n) == text


@pytest.mark.parametrize(
    "s, text",
    [(None, "-"), (0.0123, "12.3ms"), (1.0, "1.0s"), (119.0, "119.0s"), (600, "10m"),
     (7200, "2h")],
)
def test_human_seconds(s, text):
    assert fields.human_seconds(s) == text


# -- filters ---------------------------------------------------------------------------


def test_filter_empty_matches_everything():
    assert Filter().matches(_known_record(), 0, "")


def test_filter_pid_uses_given_owner_not_record():
    """Tables may know a better owner than the record; the filter must use that one."""
    ev = _known_record(tgid=321)
    flt = Filter(pids=frozenset({10, 20}))
    assert flt.matches(ev, 20, "x")
    assert not flt.matches(ev, 321, "x")


def test_filter_comm_substring_case_insensitive():
    ev = _known_record()
    assert Filter(comm="URL").matches(ev, 1, "curl")
    assert not Filter(comm="wget").matches(ev, 1, "curl")


def test_filter_port_local_or_remote():
    ev = _known_record(sport=40001, dport=443)
    assert Filter(port=443).matches(ev, 1, "c")
    assert Filter(port=40001).matches(ev, 1, "c")
    assert not Filter(port=80).matches(ev, 1, "c")


def test_filter_state_uses_ss_names():
    """--state established is normalized to ESTAB; the filter compares with state_name()."""
    ev = _known_record(state=ESTAB)
    assert Filter(state=fields.normalize_state("established")).matches(ev, 1, "c")
    assert not Filter(state="LISTEN").matches(ev, 1, "c")


def test_filter_conditions_combine_with_and():
    ev = _known_record(sport=40001, dport=443)
    assert Filter(pids=frozenset({1}), comm="cu", port=443, state="ESTAB").matches(ev, 1, "curl")
    assert not Filter(pids=frozenset({1}), comm="cu", port=443, state="LISTEN").matches(
        ev, 1, "curl")
    assert not Filter(pids=frozenset({2}), port=443).matches(ev, 1, "curl")
