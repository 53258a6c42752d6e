"""The lifecycle tables against ground truth: real probes, real sockets held by
separate processes, real namespaces.

Every socket under test lives in a child process (never in the test's own
process), so a row carrying the test's pid, or a pid guessed from a listener,
shows up as a failure. Children report what the kernel told *them* (pid, fd
numbers, getsockname/getpeername, bytes moved, errno) as JSON lines; the test
compares the monitor's rows and records with that, with /proc/<pid>/fd, and
with CLOCK_MONOTONIC instants it took itself around each step (the BPF side
stamps states with bpf_ktime_get_ns, the same clock).

Other tests and benchmarks may run at the same time, so:
- everything asserted on is selected by this test's own tuples, namespaces and
  pids, never by "the only row";
- the monitor is drained every few ms while the test waits on its children;
- if the ring buffer still overflowed during an attempt (the product counts
  that loss) and a record was missing, the attempt is repeated; a record
  missing without counted loss always fails.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import select
import socket
import struct
import subprocess
import sys
import textwrap
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import pytest

from sockwatch import records
from sockwatch.kernel.loader import LoaderConfig
from sockwatch.monitor import Monitor
from sockwatch.records import ConnEvent, Kind, Result, Role
from sockwatch.tables import Connection

# Kernel TCP state numbers (include/net/tcp_states.h), as indexed in state_ns.
ESTABLISHED, SYN_SENT, SYN_RECV, FIN_WAIT1, FIN_WAIT2 = 1, 2, 3, 4, 5
CLOSE, CLOSE_WAIT, LAST_ACK, LISTEN = 7, 8, 9, 10

LOOPBACK = {socket.AF_INET: "127.0.0.1", socket.AF_INET6: "::1"}
FAMILIES = [
    pytest.param(socket.AF_INET, id="ipv4"),
    pytest.param(socket.AF_INET6, id="ipv6"),
]
OWN_NETNS = os.stat("/proc/self/ns/net").st_ino
DEADLINE_S = 10.0  # generous upper bound for anything that should take milliseconds
IDLE_S = 0.02  # how often the monitor is drained while a test waits
ATTEMPTS = 3  # attempts when records were lost to a full ring buffer


# --------------------------------------------------------------------------------------
# Child processes
# --------------------------------------------------------------------------------------

# Prepended to every child script. The child renames itself (PR_SET_NAME) so the
# comm the kernel captures is one this test chose, then talks JSON lines on stdout
# and takes one-word commands on stdin.
PRELUDE = r'''
import ctypes, errno, json, os, socket, struct, sys
NAME, ARGS = sys.argv[1], sys.argv[2:]
ctypes.CDLL(None, use_errno=True).prctl(15, NAME.encode(), 0, 0, 0)  # PR_SET_NAME

def report(event, **kw):
    kw.update(event=event, pid=os.getpid())
    sys.stdout.write(json.dumps(kw) + "\n")
    sys.stdout.flush()

def wait_for(word):
    line = sys.stdin.readline().strip()
    if line != word:
        raise SystemExit(f"{NAME}: expected {word!r} on stdin, got {line!r}")

def recv_exact(sock, n):
    got = bytearray()
    while len(got) < n:
        chunk = sock.recv(min(1 << 16, n - len(got)))
        if not chunk:
            raise SystemExit(f"{NAME}: EOF after {len(got)} of {n} bytes")
        got += chunk
    return bytes(got)

def fam(v):
    return socket.AF_INET6 if v == "6" else socket.AF_INET

def ends(s):
    return dict(fd=s.fileno(), local=list(s.getsockname()[:2]), peer=list(s.getpeername()[:2]))
'''

# argv: family host port n_conns expect_bytes reply_bytes
# Accepts n connections; on each reads expect_bytes then sends reply_bytes. Keeps
# them open until "close"; then, as the passive closer, waits for each peer's EOF
# before closing its own end, closes the listener, and exits.
SERVER = r'''
family, host, port, n, expect, reply = fam(ARGS[0]), ARGS[1], int(ARGS[2]), *map(int, ARGS[3:6])
lst = socket.socket(family, socket.SOCK_STREAM)
lst.bind((host, port))
lst.listen(16)
report("listening", fd=lst.fileno(), local=list(lst.getsockname()[:2]))
conns = []
for _ in range(n):
    c, _ = lst.accept()
    got = recv_exact(c, expect)
    c.sendall(b"s" * reply)
    conns.append(c)
    report("accepted", received=len(got), **ends(c))
wait_for("close")
for c in conns:
    if c.recv(1) != b"":
        raise SystemExit("server: data after the client's close")
    c.close()
lst.close()
report("closed")
'''

# argv: family host port send_bytes expect_bytes
# Connects, sends, reads the reply, then waits for "close" and closes first
# (the active closer) and exits.
CLIENT = r'''
family, host, port, send, expect = fam(ARGS[0]), ARGS[1], int(ARGS[2]), int(ARGS[3]), int(ARGS[4])
c = socket.socket(family, socket.SOCK_STREAM)
c.connect((host, port))
report("connected", **ends(c))
c.sendall(b"c" * send)
got = recv_exact(c, expect)
report("exchanged", received=len(got))
wait_for("close")
c.close()
report("closed")
'''

# argv: family host port syncnt app_timeout_s
# One connect that is expected to fail; reports the errno the application saw.
FAILING_CLIENT = r'''
family, host, port = fam(ARGS[0]), ARGS[1], int(ARGS[2])
syncnt, app_timeout = int(ARGS[3]), float(ARGS[4])
c = socket.socket(family, socket.SOCK_STREAM)
if syncnt:
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_SYNCNT, syncnt)
if app_timeout:
    c.settimeout(app_timeout)
with open("/proc/self/comm") as f:
    comm = f.read().strip()
report("connecting", comm=comm)
try:
    c.connect((host, port))
except TimeoutError as exc:  # socket.timeout is TimeoutError; so is ETIMEDOUT
    err = "app-timeout" if exc.errno is None else errno.errorcode[exc.errno]
except OSError as exc:
    err = errno.errorcode.get(exc.errno, str(exc.errno))
else:
    err = "connected"
c.close()
report("failed", error=err)
'''


class Child:
    """One child process speaking JSON lines; reads never block past a deadline."""

    def __init__(self, proc: subprocess.Popen, name: str, idle: Callable[[], object] | None):
        self.proc = proc
        self.name = name
        self._buf = b""
        # Called every few ms while waiting on the child: drains the monitor so
        # that records are not lost to a full ring buffer meanwhile.
        self._idle = idle or (lambda: None)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def expect(self, event: str, timeout: float = DEADLINE_S) -> dict:
        """The next report, which must be ``event``."""
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                self.fail(f"no {event!r} report within {timeout}s")
            ready, _, _ = select.select([fd], [], [], min(left, IDLE_S))
            self._idle()
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    self.fail(f"exited before reporting {event!r}")
                self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        msg = json.loads(line)
        assert msg["event"] == event, f"{self.name}: expected {event!r}, got {msg}"
        assert msg["pid"] == self.pid, "the child is not the process Popen started"
        return msg

    def send(self, word: str) -> None:
        self.proc.stdin.write(word.encode() + b"\n")
        self.proc.stdin.flush()

    def finish(self, timeout: float = DEADLINE_S) -> None:
        """Wait for a clean exit."""
        deadline = time.monotonic() + timeout
        while (rc := self.proc.poll()) is None:
            if time.monotonic() > deadline:
                self.fail("did not exit")
            self._idle()
            time.sleep(IDLE_S / 5)
        if rc != 0:
            self.fail(f"exited with {rc}")

    def fail(self, why: str) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        err = self.proc.stderr.read().decode(errors="replace")
        pytest.fail(f"{self.name} (pid {self.pid}) {why}; stderr:\n{err}")


class Spawner:
    """Starts child processes and reaps every one of them."""

    def __init__(self) -> None:
        self.kids: list[Child] = []

    def __call__(
        self,
        name: str,
        body: str,
        *args: object,
        netns: str | None = None,
        rec: Recorder | None = None,
    ) -> Child:
        """Run ``body`` as process ``name`` (its comm), in ``netns`` if given; with
        ``rec``, the monitor is drained while the test waits on it and records
        carrying its pid are kept."""
        assert len(name) <= 15, "comm holds 15 characters"
        cmd = [sys.executable, "-c", PRELUDE + textwrap.dedent(body), name, *map(str, args)]
        if netns:
            cmd = ["ip", "netns", "exec", netns, *cmd]  # execs in place: same pid
        proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        kid = Child(proc, name, rec.drain if rec else None)
        self.kids.append(kid)
        if rec:
            rec.pids.add(kid.pid)
        return kid

    def kill_all(self) -> None:
        for kid in self.kids:
            if kid.proc.poll() is None:
                kid.proc.kill()
            kid.proc.wait(timeout=DEADLINE_S)
            for pipe in (kid.proc.stdin, kid.proc.stdout, kid.proc.stderr):
                pipe.close()
        self.kids.clear()


@pytest.fixture
def spawn() -> Iterator[Spawner]:
    """Every child is killed (if still running) and reaped before the test ends,
    so ``leaves_nothing_behind`` holds even when the test fails."""
    spawner = Spawner()
    try:
        yield spawner
    finally:
        spawner.kill_all()


def fam_arg(family: int) -> str:
    return "6" if family == socket.AF_INET6 else "4"


# --------------------------------------------------------------------------------------
# Reading the monitor
# --------------------------------------------------------------------------------------


def same_ip(a: str, b: str) -> bool:
    return ipaddress.ip_address(a) == ipaddress.ip_address(b)


def tuple_is(ev: ConnEvent, local: list, peer: list, netns: int = OWN_NETNS) -> bool:
    """Does the record carry exactly this (local, peer) pair, as the socket's owner
    saw it, in this network namespace? (Other tests use the same addresses, and
    may use the same ports, in namespaces of their own.)"""
    return (
        ev.netns == netns
        and ev.sport == local[1]
        and ev.dport == peer[1]
        and same_ip(ev.saddr, local[0])
        and same_ip(ev.daddr, peer[0])
    )


def is_listener_at(ev: ConnEvent, local: list, netns: int = OWN_NETNS) -> bool:
    return ev.netns == netns and ev.sport == local[1] and same_ip(ev.saddr, local[0])


def socket_inode(pid: int, fd: int) -> int:
    """Ground truth from /proc: the inode behind ``fd`` of ``pid``."""
    target = os.readlink(f"/proc/{pid}/fd/{fd}")
    assert target.startswith("socket:["), f"/proc/{pid}/fd/{fd} -> {target}"
    return int(target[len("socket:[") : -1])


def find_row(
    conns: list[Connection], local: list, peer: list, netns: int = OWN_NETNS
) -> Connection:
    rows = [c for c in conns if tuple_is(c.ev, local, peer, netns)]
    assert len(rows) == 1, f"expected one live row {local} -> {peer}, found {rows}"
    return rows[0]


def find_listener(conns: list[Connection], local: list, netns: int = OWN_NETNS) -> Connection:
    rows = [c for c in conns if c.ev.state == LISTEN and is_listener_at(c.ev, local, netns)]
    assert len(rows) == 1, f"expected one listener at {local}, found {rows}"
    return rows[0]


def assert_owned(
    row: Connection, pid: int, fd: int, comm: str, inodes: dict[tuple[int, int], int] | None = None
) -> None:
    """The row names the process and fd that really hold the socket: the fd the
    process reported, whose /proc link (read now, or in ``inodes`` when it was
    read while the sockets were open) is the row's socket inode."""
    assert row.tgid == pid != os.getpid(), (row.tgid, pid)
    assert row.comm == comm, row.comm
    assert row.fd == fd, (row.fd, fd)
    ino = inodes[(pid, fd)] if inodes is not None else socket_inode(pid, fd)
    assert row.ev.ino == ino, "fd does not hold the row's socket inode"


