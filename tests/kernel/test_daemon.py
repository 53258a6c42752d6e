"""``sockwatch daemon`` as a service: a real daemon subprocess with real probes,
scraped by a real Prometheus during a real loopback workload, flooded, signalled,
misconfigured, and put behind TLS and basic auth; plus what its counters and
labels must hold for Prometheus (counters never decrease; sockets older than
the daemon carry their process name).

Figures worth reporting (latencies, counts) go to ``record_property`` and are
printed as ``FIGURES {...}`` lines (see them with ``-s`` or ``-rA``). The flood
lasts SOCKWATCH_FLOOD_SECONDS (default 15) per flood test.

Other sockwatch runs may share the host: every assertion is filtered by this
test's own pids, ports and process names (names are random per run), and the
daemons get label caps large enough that concurrent tests' processes cannot
fold ours into ``other``.
"""

from __future__ import annotations

import base64
import http.client
import json
import math
import os
import platform
import re
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as om_families
from prometheus_client.parser import text_string_to_metric_families as prom_families

from tests.kernel import daemon_util as du
from tests.kernel.daemon_util import Daemon, ROOT

FLOOD_SECONDS = float(os.environ.get("SOCKWATCH_FLOOD_SECONDS", "15"))
FLOOD_HAMMERS = int(os.environ.get("SOCKWATCH_FLOOD_HAMMERS", "200"))  # over the cap of 32
FLOOD_UNDER = int(os.environ.get("SOCKWATCH_FLOOD_UNDER", "8"))  # well below it
FLOOD_SLOW = int(os.environ.get("SOCKWATCH_FLOOD_SLOW", "100"))
FLOOD_IDLE = int(os.environ.get("SOCKWATCH_FLOOD_IDLE", "200"))

# Process and port label values must not be folded into "other" by the sticky
# caps while other tests fill them with their own short-lived process names.
WIDE_LABELS = {"metrics": {"top_processes": 10000, "top_ports": 10000}}
# Live rows carry the counters of their last record until the next kernel walk
# (tables.reconcile_interval_seconds): walk every second where bytes are checked.
FAST = {"metrics": {"top_processes": 10000, "top_ports": 10000},
        "tables": {"reconcile_interval_seconds": 1}}


def tag() -> str:
    return uuid.uuid4().hex[:6]


def report(record_property: Callable[[str, Any], None], **figures: Any) -> None:
    for k, v in figures.items():
        record_property(k, v)
    print("\nFIGURES " + json.dumps(figures, sort_keys=True))


# --------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------


class Daemons:
    """Starts daemons for one test and stops (and reaps) every one of them."""

    def __init__(self, tmp_path: Path):
        self.tmp_path = tmp_path
        self.started: list[Daemon] = []

    def __call__(self, config: dict | None = None, *args: str, **kw: Any) -> Daemon:
        kw.setdefault("name", f"sockwatch-{len(self.started)}")
        d = du.start_daemon(self.tmp_path, config, *args, **kw)
        self.started.append(d)
        return d

    def spawn(self, config_path: Path, *args: str) -> Daemon:
        d = du.spawn_daemon(config_path, *args)
        self.started.append(d)
        return d

    def stop_all(self) -> None:
        for d in self.started:
            d.stop()


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[Daemons]:
    ds = Daemons(tmp_path)
    try:
        yield ds
    finally:
        ds.stop_all()


