"""``sockwatch table`` and ``sockwatch trace`` output, from plain records.

What people read (aligned text) and what scripts parse (JSON) must both show
each row once, honour the filters, and stop where --count says.
"""

from __future__ import annotations

import io
import json
import socket

from recfactory import event, raw
from sockwatch import records
from sockwatch.records import Attrib, Kind, Result, Role
from sockwatch.tables import ConnTable
from sockwatch.views import table as table_view
from sockwatch.views import trace as trace_view
from sockwatch.views.filters import Filter

SYN_SENT, ESTAB, CLOSE, LISTEN = (records.TCP_SYN_SENT, records.TCP_ESTABLISHED,
                                  records.TCP_CLOSE, records.TCP_LISTEN)


def _live(tbl, key):
    """A live row as views see it (decoded)."""
    return tbl.live[key].connection()


def _table() -> ConnTable:
    tbl = ConnTable()
    tbl.apply(raw(kind=Kind.OPEN, skaddr=1, role=Role.CLIENT, tgid=500, comm=b"curl", fd=3,
                    saddr="10.0.0.1", sport=40001, daddr="93.184.216.34", dport=443,
                    state=ESTAB, bytes_sent=13_000, state_ns={SYN_SENT: 1, ESTAB: 2}, ts_ns=2))
    tbl.apply(raw(kind=Kind.OPEN, skaddr=2, role=Role.LISTENER, attrib=Attrib.LISTEN,
                    tgid=900, comm=b"nginx", fd=6, saddr="0.0.0.0", sport=80, daddr="0.0.0.0",
                    dport=0, state=LISTEN, listen_backlog=511, state_ns={LISTEN: 1}, ts_ns=1))
    tbl.apply(raw(kind=Kind.OPEN, skaddr=3, role=Role.SERVER, tgid=0, comm=b"", fd=-1,
                    family=socket.AF_INET6, saddr="::1", sport=80, daddr="::1", dport=51000,
                    state=ESTAB, state_ns={ESTAB: 3}, ts_ns=3))
    return tbl


def _rows(flt: Filter = Filter()) -> list[dict]:
    return table_view.ordered(table_view.rows_of(_table().snapshot(), flt))


def test_rows_filter_and_put_listeners_first():
    """Like ss output people scan: listeners on top, then by owner and port."""
    assert [r["local_port"] for r in _rows()] == [80, 80, 40001]
    assert [r["role"] for r in _rows()] == ["listener", "server", "client"]
    assert [r["pid"] for r in _rows(Filter(port=443))] == [500]
    assert [r["state"] for r in _rows(Filter(state="LISTEN"))] == ["LISTEN"]
    assert _rows(Filter(pids=frozenset({12345}))) == []


def test_render_text_has_header_and_one_line_per_row():
    rows = _rows()
    out = io.StringIO()
    table_view.render(rows, out, as_json=False)
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 + len(rows)
    assert lines[0].split() == list(table_view.COLUMNS)
    listener, server, client = (ln.split() for ln in lines[1:])
    assert listener[:7] == ["900", "nginx", "6", "listener", "LISTEN", "0.0.0.0:80", "0.0.0.0:0"]
    # unknown owner and fd show as "-"; IPv6 endpoints in brackets
    assert server[:7] == ["-", "-", "-", "server", "ESTAB", "[::1]:80", "[::1]:51000"]
    assert client[:8] == ["500", "curl", "3", "client", "ESTAB", "10.0.0.1:40001",
                          "93.184.216.34:443", "12.7K"]
    # columns are aligned: every line starts its second column at the same place
    starts = {ln.index(ln.split()[1], len(ln.split()[0])) for ln in lines}
    assert len(starts) == 1


def test_render_text_closed_rows_show_result():
    """--closed shows how each connection ended in the STATE column."""
    tbl = ConnTable()
    tbl.apply(raw(kind=Kind.CLOSE, skaddr=1, state=CLOSE, oldstate=SYN_SENT,
                    result=Result.REFUSED, state_ns={SYN_SENT: 1, CLOSE: 5}, ts_ns=5))
    tbl.apply(raw(kind=Kind.OPEN, skaddr=2, state=ESTAB, state_ns={ESTAB: 1}, ts_ns=1))
    tbl.remove_missing(100, {_live(tbl, 2).ev.netns})
    out = io.StringIO()
    table_view.render(table_view.rows_of(tbl.recently_closed(), Filter()), out, as_json=False)
    states = [ln.split()[4] for ln in out.getvalue().splitlines()[1:]]
    assert states == ["REFUSED", "RECONCILED"]