def assert_states(ev: ConnEvent, entered: list[int], never: list[int]) -> None:
    """``entered`` were all entered, in this order; ``never`` were not."""
    stamps = [ev.state_ns[s] for s in entered]
    assert all(stamps), f"states {entered} entered at {stamps}"
    assert stamps == sorted(stamps), f"states {entered} entered out of order: {stamps}"
    assert stamps[-1] <= ev.ts_ns
    assert [ev.state_ns[s] for s in never] == [0] * len(never), ev.state_ns


def kernel_sockets(mon: Monitor) -> list[ConnEvent]:
    """Every TCP socket of our namespace as the kernel's own walk finds it now."""
    assert mon.probes is not None
    raw = b"".join(mon.probes.snapshot_chunks())
    size = records.EVENT_SIZE
    return [records.decode(raw[i : i + size]) for i in range(0, len(raw), size)]


class Recorder:
    """Drains the monitor often and keeps the records that concern this test:
    those carrying its children's pids or touching its ports (either end), so a
    record with a wrong owner is still kept and shows up as a failure.

    ``connections()`` also drains the ring buffer (its reconciliation polls), so
    tests call it only when no record they wait for can be pending.
    """

    def __init__(self, monitor: Monitor):
        self.monitor = monitor
        self.pids: set[int] = set()
        self.ports: set[int] = set()
        self.events: dict[tuple[int, int, Kind], ConnEvent] = {}

    def drain(self) -> None:
        for ev in self.monitor.poll():
            if ev.tgid in self.pids or ev.sport in self.ports or ev.dport in self.ports:
                self.events[(ev.skaddr, ev.ts_ns, ev.kind)] = ev

    def wait(
        self, match: Callable[[ConnEvent], bool], count: int = 1, kind: Kind = Kind.CLOSE
    ) -> list[ConnEvent]:
        """Exactly ``count`` matching records of ``kind``, polling until a deadline."""
        deadline = time.monotonic() + DEADLINE_S
        while True:
            self.drain()
            found = [ev for ev in self.events.values() if ev.kind == kind and match(ev)]
            if len(found) >= count or time.monotonic() > deadline:
                break
            time.sleep(IDLE_S / 2)
        if kind == Kind.CLOSE and len(found) < count and not any(
                map(match, kernel_sockets(self.monitor))):
            raise CloseNeverSeen(f"expected {count} CLOSE records, got {len(found)}, and the "
                                 "kernel has no such socket any more")
        assert len(found) == count, (
            f"expected {count} {kind.name} records, got {found}; {self.monitor.loss()}"
        )
        return found


