"""Every query of every Grafana dashboard, run by a real Prometheus against a
real daemon that watched a real workload, returns data.

One workload exercises every metric the dashboards read: short ping-pong
connections, bulk transfers, a long-lived connection, refused connects (a
bound port that does not listen) and timed-out ones (a listener whose accept
queue is full drops SYNs; TCP_SYNCNT=1 gives up after ~3 s), accepts through a
deliberately slow accept loop, on loopback and across a veth pair between two
namespaces the test makes (so the per-interface metrics have a veth as well as
lo). All workload processes share one random task name, the ``$process`` of
the run. Prometheus scrapes every second; then each panel's PromQL, with the
dashboard variables filled in, goes through Prometheus's HTTP API the way
Grafana sends it (range queries over the run, instant ones at its end). A
query that does not parse, returns no series or only NaN, or names a metric
the daemon does not serve fails the test, which lists every such panel.

With SOCKWATCH_RENDER_DIR set, the same answers are drawn into one PNG per
dashboard there (grafana/render.py; needs matplotlib).
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from grafana import build, model
from tests.kernel import daemon_util as du

SECONDS = float(os.environ.get("SOCKWATCH_DASHBOARD_SECONDS", "20"))  # of workload
SHORT = 4  # short ping-pong connections per cycle and client
ROUNDS = 20  # ping-pong rounds each
BULK = 1 << 20  # bytes each way on one connection per cycle and client

# argv: NETNS ("-" for the caller's). Joins the namespace before any socket exists.
JOIN = """
NETNS = sys.argv[2]
if NETNS != "-":
    fd = os.open(f"/run/netns/{NETNS}", os.O_RDONLY)
    if ctypes.CDLL(None, use_errno=True).setns(fd, 0x40000000) != 0:  # CLONE_NEWNET
        raise SystemExit(f"setns {NETNS} failed")
    os.close(fd)
def drain(s, n):
    while n:
        got = len(s.recv(min(n, 1 << 16)))
        if not got:
            raise EOFError(n)
        n -= got
"""

# argv: NETNS HOST. Serves requests (P n: n echoes of 64 bytes; B n: takes n bytes,
# sends n back) on a listener it accepts from slowly; also offers a port that is
# bound but not listening (connects are refused) and a listener whose one-slot
# accept queue it fills and never accepts from (SYNs to it are dropped).
SERVER = JOIN + """
import select, threading
host = sys.argv[3]
ls = socket.create_server((host, 0), backlog=256)
closed = socket.socket()
closed.bind((host, 0))
hole = socket.socket()
hole.bind((host, 0))
hole.listen(0)
filler = socket.create_connection(hole.getsockname())
say(port=ls.getsockname()[1], closed=closed.getsockname()[1], hole=hole.getsockname()[1])

def serve(c):
    with c:
        while True:
            try:
                head = recv_exact(c, 5)
            except (EOFError, OSError):
                return
            n = int.from_bytes(head[1:], "big")
            if head[:1] == b"P":
                for _ in range(n):
                    c.sendall(recv_exact(c, 64))
            else:
                drain(c, n)
                c.sendall(b"b" * n)

while not select.select([sys.stdin], [], [], 0)[0]:
    if select.select([ls], [], [], 0.1)[0]:
        time.sleep(0.005)  # a slow accept loop: connections wait in the accept queue
        c, _ = ls.accept()
        threading.Thread(target=serve, args=(c,), daemon=True).start()
say(done=True)
"""

# argv: NETNS HOST PORT CLOSED HOLE SHORT ROUNDS BULK SECONDS. For SECONDS, in
# cycles: SHORT ping-pong connections, one BULK transfer, one refused connect and
# a ping on a held connection, while a thread keeps connecting to the SYN-dropping
# listener (each attempt times out after ~3 s); then keeps the held connection
# ping-ponging until stdin closes. Counters grow over many scrapes, so rate() sees
# them move (a series' first sample carries no rate).
CLIENT = JOIN + """
import errno, select, threading
host = sys.argv[3]
port, closed, hole, short, rounds, bulk = map(int, sys.argv[4:10])
stop_at = time.monotonic() + float(sys.argv[10])

def ask(s, kind, n):
    s.sendall(kind + n.to_bytes(4, "big"))

def ping(s, n):
    ask(s, b"P", n)
    for _ in range(n):
        s.sendall(b"p" * 64)
        recv_exact(s, 64)

def fail(target, syncnt):
    s = socket.socket()
    if syncnt:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_SYNCNT, syncnt)
    try:
        s.connect((host, target))
        return "connected"
    except OSError as exc:
        return errno.errorcode.get(exc.errno, str(exc))
    finally:
        s.close()

timeouts = []
def time_out():
    while time.monotonic() < stop_at - 3:
        timeouts.append(fail(hole, 1))
t = threading.Thread(target=time_out)
t.start()
held = socket.create_connection((host, port), timeout=10)
refused, cycles = [], 0
while time.monotonic() < stop_at:
    for _ in range(short):
        with socket.create_connection((host, port), timeout=10) as s:
            ping(s, rounds)
    with socket.create_connection((host, port), timeout=30) as s:
        ask(s, b"B", bulk)
        s.sendall(b"B" * bulk)
        drain(s, bulk)
    refused.append(fail(closed, 0))
    ping(held, 5)
    cycles += 1
    time.sleep(0.2)
t.join()
say(refused=sorted(set(refused)), timeout=sorted(set(timeouts)), cycles=cycles,
    timeouts=len(timeouts))
