"""``sockwatch top`` without a kernel: rates, sorting, filtering and the 80x24 screen.

Rows are built through the real path (records -> table -> ``connection_dict`` /
``event_dict``), so the model is tested on the shapes both sources deliver.
"""

from __future__ import annotations

import json

import pytest

from recfactory import event, raw
from sockwatch import cli, latency, records
from sockwatch.errors import UsageError
from sockwatch.records import Attrib, Kind, Result, Role
from sockwatch.tables import ConnTable
from sockwatch.views import fields
from sockwatch.views import top_screen as screen
from sockwatch.views.top import frame_dict
from sockwatch.views.top_model import TopModel, percentile
from sockwatch.views.top_source import Sample

S = 1_000_000_000
NOW = 100 * S
SYN_SENT, SYN_RECV, ESTAB, LISTEN, CLOSE = (records.TCP_SYN_SENT, 3, records.TCP_ESTABLISHED,
                                            records.TCP_LISTEN, records.TCP_CLOSE)


def conn(now_ns: int = NOW, **kw) -> dict:
    tbl = ConnTable()
    kw.setdefault("skaddr", kw.get("ino", 1))
    tbl.apply(raw(kind=Kind.OPEN, ts_ns=1, **kw))
    return fields.connection_dict(tbl.snapshot()[0], now_ns)


def ev(kind: Kind = Kind.OPEN, **kw) -> dict:
    return fields.event_dict(event(kind=kind, **kw))


def sample(t: float, conns: list[dict], events: list[dict] = (), users=None) -> Sample:
    return Sample(t, conns, list(events), users or {100: "alice", 200: "bob"},
                  {"ringbuf_full": 2, "untracked_close": 9}, {"state": "tp_btf"}, {})


OLD = {SYN_SENT: 1 * S, ESTAB: 1 * S + 2_000_000}  # handshake 2 ms, long ago


def web_conn(ino: int, sent: int, recv: int, now_ns: int = NOW, states=OLD, **kw) -> dict:
    kw.setdefault("tgid", 100)
    kw.setdefault("comm", b"curl")
    return conn(now_ns, ino=ino, sport=40000 + ino, dport=443, bytes_sent=sent,
                bytes_received=recv, state_ns=states, **kw)


def two_frames():
    """Sample 1 at t=10 s; sample 2 at t=12 s after a window of real activity."""
    model = TopModel()
    first = model.update(sample(10.0, [web_conn(1, 1000, 500), web_conn(3, 100, 0),
                                       web_conn(5, 0, 0, tgid=200, comm=b"nginx")]))
    fresh = {SYN_SENT: NOW - S, ESTAB: NOW - S + 10_000_000}  # opened 1 s ago, 10 ms handshake
    ended = ev(Kind.CLOSE, ino=3, sport=40003, dport=443, tgid=100, comm=b"curl",
               bytes_sent=700, bytes_received=40, state=CLOSE, oldstate=ESTAB, state_ns=OLD,
               ts_ns=NOW, rcvq_wait_p50_ns=30_000, rcvq_wait_max_ns=900_000)
    events = [ev(tgid=100, comm=b"curl", ino=8, sport=50008, state_ns={SYN_SENT: NOW}),
              ev(tgid=100, comm=b"curl", ino=2, sport=40002, state_ns=fresh),
              ev(Kind.CLOSE, tgid=100, comm=b"curl", ino=8, sport=50008, state=CLOSE,
                 oldstate=SYN_SENT, result=Result.REFUSED, state_ns={SYN_SENT: NOW}, ts_ns=NOW),
              ev(role=Role.SERVER, attrib=Attrib.ACCEPT, tgid=200, comm=b"nginx", ino=9,
                 sport=80, dport=51000, state_ns={SYN_RECV: NOW, ESTAB: NOW},
                 accept_wait_ns=250_000),
              ended]
    second = model.update(sample(12.0, [
        web_conn(1, 5000, 2500, rcvq_wait_p50_ns=10_000, rcvq_wait_max_ns=50_000),
        web_conn(2, 2000, 30, states=fresh),  # opened in the window: all of it counts
        web_conn(4, 9999, 9999, tgid=100),  # predates the window, never seen: no rate
        web_conn(5, 0, 0, tgid=200, comm=b"nginx"),
        conn(ino=6, tgid=200, comm=b"nginx", role=Role.LISTENER, attrib=Attrib.LISTEN,
             state=LISTEN, sport=80, dport=0, daddr="0.0.0.0", listen_backlog=511,
             state_ns={LISTEN: 1 * S}),
    ], events))
    return first, second