class RecordsLost(Exception):
    """An attempt failed while the ring buffer overflowed: not a verdict."""


class CloseNeverSeen(RecordsLost):
    """A socket left the kernel without its close reaching any hook: the rare gap
    the README lists under known limits (orphaned FIN_WAIT closes the kernel never
    hands to the programs; bench/missed_closes.py measures it). Where a test holds
    the row, its repair is checked too; the attempt is no verdict."""


def lost(monitor: Monitor) -> int:
    loss = monitor.loss()
    return loss.ringbuf_full + loss.socks_map_full


@contextlib.contextmanager
def loss_guard(monitor: Monitor) -> Iterator[None]:
    """Turn a failed assertion into RecordsLost when the kernel side counted lost
    records meanwhile (the product's own account of what it could not deliver)."""
    before = lost(monitor)
    try:
        yield
    except AssertionError as exc:
        if lost(monitor) > before:
            raise RecordsLost(f"{lost(monitor) - before} records lost: {exc}") from exc
        raise


def loss_guarded(monitor: Monitor) -> Callable[[Callable[[int], None]], Callable[[int], None]]:
    """Decorator form of loss_guard for an attempt function."""

    def wrap(fn: Callable[[int], None]) -> Callable[[int], None]:
        def run(i: int) -> None:
            with loss_guard(monitor):
                fn(i)

        return run

    return wrap


def with_retries(spawn: Spawner, attempt: Callable[[int], None]) -> None:
    """Run ``attempt(i)``, again only if an attempt raised RecordsLost. A close
    missed in every attempt is no rare gap but a failure."""
    why, unseen = [], 0
    for i in range(ATTEMPTS):
        try:
            attempt(i)
            return
        except RecordsLost as exc:
            why.append(str(exc).splitlines()[0][:300])
            unseen += isinstance(exc, CloseNeverSeen)
            warnings.warn(f"attempt {i + 1} inconclusive, {why[-1]}", stacklevel=2)
            spawn.kill_all()
    if unseen == ATTEMPTS:
        pytest.fail(f"closes never seen in all {ATTEMPTS} attempts: {why}")
    pytest.skip(f"host too busy: ring buffer overflowed in {ATTEMPTS - unseen} of {ATTEMPTS} "
                f"attempts: {why}")