class Children:
    """Workload processes of one test, reaped at its end."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def __call__(self, name: str, script: str, *args: Any) -> subprocess.Popen:
        p = du.spawn_named(name, script, *map(str, args))
        self.procs.append(p)
        return p

    def reap_all(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            du.reap(p)


@pytest.fixture
def children() -> Iterator[Children]:
    c = Children()
    try:
        yield c
    finally:
        c.reap_all()


@pytest.fixture(scope="module")
def prometheus_available() -> None:
    why = du.ensure_prometheus()
    if why:
        pytest.skip(why)


def families(text: str) -> dict[str, Any]:
    return {f.name: f for f in prom_families(text)}


def samples(text: str, name: str, **labels: str) -> list[Any]:
    """Samples called ``name`` whose labels include ``labels``."""
    out = []
    for fam in prom_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                out.append(s)
    return out


def wait_until(what: str, check: Callable[[], Any], timeout: float = 20.0,
               every: float = 0.25) -> Any:
    """``check()`` until it returns something truthy; fails naming ``what``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(every)
    pytest.fail(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


# --------------------------------------------------------------------------------------
# Workloads
# --------------------------------------------------------------------------------------

# Accepts N connections; from each reads S bytes, answers R bytes, waits for EOF.
SERVER = """
N, S, R = map(int, sys.argv[2:5])
ls = socket.create_server(("127.0.0.1", 0), backlog=128)
say(port=ls.getsockname()[1], pid=os.getpid())
for i in range(N):
    c, _ = ls.accept()
    recv_exact(c, S)
    c.sendall(b"r" * R)
    assert c.recv(1) == b""  # the client closes first
    c.close()
ls.close()
say(done=N)
"""

# N connections to PORT (S bytes out, R bytes back), then K connects to REFUSED.
CLIENT = """
port, refused_port, N, K, S, R = map(int, sys.argv[2:8])
for i in range(N):
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(b"q" * S)
    recv_exact(s, R)
    s.close()
refused = 0
for i in range(K):
    s = socket.socket()
    try:
        s.connect(("127.0.0.1", refused_port))
    except ConnectionRefusedError:
        refused += 1
    finally:
        s.close()
say(ok=N, refused=refused)
"""

# A steady trickle of loopback connections until stdin closes.
LIGHT = """
import select
ls = socket.create_server(("127.0.0.1", 0))
port = ls.getsockname()[1]
say(port=port)
n = 0
while not select.select([sys.stdin], [], [], 0)[0]:
    c = socket.create_connection(("127.0.0.1", port))
    a, _ = ls.accept()
    c.sendall(b"x" * 100)
    recv_exact(a, 100)
    c.close(); a.close()
    n += 1
    time.sleep(0.02)
say(connections=n)
"""

# For SECONDS: HAMMERS clients each GET /metrics back to back; SLOW connections
# trickle a request line one byte every half second and never finish it; IDLE
# connections send nothing. Slow and idle ones reconnect when the server drops
# them (listen.request_timeout_seconds). Prints what the flood got.
FLOOD = """
import asyncio
port, hammers, slow, idle = map(int, sys.argv[2:6])
seconds = float(sys.argv[6])
counts = {"200": 0, "503": 0, "other": 0, "errors": 0, "slow_connections": 0,
          "idle_connections": 0, "503_without_retry_after": 0}
REQ = b"GET /metrics HTTP/1.1\\r\\nHost: 127.0.0.1\\r\\n\\r\\n"

async def hammer(stop_at):
    while time.monotonic() < stop_at:
        try:
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(REQ)
            await w.drain()
            data = await asyncio.wait_for(r.read(), 30)
            w.close()
            code = data[9:12].decode("latin-1")
            counts[code if code in ("200", "503") else "other"] += 1
            if code == "503" and b"\\r\\nRetry-After: " not in data.partition(b"\\r\\n\\r\\n")[0]:
                counts["503_without_retry_after"] += 1
        except (OSError, asyncio.TimeoutError):
            counts["errors"] += 1
            await asyncio.sleep(0.05)

async def slowpoke(trickle, stop_at):
    while time.monotonic() < stop_at:
        try:
            r, w = await asyncio.open_connection("127.0.0.1", port)
            counts["slow_connections" if trickle else "idle_connections"] += 1
            if trickle:
                for b in b"GET /metrics HTTP/1.1\\r\\nHost: 127.0.0.1\\r\\n":
                    w.write(bytes([b]))
                    await w.drain()
                    await asyncio.sleep(0.5)
                    if time.monotonic() > stop_at:
                        break
            else:
                await asyncio.wait_for(r.read(), max(0.1, stop_at - time.monotonic()))
            w.close()
        except (OSError, asyncio.TimeoutError):
            await asyncio.sleep(0.1)

async def main():
    stop_at = time.monotonic() + seconds
    say(started=True)
    await asyncio.gather(*[hammer(stop_at) for _ in range(hammers)],
                         *[slowpoke(True, stop_at) for _ in range(slow)],
                         *[slowpoke(False, stop_at) for _ in range(idle)])

asyncio.run(main())
say(**counts)
"""


# --------------------------------------------------------------------------------------
# 1. A real Prometheus scrapes a real daemon during a real workload
# --------------------------------------------------------------------------------------


def test_prometheus_scrapes_workload_counts(prometheus_available, daemons, children, tmp_path,
                                            record_property):
    """connects/accepts/bytes per process as PromQL sees them equal what the workload did."""
    d = daemons(WIDE_LABELS)
    prom = du.start_prometheus(tmp_path / "prom", f"127.0.0.1:{d.port}")
    try:
        wait_until("Prometheus to scrape the daemon",
                   lambda: prom.scalar('up{job="sockwatch"}') == 1.0, timeout=30)
        base_est = prom.scalar('sum(sockwatch_state_transitions_total{from="SYN-SENT",to="ESTAB"})')
        base_fail = prom.scalar('sum(sockwatch_state_transitions_total{from="SYN-SENT",to="UNCONN"})') or 0
        assert base_est is not None

        n, k, s_bytes, r_bytes = 25, 7, 3000, 1777
        t = tag()
        srv_name, cli_name = f"swd-s-{t}", f"swd-c-{t}"
        # A bound socket that never listens: connects to its port are refused (RST).
        closed = socket.socket()
        closed.bind(("127.0.0.1", 0))
        try:
            server = children(srv_name, SERVER, n, s_bytes, r_bytes)
            port = du.read_json_line(server)["port"]
            client = children(cli_name, CLIENT, port, closed.getsockname()[1], n, k,
                              s_bytes, r_bytes)
            assert du.read_json_line(client) == {"ok": n, "refused": k}
            assert du.read_json_line(server) == {"done": n}
        finally:
            closed.close()
        assert du.reap(client) == 0 and du.reap(server) == 0

        want = {
            f'sockwatch_connects_total{{process="{cli_name}",result="ok"}}': n,
            f'sockwatch_connects_total{{process="{cli_name}",result="refused"}}': k,
            f'sum(sockwatch_accepts_total{{port="{port}"}})': n,
            f'sockwatch_accepts_total{{process="{srv_name}",port="{port}"}}': n,
            f'sockwatch_sent_bytes_total{{process="{cli_name}"}}': n * s_bytes,
            f'sockwatch_received_bytes_total{{process="{cli_name}"}}': n * r_bytes,
            f'sockwatch_sent_bytes_total{{process="{srv_name}"}}': n * r_bytes,
            f'sockwatch_received_bytes_total{{process="{srv_name}"}}': n * s_bytes,
        }
        got: dict[str, float | None] = {}

        def all_match() -> bool:
            got.update({q: prom.scalar(q) for q in want})
            return all(got[q] == v for q, v in want.items())

        deadline = time.monotonic() + 30
        while not all_match() and time.monotonic() < deadline:
            time.sleep(0.5)
        diff = {q: (got[q], v) for q, v in want.items() if got[q] != v}
        own = "\n".join(line for line in d.metrics().splitlines() if t in line)
        assert not diff, f"PromQL (got, want): {diff}\ndaemon's own lines for {t}:\n{own}"

        est = prom.scalar('sum(sockwatch_state_transitions_total{from="SYN-SENT",to="ESTAB"})')
        fail = prom.scalar('sum(sockwatch_state_transitions_total{from="SYN-SENT",to="UNCONN"})')
        assert est - base_est >= n, (base_est, est)
        assert fail - base_fail >= k, (base_fail, fail)
        quantiles = {}
        for role in ("client", "server"):
            q = prom.scalar(f'histogram_quantile(0.9, sum by (le) '
                            f'(sockwatch_handshake_seconds_bucket{{role="{role}"}}))')
            assert q is not None and math.isfinite(q) and q > 0, (role, q)
            quantiles[role] = q
        lifetimes = prom.scalar('sockwatch_connection_lifetime_seconds_count{role="client"}')
        assert lifetimes is not None and lifetimes >= n
        targets = [t_ for t_ in prom.targets() if t_["labels"]["job"] == "sockwatch"]
        assert targets and targets[0]["health"] == "up", targets
        report(record_property, prometheus_results={**{q: got[q] for q in want},
               "transitions SYN-SENT->ESTAB delta": est - base_est,
               "transitions SYN-SENT->UNCONN delta": fail - base_fail,
               "handshake p90 client s": quantiles["client"],
               "handshake p90 server s": quantiles["server"],
               "lifetime count client": lifetimes})
    finally:
        assert prom.stop() == 0, prom.log_path.read_text()[-2000:]


# Holds M connection pairs (S bytes client to server) until told to close them,
# then closes one pair every 10 ms, then waits to be told to exit.
HOLDER = """
M, S = map(int, sys.argv[2:4])
ls = socket.create_server(("127.0.0.1", 0), backlog=1024)
pairs = []
for i in range(M):
    c = socket.create_connection(ls.getsockname())
    a, _ = ls.accept()
    c.sendall(b"z" * S)
    recv_exact(a, S)
    pairs.append((c, a))
say(ready=True)
sys.stdin.readline()
for c, a in pairs:
    c.close()
    a.close()
    time.sleep(0.01)
say(closed=True)
sys.stdin.readline()
"""


def test_byte_counters_never_go_backwards_when_connections_close(daemons, children,
                                                                 record_property):
    """sent/received_bytes_total{process} must be exact and monotonic across closes.

    Prometheus reads any decrease of a counter as a reset (rate() and increase()
    then count the whole value again). One process holds 200 connections with a
    known payload until the daemon's walk has their bytes, then closes them over
    two seconds while the test scrapes as fast as it can: every scrape must show
    exactly the payload sent, before, during and after the closes.
    """
    d = daemons(FAST)
    m, s_bytes = 200, 5000
    name = f"swd-m-{tag()}"
    holder = children(name, HOLDER, m, s_bytes)
    assert du.read_json_line(holder) == {"ready": True}
    want = m * s_bytes

    def values(text: str) -> tuple[float | None, float | None]:
        sent = samples(text, "sockwatch_sent_bytes_total", process=name)
        recv = samples(text, "sockwatch_received_bytes_total", process=name)
        return (sent[0].value if sent else None, recv[0].value if recv else None)

    wait_until(f"{name}'s live bytes in the counters",
               lambda: values(d.metrics()) == (want, want), timeout=15)
    seen: list[tuple[float, float | None, float | None]] = []
    stop = threading.Event()

    def scrape() -> None:
        t0 = time.monotonic()
        while not stop.is_set():
            seen.append((round(time.monotonic() - t0, 3), *values(d.metrics())))

    scraper = threading.Thread(target=scrape)
    scraper.start()
    try:
        time.sleep(0.3)
        holder.stdin.write("close\n")
        holder.stdin.flush()
        assert du.read_json_line(holder) == {"closed": True}
        after = len(seen)
        deadline = time.monotonic() + 20
        while (len(seen) < after + 5 or time.monotonic() < deadline - 18.5) \
                and time.monotonic() < deadline:
            time.sleep(0.05)  # at least 1.5 s and 5 scrapes after the closes
    finally:
        stop.set()
        scraper.join()
    holder.stdin.write("exit\n")
    holder.stdin.flush()
    assert du.reap(holder) == 0
    wrong = [v for v in seen if v[1:] != (want, want)]
    report(record_property, monotonic={"scrapes": len(seen), "expected": want,
                                       "wrong": wrong[:10]})
    assert len(seen) >= 6
    assert not wrong, (f"{len(wrong)} of {len(seen)} scrapes showed (t, sent, received) "
                       f"other than {want} each: {wrong[:10]}")


PREEXISTING = """
ls = socket.create_server(("127.0.0.1", 0))
c = socket.create_connection(ls.getsockname())
a, _ = ls.accept()
c.sendall(b"p" * 42)
recv_exact(a, 42)
say(port=ls.getsockname()[1])
sys.stdin.readline()
"""


def test_sockets_older_than_the_daemon_are_labelled_with_their_process(daemons, children):
    """A daemon (re)started on a running host must label the sockets it finds at
    start-up with their owner, as it does for new ones: the process label of a
    listener must not read "unknown" (nor change later when someone happens to
    call the JSON API, which resolves owners from /proc)."""
    name = f"swd-p-{tag()}"
    holder = children(name, PREEXISTING)
    port = du.read_json_line(holder)["port"]
    d = daemons(FAST)

    def labels() -> dict[str, str]:
        text = d.metrics()
        listening = samples(text, "sockwatch_listening_sockets", port=str(port))
        return {"listener": listening[0].labels["process"] if listening else "(absent)"}

    time.sleep(2.5)  # more than one walk (tables.reconcile_interval_seconds = 1)
    before_api = labels()
    rows = d.get(f"/api/connections?port={port}", timeout=60).json()
    after_api = labels()
    holder.stdin.write("exit\n")
    holder.stdin.flush()
    assert du.reap(holder) == 0
    assert {r["process"] for r in rows} == {name}, rows  # the API knows the owner
    assert before_api == {"listener": name}, (
        f"/metrics labels before any API call: {before_api}; after one: {after_api}")
    # The ready line says where the start went; its walk read these sockets too.
    split = re.search(r"ready in \d+ ms \(waited \d+ ms for the probes; owners \d+ ms; "
                      r"walk \d+ ms, sockets read (\d+)\)", d.log())
    assert split and int(split.group(1)) >= len(rows) > 0, d.log()


# --------------------------------------------------------------------------------------
# 2. The exposition is clean: promtool and an OpenMetrics parser
# --------------------------------------------------------------------------------------


def test_promtool_and_openmetrics_accept_the_exposition(prometheus_available, daemons):
    d = daemons({"metrics": {**WIDE_LABELS["metrics"], "per_connection": True}})
    # Some traffic of our own so every family (histograms, per-connection) has samples.
    srv = socket.create_server(("127.0.0.1", 0))
    held = []
    try:
        for _ in range(3):
            c = socket.create_connection(srv.getsockname())
            a, _ = srv.accept()
            c.sendall(b"ping")
            a.recv(4)
            held.append((c, a))
        held.pop()[0].close()  # one ended connection for the lifetime histogram
        wait_until("per-connection series",
                   lambda: samples(d.metrics(), "sockwatch_connection_sent_bytes"))
        text = d.get("/metrics")
        assert text.status == 200
        assert text.headers["content-type"].startswith("text/plain; version=")
        lint = subprocess.run([du.PROMTOOL, "check", "metrics"], input=text.body,
                              capture_output=True, timeout=30)
        assert lint.returncode == 0 and not lint.stdout.strip() and not lint.stderr.strip(), (
            lint.returncode, lint.stdout.decode(), lint.stderr.decode())
        fams = families(text.text)
        for name, kind in (("sockwatch_connects", "counter"), ("sockwatch_handshake_seconds",
                                                               "histogram"),
                           ("sockwatch_connection_lifetime_seconds", "histogram"),
                           ("sockwatch_build_info", "gauge"), ("sockwatch_lost_events", "counter")):
            assert fams[name].type == kind, (name, fams.get(name))

        om = d.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
        assert om.status == 200
        assert om.headers["content-type"].startswith("application/openmetrics-text")
        assert om.text.endswith("# EOF\n")
        om_fams = {f.name: f for f in om_families(om.text)}  # raises on any syntax error
        assert om_fams["sockwatch_connects"].type == "counter"
        assert om_fams["sockwatch_handshake_seconds"].type == "histogram"
        hs = [s for s in om_fams["sockwatch_handshake_seconds"].samples
              if s.name.endswith("_count")]
        assert hs and all(s.value >= 1 for s in hs), hs
        assert om_fams["sockwatch_connection_sent_bytes"].samples
    finally:
        for c, a in held:
            c.close()
            a.close()
        srv.close()


# --------------------------------------------------------------------------------------
# 3. Bad configs and flags: exit 2, one line naming the key, no BPF touched
# --------------------------------------------------------------------------------------

BPF_SYSCALL = {"x86_64": 321, "aarch64": 280}.get(platform.machine())


def traced(args: list[str], tmp_path: Path, timeout: float = 60) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run under ``strace -f -e trace=bpf``: the process and the bpf() calls it (or
    any child) made. No bpf() call at all is the sound proof that nothing was
    loaded: every program, map or link load goes through that one syscall."""
    out = tmp_path / f"strace-{uuid.uuid4().hex[:8]}.txt"
    proc = subprocess.run(["strace", "-f", "-qq", "-e", "trace=bpf", "-o", str(out), *args],
                          cwd=ROOT, env=du.daemon_env(), capture_output=True, text=True,
                          timeout=timeout)
    calls = [line for line in out.read_text().splitlines() if "bpf(" in line]
    return proc, calls


@pytest.fixture(scope="module")
def strace_works(tmp_path_factory) -> None:
    """The method's control: strace does see a bpf() call made from Python."""
    if not shutil.which("strace"):
        pytest.skip("strace is not installed (apt-get install strace)")
    if BPF_SYSCALL is None:
        pytest.skip(f"bpf syscall number unknown on {platform.machine()}")
    proc, calls = traced([sys.executable, "-c", "import ctypes; "
                          f"ctypes.CDLL(None).syscall({BPF_SYSCALL}, 0, 0, 0)"],
                         tmp_path_factory.mktemp("strace"))
    assert proc.returncode == 0, proc.stderr
    assert calls and "BPF_MAP_CREATE" in calls[0], calls


BAD_CONFIGS: list[tuple[str, str, list[str], list[str]]] = [
    # id, config file text (None: no --config), extra flags, needles for the one line
    ("unknown-section", "[bogus]\nx = 1\n", [], ["[bogus]"]),
    ("unknown-key", "[listen]\nmax_request = 3\n", [], ["listen.max_request"]),
    ("section-not-table", "listen = 5\n", [], ["listen"]),
    ("wrong-type-str", '[listen]\nmax_requests = "32"\n', [], ["listen.max_requests", "int"]),
    ("bool-for-int", "[tables]\nclosed_capacity = true\n", [], ["tables.closed_capacity"]),
    ("int-for-bool", "[metrics]\nper_connection = 1\n", [], ["metrics.per_connection", "bool"]),
    ("below-range", "[listen]\nmax_requests = 0\n", [], ["listen.max_requests", "between"]),
    ("above-range", "[tables]\npoll_interval_seconds = 11\n", [],
     ["tables.poll_interval_seconds", "between"]),
    ("bad-choice", '[probes]\nattach = "magic"\n', [], ["probes.attach", "magic"]),
    ("listen-not-ip", '[listen]\naddress = "localhost:9873"\n', [], ["listen.address"]),
    ("listen-bad-port", '[listen]\naddress = "127.0.0.1:70000"\n', [], ["listen.address"]),
    ("ringbuf-not-pow2", "[probes]\nringbuf_bytes = 5000\n", [],
     ["probes.ringbuf_bytes", "power of two"]),
    ("tls-missing-file", '[web.tls_server_config]\ncert_file = "/nonexistent/c.pem"\n'
     'key_file = "/nonexistent/k.pem"\n', [], ["web.tls_server_config.cert_file"]),
    ("tls-half", '[web.tls_server_config]\ncert_file = "GOOD_CERT"\n', [],
     ["web.tls_server_config", "key_file"]),
    ("tls-unknown-key", '[web.tls_server_config]\ncert_file = "GOOD_CERT"\nkey_file = "GOOD_KEY"\n'
     'ca_file = "GOOD_CERT"\n', [], ["web.tls_server_config.ca_file"]),
    ("auth-not-bcrypt", '[web.basic_auth_users]\nprometheus = "hunter2"\n', [],
     ["web.basic_auth_users.prometheus", "bcrypt"]),
    ("invalid-toml", "[listen\naddress = \n", [], ["not valid TOML", "line"]),
    ("missing-config-file", None, ["--config", "/nonexistent/sockwatch.toml"],
     ["/nonexistent/sockwatch.toml", "no such config file"]),
    ("flag-listen-garbage", "", ["--listen", "nonsense"], ["listen.address", "nonsense"]),
    ("flag-listen-port-zero", "", ["--listen", "127.0.0.1:0"], ["listen.address"]),
    ("flag-attach-choice", "", ["--attach", "warp"], ["--attach", "warp"]),
    ("flag-unknown", "", ["--frobnicate"], ["--frobnicate"]),
    ("flag-log-level", "", ["--log-level", "loud"], ["--log-level", "loud"]),
    ("flag-config-no-value", None, ["--config"], ["--config"]),
]


@pytest.mark.parametrize("case", BAD_CONFIGS, ids=[c[0] for c in BAD_CONFIGS])
def test_bad_config_exits_2_in_one_line_before_any_bpf(case, strace_works, tmp_path):
    _id, text, flags, needles = case
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_text("not checked until load\n")
    key.write_text("not checked until load\n")
    args = list(flags)
    if text is not None:
        path = tmp_path / "bad.toml"
        path.write_text(text.replace("GOOD_CERT", str(cert)).replace("GOOD_KEY", str(key)))
        args = ["--config", str(path), *args]
    proc, calls = traced(du.sockwatch_cmd("daemon", *args), tmp_path)
    what = f"exit {proc.returncode}, stderr {proc.stderr!r}"
    assert proc.returncode == 2, what
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("sockwatch:"), what
    assert "Traceback" not in proc.stderr, what
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    assert proc.stdout == "", proc.stdout
    assert calls == [], f"bpf() was called before the config was rejected: {calls[:3]}"


def test_check_config_accepts_a_valid_config_and_loads_nothing(strace_works, tmp_path):
    path = tmp_path / "ok.toml"
    bcrypt = pytest.importorskip("bcrypt")
    hashed = bcrypt.hashpw(b"pw", bcrypt.gensalt(rounds=4)).decode()
    path.write_text((ROOT / "systemd" / "sockwatch.toml").read_text()
                    + f'\n[web.basic_auth_users]\nprom = "{hashed}"\n')
    proc, calls = traced(du.sockwatch_cmd("daemon", "--config", str(path), "--check-config",
                                          "--listen", "127.0.0.1:19999"), tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "config OK" in proc.stdout and str(path) in proc.stdout, proc.stdout
    assert proc.stderr == ""
    assert calls == [], f"--check-config called bpf(): {calls[:3]}"


# --------------------------------------------------------------------------------------
# 4. Scrape flood
# --------------------------------------------------------------------------------------


def lost_records(d: Daemon) -> dict[str, float]:
    return {s.labels["source"]: s.value
            for s in samples(d.metrics(), "sockwatch_lost_events_total")}


def run_flood(daemons: Daemons, children: Children, hammers: int, slow: int,
              idle: int) -> dict[str, Any]:
    """A daemon (max_requests 32, the default) under a flood, with a light
    connection workload going, scraped once a second by a "normal" scraper.

    A second, unflooded daemon runs alongside as a control: both see the same
    kernel events, so if the control also lost records the host produced more
    than any daemon could take (other test runs), and the loss check says
    nothing about the flood.
    """
    d = daemons(WIDE_LABELS)
    control = daemons(WIDE_LABELS, name="control")
    light = children(f"swd-l-{tag()}", LIGHT)
    du.read_json_line(light)
    flood = children(f"swd-f-{tag()}", FLOOD, d.port, hammers, slow, idle, FLOOD_SECONDS)
    assert du.read_json_line(flood) == {"started": True}
    normal: list[tuple[int, float]] = []  # (status, seconds); status 0: no answer in 10 s
    baseline: list[float] = []  # the same scrape of the unflooded control
    t_end = time.monotonic() + FLOOD_SECONDS

    def every_second(scrape: Callable[[], None]) -> None:
        next_at = time.monotonic() + 0.5
        while next_at < t_end - 0.5:
            time.sleep(max(0.0, next_at - time.monotonic()))
            next_at += 1.0
            scrape()

    def scrape_flooded() -> None:
        t0 = time.perf_counter()
        try:
            r = d.get("/metrics", timeout=10)
            ok = r.status != 200 or b"sockwatch_build_info" in r.body
            normal.append((r.status if ok else -1, r.seconds))
        except OSError:
            normal.append((0, time.perf_counter() - t0))

    def scrape_control() -> None:
        try:
            baseline.append(control.get("/metrics", timeout=10).seconds)
        except OSError:
            baseline.append(10.0)

    baseline_thread = threading.Thread(target=every_second, args=(scrape_control,))
    baseline_thread.start()
    try:
        every_second(scrape_flooded)
    finally:
        baseline_thread.join()
    got = du.read_json_line(flood, timeout=60)
    assert du.reap(flood) == 0
    light.stdin.close()
    light_n = du.read_json_line(light)["connections"]
    assert du.reap(light) == 0

    latencies = sorted(t for _, t in normal)
    ok_latencies = sorted(t for st, t in normal if st == 200)
    p99 = latencies[max(0, math.ceil(0.99 * len(latencies)) - 1)] if latencies else None
    figures = {
        "flood_seconds": FLOOD_SECONDS, "hammers": hammers, "slow": slow, "idle": idle,
        "max_requests": 32, "normal_scrapes": len(normal),
        "normal_200": sum(st == 200 for st, _ in normal),
        "normal_503": sum(st == 503 for st, _ in normal),
        "normal_200_over_1s": sum(st == 200 and t > 1.0 for st, t in normal),
        "normal_max_s": round(latencies[-1], 4) if latencies else None,
        "normal_p99_s": round(p99, 4) if p99 is not None else None,
        "normal_median_s": round(statistics.median(latencies), 4) if latencies else None,
        "normal_200_max_s": round(ok_latencies[-1], 4) if ok_latencies else None,
        "flood_200": got["200"], "flood_503": got["503"], "flood_other": got["other"],
        "flood_errors": got["errors"], "slow_connections": got["slow_connections"],
        "flood_503_without_retry_after": got["503_without_retry_after"],
        "idle_connections": got["idle_connections"], "light_connections": light_n,
        "control_scrape_median_s": round(statistics.median(baseline), 4) if baseline else None,
        "control_scrape_max_s": round(max(baseline), 4) if baseline else None,
        "live_sockets": samples(d.metrics(), "sockwatch_table_entries")[0].value,
        "lost": lost_records(d), "control_lost": lost_records(control),
    }
    figures["normal"] = normal
    figures["healthz_after"] = d.get("/healthz").status if d.proc.poll() is None else None
    return figures


def assert_flood_ran(fig: dict[str, Any]) -> None:
    """The flood and the normal scraper really ran, and the daemon survived."""
    assert fig["healthz_after"] == 200, fig
    assert len(fig["normal"]) >= FLOOD_SECONDS - 2, fig  # one scrape a second throughout
    assert fig["flood_200"] > 0 and fig["slow_connections"] >= fig["slow"], fig
    assert fig["idle_connections"] >= fig["idle"] and fig["light_connections"] > 0, fig


def skip_if_host_overloaded(figures: dict[str, Any]) -> None:
    """The unflooded control tells whether the host itself, not the flood, was the
    problem: if it lost records (other runs made more connections than a daemon
    can drain) or a lone scrape of it took over half a second (no CPU to spare),
    the flooded daemon's figures say nothing about the flood."""
    control = figures["control_lost"]
    if any(control.values()):
        pytest.skip(f"inconclusive: the unflooded control daemon lost records too ({control}): "
                    f"other processes made more connections than a daemon can drain; {figures}")
    if figures["control_scrape_max_s"] > 0.5:
        pytest.skip(f"inconclusive: a lone scrape of the unflooded control took "
                    f"{figures['control_scrape_max_s']} s: the host has no CPU to spare; {figures}")


def assert_nothing_lost(figures: dict[str, Any]) -> None:
    """Nothing lost by the daemon itself, and what the kernel dropped is counted.

    On this kernel (6.15+, the resilient ring buffer lock) a reservation fails when
    a softirq nests into another on the same CPU; each such record is counted
    under ringbuf_full, and happens a few times per ten thousand connections
    under this flood (which itself makes thousands of traced connections). That
    is allowed here only while it stays below one record in two thousand traced.
    """
    lost = figures["lost"]
    assert set(lost) >= {"ringbuf_full", "socks_map_full", "decode", "table_full"}, lost
    nested = lost.pop("ringbuf_full")
    assert all(v == 0 for v in lost.values()), f"records lost under the flood: {figures}"
    traced = 4 * (figures["flood_200"] + figures["flood_503"] + figures["light_connections"])
    assert nested * 2000 <= traced, f"ring buffer reservations failed: {figures}"


def test_scrape_flood_below_the_cap_normal_scrapes_get_200_within_1s(daemons, children,
                                                                      record_property):
    """The requirement: under a flood, a normal scrape still gets its 200 within 1 s.

    The in-flight cap (listen.max_requests, 32) is global and every client here
    comes from 127.0.0.1, so the server cannot tell the normal scraper from a
    flood client: once more than 32 requests are in flight, anyone's request may
    get 503 (the next test measures that). Each admitted /metrics is rendered on
    its own, so a normal scrape also waits behind every admitted request ahead of
    it: its latency is about (hammering clients + 1) x one render, and a render
    takes 5-50 ms on this 2-vCPU host depending on what else runs. The flood
    here is therefore SOCKWATCH_FLOOD_UNDER (default 8) clients GETting /metrics
    back to back, plus SOCKWATCH_FLOOD_SLOW (100) trickling and
    SOCKWATCH_FLOOD_IDLE (200) silent connections that hold sockets without
    holding request slots: ~300 concurrent clients. Also: no kernel record may be
    lost (the flood's own connections are traced as well)."""
    fig = run_flood(daemons, children, FLOOD_UNDER, FLOOD_SLOW, FLOOD_IDLE)
    report(record_property, flood_below_cap={k: v for k, v in fig.items() if k != "normal"})
    assert_flood_ran(fig)
    skip_if_host_overloaded(fig)
    bad = [(st, round(t, 3)) for st, t in fig["normal"] if st != 200 or t > 1.0]
    assert not bad, f"normal scrapes not a 200 within 1 s: {bad}; {fig}"
    assert_nothing_lost(fig)


def test_scrape_flood_over_the_cap_is_shed_not_queued(daemons, children, record_property):
    """Hundreds of clients hammering /metrics (SOCKWATCH_FLOOD_HAMMERS, default
    200) plus slow connections. What the product promises here: the excess is
    shed with 503 + Retry-After instead of queueing, every request of the normal
    scraper is answered (no timeout, no reset), the daemon stays healthy, and no
    kernel record is lost. How many normal scrapes got 503, and how long the
    answers took, is reported rather than asserted: with more hammering clients
    than the cap, a normal scraper cannot be told apart from them."""
    fig = run_flood(daemons, children, FLOOD_HAMMERS, FLOOD_SLOW, 0)
    report(record_property, flood_over_cap={k: v for k, v in fig.items() if k != "normal"})
    assert_flood_ran(fig)
    skip_if_host_overloaded(fig)
    assert fig["flood_503"] > 0, f"the cap of 32 in-flight requests never applied: {fig}"
    assert fig["flood_other"] == 0 and fig["flood_errors"] == 0, fig
    unanswered = [(st, round(t, 3)) for st, t in fig["normal"] if st not in (200, 503)]
    assert not unanswered, f"normal requests not answered: {unanswered}; {fig}"
    assert fig["flood_503_without_retry_after"] == 0, fig
    assert_nothing_lost(fig)


# --------------------------------------------------------------------------------------
# 5. Signals
# --------------------------------------------------------------------------------------

PROGRAM_NAMES = {"set_state_btf", "send_btf", "recv_btf", "dump_tcp"}


def _held_programs(d: Daemon) -> set[int]:
    ids = d.prog_ids()
    names = {p["name"] for p in du.loaded_programs() if p["id"] in ids}
    assert ids and names & PROGRAM_NAMES, (ids, names)
    return ids


def test_sigterm_exits_0_and_detaches_every_program(daemons):
    d = daemons()
    ids = _held_programs(d)
    assert d.get("/healthz").status == 200
    t0 = time.monotonic()
    d.signal(signal.SIGTERM)
    rc = d.wait(5)
    took = time.monotonic() - t0
    assert rc == 0, f"exit {rc} after {took:.1f}s:\n{d.log()}"
    assert "probes detached" in d.log()
    assert "Traceback" not in d.log()
    assert du.wait_programs_gone(d.pid, ids) == []
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", d.port), timeout=2).close()


def _counters(text: str) -> dict[tuple, float]:
    """Every counter sample (``*_total``) of a scrape, keyed by name and labels."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in prom_families(text) if fam.type == "counter"
            for s in fam.samples if s.name.endswith("_total")}


def test_sigkill_leaves_no_program_behind_and_a_restart_is_right_within_seconds(daemons):
    """Crash and restart: after kill -9 nothing stays attached; the next daemon serves
    the test's own connection, owner and fd included, within seconds; counters never
    go backwards within a run and sockwatch_start_time_seconds tells runs apart (so
    PromQL's rate()/increase() handle the reset)."""
    d = daemons(FAST)
    first = d.metrics()
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]
    c = socket.create_connection(("127.0.0.1", port))
    a, _ = srv.accept()  # held across the restart: the data that must come back
    try:
        for _ in range(20):  # traffic between two scrapes of the same run
            socket.create_connection(("127.0.0.1", port)).close()
            srv.accept()[0].close()
        time.sleep(1.5)
        second = d.metrics()
        before, after = _counters(first), _counters(second)
        went_back = {k: (v, after[k]) for k, v in before.items() if k in after and after[k] < v}
        assert not went_back, went_back
        assert len(before) > 10
        started = samples(second, "sockwatch_start_time_seconds")[0].value
        assert abs(started - time.time()) < 120

        ids = _held_programs(d)
        d.signal(signal.SIGKILL)
        assert d.wait(5) == -signal.SIGKILL
        assert du.wait_programs_gone(d.pid, ids) == []

        t0 = time.monotonic()
        d2 = daemons(FAST)
        me = os.getpid()

        def right() -> dict | None:
            rows = d2.get(f"/api/connections?pid={me}&port={port}", timeout=10).json()
            mine = {(r["local_port"], r["remote_port"]): r for r in rows}
            row = mine.get((c.getsockname()[1], port))
            return row if row and (row["pid"], row["fd"]) == (me, c.fileno()) else None

        row = wait_until("the test's connection served by the restarted daemon", right,
                         timeout=10, every=0.05)
        took = time.monotonic() - t0
        print(f"\nFIGURES restart to correct data: {took:.2f} s")
        assert row["state"] == "ESTAB" and took < 5, (row, took)
        assert samples(d2.metrics(), "sockwatch_start_time_seconds")[0].value > started
    finally:
        for s in (c, a, srv):
            s.close()


def test_sighup_reload_bad_config_kept_good_config_applied(daemons):
    d = daemons(FAST)
    srv = socket.create_server(("127.0.0.1", 0))
    c = socket.create_connection(srv.getsockname())
    a, _ = srv.accept()
    try:
        c.sendall(b"hello")
        a.recv(5)
        mine = {"pid": str(os.getpid()), "local": f"127.0.0.1:{c.getsockname()[1]}"}
        assert not samples(d.metrics(), "sockwatch_connection_sent_bytes")
        listen = f'[listen]\naddress = "127.0.0.1:{d.port}"\n'

        # Invalid: an unknown key next to the change; nothing of it may apply.
        d.config_path.write_text(listen + "bogus_key = 1\n[metrics]\nper_connection = true\n")
        mark = d.log_mark()
        d.signal(signal.SIGHUP)
        m = d.wait_log(r"ERROR .*config reload failed.*listen\.bogus_key", 10, start=mark)
        assert m, d.log()
        assert d.proc.poll() is None
        assert d.get("/healthz").status == 200
        time.sleep(0.3)
        assert not samples(d.metrics(), "sockwatch_connection_sent_bytes")

        # Valid: per-connection series appear, capped at the new per_connection_limit.
        limit = 3000
        d.config_path.write_text(listen + "[metrics]\nper_connection = true\n"
                                 f"per_connection_limit = {limit}\n"
                                 "top_processes = 10000\ntop_ports = 10000\n"
                                 "[tables]\nreconcile_interval_seconds = 1\n")
        mark = d.log_mark()
        d.signal(signal.SIGHUP)
        assert d.wait_log(r"config reloaded from " + re.escape(str(d.config_path)), 10,
                          start=mark), d.log()

        def mine_with_bytes() -> list | None:
            text = d.metrics()
            series = samples(text, "sockwatch_connection_sent_bytes")
            live = samples(text, "sockwatch_table_entries", table="connections")[0].value
            assert len(series) == min(live, limit), (len(series), live)  # one consistent read
            if live > limit:
                return None  # the newest rows (ours) are past the cap on a busy host
            return [s for s in series if all(s.labels[k] == v for k, v in mine.items())
                    and s.value == 5]

        def check() -> list | str:
            rows = mine_with_bytes()
            return "past the cap" if rows is None else rows

        rows = wait_until("per-connection series of this test's socket, 5 bytes sent", check,
                          timeout=10)
        if rows != "past the cap":
            assert rows[0].labels["state"] == "ESTAB" and rows[0].labels["remote"] == \
                f"127.0.0.1:{srv.getsockname()[1]}", rows
        assert d.proc.poll() is None and d.get("/healthz").status == 200
        assert d.stop() == 0
    finally:
        for s in (c, a, srv):
            s.close()


# --------------------------------------------------------------------------------------
# 6. TLS and basic auth
# --------------------------------------------------------------------------------------


def test_tls_and_basic_auth(daemons, tmp_path):
    if not shutil.which("openssl"):
        pytest.skip("openssl is not installed (apt-get install openssl)")
    bcrypt = pytest.importorskip("bcrypt")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    password = "s3cret-" + tag()
    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=6)).decode()
    ctx = ssl.create_default_context(cafile=str(cert))
    d = daemons({"web": {"tls_server_config": {"cert_file": str(cert), "key_file": str(key)},
                         "basic_auth_users": {"prometheus": hashed}}}, tls=ctx)
    assert d.scheme == "https"

    def basic(user: str, pw: str) -> dict[str, str]:
        return {"Authorization": "Basic " + base64.b64encode(f"{user}:{pw}".encode()).decode()}

    none = d.get("/metrics")
    assert none.status == 401 and none.headers.get("www-authenticate", "").startswith("Basic")
    assert d.get("/metrics", headers=basic("prometheus", password + "x")).status == 401
    assert d.get("/metrics", headers=basic("grafana", password)).status == 401
    assert d.get("/api/connections").status == 401
    ok = d.get("/metrics", headers=basic("prometheus", password))
    assert ok.status == 200 and b"sockwatch_build_info" in ok.body
    assert d.get("/healthz", headers=basic("prometheus", password)).status == 200
    # Verification is real: a client that does not trust the cert cannot connect.
    with pytest.raises(ssl.SSLError):
        d.get("/metrics", tls=ssl.create_default_context())
    # And there is no plaintext side door.
    try:
        plain: du.Reply | None = du.http_get("127.0.0.1", d.port, "/metrics", timeout=3)
    except (OSError, http.client.HTTPException):
        plain = None  # the TLS server could not make sense of plaintext: right
    assert plain is None or plain.status != 200, plain