def by_pid(frame):
    return {p.pid: p for p in frame.processes}


def test_first_frame_has_counts_but_no_rates():
    first, _ = two_frames()
    curl = by_pid(first)[100]
    assert curl.conns == 2 and curl.user == "alice"
    assert first.window is None
    assert (curl.tx_s, curl.rx_s, curl.out_s, curl.fail_s) == (None, None, None, None)
    assert curl.handshakes == []  # handshakes before the first sample are not in a window


def test_rates_are_per_connection_differences_over_the_window():
    _, second = two_frames()
    assert second.window == pytest.approx(2.0)
    curl = by_pid(second)[100]
    # 4000 (grew) + 2000 (new) + 600 (closed: final 700 minus 100 seen) ; conn 4 not counted
    assert curl.tx_s == pytest.approx((4000 + 2000 + 600) / 2)
    assert curl.rx_s == pytest.approx((2000 + 30 + 40) / 2)
    assert curl.out_s == pytest.approx(1.0)  # two connects in two seconds
    assert curl.fail_s == pytest.approx(0.5)
    assert curl.in_s == 0
    assert curl.handshakes == [pytest.approx(0.01)]  # only the one established in the window
    nginx = by_pid(second)[200]
    assert nginx.in_s == pytest.approx(0.5) and nginx.tx_s == 0
    assert nginx.count("LISTEN") == 1 and nginx.count("ESTAB") == 1
    host = second.host
    assert host.tx_s == pytest.approx(curl.tx_s + nginx.tx_s)
    assert host.conns == 5 and host.states["ESTAB"] == 4
    assert second.lost == 2  # closes of sockets that predate us are not losses


def test_counters_going_backwards_never_give_negative_rates():
    model = TopModel()
    model.update(sample(1.0, [web_conn(1, 5000, 5000)]))
    frame = model.update(sample(2.0, [web_conn(1, 10, 10)]))
    assert by_pid(frame)[100].tx_s == 0 and by_pid(frame)[100].rx_s == 0


def test_receive_queue_wait_of_live_and_closed_connections():
    """RQW comes from live connections and from those that closed in the window;
    '-' (None) for a process the stack probes measured nothing for."""
    _, second = two_frames()
    curl, nginx = by_pid(second)[100], by_pid(second)[200]
    assert sorted(curl.rcvq_p50_us) == [pytest.approx(10), pytest.approx(30)]
    assert curl.rcvq_wait_max_us == pytest.approx(900)
    assert nginx.rcvq_wait_p50_us is None and nginx.rcvq_wait_max_us is None
    assert second.host.rcvq_wait_max_us == pytest.approx(900)


def test_listener_rows_count_accepts_and_established():
    _, second = two_frames()
    (ln,) = second.listeners
    assert (ln.pid, ln.port, ln.d["backlog"]) == (200, 80, 511)
    assert ln.accepts_s == pytest.approx(0.5)
    assert ln.accept_wait_p50_us == pytest.approx(250)  # from the accept event


def test_percentile_is_nearest_rank():
    assert percentile([], 0.5) is None
    assert percentile([5.0, 1.0, 3.0], 0.5) == 3.0
    assert percentile(list(range(1, 101)), 0.99) == 99
    assert percentile([1.0, 2.0], 0.99) == 2.0


def test_sort_by_any_column_unknown_values_last():
    _, second = two_frames()
    st = screen.UIState()
    assert [p.pid for p in screen.rows(second, st)] == [100, 200]  # TX/s, descending
    for col in screen.PROCESS_COLUMNS:
        st.sort["processes"] = (col.title, False)
        values = [col.value(p) for p in screen.rows(second, st)]
        known = [v for v in values if v is not None]
        assert values[:len(known)] == known, col.title
        assert known == sorted(known, key=lambda v: v.lower() if isinstance(v, str) else v)
    st.sort["processes"] = ("PROCESS", False)
    assert [p.process for p in screen.rows(second, st)] == ["curl", "nginx"]
    st.reverse()
    assert [p.process for p in screen.rows(second, st)] == ["nginx", "curl"]
    st.sort_by(1)
    assert st.sort["processes"] == ("CONN", True)
    st.sort_by(-2)
    assert st.sort["processes"] == ("USER", True)


