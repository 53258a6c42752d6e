"""Attribution at scale, agreement with ``ss``, and the attach modes.

Ground truth is always the test's own: pids it forked, fds it holds, bytes it
sent, and what ``ss`` (sock_diag, independent of sockwatch) says about the same
sockets. Everything asserted is filtered by the test's own ports and pids, so
other sockwatch instances running beside it do not matter.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.kernel import daemon_util as du
from sockwatch.errors import SockwatchError
from sockwatch.kernel import features
from sockwatch.kernel.loader import LoaderConfig, default_objects_dir
from sockwatch.monitor import Monitor
from sockwatch.records import Kind, Result, Role, state_name

ROOT = Path(__file__).resolve().parents[2]
LIBC = ctypes.CDLL(None, use_errno=True)
PR_SET_NAME = 15
# Other sockwatch tests and benchmarks may run beside these ones and flood every
# monitor's ring buffer with their connections: give ours room (~116k records).
RING_BYTES = 32 << 20


# -- helpers ---------------------------------------------------------------------------
def held_bpf_objects() -> list[str]:
    """Every BPF object this process holds: programs, maps, links, BTF, iterators."""
    held = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(("anon_inode:bpf", "anon_inode:btf")):
            held.append(f"{fd}->{target}")
    return held


def bpf_program_misses() -> dict[str, int]:
    """Kernel-side recursion misses of each BPF program this process holds: runs the
    kernel skipped because the program was already running on that CPU."""
    misses = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") != "anon_inode:bpf-prog":
                continue
            with open(f"/proc/self/fdinfo/{fd}") as f:
                prog_id = next(ln.split()[1] for ln in f if ln.startswith("prog_id:"))
        except (OSError, StopIteration):
            continue
        out = subprocess.run(["bpftool", "-j", "prog", "show", "id", prog_id],
                             capture_output=True, text=True, timeout=10)
        if out.returncode == 0:
            info = json.loads(out.stdout)
            misses[info.get("name", prog_id)] = info.get("recursion_misses", 0)
    return misses


MY_NETNS = os.stat("/proc/self/ns/net").st_ino


def ours(ev, ports: set[int], addr: str = "127.0.0.1") -> bool:
    """A record of this test's sockets: one of its ports on its address, in its network
    namespace (other tests may use the same port numbers on other addresses or inside
    namespaces of their own)."""
    return ev.netns == MY_NETNS and (
        (ev.sport in ports and ev.saddr == addr) or (ev.dport in ports and ev.daddr == addr))


def poll_until(mon: Monitor, done, timeout: float, sink: list) -> bool:
    """Poll the monitor into ``sink`` until ``done(sink)`` or the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        sink.extend(mon.poll())
        if done(sink):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)


cli_env = du.daemon_env  # the checkout, its BPF objects, plain log lines


def kernel_features(mount: bool = False) -> features.KernelFeatures:
    return features.probe_kernel(str(default_objects_dir() / "probe.bpf.o"), mount=mount)


# -- 1. a thousand short-lived processes -------------------------------------------------
N_CHILDREN = 1000
BATCH = 50


def _child(addr: tuple[str, int], name: bytes) -> None:
    """Runs in a forked child: rename, connect once, send one byte, close, exit."""
    code = 1
    try:
        LIBC.prctl(PR_SET_NAME, ctypes.c_char_p(name), 0, 0, 0)
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.connect(addr)
        s.sendall(b"x")
        s.close()
        code = 0
    finally:
        os._exit(code)


def test_thousand_short_lived_processes_attributed():
    with Monitor(LoaderConfig(ringbuf_bytes=RING_BYTES)) as monitor:
        short_lived_children(monitor, N_CHILDREN)