# --------------------------------------------------------------------------------------
# A loopback scenario shared by the first two tests
# --------------------------------------------------------------------------------------


@dataclass
class Scenario:
    server: Child
    clients: list[Child]
    listening: dict
    accepted: list[dict]  # as the server saw each connection
    connected: list[dict]  # as each client saw its connection
    live: list[Connection]
    inodes: dict[tuple[int, int], int]  # (pid, fd) -> /proc inode, read while open
    t_start: int
    t_clients_close: int = 0
    t_server_close: int = 0
    client_closes: list[ConnEvent] = field(default_factory=list)
    server_closes: list[ConnEvent] = field(default_factory=list)
    listener_close: ConnEvent | None = None


def loopback_scenario(
    monitor: Monitor, spawn: Spawner, family: int, n: int, send: int, reply: int
) -> Scenario:
    """n clients (each its own process) to one server process on loopback; the
    live table is read while all are open; then the clients close first, their
    CLOSE records are awaited, and only then does the server close its ends."""
    host, fa = LOOPBACK[family], fam_arg(family)
    rec = Recorder(monitor)
    t_start = time.monotonic_ns()
    server = spawn("swt-lc-server", SERVER, fa, host, 0, n, send, reply, rec=rec)
    listening = server.expect("listening")
    port = listening["local"][1]
    rec.ports.add(port)
    clients = [
        spawn(f"swt-lc-client{i}", CLIENT, fa, host, port, send, reply, rec=rec) for i in range(n)
    ]
    connected = [c.expect("connected") for c in clients]
    for c in clients:
        assert c.expect("exchanged")["received"] == reply
    accepted = [server.expect("accepted") for _ in range(n)]
    assert all(a["received"] == send for a in accepted)

    live = monitor.connections()
    held = [(server, m) for m in (listening, *accepted)] + list(zip(clients, connected))
    inodes = {(kid.pid, m["fd"]): socket_inode(kid.pid, m["fd"]) for kid, m in held}
    sc = Scenario(server, clients, listening, accepted, connected, live, inodes, t_start)

    sc.t_clients_close = time.monotonic_ns()
    for c in clients:
        c.send("close")
    for c in clients:
        c.expect("closed")
        c.finish()
    sc.client_closes = [
        rec.wait(lambda ev, m=m: tuple_is(ev, m["local"], m["peer"]))[0] for m in connected
    ]
    sc.t_server_close = time.monotonic_ns()
    server.send("close")
    server.expect("closed")
    server.finish()
    sc.server_closes = [
        rec.wait(lambda ev, a=a: tuple_is(ev, a["local"], a["peer"]))[0] for a in accepted
    ]
    sc.listener_close = rec.wait(
        lambda ev: ev.role == Role.LISTENER and is_listener_at(ev, listening["local"])
    )[0]
    return sc


# --------------------------------------------------------------------------------------
# 1. Owners, fds, tuples, roles and state sequences on loopback
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_loopback_owners_and_state_sequences(
    monitor: Monitor, spawn: Spawner, family: int
) -> None:
    """The core promise, process -> fd -> socket -> 5-tuple, with server and
    clients in separate processes: the accepting process's pid is learned from
    its first I/O (no kprobes here), never the test's pid. Who closes first is
    chosen (the clients), so each side's state sequence is known exactly."""

    @loss_guarded(monitor)
    def attempt(_: int) -> None:
        sc = loopback_scenario(monitor, spawn, family, 3, send=5, reply=5)
        server_pid, lst = sc.server.pid, sc.listening

        # -- while open: every socket with its real owner, fd, tuple and role
        assert {tuple(a["peer"]) for a in sc.accepted} == {tuple(c["local"]) for c in sc.connected}
        for client, mine in zip(sc.clients, sc.connected):
            row = find_row(sc.live, mine["local"], mine["peer"])
            assert (row.ev.role, row.ev.family, row.ev.state) == (Role.CLIENT, family, ESTABLISHED)
            assert_owned(row, client.pid, mine["fd"], client.name, sc.inodes)
        for acc in sc.accepted:
            row = find_row(sc.live, acc["local"], acc["peer"])
            assert (row.ev.role, row.ev.family, row.ev.state) == (Role.SERVER, family, ESTABLISHED)
            assert_owned(row, server_pid, acc["fd"], sc.server.name, sc.inodes)
        row = find_listener(sc.live, lst["local"])
        assert (row.ev.role, row.ev.family) == (Role.LISTENER, family)
        assert_owned(row, server_pid, lst["fd"], sc.server.name, sc.inodes)

        # -- after the close: the clients closed actively, the server passively
        for client, ev in zip(sc.clients, sc.client_closes):
            assert (ev.role, ev.result, ev.tgid, ev.comm) == (
                Role.CLIENT, Result.OK, client.pid, client.name)  # fmt: skip
            assert (ev.oldstate, ev.state) == (FIN_WAIT2, CLOSE)
            assert_states(ev, [SYN_SENT, ESTABLISHED, FIN_WAIT1, FIN_WAIT2],
                          never=[SYN_RECV, CLOSE_WAIT, LAST_ACK])  # fmt: skip
            assert sc.t_start < ev.state_ns[SYN_SENT]
            assert sc.t_clients_close < ev.state_ns[FIN_WAIT1] < sc.t_server_close
        for ev in sc.server_closes:
            assert (ev.role, ev.result, ev.tgid, ev.comm) == (
                Role.SERVER, Result.OK, server_pid, sc.server.name)  # fmt: skip
            assert (ev.oldstate, ev.state) == (LAST_ACK, CLOSE)
            assert_states(ev, [SYN_RECV, ESTABLISHED, CLOSE_WAIT, LAST_ACK],
                          never=[SYN_SENT, FIN_WAIT1, FIN_WAIT2])  # fmt: skip
            peer = next(c for c in sc.client_closes if c.sport == ev.dport)
            # The client's FIN made the server CLOSE_WAIT; the server's own close
            # came only when the test said so, after the client side was gone.
            assert peer.state_ns[SYN_SENT] < ev.state_ns[SYN_RECV]
            assert peer.state_ns[FIN_WAIT1] < ev.state_ns[CLOSE_WAIT] < sc.t_server_close
            assert peer.ts_ns < sc.t_server_close < ev.state_ns[LAST_ACK]
        lc = sc.listener_close
        assert (lc.role, lc.tgid, lc.comm, lc.oldstate) == (
            Role.LISTENER, server_pid, sc.server.name, LISTEN)  # fmt: skip
        assert sc.t_start < lc.state_ns[LISTEN] < sc.t_server_close < lc.ts_ns

    with_retries(spawn, attempt)