while not select.select([sys.stdin], [], [], 0.2)[0]:
    ping(held, 5)
held.close()
say(done=True)
"""


def start_pair(children: list, name: str, server_ns: str, client_ns: str,
               host: str) -> tuple[Any, Any]:
    server = du.spawn_named(name, SERVER, server_ns, host)
    children.append(server)
    ports = du.read_json_line(server)
    client = du.spawn_named(name, CLIENT, client_ns, host, ports["port"], ports["closed"],
                            ports["hole"], SHORT, ROUNDS, BULK, SECONDS)
    children.append(client)
    return server, client


def served_names(metrics_text: str) -> set[str]:
    """Sample names the daemon serves (``x_bucket``, ``x_total``, ...)."""
    return {s.name for f in text_string_to_metric_families(metrics_text) for s in f.samples}


def wait_for(prom: du.Prometheus, promql: str, at_least: float, timeout: float = 30) -> float:
    deadline = time.monotonic() + timeout
    while True:
        got = sum(float(r["value"][1]) for r in prom.query(promql))
        if got >= at_least or time.monotonic() > deadline:
            return got
        time.sleep(0.5)


def test_every_panel_of_every_dashboard_returns_data(netns_pair, tmp_path: Path,
                                                    record_property) -> None:
    why = du.ensure_prometheus()
    if why:
        pytest.skip(why)
    name = f"swg-{uuid.uuid4().hex[:6]}"
    config = {"metrics": {"top_processes": 10000, "top_ports": 10000, "per_connection": True,
                          "per_connection_limit": 100000},
              "tables": {"reconcile_interval_seconds": 1}}
    d = du.start_daemon(tmp_path, config)
    children: list = []
    prom = None
    try:
        prom = du.start_prometheus(tmp_path / "prom", f"127.0.0.1:{d.port}")
        instance = f"127.0.0.1:{d.port}"
        assert wait_for(prom, f'up{{instance="{instance}"}}', 1) == 1
        start = time.time()
        pairs = [start_pair(children, name, "-", "-", "127.0.0.1"),
                 start_pair(children, name, netns_pair.b, netns_pair.a, netns_pair.addr_b)]
        cycles = 0
        for _, client in pairs:
            got = du.read_json_line(client, timeout=SECONDS + 60)
            assert (got["refused"], got["timeout"]) == (["ECONNREFUSED"], ["ETIMEDOUT"]), got
            cycles += got["cycles"]
        # the held connections keep ping-ponging meanwhile: a few more scrapes of traffic
        time.sleep(3)
        own = f'instance="{instance}", process="{name}"'
        want = cycles * (SHORT + 1)
        ok = wait_for(prom, f'sockwatch_connects_total{{{own}, result="ok"}}', want)
        refused = wait_for(prom, f'sockwatch_connects_total{{{own}, result="refused"}}', cycles)
        timeouts = wait_for(prom, f'sockwatch_connects_total{{{own}, result="timeout"}}', 2)
        assert ok >= want and refused >= cycles and timeouts >= 2, (ok, refused, timeouts)
        end = time.time()
        served = served_names(d.metrics())

        values = {"instance": instance, "process": name, "interface": ".*",
                  "__rate_interval": "10s", "__interval": "1s",
                  "__range": f"{int(end - start) + 1}s"}
        failures: list[str] = []
        passed: dict[str, int] = {}
        answers: dict[str, list[model.Answer]] = {}
        for dash in build.DASHBOARDS:
            doc = build.build(dash)
            answers[dash] = got = model.evaluate(doc, prom.api, values, start, end, 1)
            bad_panels = set()
            for a in got:
                where = f"{dash} / {a.panel['title']} [{a.target['refId']}]"
                missing = sorted(model.metric_names(a.expr) - served)
                if missing:
                    failures.append(f"{where}: not served by the daemon: {', '.join(missing)}")
                elif a.error:
                    failures.append(f"{where}: {a.error}\n    {a.expr}")
                elif not a.has_data:
                    failures.append(f"{where}: no data\n    {a.expr}")
                else:
                    continue
                bad_panels.add(a.panel["id"])
            passed[dash] = len({a.panel["id"] for a in got} - bad_panels)
            for var in model.variables(doc).values():
                if var["type"] == "query":
                    expr = model.substitute(var["query"], values)
                    metric, label = expr[len("label_values("):-1].rsplit(", ", 1)
                    reply = prom.api(f"label/{label}/values",
                                     {"match[]": metric, "start": f"{start:.3f}"})
                    want = values[var["name"]] if var["name"] != "interface" else None
                    if not reply.get("data") or (want and want not in reply["data"]):
                        failures.append(f"{dash}: variable ${var['name']} ({expr}) offers "
                                        f"{reply.get('data')}, not {want or 'any value'}")
        record_property("panels_with_data", passed)
        print(f"\nFIGURES panels with data per dashboard: {passed}")
        if os.environ.get("SOCKWATCH_RENDER_DIR"):
            from grafana import render
            for dash, got in answers.items():
                render.render(build.build(dash), got, values,
                              Path(os.environ["SOCKWATCH_RENDER_DIR"]) / f"{dash}.png")
        assert not failures, f"{len(failures)} queries failed:\n" + "\n".join(failures)
    finally:
        for p in children:
            if p.stdin and not p.stdin.closed:
                p.stdin.close()  # EOF: clients drop their held connection, servers stop
        for p in children:
            du.reap(p)
        if prom is not None:
            prom.stop()
        d.stop()