def short_lived_children(monitor: Monitor, n: int) -> float:
    """``n`` forked children each connect once, send a byte, close and exit; every one
    must be seen under its own pid and name. Returns the seconds it took (bench/
    attribution.py runs it with 10k children: too slow for the suite)."""
    srv = socket.create_server(("127.0.0.1", 0), backlog=n + 24)
    srv.setblocking(False)
    port = srv.getsockname()[1]
    names: dict[int, str] = {}  # ground truth: child pid -> the name it gave itself
    statuses: dict[int, int] = {}
    served = 0
    events: list = []
    loss0 = monitor.loss()
    repaired0 = repaired(monitor)
    t0 = time.monotonic()

    def serve_pending() -> int:
        got = 0
        while True:
            try:
                conn, _ = srv.accept()
            except BlockingIOError:
                return got
            with conn:
                conn.settimeout(5)
                data = b""
                while chunk := conn.recv(16):  # the byte, then the child's FIN
                    data += chunk
                assert data == b"x"
            got += 1

    try:
        for start in range(0, n, BATCH):
            batch = []
            for i in range(start, min(start + BATCH, n)):
                name = f"swk-{i:04d}"
                pid = os.fork()
                if pid == 0:  # pragma: no cover - child
                    _child(("127.0.0.1", port), name.encode())
                names[pid] = name
                batch.append(pid)
                if i % 10 == 9:
                    events.extend(monitor.poll())
            for pid in batch:
                _, status = os.waitpid(pid, 0)
                statuses[pid] = status
            served += serve_pending()
            events.extend(monitor.poll())
        deadline = time.monotonic() + 10
        while served < n and time.monotonic() < deadline:
            served += serve_pending()
            time.sleep(0.01)
    finally:
        for pid in names:  # reap anything left if the loop broke halfway
            if pid not in statuses:
                try:
                    os.kill(pid, 9)
                    os.waitpid(pid, 0)
                except ChildProcessError:
                    pass
        srv.close()

    assert all(os.waitstatus_to_exitcode(s) == 0 for s in statuses.values()), (
        Counter(os.waitstatus_to_exitcode(s) for s in statuses.values())
    )
    assert served == n
    assert len(names) == n  # distinct pids: no reuse within the run

    # (other tests may use the same port number inside their own network namespaces)
    def client(kind):
        return [e for e in events if e.kind == kind and e.role == Role.CLIENT
                and e.dport == port and e.daddr == "127.0.0.1" and e.netns == monitor.netns]

    def server(kind):
        return [e for e in events if e.kind == kind and e.role == Role.SERVER
                and e.sport == port and e.saddr == "127.0.0.1" and e.netns == monitor.netns]

    def complete(_evs) -> bool:
        return all(len(recs(kind)) >= n
                   for recs in (client, server) for kind in (Kind.OPEN, Kind.CLOSE))

    poll_until(monitor, complete, 5, events)
    elapsed = time.monotonic() - t0
    loss = monitor.loss()
    assert loss.decode_errors == loss0.decode_errors == 0
    assert loss.socks_map_full == loss0.socks_map_full

    # What arrived is right: each child at most once per kind, under its own pid
    # and the name it gave itself, and nobody else on this port.
    expected = set(names)
    for kind in (Kind.OPEN, Kind.CLOSE):
        recs = client(kind)
        per_pid = Counter(e.tgid for e in recs)
        assert set(per_pid) <= expected, f"{kind.name}: tgids {set(per_pid) - expected}"
        assert max(per_pid.values(), default=1) == 1, [p for p, n in per_pid.items() if n > 1]
        wrong = [(e.tgid, e.comm, names[e.tgid]) for e in recs if e.comm != names[e.tgid]]
        assert not wrong, f"{kind.name}: {len(wrong)} wrong names, e.g. {wrong[:5]}"
        # a single-threaded child: the connecting task is the process itself
        assert all(e.tid == e.tgid for e in recs)
    closes = client(Kind.CLOSE)
    assert all(e.result == Result.OK for e in closes), Counter(e.result for e in closes)
    assert all(e.payload_sent == 1 and e.payload_received == 0 for e in closes)
    # The accepted ends belong to this process, which read and closed them.
    accepted = server(Kind.OPEN) + server(Kind.CLOSE)
    assert {e.tgid for e in accepted} <= {os.getpid()}
    assert all(e.payload_received == 1 and e.payload_sent == 0 for e in server(Kind.CLOSE))
    # The peers of the accepted sockets are the children's source ports.
    assert {e.dport for e in server(Kind.CLOSE)} <= {e.sport for e in client(Kind.OPEN)}

    # Every connection was seen open, under its own pid and name.
    assert {e.tgid for e in client(Kind.OPEN)} == expected
    assert {e.tgid for e in server(Kind.OPEN)} == {os.getpid()}
    assert len(server(Kind.OPEN)) == n

    # Closes: on this kernel a few client sockets in ten thousand, orphaned in
    # FIN_WAIT1 and completed by the server's delayed ACK in a timer softirq, are
    # never handed to our programs (the kernel traces the state changes; see
    # bench/missed_closes.py). The guarantee is then that the stale rows are
    # repaired and counted, so the table never keeps a ghost: at most a few.
    # (sock addresses are reused within milliseconds: match by the children's pids)
    unclosed = expected - {e.tgid for e in closes}
    if unclosed and loss.ringbuf_full == loss0.ringbuf_full:
        assert len(unclosed) <= n // 200, (
            f"{len(unclosed)} closes missing: {bpf_program_misses()}; "
            f"{_missing_closes(events, client(Kind.OPEN), closes, port)}")
        monitor.reconcile()
        with monitor.lock:
            ghosts = [hex(k) for k, row in monitor.table.live.items() if row.tgid in unclosed]
        assert not ghosts, f"stale rows survived reconciliation: {ghosts}"
        assert repaired(monitor) - repaired0 >= len(unclosed), "repairs not counted"
        return time.monotonic() - t0

    # And nothing else is missing.
    counts = {f"{side} {kind.name}": len(recs(kind))
              for side, recs in (("client", client), ("server", server))
              for kind in (Kind.OPEN, Kind.CLOSE)}
    if not complete(events):
        dropped = loss.ringbuf_full - loss0.ringbuf_full
        if dropped:
            # Counted loss: other processes flooded the (shared, host-wide) stream.
            pytest.skip(
                f"host too busy to check completeness: the ring buffer overflowed "
                f"({dropped} records dropped and counted) while this test ran; got {counts}"
            )
        pytest.fail(
            f"records lost without any loss counted by Monitor.loss(): {counts} of "
            f"{n} each; BPF programs of this process (recursion_misses from "
            f"bpf_prog_info): {bpf_program_misses()}; missing clients: "
            f"{_missing_closes(events, client(Kind.OPEN), closes, port)}"
        )
    assert {e.tgid for e in client(Kind.OPEN)} == {e.tgid for e in closes} == expected
    assert Counter(e.dport for e in server(Kind.CLOSE)) == Counter(e.sport for e in closes)
    assert loss.ringbuf_full == loss0.ringbuf_full
    assert elapsed < 45 * max(1, n // 1000), f"took {elapsed:.1f}s"
    return elapsed


def repaired(monitor) -> int:
    """Rows the table retired because their close never came (reconcile or reuse)."""
    return (monitor.table.counters["reconciled_removed"]
            + monitor.table.counters["stale_replaced"])


def _missing_closes(events, opens, closes, port) -> list[str]:
    """For a failure message: what became of the clients whose CLOSE never came."""
    closed = {e.tgid for e in closes}
    out = []
    for o in opens:
        if o.tgid in closed:
            continue
        related = [(e.kind.name, e.role.name, e.tgid, state_name(e.oldstate), e.ts_ns - o.ts_ns)
                   for e in events if e.sport == o.sport or e.dport == o.sport]
        out.append(f"pid {o.tgid} :{o.sport} now {_tcp_states_of(o.sport, port)} "
                   f"records {related}")
    return out[:5]


# -- 2. sockwatch table --json against ss -tanpie -i ---------------------------------------
_SS_COUNTERS = ("bytes_sent", "bytes_acked", "bytes_received", "bytes_retrans",
                "segs_out", "segs_in")


def _split_endpoint(text: str) -> tuple[str, int]:
    addr, port = text.rsplit(":", 1)
    if addr.startswith("[") and addr.endswith("]"):
        addr = addr[1:-1]
    addr = addr.split("%", 1)[0]  # 127.0.0.1%lo when bound to a device
    if addr == "*":
        addr = "0.0.0.0"
    return addr, 0 if port == "*" else int(port)


def parse_ss(text: str) -> dict[int, dict]:
    """``ss -tanpie -i -H`` output -> {inode: fields}, one entry per socket.

    Each socket is a line starting with the state and a continuation line
    (starting with whitespace) holding tcp_info. ss omits counters that are 0
    and ``uid:`` when it is 0.
    """
    socks: dict[int, dict] = {}
    cur: dict | None = None
    for line in text.splitlines():
        if not line.strip():
            continue
        if not line[0].isspace():
            tok = line.split()
            laddr, lport = _split_endpoint(tok[3])
            raddr, rport = _split_endpoint(tok[4])
            users = re.findall(r'\("((?:[^"\\]|\\.)*)",pid=(\d+),fd=(\d+)\)', line)
            ino = re.search(r"\bino:(\d+)", line)
            uid = re.search(r"\buid:(\d+)", line)
            cur = {
                "state": tok[0],
                "local_addr": laddr, "local_port": lport,
                "remote_addr": raddr, "remote_port": rport,
                "users": [(name, int(pid), int(fd)) for name, pid, fd in users],
                "ino": int(ino.group(1)) if ino else 0,
                "uid": int(uid.group(1)) if uid else 0,
                **{k: 0 for k in _SS_COUNTERS},
                "retrans_total": 0,
                "rtt_ms": None,
            }
            socks[cur["ino"]] = cur
        elif cur is not None:
            for k in _SS_COUNTERS:
                m = re.search(rf"(?<![\w.]){k}:(\d+)", line)
                if m:
                    cur[k] = int(m.group(1))
            m = re.search(r"(?<![\w.])retrans:\d+/(\d+)", line)
            if m:
                cur["retrans_total"] = int(m.group(1))
            m = re.search(r"(?<![\w.])rtt:([\d.]+)/", line)
            if m:
                cur["rtt_ms"] = float(m.group(1))
    return socks


def exchange(cli: socket.socket, acc: socket.socket, up: int, down: int) -> None:
    """The client sends ``up`` bytes, then the server ``down``; each is read in full."""
    for sender, receiver, n in ((cli, acc, up), (acc, cli, down)):
        if n:
            sender.sendall(b"x" * n)
            got = 0
            while got < n:
                got += len(receiver.recv(65536))


def ss_snapshot(ports: list[int]) -> dict[int, dict]:
    expr = " or ".join(f"sport = :{p} or dport = :{p}" for p in ports)
    out = subprocess.run(["ss", "-tanpie", "-i", "-H", expr],
                         capture_output=True, text=True, check=True, timeout=10).stdout
    return parse_ss(out)


def _comparable(ss: dict[int, dict]) -> dict:
    return {ino: {k: v for k, v in d.items() if k != "rtt_ms"} for ino, d in ss.items()}


def test_table_json_agrees_with_ss():
    if not shutil.which("ss"):
        pytest.skip("ss (iproute2) is not installed")
    socks: list[socket.socket] = []
    try:
        srv4 = socket.create_server(("127.0.0.1", 0))
        srv6 = socket.create_server(("::1", 0), family=socket.AF_INET6)
        socks += [srv4, srv6]
        p4, p6 = srv4.getsockname()[1], srv6.getsockname()[1]
        pairs = []
        payloads = [(1000, 333), (70_000, 5), (1, 0)]
        for i, (up, down) in enumerate(payloads):
            srv, fam, host = (srv6, socket.AF_INET6, "::1") if i == 1 else (srv4, socket.AF_INET, "127.0.0.1")
            if i == 2:
                # created with fsuid nobody: its sk_uid (ss "uid:") is 65534
                assert LIBC.setfsuid(65534) == 0
                try:
                    cli = socket.socket(fam, socket.SOCK_STREAM)
                finally:
                    LIBC.setfsuid(0)
                    assert LIBC.setfsuid(0) == 0
            else:
                cli = socket.socket(fam, socket.SOCK_STREAM)
            socks.append(cli)
            cli.connect((host, srv.getsockname()[1]))
            acc, _ = srv.accept()
            socks.append(acc)
            exchange(cli, acc, up, down)
            pairs.append((cli, acc))
        # ground truth from /proc/self/fd: socket:[inode] for each fd the test holds
        my_inos = {int(os.readlink(f"/proc/self/fd/{s.fileno()}")[8:-1]): s.fileno()
                   for s in socks}
        ino_of = {id(s): os.fstat(s.fileno()).st_ino for s in socks}
        assert set(ino_of.values()) == set(my_inos)

        # Idle: wait until two consecutive ss snapshots agree (delayed ACKs settled).
        deadline = time.monotonic() + 10
        before, settled = ss_snapshot([p4, p6]), False
        while not settled and time.monotonic() < deadline:
            time.sleep(0.1)
            again = ss_snapshot([p4, p6])
            settled, before = _comparable(again) == _comparable(before), again

        # --pid keeps the output small on a host with many sockets (the walk is whole)
        proc = subprocess.run(
            [sys.executable, "-m", "sockwatch", "table", "--json", "--pid", str(os.getpid())],
            cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=90,
        )
        after = ss_snapshot([p4, p6])
    finally:
        for s in socks:
            s.close()

    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert {r["pid"] for r in rows} == {os.getpid()}
    assert _comparable(after) == _comparable(before), "connections were not idle"
    assert set(before) == set(my_inos), "ss does not list exactly the test's sockets"

    by_ino = {r["ino"]: r for r in rows if r["ino"] in my_inos}
    assert set(by_ino) == set(my_inos), f"sockwatch misses inodes {set(my_inos) - set(by_ino)}"
    pid = os.getpid()
    for ino, ss in before.items():
        row = by_ino[ino]
        what = f"ino {ino} ({row['role']} {row['local_addr']}:{row['local_port']})"
        assert ss["users"] == [(ss["users"][0][0], pid, my_inos[ino])], what
        assert row["pid"] == pid and row["fd"] == my_inos[ino], what
        assert row["process"] == ss["users"][0][0], what
        for field in ("state", "local_addr", "local_port", "remote_addr", "remote_port", "uid"):
            assert row[field] == ss[field], f"{what}: {field} {row[field]!r} vs ss {ss[field]!r}"
        assert row["tcpi_bytes_sent"] == ss["bytes_sent"], what
        assert row["tcpi_bytes_acked"] == ss["bytes_acked"], what
        assert row["tcpi_bytes_received"] == ss["bytes_received"], what
        assert row["tcpi_bytes_retrans"] == ss["bytes_retrans"], what
        assert row["segs_out"] == ss["segs_out"], what
        assert row["segs_in"] == ss["segs_in"], what
        assert row["retransmits"] == ss["retrans_total"], what
        if ss["rtt_ms"] is not None and row["state"] == "ESTAB":
            assert abs(row["rtt_us"] - ss["rtt_ms"] * 1000) <= 1, what

    # And both agree with what the test itself did.
    states = Counter(before[i]["state"] for i in before)
    assert states == {"LISTEN": 2, "ESTAB": 6}
    def row_of(sock: socket.socket) -> dict:
        return by_ino[ino_of[id(sock)]]

    for (cli, acc), (up, down) in zip(pairs, payloads):
        c, a = row_of(cli), row_of(acc)
        assert (c["tcpi_bytes_sent"], c["tcpi_bytes_received"]) == (up, down)
        assert (a["tcpi_bytes_sent"], a["tcpi_bytes_received"]) == (down, up)
        assert (c["remote_port"], a["local_port"]) == (a["local_port"], c["remote_port"])
    assert [row_of(c)["uid"] for c, _ in pairs] == [0, 0, 65534]


# -- 3. every available attach mode sees the same thing -----------------------------------
TRACEPOINT_MODES = ("auto", "tp_btf", "raw_tp", "tracepoint")
WORKLOAD = [(100, 7), (4096, 0), (1, 65536)]  # (client -> server, server -> client) bytes


def _tcp_states_of(lport: int, rport: int) -> set[str]:
    """States (hex, as /proc/net/tcp shows them) of the sockets 127.0.0.1:lport -> :rport
    (an older TIME_WAIT socket may share the tuple)."""
    states = set()
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            tok = line.split()
            if (int(tok[1].rsplit(":", 1)[1], 16), int(tok[2].rsplit(":", 1)[1], 16)) == (
                lport, rport
            ):
                states.add(tok[3])
    return states


def _wait(cond, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.002)


def run_workload(mon: Monitor) -> tuple[list, list, set[int]]:
    """Listener, three connections with known bytes, one refused connect.

    Returns (the live rows seen mid-run, every record, the ports involved).
    The client always closes first and waits for FIN_WAIT2 before the server
    closes, so every socket takes the same path through the states in every run.
    """
    blocker = socket.socket()  # bound but not listening: connects to it are refused
    blocker.bind(("127.0.0.1", 0))
    refused_port = blocker.getsockname()[1]
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]
    labels: dict[int, str] = {srv.fileno(): "listener"}
    conns = []
    events: list = []
    try:
        for i, (up, down) in enumerate(WORKLOAD):
            cli = socket.create_connection(("127.0.0.1", port), timeout=5)
            acc, _ = srv.accept()
            acc.settimeout(5)
            conns.append((cli, acc))
            labels[cli.fileno()], labels[acc.fileno()] = f"client{i}", f"server{i}"
            exchange(cli, acc, up, down)
        # connections() drains the ring buffer into the table: keep what it holds first
        events.extend(mon.poll())
        live = [
            (labels.get(c.fd, "?"), c.ev.role.name, c.ev.state_name, c.tgid,
             c.ev.payload_sent, c.ev.payload_received)
            for c in mon.connections()
            if c.tgid == os.getpid() and ours(c.ev, {port})
        ]
        for cli, acc in conns:
            cport = cli.getsockname()[1]
            cli.close()
            events.extend(mon.poll())
            assert acc.recv(1) == b""  # the client's FIN arrived
            _wait(lambda: "05" in _tcp_states_of(cport, port))  # FIN_WAIT2: our FIN was acked
            acc.close()
        bad = socket.socket()
        with pytest.raises(ConnectionRefusedError):
            bad.connect(("127.0.0.1", refused_port))
        bad.close()
    finally:
        for cli, acc in conns:
            cli.close()
            acc.close()
        srv.close()
        blocker.close()
    ports = {port, refused_port}

    def complete(evs) -> bool:
        mine = [e for e in evs if ours(e, ports)]
        return sum(e.kind == Kind.CLOSE for e in mine) >= 2 * len(WORKLOAD) + 2

    poll_until(mon, complete, 5, events)
    return live, [e for e in events if ours(e, ports)], ports


