"""``sockwatch latency`` and ``table --latency``: rendering, filtering and CLI errors.

Reports come from ``latency.report`` over raw slot lists (test_latency); the
--url tests serve them from a real HTTP server on loopback, so the client,
the JSON round trip and the exit paths are the ones users get.
"""

from __future__ import annotations

import http.server
import io
import json
import threading

import pytest

from recfactory import event
from sockwatch import cli, latency, monitor, records
from sockwatch.errors import SockwatchError
from sockwatch.records import Role
from sockwatch.tables import Connection
from sockwatch.views import fields
from sockwatch.views import latency as latency_view
from sockwatch.views import table as table_view
from test_cli_args import _one_error_line
from test_latency import NAMES, OTHER, STACK, TOTALS, kernel_hists

TCP_SYN_RECV = 3
REPORT = latency.report(True, kernel_hists(), STACK, TOTALS, NAMES)
VETH = f"veth1@{OTHER}"


def text(report, encoding="utf-8") -> str:
    out = io.TextIOWrapper(io.BytesIO(), encoding=encoding)
    latency_view.render(report, out, as_json=False)
    out.flush()
    out.seek(0)
    return out.read()


# -- rendering ------------------------------------------------------------------------

def test_text_has_one_line_per_layer_under_its_interface():
    lines = text(REPORT).splitlines()
    assert lines[0].startswith("buckets: log2") and lines[1].split() == ["LAYER", "COUNT", "P50", "P99"]
    assert lines[2] == "connections"
    conn = lines[3:8]
    assert [ln.split()[:2] for ln in conn] == [["handshake", "client"], ["handshake", "server"],
                                               ["accept", "queue"], ["lifetime", "client"],
                                               ["lifetime", "server"]]
    # accept queue: 1 wait of 200 ms -> count 1, p50 inside (131, 262] ms
    accept = conn[2].split()
    assert accept[2] == "1" and accept[3].endswith("ms") and 131 < float(accept[3][:-2]) <= 262
    assert conn[1].split()[2:5] == ["0", "-", "-"]  # empty: no quantiles
    veth = lines.index(f"{VETH} (veth): rx 10 pkts 1.5K, tx 12 pkts 2.0K, driver errors 1")
    assert [ln.split()[:2] for ln in lines[veth + 1 : veth + 4]] == [
        ["tx", "tcp"], ["rx", "driver"], ["rx", "socket"]]
    assert any(ln.startswith("eth0 (virtio_net): rx 1 pkts") for ln in lines)


def test_bars_share_one_axis():
    lines = [ln for ln in text(REPORT).splitlines() if ln.endswith("|") and "|" in ln]
    bars = [ln[ln.index("|") + 1 : -1] for ln in lines]
    assert len({len(b) for b in bars}) == 1  # same width everywhere
    socket_bar = bars[[ln.split()[:2] for ln in lines].index(["rx", "socket"])]
    assert socket_bar.rstrip()[-1] == "█" and socket_bar.strip() == "█"


def test_ascii_terminal_gets_an_ascii_ramp():
    out = text(REPORT, encoding="ascii")
    assert "█" not in out and "@" in out


def test_sparkline_scales_to_the_fullest_slot_and_shows_any_nonzero():
    assert latency_view.sparkline([0, 1, 1000, 500], latency_view.RAMP) == " ▁█▄"
    assert latency_view.sparkline([], latency_view.RAMP) == ""


def test_text_with_stack_off_says_so():
    out = text(latency.report(False, kernel_hists(), {}, {}, {}))
    assert out.rstrip().endswith("(--no-stack-latency or probes.stack_latency = false)")


def test_json_is_the_report():
    out = io.StringIO()
    latency_view.render(REPORT, out, as_json=True)
    assert json.loads(out.getvalue()) == REPORT


# -- --interface ------------------------------------------------------------------------

@pytest.mark.parametrize("wanted", ["veth1", VETH])
def test_select_one_interface(wanted):
    got = latency_view.select(REPORT, wanted)
    assert {e["interface"] for e in got["layers"]} == {VETH}
    assert [i["interface"] for i in got["interfaces"]] == [VETH]


def test_select_unknown_interface_names_those_seen():
    with pytest.raises(SockwatchError, match=r"'wlan0' \(seen: eth0, lo, veth1@"):
        latency_view.select(REPORT, "wlan0")


def test_select_with_stack_off_is_an_error():
    with pytest.raises(SockwatchError, match="stack probes are off"):
        latency_view.select(latency.report(False, kernel_hists(), {}, {}, {}), "eth0")


# -- table --latency --------------------------------------------------------------------

def conn(**kw) -> Connection:
    ev = event(**kw)
    return Connection(ev=ev, tgid=ev.tgid, comm=ev.comm, fd=4, alive_since_ns=0, seen_by="event")