@pytest.mark.parametrize("text,pids", [
    ("curl", [100]), ("NGINX", [200]), ("200", [200]), ("bob", [200]),
    ("443", [100, 200]), ("10.0.0.2", [100, 200]), ("40002", [100]), ("listen", [200]),
    ("nothing-like-this", []),
])
def test_filter_by_name_pid_user_port_address_state(text, pids):
    _, second = two_frames()
    st = screen.UIState(filter=text)
    assert sorted(p.pid for p in screen.rows(second, st)) == pids


def test_connections_view_filters_the_process_sockets():
    _, second = two_frames()
    st = screen.UIState(view="connections", pid=100)
    assert sorted(c.d["ino"] for c in screen.rows(second, st)) == [1, 2, 4]
    st.filter = "40002"
    assert [c.d["ino"] for c in screen.rows(second, st)] == [2]
    st.filter = "curl"  # the process itself matches: all of its sockets
    assert len(screen.rows(second, st)) == 3


def screen_text(frame, state, width, height):
    lines = screen.render(frame, "probes attached here", state, width, height)
    return lines, screen.plain(lines).splitlines()


@pytest.mark.parametrize("view", screen.TOP_VIEWS)
def test_every_view_fits_80x24(view):
    _, second = two_frames()
    st = screen.UIState(view=view, pid=100)
    lines, text = screen_text(second, st, 80, 24)
    assert len(lines) == 24
    assert all(sum(len(t) for t, _ in line) <= 80 for line in lines)
    assert text[0].startswith("sockwatch top - probes attached here")
    assert text[-1] == screen.KEYS_NARROW
    head = next(i for i, ln in enumerate(lines) if ln and ln[0][1] in ("head", "sort"))
    titles = [t.lstrip("v^") for t in text[head].split()]
    always = [c.title for c in screen.COLUMNS[view] if c.priority == 0]
    assert set(always) <= set(titles) <= {c.title for c in screen.COLUMNS[view]}


def test_process_screen_rows_and_wider_terminal_shows_more():
    _, second = two_frames()
    st = screen.UIState()
    lines, text = screen_text(second, st, 80, 24)
    head = text.index(next(t for t in text if t.lstrip().startswith("PID")))
    curl = text[head + 1].split()
    assert curl[:4] == ["100", "curl", "3", "3"]  # pid, name, sockets, established
    assert lines[head + 1][0][1] == "sel"  # the selection starts on the first row
    assert "USER" not in text[head] and "RQW50" not in text[head]
    _, wide = screen_text(second, st, 200, 50)
    assert {"USER", "RQW50", "RQWMX", "LSN"} <= set(wide[head].split())
    assert wide[-1] == screen.KEYS
    assert "conns 5: ESTAB 4 LISTEN 1  lost 2  probes tp_btf" in text[1]


def test_drill_down_rows_name_fd_and_5_tuple():
    _, second = two_frames()
    st = screen.UIState(view="connections", pid=100)
    st.sort["connections"] = ("LOCAL", False)
    _, text = screen_text(second, st, 80, 24)
    assert "[2:100 curl]" in text[3]
    rows = [ln.split() for ln in text[5:8]]
    assert [r[2] for r in rows] == ["10.0.0.1:40001", "10.0.0.1:40002", "10.0.0.1:40004"]
    assert all(r[1] == "ESTAB" and r[3] == "10.0.0.2:443" for r in rows)
    assert rows[1][-1] == "10ms"  # its handshake


def test_selection_scrolls_and_stays_on_screen():
    model = TopModel()
    frame = model.update(sample(1.0, [web_conn(i, i, 0, tgid=1000 + i) for i in range(1, 60)]))
    st = screen.UIState()
    st.selected["processes"] = 58
    lines, _ = screen_text(frame, st, 80, 24)
    assert [ln[0][1] for ln in lines].count("sel") == 1
    assert st.top["processes"] > 0