def normalize(events: list) -> list[tuple]:
    """What must not depend on the attach mode: no times, addresses or ports."""
    out = []
    for e in events:
        states = tuple(sorted(state_name(i) for i, t in enumerate(e.state_ns) if t))
        # counters at OPEN depend on when the first read ran; at CLOSE they are final
        payload = (e.payload_sent, e.payload_received) if e.kind == Kind.CLOSE else None
        out.append((
            e.kind.name, e.role.name, e.result.name, e.attrib.name,
            state_name(e.oldstate), state_name(e.state), states,
            payload, e.tgid == os.getpid(), e.comm,
        ))
    return sorted(out, key=repr)


def test_every_available_attach_mode_sees_the_same():
    feats = kernel_features(mount=True)  # classic tracepoints need tracefs
    modes = [m for m in TRACEPOINT_MODES if m == "auto" or feats.allows(m)]
    unavailable = sorted(set(TRACEPOINT_MODES) - set(modes))
    if len(modes) < 2:
        pytest.skip(f"only {modes} can attach here; nothing to compare ({unavailable})")
    results, misses = {}, {}
    for mode in modes:
        for _attempt in range(3):
            with Monitor(LoaderConfig(attach_mode=mode, ringbuf_bytes=RING_BYTES)) as mon:
                chosen = {h.hook: h.mode for h in mon.probes.plan.hooks}
                if mode != "auto":
                    assert chosen["state"] == mode
                loss0 = mon.loss()
                live, events, ports = run_workload(mon)
                dropped = mon.loss().ringbuf_full - loss0.ringbuf_full
                misses[mode] = bpf_program_misses()
            if not dropped:
                break
        else:  # counted loss caused by other processes' connections, every time
            pytest.skip(f"host too busy: the ring buffer overflowed in {mode} mode "
                        f"({dropped} records dropped and counted) in 3 attempts")
        results[mode] = (sorted(live), normalize(events), events)

    ref_live, ref_norm, ref_events = results["auto"]
    # The reference itself is right, not just consistent:
    kinds = Counter((e.kind.name, e.role.name, e.result.name) for e in ref_events)
    n = len(WORKLOAD)
    assert kinds == {
        ("OPEN", "LISTENER", "OK"): 1, ("CLOSE", "LISTENER", "OK"): 1,
        ("OPEN", "CLIENT", "OK"): n, ("CLOSE", "CLIENT", "OK"): n,
        ("OPEN", "SERVER", "OK"): n, ("CLOSE", "SERVER", "OK"): n,
        ("CLOSE", "CLIENT", "REFUSED"): 1,
    }, f"{kinds}; recursion misses {misses['auto']}"
    assert all(e.tgid == os.getpid() for e in ref_events)
    client_closes = sorted((e.payload_sent, e.payload_received) for e in ref_events
                           if e.kind == Kind.CLOSE and e.role == Role.CLIENT
                           and e.result == Result.OK)
    assert client_closes == sorted(WORKLOAD)
    server_closes = sorted((e.payload_received, e.payload_sent) for e in ref_events
                           if e.kind == Kind.CLOSE and e.role == Role.SERVER)
    assert server_closes == sorted(WORKLOAD)
    assert sorted(label for label, *_ in ref_live) == sorted(
        ["listener"] + [f"client{i}" for i in range(n)] + [f"server{i}" for i in range(n)])
    for label, role, state, tgid, sent, received in ref_live:
        if label != "listener":
            i = int(label[-1])
            up, down = WORKLOAD[i]
            assert (sent, received) == ((up, down) if role == "CLIENT" else (down, up)), label
            assert state == "ESTAB"

    for mode in modes:
        live, norm, _ = results[mode]
        assert live == ref_live, f"{mode}: live table differs from auto"
        assert norm == ref_norm, (
            f"{mode}: records differ from auto: only in {mode} "
            f"{[r for r in norm if r not in ref_norm]}, only in auto "
            f"{[r for r in ref_norm if r not in norm]}; recursion misses {misses}")


