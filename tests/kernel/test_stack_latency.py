"""Per-layer stack latency (stack.bpf.o) against delays the test injects itself.

Every flow runs between two network namespaces joined by a veth pair that the
test makes (netns_pair), between child processes, so the histograms of those
namespaces' interfaces hold only this test's traffic, whatever else runs on
the host. Histograms are read through the Probes API (the kernel layout: slot
k counts values <= 2**k microseconds); per-socket summaries come from the
iter/tcp snapshot of the server's namespace while the socket is still open.
The qdisc, driver and rx tcp layers time one packet in eight (each counts
eight times); the tcp and socket layers and the per-socket summaries follow
one sampled byte per socket, so a reader's every read is measured.
"""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import socket
import statistics
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

from sockwatch import records
from sockwatch.kernel.loader import UNAVAILABLE, LoaderConfig, Probes, default_objects_dir, load

PORT = 5201
DEADLINE_S = 15.0


@pytest.fixture
def probes() -> Iterator[Probes]:
    p = load(LoaderConfig())
    try:
        assert p.stack_enabled, [h for h in p.plan.hooks if h.stack]
        yield p
    finally:
        p.close()


# --------------------------------------------------------------------------------------
# Namespaces, children, histograms
# --------------------------------------------------------------------------------------

def netns_inode(ns: str) -> int:
    return os.stat(f"/run/netns/{ns}").st_ino


def ifindex(ns: str, dev: str) -> int:
    out = subprocess.run(["ip", "-n", ns, "-j", "link", "show", "dev", dev],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out)[0]["ifindex"]


def sysfs_stats(ns: str, dev: str) -> dict[str, int]:
    """The driver's own counters, read inside the interface's namespace."""
    names = ("rx_packets", "rx_bytes", "tx_packets", "tx_bytes", "tx_dropped")
    out = subprocess.run(
        ["ip", "netns", "exec", ns, "cat",
         *(f"/sys/class/net/{dev}/statistics/{n}" for n in names)],
        check=True, capture_output=True, text=True).stdout.split()
    return dict(zip(names, map(int, out)))