def test_connection_dict_latency_fields():
    row = fields.connection_dict(conn(rcvq_wait_p50_ns=150_000, rcvq_wait_max_ns=201_000_000,
                                      accept_wait_ns=2_500), 0)
    assert (row["rcvq_wait_p50_us"], row["rcvq_wait_max_us"], row["accept_wait_us"]) == (
        150.0, 201000.0, 2.5)
    unknown = fields.connection_dict(conn(), 0)
    assert unknown["rcvq_wait_p50_us"] is None and unknown["accept_wait_us"] is None


def test_table_latency_columns():
    rows = [fields.connection_dict(conn(role=Role.SERVER, rcvq_wait_p50_ns=150_000,
                                        rcvq_wait_max_ns=201_000_000, accept_wait_ns=40_000,
                                        state_ns={TCP_SYN_RECV: 1_000_000,
                                                  records.TCP_ESTABLISHED: 1_250_000}), 0)]
    out = io.StringIO()
    table_view.render(rows, out, as_json=False, latency=True)
    header, line = out.getvalue().splitlines()
    assert header.split()[-4:] == ["RCVQ-P50", "RCVQ-MAX", "ACCEPT-WAIT", "HANDSHAKE"]
    assert line.split()[-4:] == ["150us", "201.0ms", "40us", "250us"]
    plain = io.StringIO()
    table_view.render(rows, plain, as_json=False)
    assert "RCVQ-P50" not in plain.getvalue()


# -- the command line ---------------------------------------------------------------------

class Daemon(http.server.ThreadingHTTPServer):
    """A stand-in for a daemon's JSON API on loopback, serving one fixed report."""

    def __init__(self, report):
        body = json.dumps(report).encode()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                ok = self.path == "/api/latency"
                self.send_response(200 if ok else 404)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(body if ok else b"{}")

            def log_message(self, *args):
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


@pytest.fixture
def daemon():
    d = Daemon(REPORT)
    yield d
    d.shutdown()
    d.server_close()
    d.thread.join()


def test_url_json_is_the_daemons_report(daemon, capsys):
    assert cli.main(["latency", "--url", daemon.url, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == REPORT


def test_url_text_filtered_to_one_interface(daemon, capsys):
    assert cli.main(["latency", "--url", daemon.url, "--interface", "veth1"]) == 0
    out = capsys.readouterr().out
    assert VETH in out and "eth0" not in out and "connections" not in out


def test_url_unknown_interface_is_one_line(daemon, capsys):
    assert cli.main(["latency", "--url", daemon.url, "--interface", "wlan0"]) == 1
    assert "no traffic seen on interface 'wlan0'" in _one_error_line(capsys)


def test_unreachable_url_is_one_line(capsys):
    with Daemon(REPORT) as d:  # bound, then closed: nobody listens there any more
        url = d.url
        d.shutdown()
    assert cli.main(["latency", "--url", url]) == 1
    assert "cannot reach a sockwatch daemon" in _one_error_line(capsys)


def test_standalone_unknown_interface_fails_before_loading(monkeypatch, capsys):
    monkeypatch.setattr(cli.os, "geteuid", lambda: 0)
    monkeypatch.setattr(monitor, "Monitor", lambda *a, **k: pytest.fail("probes loaded"))
    assert cli.main(["latency", "--interface", "nosuchif0"]) == 2
    assert "no interface named 'nosuchif0'" in _one_error_line(capsys)


def test_interface_without_stack_probes_fails_before_loading(monkeypatch, capsys):
    monkeypatch.setattr(cli.os, "geteuid", lambda: 0)
    monkeypatch.setattr(monitor, "Monitor", lambda *a, **k: pytest.fail("probes loaded"))
    assert cli.main(["latency", "--interface", "lo", "--no-stack-latency"]) == 2
    assert "--no-stack-latency" in _one_error_line(capsys)


def test_no_stack_latency_reaches_the_loader_config():
    args = cli.build_parser().parse_args(["table", "--latency", "--no-stack-latency"])
    assert args.latency and cli._loader_config(args).stack_latency is False
    args = cli.build_parser().parse_args(["latency"])
    assert cli._loader_config(args).stack_latency is True and args.interval == 5.0


def test_daemon_no_stack_latency_overrides_the_config(tmp_path):
    path = tmp_path / "sockwatch.toml"
    path.write_text("[probes]\nstack_latency = true\n")
    args = cli.build_parser().parse_args(["daemon", "--config", str(path), "--no-stack-latency"])
    assert cli._daemon_config(args)["probes"]["stack_latency"] is False
    args = cli.build_parser().parse_args(["daemon", "--config", str(path)])
    assert cli._daemon_config(args)["probes"]["stack_latency"] is True