# -- 4. an unavailable mode fails fast and cleanly --------------------------------------------
@pytest.mark.parametrize("mode", ["fentry", "kprobe"])
def test_unavailable_mode_fails_fast_and_cleanly(mode):
    feats = kernel_features()
    if feats.allows(mode):
        pytest.skip(f"{mode} is available on this kernel: nothing to refuse")
    before = held_bpf_objects()
    mon = Monitor(LoaderConfig(attach_mode=mode))
    t0 = time.monotonic()
    with pytest.raises(SockwatchError) as info:
        mon.start()
    elapsed = time.monotonic() - t0
    try:
        msg = str(info.value)
        assert mode in msg, msg
        assert "not available" in msg, msg
        assert "Traceback" not in msg and len(msg.splitlines()) == 1, msg
        assert elapsed < 5, f"took {elapsed:.1f}s to refuse"
        assert held_bpf_objects() == before == []
        assert mon.probes is None
        progs = subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True,
                               text=True, timeout=10)
        if progs.returncode == 0 and progs.stdout.strip():
            mine = [p for p in json.loads(progs.stdout)
                    if any(h.get("pid") == os.getpid() for h in p.get("pids", []))]
            assert mine == [], f"programs still held by this process: {mine}"
    finally:
        mon.close()


# -- 5. pid reuse ----------------------------------------------------------------------------
def _fork_at(pid: int, child) -> int | None:
    """Fork ``child`` as process ``pid`` (ns_last_pid, as CRIU does); None if another
    fork on the host took that pid first (the stray child is reaped)."""
    with open("/proc/sys/kernel/ns_last_pid", "w") as f:
        f.write(str(pid - 1))
    got = os.fork()
    if got == 0:  # pragma: no cover - child
        code = 1
        try:
            if os.getpid() == pid:
                child()
                code = 0
        finally:
            os._exit(code)
    if got != pid:
        os.waitpid(got, 0)
        return None
    return got