def test_render_json_parses_and_has_one_object_per_row():
    out = io.StringIO()
    table_view.render(_rows(), out, as_json=True)
    data = json.loads(out.getvalue())
    assert [d["pid"] for d in data] == [900, None, 500]
    assert [d["role"] for d in data] == ["listener", "server", "client"]
    assert data[0]["backlog"] == 511
    assert data[2]["bytes_sent"] == 13_000
    empty = io.StringIO()
    table_view.render([], empty, as_json=True)
    assert json.loads(empty.getvalue()) == []


# -- trace -------------------------------------------------------------------------------

START = 1_000_000_000


def _dicts(events, flt: Filter = Filter()) -> list[dict]:
    return trace_view.dicts_of(events, flt)


def _connects(n):
    return [event(kind=Kind.OPEN, role=Role.CLIENT, tgid=100 + i, comm=b"curl", skaddr=i,
                  sport=40000 + i, ts_ns=START + i * 500_000_000) for i in range(n)]


def test_trace_header_and_lines():
    out = io.StringIO()
    printer = trace_view.TracePrinter(out, as_json=False, start_ns=START)
    printer.header()
    printer(_dicts(_connects(2)))
    lines = out.getvalue().splitlines()
    assert lines[0] == trace_view.HEADER
    assert lines[1].split() == ["0.000", "100", "curl", "connect", "10.0.0.1:40000",
                                "10.0.0.2:443"]
    assert lines[2].split()[:4] == ["0.500", "101", "curl", "connect"]
    assert printer.printed == 2


def test_trace_respects_count_limit_across_batches():
    """--count N stops after N events even when they arrive in several batches."""
    out = io.StringIO()
    printer = trace_view.TracePrinter(out, as_json=False, start_ns=START)
    evs = _dicts(_connects(5))
    printer(evs[:2], limit=3)
    printer(evs[2:], limit=3)
    printer(evs, limit=3)
    assert printer.printed == 3
    assert [ln.split()[1] for ln in out.getvalue().splitlines()] == ["100", "101", "102"]


def test_trace_respects_filter_and_skips_snapshots():
    """Snapshot rows are table seeds, not events; filtered-out events do not count toward --count."""
    out = io.StringIO()
    printer = trace_view.TracePrinter(out, as_json=True, start_ns=START)
    snap = event(kind=Kind.SNAPSHOT, tgid=103, comm=b"curl", role=Role.UNKNOWN)
    printer(_dicts([snap] + _connects(5), Filter(pids=frozenset({103, 104}))), limit=1)
    objs = [json.loads(ln) for ln in out.getvalue().splitlines()]
    assert [(o["pid"], o["event"]) for o in objs] == [(103, "connect")]
    assert printer.printed == 1


def test_trace_close_and_fail_details():
    """Closes show payload bytes and lifetime; failures show why."""
    out = io.StringIO()
    printer = trace_view.TracePrinter(out, as_json=False, start_ns=START)
    printer(_dicts([
        event(kind=Kind.CLOSE, state=CLOSE, oldstate=SYN_SENT, result=Result.REFUSED,
              state_ns={SYN_SENT: START, CLOSE: START + 1_000_000}, ts_ns=START + 1_000_000),
        event(kind=Kind.CLOSE, state=CLOSE, oldstate=ESTAB, result=Result.OK,
              bytes_sent=1500, bytes_retrans=500, bytes_received=201, peer_fin=1,
              state_ns={SYN_SENT: START, ESTAB: START + 1}, ts_ns=START + 2_000_000_000),
        event(kind=Kind.CLOSE, state=CLOSE, oldstate=ESTAB, result=Result.RESET,
              state_ns={SYN_SENT: START}, ts_ns=START + 500_000_000),
    ]))
    fail, ok, reset = out.getvalue().splitlines()
    assert fail.split()[3] == "fail" and fail.endswith("refused")
    assert ok.split()[3] == "close" and ok.endswith("tx 1000 rx 200 life 2.0s")
    assert reset.endswith("life 500.0ms reset")


def test_trace_json_lines_are_event_dicts():
    out = io.StringIO()
    printer = trace_view.TracePrinter(out, as_json=True, start_ns=START)
    printer.header()  # no header in JSON mode: every line must parse
    printer(_dicts(_connects(3)))
    objs = [json.loads(ln) for ln in out.getvalue().splitlines()]
    assert [o["pid"] for o in objs] == [100, 101, 102]
    assert all(o["event"] == "connect" and o["state"] == "ESTAB" for o in objs)