# --------------------------------------------------------------------------------------
# 2. Exact application bytes, live and at close
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_loopback_payload_bytes(monitor: Monitor, spawn: Spawner, family: int) -> None:
    """Application bytes are exact on both ends, in the live table (refreshed
    from iter/tcp) and in the CLOSE records, where the peer's FIN (counted by
    tcpi_bytes_received) must not show up as a byte of payload."""
    sent, replied = 123457, 54321

    @loss_guarded(monitor)
    def attempt(_: int) -> None:
        sc = loopback_scenario(monitor, spawn, family, 1, send=sent, reply=replied)
        cli, srv = sc.connected[0], sc.accepted[0]

        client_row = find_row(sc.live, cli["local"], cli["peer"])
        server_row = find_row(sc.live, srv["local"], srv["peer"])
        assert (client_row.ev.payload_sent, client_row.ev.payload_received) == (sent, replied)
        assert (server_row.ev.payload_sent, server_row.ev.payload_received) == (replied, sent)

        client_close, server_close = sc.client_closes[0], sc.server_closes[0]
        assert (client_close.payload_sent, client_close.payload_received) == (sent, replied)
        assert (server_close.payload_sent, server_close.payload_received) == (replied, sent)
        assert server_close.peer_fin  # the server read the client's FIN before closing

    with_retries(spawn, attempt)


# --------------------------------------------------------------------------------------
# 3. Refused
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_connect_refused(monitor: Monitor, spawn: Spawner, family: int) -> None:
    """A connect answered by RST is one CLOSE (no OPEN) with result REFUSED,
    attributed to the connecting process. The port is held bound (but not
    listening) by the test, so nobody else can start listening on it meanwhile."""
    host = LOOPBACK[family]

    @loss_guarded(monitor)
    def attempt(_: int) -> None:
        with socket.socket(family, socket.SOCK_STREAM) as closed_port:
            closed_port.bind((host, 0))
            port = closed_port.getsockname()[1]
            rec = Recorder(monitor)
            rec.ports.add(port)
            t0 = time.monotonic_ns()
            child = spawn("swt-refused", FAILING_CLIENT, fam_arg(family), host, port, 0, 0, rec=rec)
            assert child.expect("connecting")["comm"] == "swt-refused"
            assert child.expect("failed")["error"] == "ECONNREFUSED"
            child.finish()
            ev = rec.wait(
                lambda e: e.netns == OWN_NETNS and e.dport == port and same_ip(e.daddr, host)
            )[0]
            assert not [e for e in rec.events.values() if e.kind == Kind.OPEN and e.dport == port]
            assert not any(
                c.ev.netns == OWN_NETNS and c.ev.dport == port and same_ip(c.ev.daddr, host)
                for c in monitor.connections()
            ), "a refused connect must not leave a live row"
        assert (ev.role, ev.result, ev.tgid, ev.comm) == (
            Role.CLIENT, Result.REFUSED, child.pid, "swt-refused")  # fmt: skip
        assert (ev.oldstate, ev.family) == (SYN_SENT, family)
        assert t0 < ev.state_ns[SYN_SENT] <= ev.ts_ns and ev.state_ns[ESTABLISHED] == 0

    with_retries(spawn, attempt)


# --------------------------------------------------------------------------------------
# 4. Timed out (and aborted by the application)
# --------------------------------------------------------------------------------------


def accept_queue_length(listener: socket.socket) -> int:
    """Connections waiting for accept(): tcp_info's tcpi_unacked for a listener."""
    info = listener.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    return struct.unpack_from("I", info, 24)[0]