def _reusable_pid() -> int:
    with open("/proc/sys/kernel/pid_max") as f:
        top = int(f.read())
    return next(p for p in range(top - 2, 300, -1) if not os.path.exists(f"/proc/{p}"))


def test_pid_reuse_keeps_connections_and_process_names_apart():
    """Process A connects and exits; process B gets A's pid and connects too. A's
    closed connection keeps A's name, B's live one gets B's name and fd, and the
    process cache (keyed by pid and start time) does not hand B A's identity."""
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]

    def run_child(name: bytes, go_r: int, out_w: int) -> None:
        LIBC.prctl(PR_SET_NAME, ctypes.c_char_p(name), 0, 0, 0)
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(name[-1:])
        os.write(out_w, f"{s.fileno()}\n".encode())
        os.read(go_r, 1)  # until the parent says go (or dies)
        s.close()

    with Monitor(LoaderConfig(ringbuf_bytes=RING_BYTES), closed_capacity=1 << 20) as mon:
        seen = {}
        for name in (b"swreuse-a", b"swreuse-b"):
            go_r, go_w = os.pipe()
            out_r, out_w = os.pipe()
            pid = seen.get(b"swreuse-a", (None,))[0]
            for _ in range(50):
                target = pid or _reusable_pid()
                child = _fork_at(target, lambda: run_child(name, go_r, out_w))
                if child:
                    break
            else:
                pytest.skip("the host forks too fast to reuse a pid on purpose")
            os.close(out_w)
            fd = int(os.read(out_r, 16).split()[0])
            acc, _ = srv.accept()
            assert acc.recv(1) == name[-1:]
            mon.sync()
            info = mon.processes.lookup(child)
            conns = [c for c in mon.connections() if c.ev.dport == port and c.tgid == child]
            seen[name] = (child, fd, info, conns)
            if name == b"swreuse-a":  # A exits; its connection closes
                os.write(go_w, b"x")
                os.waitpid(child, 0)
                acc.close()
                mon.sync()
            else:
                closed = [c for c in mon.table.recently_closed()
                          if c.tgid == child and c.ev.dport == port]
                os.write(go_w, b"x")
                os.waitpid(child, 0)
                acc.close()
            for p in (go_r, go_w, out_r):
                os.close(p)
        totals = {(k.comm, k.what.name): v for k, v in mon.probes.totals().items()
                  if k.comm.startswith("swreuse-") and k.what.name in ("CONNECT", "SENT_BYTES")}
    srv.close()

    (pid_a, fd_a, info_a, conns_a), (pid_b, fd_b, info_b, conns_b) = (
        seen[b"swreuse-a"], seen[b"swreuse-b"])
    assert pid_a == pid_b  # the pid really was reused
    assert info_a.name == "swreuse-a" and info_b.name == "swreuse-b"
    assert info_a.start_time != info_b.start_time
    assert [(c.comm, c.fd) for c in conns_a] == [("swreuse-a", fd_a)]
    assert [(c.comm, c.fd) for c in conns_b] == [("swreuse-b", fd_b)]
    assert [c.comm for c in closed] == ["swreuse-a"]  # A's closed row keeps A's name
    assert totals == {("swreuse-a", "CONNECT"): 1, ("swreuse-b", "CONNECT"): 1,
                      ("swreuse-a", "SENT_BYTES"): 1, ("swreuse-b", "SENT_BYTES"): 1}