class Child:
    """A Python snippet in a namespace: JSON lines out, one-word commands in."""

    def __init__(self, ns: str, script: str, *args: str):
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-c", textwrap.dedent(script), *args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def expect(self, event: str, timeout: float = DEADLINE_S) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], deadline - time.monotonic())
            line = self.proc.stdout.readline() if ready else ""
            if not line:
                break
            msg = json.loads(line)
            if msg["event"] == event:
                return msg
        self.proc.kill()
        _, err = self.proc.communicate()
        pytest.fail(f"no {event!r} from child: {err.strip()[-800:]}")

    def send(self, word: str) -> None:
        self.proc.stdin.write(word + "\n")
        self.proc.stdin.flush()

    def finish(self) -> None:
        try:
            _, err = self.proc.communicate(timeout=DEADLINE_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()
            pytest.fail("child did not exit")
        assert self.proc.returncode == 0, err


@pytest.fixture
def children() -> Iterator[list[Child]]:
    made: list[Child] = []
    yield made
    for c in made:
        if c.proc.poll() is None:
            c.proc.kill()
            c.proc.communicate()


PRELUDE = r'''
import json, os, select, socket, sys, time
def report(event, **kw):
    kw.update(event=event)
    print(json.dumps(kw), flush=True)
'''

# argv: port seconds. Accepts one connection and reads until EOF.
SINK = PRELUDE + r'''
lst = socket.create_server(("0.0.0.0", int(sys.argv[1])))
report("ready")
c, _ = lst.accept()
total = 0
while chunk := c.recv(1 << 16):
    total += len(chunk)
report("done", received=total)
'''

# argv: host port seconds. Writes 64 KiB chunks for that long, then closes.
SOURCE = PRELUDE + r'''
s = socket.create_connection((sys.argv[1], int(sys.argv[2])))
end, total, buf = time.monotonic() + float(sys.argv[3]), 0, b"b" * (1 << 16)
while time.monotonic() < end:
    s.sendall(buf)
    total += len(buf)
s.close()
report("done", sent=total)
'''


def bulk(pair, children: list[Child], seconds: float) -> int:
    """Send from namespace a to b for ``seconds``; returns the bytes received."""
    sink = Child(pair.b, SINK, str(PORT))
    children.append(sink)
    sink.expect("ready")
    source = Child(pair.a, SOURCE, pair.addr_b, str(PORT), str(seconds))
    children.append(source)
    sent = source.expect("done", timeout=seconds + DEADLINE_S)["sent"]
    got = sink.expect("done")["received"]
    source.finish()
    sink.finish()
    assert got == sent
    return got


def minus(after: list[int], before: list[int] | None) -> list[int]:
    return [a - b for a, b in zip(after, before or [0] * len(after))]


def count(hist: list[int]) -> int:
    return sum(hist[: records.HIST_SLOTS])


def quantile_s(hist: list[int], q: float) -> float:
    """Upper bound (seconds) of the log2 slot holding the q-quantile."""
    total, seen = count(hist), 0
    for k, n in enumerate(hist[: records.HIST_SLOTS]):
        seen += n
        if seen >= q * total:
            return 2**k * 1e-6
    return float("inf")


def mean_s(hist: list[int]) -> float:
    return hist[records.HIST_STRIDE - 1] / count(hist) / 1e9


def snapshot(probes: Probes, ns: str | None = None) -> list[records.ConnEvent]:
    """Every TCP socket of namespace ``ns`` (default: ours), as iter/tcp reports it."""
    raw = b"".join(probes.snapshot_chunks(f"/run/netns/{ns}" if ns else None))
    size = records.EVENT_SIZE
    return [records.decode(raw[i : i + size]) for i in range(0, len(raw), size)]


def server_socket(probes: Probes, ns: str, port: int) -> records.ConnEvent:
    rows = [e for e in snapshot(probes, ns)
            if e.sport == port and e.state == records.TCP_ESTABLISHED]
    assert len(rows) == 1, rows
    return rows[0]


# --------------------------------------------------------------------------------------
# tx qdisc: tbf rate limit
# --------------------------------------------------------------------------------------

RATE_BPS = 10_000_000  # 10 Mbit/s: a 64 KiB GSO segment takes 52 ms to drain


def backlog_bytes(ns: str, dev: str) -> int:
    out = subprocess.run(["tc", "-n", ns, "-s", "qdisc", "show", "dev", dev],
                         check=True, capture_output=True, text=True).stdout
    m = re.search(r"backlog (\d+)([KM]?)b", out)
    assert m, out
    return int(m.group(1)) * {"": 1, "K": 1000, "M": 1000**2}[m.group(2)]


def test_qdisc_wait_follows_a_tbf_rate_limit(probes: Probes, netns_pair, children) -> None:
    """Unlimited, the veth has no queue (noqueue) and the qdisc layer stays in
    microseconds. Under tbf the wait must be what the queue the qdisc reports
    takes to drain at the configured rate: backlog / rate, sampled by the test
    while the transfer runs. TCP small queues keeps about two GSO segments per
    socket below TCP, so the backlog is measured rather than assumed. By
    Little's law the mean wait of the packets a busy queue holds is its mean
    backlog over its drain rate; means, not medians, since the histogram's sum
    is exact and a log2 median is only known to a factor of 2 (a median 4.4
    times below the backlog's prediction once failed CI). The backlog is
    sampled every 50 ms, packets differ in size and the kernel times one skb in
    8, so the mean must be within a factor of 2 above the prediction and 3
    below: over 26 runs here mean / prediction
    ranged 0.48-1.30 (sampling the backlog every 10 ms did not narrow it), and
    0.48 failed CI with a factor of 2."""
    pair = netns_pair
    key = ("tx", "qdisc", netns_inode(pair.a), ifindex(pair.a, pair.veth_a))

    bulk(pair, children, 0.5)
    free = probes.stack_histograms()[key]
    assert count(free) > 10
    assert quantile_s(free, 0.5) <= 16e-6 and quantile_s(free, 0.99) <= 1e-3, free

    # burst above the 64 KiB GSO size: tbf would otherwise split segments into new skbs
    subprocess.run(["tc", "-n", pair.a, "qdisc", "add", "dev", pair.veth_a, "root", "tbf",
                    "rate", f"{RATE_BPS}bit", "burst", "100kb", "limit", "2mb"], check=True)
    samples: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.05):
            samples.append(backlog_bytes(pair.a, pair.veth_a))

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        bulk(pair, children, 2.5)
    finally:
        stop.set()
        sampler.join()
    limited = minus(probes.stack_histograms()[key], free)
    busy = [b for b in samples if b]
    assert len(busy) > len(samples) // 2, samples
    predicted = statistics.fmean(busy) * 8 / RATE_BPS
    mean = mean_s(limited)
    assert count(limited) >= 40  # sampled: each timed packet counts SAMPLE_EVERY (8) times
    assert predicted / 3 <= mean <= predicted * 2, (mean, predicted, limited)
    assert quantile_s(limited, 0.5) >= 2e-3, "a rate-limited queue must leave the microsecond range"