def test_connect_timeout_and_abort(monitor: Monitor, spawn: Spawner) -> None:
    """A connect whose SYNs are dropped ends TIMEOUT in the caller's name; one
    the application gives up on first (its own socket timeout) ends ABORTED.

    The SYN-dropping destination is built on loopback: a listener with backlog 0
    whose single accept-queue slot the test fills and never accepts. Linux
    drops SYNs to a listener whose accept queue is full (tcp_conn_request:
    sk_acceptq_is_full -> drop, no RST), so the client retransmits until
    TCP_SYNCNT=1 gives up, after 1 + 2 s. This needs neither iptables/nft (absent
    on this machine) nor netem, sends nothing off loopback, and is
    deterministic: the queue is checked full (tcpi_unacked == 1) before the
    clients start, and still full after. Both clients run in parallel: ~3 s.
    """
    host = "127.0.0.1"

    @loss_guarded(monitor)
    def attempt(_: int) -> None:
        with socket.socket() as listener, socket.socket() as filler:
            listener.bind((host, 0))
            listener.listen(0)
            port = listener.getsockname()[1]
            filler.connect((host, port))
            deadline = time.monotonic() + DEADLINE_S
            while accept_queue_length(listener) < 1 and time.monotonic() < deadline:
                time.sleep(0.005)
            assert accept_queue_length(listener) == 1, "the accept queue did not fill"

            rec = Recorder(monitor)
            rec.ports.add(port)
            t0 = time.monotonic_ns()
            timeout = spawn("swt-timeout", FAILING_CLIENT, 4, host, port, 1, 0, rec=rec)
            aborted = spawn("swt-aborted", FAILING_CLIENT, 4, host, port, 0, 0.3, rec=rec)
            for kid in (timeout, aborted):
                assert kid.expect("connecting")["comm"] == kid.name
            assert aborted.expect("failed")["error"] == "app-timeout"
            assert timeout.expect("failed", timeout=15)["error"] == "ETIMEDOUT"
            t1 = time.monotonic_ns()
            for kid in (timeout, aborted):
                kid.finish()
            assert accept_queue_length(listener) == 1, "a client got into the accept queue"
            # (the filler is still open, so its own CLOSE cannot match)
            failed = rec.wait(
                lambda e: e.netns == OWN_NETNS and e.dport == port and same_ip(e.daddr, host)
                and e.oldstate == SYN_SENT,
                count=2,
            )  # fmt: skip

        got = {ev.tgid: ev for ev in failed}
        assert set(got) == {timeout.pid, aborted.pid}, failed
        for kid, result in ((timeout, Result.TIMEOUT), (aborted, Result.ABORTED)):
            ev = got[kid.pid]
            assert (ev.role, ev.result, ev.comm) == (Role.CLIENT, result, kid.name)
            assert t0 < ev.state_ns[SYN_SENT] < ev.ts_ns < t1
            assert ev.state_ns[ESTABLISHED] == 0
        # The kernel gave up on its own schedule (SYN, one retransmission after
        # 1 s, then 2 s more); the application gave up after its 0.3 s.
        to, ab = got[timeout.pid], got[aborted.pid]
        assert 2.5e9 < to.ts_ns - to.state_ns[SYN_SENT] < 5e9
        assert to.total_retrans >= 1
        assert 0.3e9 <= ab.ts_ns - ab.state_ns[SYN_SENT] < 2.5e9
        # A state's time is kept relative to the first one (sockwatch.h, SW_STAMP_SHIFT):
        # in ns within a second of it, in us beyond. CLOSE is stamped from the clock
        # reading the record carries, so it comes back exact, or within the microsecond.
        assert ab.state_ns[CLOSE] == ab.ts_ns
        assert to.ts_ns - 1000 < to.state_ns[CLOSE] <= to.ts_ns

    with_retries(spawn, attempt)


# --------------------------------------------------------------------------------------
# 5. Across a veth pair between namespaces
# --------------------------------------------------------------------------------------


