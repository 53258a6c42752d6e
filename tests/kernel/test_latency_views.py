"""What people read about per-layer latency, against a workload with known delays.

A server in one test-made namespace and a client in another, joined by a veth
pair. The server waits ACCEPT_DELAY before accept() (the test holds it back
after the client's connect() returned) and sleeps READ_DELAY before each read,
so every request sits in its socket queue that long; the client is always
blocked in recv() when the answer comes, so its reads wait microseconds.
Three readers look at the same run: a standalone ``sockwatch latency --json``,
a daemon's /api/latency and /metrics, and ``sockwatch table --latency --json``
(from the daemon: the per-socket summaries live in the probes' maps).

Tolerances: the kernel's histograms have log2 buckets, so a quantile is only
known to within its bucket; 200 ms lies in (131 ms, 262 ms], and the
interpolated p50 must land there. Each request's true queue wait is READ_DELAY
minus one veth RTT (well under a millisecond here). The client's reads wait
only for its wake-up: microseconds idle, a few ms on this busy two-CPU host,
so they are held under READ_DELAY / 4, far from the server's waits. The per-socket summaries (table) are
exact for the maximum and a log4 bucket bound clipped by it for the p50.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.kernel import daemon_util as du
from tests.kernel.conftest import NetnsPair
from tests.kernel.test_stack_latency import ifindex, netns_inode

READ_DELAY = 0.2
ACCEPT_DELAY = 0.2
REQUESTS = 6
BUCKET = (0.131072, 0.262144)  # the log2 bucket holding READ_DELAY
QUICK = READ_DELAY / 4  # a reader already blocked in recv(): its wake-up, even on a busy host

SERVER = du.NAMED_PRELUDE + """
addr = sys.argv[2]
srv = socket.create_server((addr, 0))
say(port=srv.getsockname()[1])
sys.stdin.readline()  # held back until the test says accept
conn, _ = srv.accept()
conn.sendall(b"hi")
for _ in range(int(sys.argv[3])):
    time.sleep(float(sys.argv[4]))  # the request waits in the socket queue meanwhile
    recv_exact(conn, 100)
    conn.sendall(b"k")
say(done=True, local_port=conn.getsockname()[1], remote_port=conn.getpeername()[1])
sys.stdin.readline()  # kept open until the test has read the table
"""

CLIENT = du.NAMED_PRELUDE + """
c = socket.create_connection((sys.argv[2], int(sys.argv[3])), timeout=10)
say(connected=time.monotonic())
recv_exact(c, 2)
for _ in range(int(sys.argv[4])):
    c.sendall(b"q" * 100)
    recv_exact(c, 1)  # blocked in recv() when the answer arrives: it waits no time in the queue