# --------------------------------------------------------------------------------------
# rx socket: a reader that sleeps before each read
# --------------------------------------------------------------------------------------

# argv: port n delay. Reads n messages of 100 bytes, sleeping delay before each read
# and answering each; then holds the socket open until "close".
READER = PRELUDE + r'''
port, n, delay = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
lst = socket.create_server(("0.0.0.0", port))
report("ready")
c, _ = lst.accept()
for _ in range(n):
    time.sleep(delay)
    got = b""
    while len(got) < 100:
        got += c.recv(100 - len(got))
    c.sendall(b"k")
report("done")
sys.stdin.readline()
c.close()
'''

# argv: host port n. Sends a message, waits for the answer, n times; then closes.
WRITER = PRELUDE + r'''
s = socket.create_connection((sys.argv[1], int(sys.argv[2])))
for _ in range(int(sys.argv[3])):
    s.sendall(b"m" * 100)
    assert s.recv(1) == b"k"
report("done")
sys.stdin.readline()
'''


def exchange(probes: Probes, pair, children: list[Child], port: int, n: int, delay: float
             ) -> records.ConnEvent:
    """Run one reader/writer exchange; the reader's socket as the kernel summarises it."""
    reader = Child(pair.b, READER, str(port), str(n), str(delay))
    children.append(reader)
    reader.expect("ready")
    writer = Child(pair.a, WRITER, pair.addr_b, str(port), str(n))
    children.append(writer)
    reader.expect("done", timeout=n * delay + DEADLINE_S)
    writer.expect("done")
    row = server_socket(probes, pair.b, port)
    for c in (reader, writer):
        c.send("close")
        c.finish()
    return row


def test_socket_wait_shows_a_sleeping_reader(probes: Probes, netns_pair, children) -> None:
    """Each message arrives just after the previous answer left, so it waits in
    the receive queue for the reader's whole sleep: 200 ms, plus the scheduling
    latency of waking from sleep (a few ms on a loaded 2-vCPU machine; never
    less). The 64 us veth round trip is noise. A reader that reads at once waits
    only for its wake-up. One sample per message: each is read whole."""
    pair, n, delay = netns_pair, 4, 0.2
    key = ("rx", "socket", netns_inode(pair.b), ifindex(pair.b, pair.veth_b))

    prompt = exchange(probes, pair, children, PORT, n, 0.0)
    before = probes.stack_histograms()[key]
    assert count(before) == n
    assert quantile_s(before, 1.0) <= 32e-3, before
    assert 0 < prompt.rcvq_wait_max_ns <= 32e6
    assert 0 < prompt.rcvq_wait_p50_ns <= prompt.rcvq_wait_max_ns

    sleepy = exchange(probes, pair, children, PORT + 1, n, delay)
    waits = minus(probes.stack_histograms()[key], before)
    assert count(waits) == n
    assert delay - 0.002 <= mean_s(waits) <= delay + 0.06, waits
    assert quantile_s(waits, 0.0001) >= delay / 2  # every sample in the 200 ms slot or above
    assert delay - 0.002 <= sleepy.rcvq_wait_max_ns / 1e9 <= delay + 0.1
    # the median is the upper bound of its log4 slot (262 ms), clipped by the maximum
    assert delay - 0.002 <= sleepy.rcvq_wait_p50_ns / 1e9 <= sleepy.rcvq_wait_max_ns / 1e9


# --------------------------------------------------------------------------------------
# accept queue
# --------------------------------------------------------------------------------------

# argv: port wait idle. Waits until a connection is queued, then `wait` s before
# accept(), then `idle` s before the first read; holds the socket until "close".
LATE_ACCEPT = PRELUDE + r'''
port, wait, idle = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
lst = socket.create_server(("0.0.0.0", port))
report("ready")
select.select([lst], [], [])
time.sleep(wait)
c, _ = lst.accept()
time.sleep(idle)
c.recv(1)
report("done")
sys.stdin.readline()
'''

# argv: host port. Connects, sends one byte, holds the socket until "close".
CONNECT_ONE = PRELUDE + r'''
s = socket.create_connection((sys.argv[1], int(sys.argv[2])))
s.sendall(b"x")
report("done")
sys.stdin.readline()
'''