# --------------------------------------------------------------------------------------
# 7. The JSON API and the CLI reading it
# --------------------------------------------------------------------------------------


def test_api_and_table_url_show_the_tests_own_connection(daemons):
    d = daemons(FAST)
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]
    c = socket.create_connection(("127.0.0.1", port))
    a, _ = srv.accept()
    try:
        c.sendall(b"x" * 10)
        assert a.recv(10) == b"x" * 10  # first use: the accepted socket is attributed
        a.sendall(b"y" * 3)
        assert c.recv(3) == b"y" * 3
        me, cport = os.getpid(), c.getsockname()[1]
        expect = {  # (local port, remote port) -> (role, fd)
            (cport, port): ("client", c.fileno()),
            (port, cport): ("server", a.fileno()),
            (port, 0): ("listener", srv.fileno()),
        }

        def mine(rows: list[dict]) -> dict:
            return {(r["local_port"], r["remote_port"]): r for r in rows
                    if (r["local_port"], r["remote_port"]) in expect}

        def api_rows() -> dict:
            r = d.get(f"/api/connections?pid={me}&port={port}", timeout=60)
            assert r.status == 200 and r.headers["content-type"] == "application/json"
            got = mine(r.json())
            complete = len(got) == 3 and all(g["fd"] is not None for g in got.values())
            fresh = complete and got[(cport, port)]["bytes_sent"] == 10 \
                and got[(port, cport)]["bytes_sent"] == 3
            return got if fresh else {}

        rows = wait_until("the test's three sockets in /api/connections", api_rows, timeout=10)
        for key, (role, fd) in expect.items():
            r = rows[key]
            assert (r["pid"], r["fd"], r["role"]) == (me, fd, role), r
        assert rows[(cport, port)]["state"] == "ESTAB"
        assert rows[(cport, port)]["bytes_sent"] == 10
        assert rows[(port, cport)]["bytes_sent"] == 3
        procs = {p["pid"]: p for p in d.get("/api/processes", timeout=60).json()}
        assert procs[me]["states"].get("ESTAB", 0) >= 2 and procs[me]["states"].get("LISTEN", 0) >= 1

        cli = subprocess.run(du.sockwatch_cmd("table", "--url", d.url, "--json", "--pid", str(me),
                                              "--port", str(port)),
                             cwd=ROOT, env=du.daemon_env(), capture_output=True, text=True,
                             timeout=30)
        assert cli.returncode == 0, cli.stderr
        table = mine(json.loads(cli.stdout))
        assert set(table) == set(expect), cli.stdout
        for key, (role, fd) in expect.items():
            assert (table[key]["pid"], table[key]["fd"], table[key]["role"]) == (me, fd, role)
    finally:
        for s in (c, a, srv):
            s.close()