say(done=True)
sys.stdin.readline()
"""


def in_netns(ns: str, script: str, *args: object) -> subprocess.Popen:
    return subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", script,
                             *map(str, args)],
                            env=du.daemon_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def layer(report: dict[str, Any], interface: str, direction: str, name: str) -> dict[str, Any]:
    found = [e for e in report["layers"] if (e["interface"], e["direction"], e["layer"])
             == (interface, direction, name)]
    assert len(found) == 1, f"no {direction} {name} layer for {interface}: " + ", ".join(
        sorted({e["interface"] for e in report["layers"]}))
    return found[0]


def check_report(report: dict[str, Any], sides: dict[str, tuple[str, int, int]]) -> None:
    """``sides``: "a" (client) and "b" (server) -> (label, netns inode, ifindex) of the veth."""
    labels = {side: label for side, (label, _ns, _index) in sides.items()}
    assert report["enabled"] is True
    server_rx = layer(report, labels["b"], "rx", "socket")
    assert server_rx["count"] >= REQUESTS
    assert BUCKET[0] < server_rx["p50_seconds"] <= BUCKET[1], server_rx
    assert server_rx["sum_seconds"] >= REQUESTS * (READ_DELAY - 0.01)
    client_rx = layer(report, labels["a"], "rx", "socket")
    assert client_rx["count"] >= REQUESTS and client_rx["p50_seconds"] < QUICK, client_rx
    for label, ns, index in sides.values():
        (entry,) = [i for i in report["interfaces"] if i["interface"] == label]
        assert (entry["driver"], entry["netns"], entry["ifindex"]) == ("veth", ns, index)
        # every request and answer crossed this link: at least one packet each way per request
        # (totals count every packet; the packet layers time one in eight, so not checked here)
        assert entry["tx_packets"] >= REQUESTS and entry["rx_packets"] >= REQUESTS, entry
    # nothing in the test's namespaces is left unnamed or named after another interface
    suffixes = tuple(f"@{ns}" for _label, ns, _index in sides.values())
    in_ours = {e["interface"] for e in report["layers"] + report["interfaces"]
               if e["interface"].endswith(suffixes)}
    assert in_ours == set(labels.values()), in_ours


def table_rows(daemon: du.Daemon, port: int, client_port: int) -> tuple[dict, dict]:
    """The server's and the client's rows from ``sockwatch table --latency --json``."""
    table = subprocess.run(du.sockwatch_cmd("table", "--latency", "--json", "--url", daemon.url,
                                            "--port", str(port)),
                           cwd=du.ROOT, env=du.daemon_env(), capture_output=True, text=True,
                           timeout=30)
    assert table.returncode == 0, table.stderr
    rows = json.loads(table.stdout)
    (server,) = [r for r in rows if r["role"] == "server" and r["remote_port"] == client_port]
    (client,) = [r for r in rows if r["role"] == "client" and r["local_port"] == client_port]
    return server, client


@pytest.fixture
def daemon(tmp_path):
    # walk the kernel every second: live rows pick up the per-socket summaries then
    d = du.start_daemon(tmp_path, {"metrics": {"top_interfaces": 10000},
                                   "tables": {"reconcile_interval_seconds": 1}})
    try:
        yield d
    finally:
        d.stop()


def test_latency_views_against_delays(netns_pair: NetnsPair, daemon: du.Daemon, tmp_path):
    pair = netns_pair
    sides = {side: (f"{dev}@{netns_inode(ns)}", netns_inode(ns), ifindex(ns, dev))
             for side, ns, dev in (("a", pair.a, pair.veth_a), ("b", pair.b, pair.veth_b))}
    labels = {side: label for side, (label, _ns, _index) in sides.items()}
    standalone = subprocess.Popen(du.sockwatch_cmd("latency", "--json", "--interval", "8"),
                                  cwd=du.ROOT, env=du.daemon_env(), stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
    server = client = None
    try:
        assert "sampling for 8 s" in standalone.stderr.readline()  # probes attached
        server = in_netns(pair.b, SERVER, "swlat-srv", pair.addr_b, REQUESTS, READ_DELAY)
        port = du.read_json_line(server)["port"]
        client = in_netns(pair.a, CLIENT, "swlat-cli", pair.addr_b, port, REQUESTS)
        du.read_json_line(client)  # connect() returned: the connection is in the accept queue
        time.sleep(ACCEPT_DELAY)
        server.stdin.write("accept\n")
        server.stdin.flush()
        ports = du.read_json_line(server)
        assert du.read_json_line(client) == {"done": True}

        # the daemon: /api/latency, /metrics, and the live connection's summaries
        reply = daemon.get("/api/latency")
        assert reply.status == 200
        check_report(reply.json(), sides)
        families = {f.name: f for f in text_string_to_metric_families(daemon.metrics())}
        assert [s.value for s in families["sockwatch_stack_probes_enabled"].samples] == [1]
        buckets = {s.labels["le"]: s.value for s in families["sockwatch_stack_latency_seconds"].samples
                   if s.name.endswith("_bucket") and s.labels["interface"] == labels["b"]
                   and (s.labels["direction"], s.labels["layer"]) == ("rx", "socket")}
        assert buckets["0.262144"] - buckets["0.131072"] >= REQUESTS // 2, buckets
        packets = {(s.labels["interface"], s.labels["direction"]): s.value
                   for s in families["sockwatch_interface_packets"].samples}
        assert packets[(labels["b"], "rx")] >= REQUESTS and packets[(labels["a"], "tx")] >= REQUESTS
        assert (labels["b"],) in {(s.labels["interface"],) for s in
                                  families["sockwatch_interface_driver_errors"].samples}
        accept = families["sockwatch_accept_queue_seconds"]
        assert any(s.name.endswith("_count") and s.value >= 1 for s in accept.samples)

        # live rows carry their latest record: wait for a kernel walk after the last read
        deadline = time.monotonic() + 10
        while True:
            srv_row, cli_row = table_rows(daemon, port, ports["remote_port"])
            if srv_row["rcvq_wait_max_us"] or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert READ_DELAY * 0.9e6 <= srv_row["rcvq_wait_max_us"] <= 2e6, srv_row
        assert 0 < srv_row["rcvq_wait_p50_us"] <= srv_row["rcvq_wait_max_us"]
        assert ACCEPT_DELAY * 1e6 <= srv_row["accept_wait_us"] <= 5e6, srv_row
        assert cli_row["rcvq_wait_max_us"] is not None and cli_row["rcvq_wait_max_us"] < QUICK * 1e6

        # the veth pair goes before the standalone run reports and before this read: the
        # counters, keyed by index in the kernel, keep the names read while it existed
        subprocess.run(["ip", "-n", pair.a, "link", "del", pair.veth_a], check=True)
        names = {i["interface"] for i in daemon.get("/api/latency").json()["interfaces"]}
        assert set(labels.values()) <= names

        out, err = standalone.communicate(timeout=30)
        assert standalone.returncode == 0, err
        check_report(json.loads(out), sides)
    finally:
        for proc in (server, client):
            if proc is not None:
                try:
                    proc.stdin.write("exit\n")
                    proc.stdin.flush()
                except (BrokenPipeError, ValueError):
                    pass
                du.reap(proc)
        if standalone.poll() is None:
            standalone.kill()
        du.reap(standalone)