def test_veth_between_namespaces(monitor: Monitor, spawn: Spawner, netns_pair) -> None:
    """Connections inside other network namespaces are seen by the same probes:
    the records carry the namespace they happened in (not the monitor's), with
    the real owners; fds are resolved through /proc of those owners, and the
    live counters are refreshed by walking those namespaces too."""
    pair, n = netns_pair, 2
    ns_ino = {ns: os.stat(f"/run/netns/{ns}").st_ino for ns in (pair.a, pair.b)}
    assert OWN_NETNS not in ns_ino.values() and monitor.netns == OWN_NETNS
    in_a, in_b = ns_ino[pair.a], ns_ino[pair.b]

    @loss_guarded(monitor)
    def attempt(i: int) -> None:
        port = 7000 + i  # a killed earlier attempt may still hold its port
        rec = Recorder(monitor)
        rec.ports.add(port)
        server = spawn("swt-veth-srv", SERVER, 4, pair.addr_b, port, n, 100, 200,
                       netns=pair.b, rec=rec)  # fmt: skip
        listening = server.expect("listening")
        clients = [
            spawn(f"swt-veth-cli{i}", CLIENT, 4, pair.addr_b, port, 100, 200, netns=pair.a, rec=rec)
            for i in range(n)
        ]
        connected = [c.expect("connected") for c in clients]
        for c in clients:
            assert c.expect("exchanged")["received"] == 200
        accepted = [server.expect("accepted") for _ in range(n)]
        assert os.stat(f"/proc/{server.pid}/ns/net").st_ino == in_b
        assert all(os.stat(f"/proc/{c.pid}/ns/net").st_ino == in_a for c in clients)

        # The OPEN records, selected by tuple and namespace (not by pid) ...
        def open_for(local: list, peer: list, netns: int) -> ConnEvent:
            return rec.wait(lambda e: tuple_is(e, local, peer, netns), kind=Kind.OPEN)[0]

        client_opens = [open_for(m["local"], m["peer"], in_a) for m in connected]
        server_opens = [open_for(m["local"], m["peer"], in_b) for m in accepted]
        listener_open = rec.wait(
            lambda e: e.role == Role.LISTENER and is_listener_at(e, listening["local"], in_b),
            kind=Kind.OPEN,
        )[0]
        # ... and the live rows, whose fds come from /proc of the owners.
        live = monitor.connections()

        for client, mine, ev in zip(clients, connected, client_opens):
            assert mine["local"][0] == pair.addr_a and mine["peer"] == [pair.addr_b, port]
            assert (ev.role, ev.tgid, ev.comm) == (Role.CLIENT, client.pid, client.name)
            row = find_row(live, mine["local"], mine["peer"], in_a)
            assert_owned(row, client.pid, mine["fd"], client.name)
            assert (row.ev.role, row.ev.state) == (Role.CLIENT, ESTABLISHED)
            assert (row.ev.payload_sent, row.ev.payload_received) == (100, 200)
        for acc, ev in zip(accepted, server_opens):
            assert acc["local"] == [pair.addr_b, port] and acc["peer"][0] == pair.addr_a
            assert (ev.role, ev.tgid, ev.comm) == (Role.SERVER, server.pid, server.name)
            row = find_row(live, acc["local"], acc["peer"], in_b)
            assert_owned(row, server.pid, acc["fd"], server.name)
            assert (row.ev.role, row.ev.state) == (Role.SERVER, ESTABLISHED)
            assert (row.ev.payload_sent, row.ev.payload_received) == (200, 100)
        assert (listener_open.tgid, listener_open.comm) == (server.pid, server.name)
        row = find_listener(live, listening["local"], in_b)
        assert_owned(row, server.pid, listening["fd"], server.name)

        # Closing: the CLOSE records keep the namespace and the owners.
        for c in clients:
            c.send("close")
        for c in clients:
            c.expect("closed")
            c.finish()
        server.send("close")
        server.expect("closed")
        server.finish()
        for client, m in zip(clients, connected):
            ev = rec.wait(lambda e: tuple_is(e, m["local"], m["peer"], in_a))[0]
            assert (ev.tgid, ev.role, ev.result, ev.oldstate) == (
                client.pid, Role.CLIENT, Result.OK, FIN_WAIT2)  # fmt: skip
        for m in accepted:
            ev = rec.wait(lambda e: tuple_is(e, m["local"], m["peer"], in_b))[0]
            assert (ev.tgid, ev.role, ev.result, ev.oldstate) == (
                server.pid, Role.SERVER, Result.OK, LAST_ACK)  # fmt: skip
            assert (ev.payload_sent, ev.payload_received) == (200, 100)

    with_retries(spawn, attempt)


# --------------------------------------------------------------------------------------
# 6. Connections that predate the monitor
# --------------------------------------------------------------------------------------


def preexisting_pair(
    spawn: Spawner, send: int, reply: int
) -> tuple[Child, Child, dict, dict, dict]:
    """A loopback client and server, in child processes, connected and past
    their exchange: (server, client, listening, accepted, connected)."""
    host = "127.0.0.1"
    server = spawn("swt-pre-server", SERVER, 4, host, 0, 1, send, reply)
    listening = server.expect("listening")
    client = spawn("swt-pre-client", CLIENT, 4, host, listening["local"][1], send, reply)
    connected = client.expect("connected")
    client.expect("exchanged")
    accepted = server.expect("accepted")
    return server, client, listening, accepted, connected


@contextlib.contextmanager
def monitor_started_now() -> Iterator[Monitor]:
    """A monitor started after the test's sockets exist, with room for every close
    on the host meanwhile (other tests may be busy), judged by loss_guard."""
    mon = Monitor(LoaderConfig(), closed_capacity=1 << 20)
    mon.start()
    try:
        with loss_guard(mon):
            yield mon
    finally:
        mon.close()


class Closing:
    """Waits for sockets that predate the monitor to leave its live table by their
    CLOSE records, poll() alone (no reconciliation). ``ours``: name -> (sock
    address, alive_since_ns), since the kernel reuses addresses quickly."""

    def __init__(self, mon: Monitor, ours: dict[str, tuple[int, int]]):
        self.mon, self.ours = mon, ours

    def is_ours(self, name: str, conn: Connection) -> bool:
        return (conn.key, conn.alive_since_ns) == self.ours[name]

    def still_live(self, name: str) -> bool:
        conn = self.mon.table.live.get(self.ours[name][0])
        return conn is not None and self.is_ours(name, conn)

    def in_kernel(self, names: Iterable[str]) -> set[str]:
        """Those of ``names`` whose socket (our incarnation of it) the kernel's own
        walk still finds: one walk for all of them."""
        opened = {ev.skaddr: ev.open_ns for ev in kernel_sockets(self.mon)}
        return {n for n in names
                if opened.get(self.ours[n][0], 1 << 64) <= self.ours[n][1]}

    def wait_gone(self, names: list[str]) -> None:
        """Rarely the kernel keeps an orphaned FIN_WAIT2 socket whole until its
        timer fires (tcp_fin_timeout) instead of turning it into a TIME_WAIT sock
        at once; there is no CLOSE record to apply before then. The kernel's walk
        tells that case apart from a CLOSE we missed, and the wait is stretched to
        the timeout once. A close that never reached our hooks (README, known
        limits) must have been repaired; the attempt is then retried."""
        mon = self.mon
        deadline = time.monotonic() + DEADLINE_S
        stretched = False
        while True:
            while any(map(self.still_live, names)) and time.monotonic() < deadline:
                mon.poll()
                time.sleep(IDLE_S / 2)
            still = [n for n in names if self.still_live(n)]
            if stretched or not still or self.in_kernel(still) != set(still):
                break
            with open("/proc/sys/net/ipv4/tcp_fin_timeout") as f:
                deadline = time.monotonic() + int(f.read()) + DEADLINE_S
            stretched = True
            warnings.warn(f"{still} still open in the kernel: waiting for its timer",
                          stacklevel=2)
        # The known gap. A row whose address a new socket took was retired by the
        # table's ordering rules already; any other a reconciliation repairs.
        unseen = sorted(set(still) - self.in_kernel(still))
        if unseen:
            mon.reconcile()
            assert not any(map(self.still_live, unseen)), unseen
        repaired = [n for n in names if any(c.reconciled and self.is_ours(n, c)
                                            for c in mon.table.recently_closed())]
        assert set(unseen) <= set(repaired), (unseen, repaired)
        if repaired:
            raise CloseNeverSeen(f"{repaired} closed without a CLOSE record; repaired")
        assert not still, f"{still} still live in the kernel after its timer; {mon.loss()}"