def test_trace_url_streams_the_tests_connection_events(daemons):
    d = daemons(WIDE_LABELS)
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]
    trace = subprocess.Popen(du.sockwatch_cmd("trace", "--url", d.url, "--json", "--count", "2",
                                              "--port", str(port)),
                             cwd=ROOT, env=du.daemon_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    made: list[int] = []
    try:
        deadline = time.monotonic() + 20
        while trace.poll() is None and time.monotonic() < deadline:
            # trace starts "from now": keep making connections until it has two events
            c = socket.create_connection(("127.0.0.1", port))
            a, _ = srv.accept()
            c.sendall(b"hi")
            a.recv(2)
            made.append(c.getsockname()[1])
            c.close()
            a.close()
            time.sleep(0.3)
        out, err = trace.communicate(timeout=10)
    finally:
        if trace.poll() is None:
            trace.kill()
            trace.communicate()
        srv.close()
    assert trace.returncode == 0, err
    events = [json.loads(line) for line in out.splitlines()]
    assert len(events) == 2, out
    for e in events:
        assert port in (e["local_port"], e["remote_port"]), e
        assert e["pid"] == os.getpid(), e
        # The test's own listener announces itself too (listen, unlisten): its
        # listen record may reach the daemon after trace took "now".
        if e["event"] in {"listen", "unlisten"}:
            assert (e["local_port"], e["remote_port"]) == (port, 0), e
        else:
            assert e["event"] in {"connect", "accept", "close"}, e
            assert {e["local_port"], e["remote_port"]} - {port} <= set(made), (e, made)


# --------------------------------------------------------------------------------------
# 8. Start to first good scrape
# --------------------------------------------------------------------------------------


def test_start_to_first_good_scrape(daemons, tmp_path, record_property):
    port = du.free_port()
    path = tmp_path / "fast.toml"
    path.write_text(du.to_toml({"listen": {"address": f"127.0.0.1:{port}"}}))
    d = daemons.spawn(path)
    d.port = port
    deadline = d.spawned_at + 15
    first = None
    while time.monotonic() < deadline and d.proc.poll() is None:
        try:
            r = d.get("/metrics", timeout=2)
            if r.status == 200 and b"sockwatch_build_info" in r.body:
                first = time.monotonic() - d.spawned_at
                break
        except OSError:
            pass  # not listening yet
        time.sleep(0.01)
    assert first is not None, f"no good scrape in 15 s:\n{d.log()}"
    ready = d.wait_log(du.READY_RE.pattern, 5)
    report(record_property, start_to_first_scrape_s=round(first, 3),
           logged_ready_ms=int(ready.group(3)) if ready else None)
    assert first < 5.0
