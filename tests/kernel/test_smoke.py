"""The fixtures themselves: a monitor starts, sees a loopback connection, and
leaves nothing behind."""

import os
import socket
import subprocess
import sys
import textwrap
import time

import psutil

from sockwatch import records
from sockwatch.kernel.loader import LoaderConfig
from sockwatch.monitor import Monitor
from sockwatch.records import Kind, Role, Stat


def test_monitor_sees_loopback_connection(monitor):
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]
    cli = socket.create_connection(("127.0.0.1", port))
    acc, _ = srv.accept()
    cli.sendall(b"ping")
    assert acc.recv(4) == b"ping"
    try:
        conns = monitor.connections()
        mine = {c.ev.role: c for c in conns if port in (c.ev.sport, c.ev.dport)}
        assert mine[Role.CLIENT].tgid == os.getpid()
        assert mine[Role.CLIENT].fd == cli.fileno()
        assert mine[Role.SERVER].fd == acc.fileno()
        assert mine[Role.LISTENER].fd == srv.fileno()
        assert mine[Role.CLIENT].ev.payload_sent == 4
        assert mine[Role.SERVER].ev.payload_received == 4
    finally:
        for s in (cli, acc, srv):
            s.close()


def test_netns_pair_connects(netns_pair):
    server = netns_pair.popen(netns_pair.b, f"""
        import socket
        s = socket.create_server(("{netns_pair.addr_b}", 7000))
        print("ready", flush=True)
        c, _ = s.accept(); c.sendall(c.recv(5)); c.close()
    """)
    assert server.stdout.readline().strip() == "ready"
    client = netns_pair.popen(netns_pair.a, f"""
        import socket
        c = socket.create_connection(("{netns_pair.addr_b}", 7000), timeout=5)
        c.sendall(b"hello"); print(c.recv(5).decode())
    """)
    out, err = client.communicate(timeout=10)
    server.wait(timeout=10)
    assert out.strip() == "hello", err



def test_reconcile_walks_other_namespaces(monitor, netns_pair):
    """iter/tcp only sees the reader's namespace; the monitor must enter the
    others it has rows in, so counters there stay live (not frozen at OPEN)."""
    script = f"""
        import socket, sys
        s = socket.create_server(("{netns_pair.addr_b}", 7001))
        c = socket.create_connection(("{netns_pair.addr_b}", 7001))
        a, _ = s.accept()
        a.sendall(b"!"); c.recv(1)      # both ends have announced themselves
        print(c.getsockname()[1], flush=True)
        sys.stdin.readline()
        c.sendall(b"x" * 5000)
        n = 0
        while n < 5000:
            n += len(a.recv(65536))
        print("moved", flush=True)
        sys.stdin.readline()
    """
    child = subprocess.Popen(
        ["ip", "netns", "exec", netns_pair.b, sys.executable, "-c", textwrap.dedent(script)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        client_port = int(child.stdout.readline())
        monitor.poll()
        ns_b = os.stat(f"/run/netns/{netns_pair.b}").st_ino

        def row():
            conns = monitor.connections()
            mine = [c for c in conns if c.ev.sport == client_port and c.ev.netns == ns_b]
            assert mine, (client_port, dict(monitor.table.counters),
                          [(c.ev.sport, c.ev.dport, c.ev.netns, c.reconciled)
                           for c in monitor.table.recently_closed()][-8:],
                          [(c.ev.sport, c.ev.dport, c.ev.netns) for c in conns][-8:])
            return mine[0]

        before = row()
        assert before.ev.netns == ns_b != monitor.netns
        assert before.tgid == child.pid or psutil.Process(before.tgid).ppid() == child.pid
        assert before.ev.payload_sent == 0
        child.stdin.write("go\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "moved"
        assert row().ev.payload_sent == 5000  # refreshed by walking namespace b
    finally:
        child.kill()
        child.wait()


def test_small_ring_wraps_without_losing_records():
    """The data area is mapped once, so a batch that wraps the ring is read in two
    pieces: push several ring sizes of records through a 64 KiB ring, a few at a
    time, and every one must arrive whole. The monitor sees the whole host, so
    other sockets' records share the ring: any of ours missing must be counted."""
    mon = Monitor(LoaderConfig(ringbuf_bytes=64 << 10))
    mon.start()
    try:
        srv = socket.create_server(("127.0.0.1", 0))
        port = srv.getsockname()[1]
        seen = {Kind.OPEN: 0, Kind.CLOSE: 0}
        read_before = mon._reader.records_read
        lost_before = mon.loss().ringbuf_full
        for i in range(301):  # 300 x 4 records x 296 bytes = 5.4 ring sizes
            if i < 300:
                cli = socket.create_connection(("127.0.0.1", port))
                acc, _ = srv.accept()
                acc.close()
                cli.close()
            else:
                srv.close()
                time.sleep(0.05)
            for ev in mon.poll():
                if ev.role == Role.CLIENT and port == ev.dport:
                    seen[ev.kind] += 1
        loss = mon.loss()
        through = (mon._reader.records_read - read_before) * (records.EVENT_SIZE + 8)
        assert through > 4 * (64 << 10), "the ring did not wrap"
        assert loss.decode_errors == 0
        missing = 600 - seen[Kind.OPEN] - seen[Kind.CLOSE]
        assert 0 <= missing <= loss.ringbuf_full - lost_before, (seen, loss)
    finally:
        mon.close()


def test_rescue_ring_takes_what_the_main_ring_refuses():
    """A burst into a one-page main ring: the records it refuses go to the rescue
    ring, and one drain delivers more than the main ring can hold, in time order."""
    mon = Monitor(LoaderConfig(ringbuf_bytes=4096))
    mon.start()
    try:
        srv = socket.create_server(("127.0.0.1", 0))
        port = srv.getsockname()[1]
        mon.poll()
        before = mon.probes.stats()
        for _ in range(40):  # about 160 records; the main ring holds 13
            cli = socket.create_connection(("127.0.0.1", port))
            acc, _ = srv.accept()
            acc.close()
            cli.close()
        srv.close()
        time.sleep(0.05)
        events = mon.poll()
        after = mon.probes.stats()
        rescued = after[Stat.RESCUED] - before[Stat.RESCUED]
        main_capacity = 4096 // (records.EVENT_SIZE + 8)
        assert rescued > 0
        assert len(events) > main_capacity
        assert len(events) <= main_capacity + rescued
        # rescued records are merged back by time: no socket's CLOSE before its OPEN
        order = {}
        for ev in events:
            order.setdefault(ev.skaddr, []).append(ev.kind)
        assert all(kinds.index(Kind.CLOSE) > kinds.index(Kind.OPEN)
                   for kinds in order.values() if Kind.OPEN in kinds and Kind.CLOSE in kinds)
        assert mon.loss().decode_errors == 0
    finally:
        mon.close()