def test_connections_opened_before_start(spawn: Spawner) -> None:
    """Sockets opened before sockwatch started were never seen opening: the
    iter/tcp seed finds them and iter/task_file names their owners and fds. When they
    close, the (untracked) CLOSE records must take them out of the live table
    by themselves, without waiting for a reconciliation."""

    def attempt(_: int) -> None:
        server, client, listening, srv, cli = preexisting_pair(spawn, 10, 20)
        with monitor_started_now() as mon:
            check(mon, server, client, listening, srv, cli)

    def check(
        mon: Monitor, server: Child, client: Child, listening: dict, srv: dict, cli: dict
    ) -> None:
        t_started = time.monotonic_ns()
        live = mon.connections()
        rows = {
            "client": find_row(live, cli["local"], cli["peer"]),
            "server": find_row(live, srv["local"], srv["peer"]),
            "listener": find_listener(live, listening["local"]),
        }
        assert_owned(rows["client"], client.pid, cli["fd"], client.name)
        assert_owned(rows["server"], server.pid, srv["fd"], server.name)
        assert_owned(rows["listener"], server.pid, listening["fd"], server.name)
        assert rows["client"].ev.state == rows["server"].ev.state == ESTABLISHED
        assert rows["listener"].ev.state == LISTEN
        for row in rows.values():
            assert row.seen_by == "snapshot"
            assert 0 < row.alive_since_ns < t_started
        # Counters come from the kernel's walk, not from anything seen happen.
        assert (rows["client"].ev.payload_sent, rows["client"].ev.payload_received) == (10, 20)
        assert (rows["server"].ev.payload_sent, rows["server"].ev.payload_received) == (20, 10)

        # skaddr is reused quickly by other sockets (other tests may be running):
        # a row is "ours" only with our key and our incarnation's alive_since_ns.
        ours = {name: (row.key, row.alive_since_ns) for name, row in rows.items()}

        closing = Closing(mon, ours)
        is_ours, wait_gone = closing.is_ours, closing.wait_gone

        assert closing.in_kernel(ours) == set(ours)
        client.send("close")
        client.expect("closed")
        client.finish()
        wait_gone(["client"])
        assert closing.still_live("server") and closing.still_live("listener")
        server.send("close")
        server.expect("closed")
        server.finish()
        wait_gone(["server", "listener"])
        assert not closing.in_kernel(ours)

        gone = mon.table.recently_closed()
        closed = {name: [c for c in gone if is_ours(name, c)] for name in ours}
        for name, pid, last in (("client", client.pid, FIN_WAIT2), ("server", server.pid, LAST_ACK),
                                ("listener", server.pid, LISTEN)):  # fmt: skip
            assert len(closed[name]) == 1, (name, closed[name])
            row = closed[name][0]
            assert not row.reconciled, f"{name} was removed by reconciliation, not its CLOSE"
            assert (row.ev.kind, row.ev.result, row.ev.oldstate) == (Kind.CLOSE, Result.OK, last)
            assert row.closed_ns == row.ev.ts_ns > t_started
            assert row.tgid == pid  # the owner /proc named survives the anonymous CLOSE

        # And a full refresh agrees: nothing of ours is left.
        for conn in mon.connections():
            assert conn.tgid not in (client.pid, server.pid), conn
            assert not any(is_ours(name, conn) for name in ours), conn

    with_retries(spawn, attempt)


def test_closed_row_of_preexisting_connection_keeps_its_tuple(spawn: Spawner) -> None:
    """A connection that predates the monitor, once closed, is still reported
    (recently_closed, `table` closed rows, trace) with the tuple and inode it had."""

    def attempt(_: int) -> None:
        _, client, _, _, cli = preexisting_pair(spawn, 1, 1)
        with monitor_started_now() as mon:
            row = find_row(mon.connections(), cli["local"], cli["peer"])
            ino = socket_inode(client.pid, cli["fd"])
            closing = Closing(mon, {"client": (row.key, row.alive_since_ns)})
            client.send("close")
            client.expect("closed")
            client.finish()
            closing.wait_gone(["client"])
            closed = [c for c in mon.table.recently_closed() if closing.is_ours("client", c)]
            assert len(closed) == 1 and not closed[0].reconciled, mon.loss()
            assert closed[0].tgid == client.pid
            assert (closed[0].ev.sport, closed[0].ev.ino) == (cli["local"][1], ino), closed[0].ev

    with_retries(spawn, attempt)