@pytest.mark.parametrize("precise, idle, expect_extra", [
    pytest.param(False, 0.0, 0.0, id="first-use"),
    pytest.param(False, 0.3, 0.3, id="first-use-is-an-upper-bound"),
    pytest.param(True, 0.3, 0.0, id="precise"),
])
def test_accept_queue_wait(netns_pair, children, precise: bool, idle: float,
                           expect_extra: float) -> None:
    """accept() comes 300 ms after the connection was queued. The accept syscall
    exit (--precise-accept) measures exactly that; the default sees the accept
    at the owner's first use of the socket, so a server that waits before its
    first read reports that wait too (an upper bound, by design). Tolerance
    above: sleep overshoot and scheduling, 100 ms on a busy machine."""
    pair, wait = netns_pair, 0.3
    p = load(LoaderConfig(precise_accept=precise))
    try:
        before = p.histograms()[records.Hist.ACCEPT_QUEUE]
        server = Child(pair.b, LATE_ACCEPT, str(PORT), str(wait), str(idle))
        children.append(server)
        server.expect("ready")
        client = Child(pair.a, CONNECT_ONE, pair.addr_b, str(PORT))
        children.append(client)
        client.expect("done")
        server.expect("done")
        row = server_socket(p, pair.b, PORT)
        after = p.histograms()[records.Hist.ACCEPT_QUEUE]
        for c in (server, client):
            c.send("close")
            c.finish()
    finally:
        p.close()
    seconds = row.accept_wait_ns / 1e9
    assert wait + expect_extra <= seconds <= wait + expect_extra + 0.1, seconds
    # the connection-level histogram counted it, in the slot of its value
    slot = max(0, (row.accept_wait_ns // 1000 - 1).bit_length())
    assert after[slot] > before[slot]


# --------------------------------------------------------------------------------------
# handshake against a measured RTT
# --------------------------------------------------------------------------------------

ECHO = PRELUDE + r'''
lst = socket.create_server(("0.0.0.0", int(sys.argv[1])))
report("ready")
c, _ = lst.accept()
while b := c.recv(1):
    c.sendall(b)
'''

# argv: host port n. Connects, then n one-byte round trips; reports them.
PINGER = PRELUDE + r'''
s = socket.create_connection((sys.argv[1], int(sys.argv[2])))
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
rtts = []
for _ in range(int(sys.argv[3])):
    t = time.monotonic_ns()
    s.sendall(b"p")
    s.recv(1)
    rtts.append(time.monotonic_ns() - t)
report("done", rtts=rtts, port=s.getsockname()[1])
sys.stdin.readline()
'''


def test_connect_latency_is_consistent_with_the_rtt(probes: Probes, netns_pair, children) -> None:
    """The handshake is one round trip (SYN out, SYN-ACK back) without the two
    user-space wake-ups an application round trip adds: positive, and at most a
    few application RTTs (10x, plus 1 ms for scheduling noise on this machine)."""
    pair = netns_pair
    before = probes.histograms()[records.Hist.HANDSHAKE_CLIENT]
    echo = Child(pair.b, ECHO, str(PORT))
    children.append(echo)
    echo.expect("ready")
    pinger = Child(pair.a, PINGER, pair.addr_b, str(PORT), "50")
    children.append(pinger)
    done = pinger.expect("done")
    rows = [e for e in snapshot(probes, pair.a) if e.sport == done["port"]]
    pinger.send("close")
    pinger.finish()
    echo.finish()
    assert len(rows) == 1
    handshake = rows[0].state_ns[records.TCP_ESTABLISHED] - rows[0].state_ns[records.TCP_SYN_SENT]
    rtt = statistics.median(done["rtts"])
    assert 0 < handshake <= 10 * rtt + 1_000_000, (handshake, rtt)
    after = probes.histograms()[records.Hist.HANDSHAKE_CLIENT]
    assert count(after) > count(before)


# --------------------------------------------------------------------------------------
# interface totals and attribution
# --------------------------------------------------------------------------------------

def test_interface_totals_agree_with_sysfs_and_layers_with_namespaces(
        probes: Probes, netns_pair, children) -> None:
    """veth counts one packet per skb it forwards, GSO skbs included, with the
    link-layer header in the bytes; GRO is off on veth (it would merge skbs
    before netif_receive_skb and make our rx count lower), so the probes see the
    same skbs. Counters are read around the transfer, so the only difference
    can be IPv6 neighbour discovery the namespaces send on their own between the
    two reads: at most 2 packets of at most 100 bytes each. One more: veth's
    xmit returns OK for a packet it then drops because the peer's backlog is
    full (possible when the receiver is starved of CPU); we count it sent, the
    driver counts it in tx_dropped, with its bytes nowhere (at most one 64 KiB
    GSO skb each)."""
    pair = netns_pair
    ends = {"a": (netns_inode(pair.a), ifindex(pair.a, pair.veth_a), pair.a, pair.veth_a),
            "b": (netns_inode(pair.b), ifindex(pair.b, pair.veth_b), pair.b, pair.veth_b)}
    zero = (0, 0, 0, 0, 0)
    before = {k: (probes.interface_totals().get(e[:2], zero), sysfs_stats(*e[2:]))
              for k, e in ends.items()}
    bulk(pair, children, 0.5)
    time.sleep(0.1)  # the last ACKs
    for name, (netns, index, ns, dev) in ends.items():
        ours = minus(probes.interface_totals()[(netns, index)], before[name][0])
        sys_after = sysfs_stats(ns, dev)
        theirs = {k: sys_after[k] - before[name][1][k] for k in sys_after}
        assert theirs["tx_packets"] > 10 and theirs["rx_packets"] > 10
        dropped = theirs["tx_dropped"]
        assert abs(ours[0] - theirs["rx_packets"]) <= 2, (name, ours, theirs)
        assert abs(ours[1] - theirs["rx_bytes"]) <= 200, (name, ours, theirs)
        assert abs(ours[2] - (theirs["tx_packets"] + dropped)) <= 2, (name, ours, theirs)
        assert -200 <= ours[3] - theirs["tx_bytes"] <= 200 + dropped * 65550, (name, ours, theirs)
        assert ours[4] == 0  # driver errors

    # every layer of this flow, and only on the interface it crossed
    hists = probes.stack_histograms()
    (na, ia), (nb, ib) = ends["a"][:2], ends["b"][:2]
    ours = {k for k in hists if k[2] in (na, nb)}
    assert {k[2:] for k in ours} <= {(na, ia), (nb, ib)}, ours
    data_path = {("tx", "tcp", na, ia), ("tx", "qdisc", na, ia), ("tx", "driver", na, ia),
                 ("rx", "driver", nb, ib), ("rx", "tcp", nb, ib), ("rx", "socket", nb, ib)}
    assert data_path <= ours, data_path - ours
    # ACKs flow back: b transmits and a receives on the same veth pair
    assert {("tx", "driver", nb, ib), ("rx", "driver", na, ia)} <= ours
    # a bulk sender's data waits in TCP for the receiver and the wire: measured, finite
    tx_tcp = hists[("tx", "tcp", na, ia)]
    assert count(tx_tcp) > 0 and quantile_s(tx_tcp, 0.5) < 1.0


# --------------------------------------------------------------------------------------
# the switch, and a stack object that cannot load
# --------------------------------------------------------------------------------------

def test_stack_latency_off_loads_no_stack_program() -> None:
    p = load(LoaderConfig(stack_latency=False))
    try:
        assert not p.stack_enabled
        assert not [h for h in p.plan.hooks if h.stack]
        assert p.stack_histograms() == {} and p.interface_totals() == {}
        assert all(len(c) % records.EVENT_SIZE == 0 for c in p.snapshot_chunks())
    finally:
        p.close()


def test_a_broken_stack_object_leaves_the_lifecycle_working(tmp_path: Path) -> None:
    """The stack programs are optional: an object without them (here: the probe
    object in its place) marks every stack hook unavailable, says why, and the
    lifecycle probes still see a new connection."""
    for name in ("lifecycle.bpf.o", "probe.bpf.o"):
        shutil.copy(default_objects_dir() / name, tmp_path / name)
    shutil.copy(default_objects_dir() / "probe.bpf.o", tmp_path / "stack.bpf.o")
    p = load(LoaderConfig(), objects_dir=tmp_path)
    try:
        stack_hooks = [h for h in p.plan.hooks if h.stack]
        assert stack_hooks and all(h.mode == UNAVAILABLE and h.note for h in stack_hooks)
        assert not p.stack_enabled
        with socket.create_server(("127.0.0.1", 0)) as lst:
            port = lst.getsockname()[1]
            with socket.create_connection(("127.0.0.1", port)):
                assert any(e.dport == port for e in snapshot(p))
    finally:
        p.close()