@pytest.mark.parametrize("view", screen.TOP_VIEWS)
def test_help_and_column_help_fit_80x24(view):
    _, second = two_frames()
    lines, text = screen_text(second, screen.UIState(help=1, view=view), 80, 24)
    assert len(lines) <= 24 and all(len(t) <= 80 for t in text)
    assert any("quit" in t for t in text) and any("filter" in t for t in text)
    assert "? again" in text[-1]
    lines, text = screen_text(second, screen.UIState(help=2, view=view), 80, 24)
    assert len(lines) <= 24 and all(len(t) <= 80 for t in text)
    assert [t.split()[0] for t in text[1:]] == [c.title for c in screen.COLUMNS[view]]


def test_once_output_without_height_lists_every_row_and_no_escapes():
    _, second = two_frames()
    text = screen.plain(screen.render(second, "x", screen.UIState(), 120, None))
    assert "\x1b" not in text
    assert sum(1 for ln in text.splitlines() if ln.split()[:3] in (["100", "alice", "curl"],
                                                                  ["200", "bob", "nginx"])) == 2


def test_interval_steps_and_limits():
    st = screen.UIState(interval=2.0)
    st.faster(1)
    assert st.interval == 3.0
    for _ in range(10):
        st.faster(-1)
    assert st.interval == screen.INTERVALS[0]


@pytest.mark.parametrize("fn,value,text", [
    (screen.rate, None, "-"), (screen.rate, 0, "0"), (screen.rate, 2.5, "2.5"),
    (screen.rate, 950, "950"), (screen.rate, 12_345, "12k"), (screen.rate, 1_500, "1.5k"),
    (screen.size, 1023, "1023"), (screen.size, 1536, "1.5K"), (screen.size, 50 * 2**20, "50M"),
    (screen.duration, 0.000_25, "250us"), (screen.duration, 0.0042, "4.2ms"),
    (screen.duration, 0.2, "200ms"), (screen.duration, 3.0, "3.0s"), (screen.duration, None, "-"),
    (screen.micros, 1500, "1.5ms"), (screen.count, 7, "7"),
])
def test_cell_formats_are_short(fn, value, text):
    assert fn(value) == text
    assert len(text) <= 6


def test_json_frame_is_plain_json():
    _, second = two_frames()
    doc = json.loads(json.dumps(frame_dict(second, screen.UIState(), "src")))
    curl = next(p for p in doc["processes"] if p["pid"] == 100)
    assert curl["sent_bytes_per_s"] == pytest.approx(3300)
    assert {s["ino"] for s in curl["sockets"]} == {1, 2, 4}
    assert doc["listeners"][0]["local_port"] == 80


def test_latency_layer_shape_and_quantiles():
    slots = [0] * records.HIST_STRIDE
    slots[3], slots[10] = 98, 2  # 98 at <= 8 us, 2 at <= 1024 us
    slots[-1] = 100 * 5_000  # sum in ns
    layer = latency.layer("", "handshake_client", "", slots)
    assert layer["count"] == 100 and layer["sum_seconds"] == pytest.approx(0.0005)
    assert 4e-6 < layer["p50_seconds"] <= 8e-6  # inside the slot that holds it
    assert 512e-6 < layer["p99_seconds"] <= 1024e-6
    assert layer["buckets"][3] == [pytest.approx(8e-6), 98]
    assert json.loads(json.dumps(layer)) == layer
    frame = TopModel().update(Sample(1.0, [], [], {}, {}, {}, {"enabled": False,
                                                               "layers": [layer],
                                                               "interfaces": []}))
    _, text = screen_text(frame, screen.UIState(view="latency"), 80, 24)
    row = next(t for t in text if "handshake_client" in t).split()
    assert row[:4] == ["handshake_client", "100", "6us", "768us"]  # interpolated in the slot


def test_top_refuses_bad_sort_and_no_terminal(monkeypatch):
    with pytest.raises(UsageError, match="no column 'bogus'"):
        cli.cmd_top(cli.build_parser().parse_args(["top", "--sort", "bogus"]))
    monkeypatch.setattr(cli.sys.stdout, "isatty", lambda: False)
    with pytest.raises(UsageError, match="not a terminal"):
        cli.cmd_top(cli.build_parser().parse_args(["top"]))
