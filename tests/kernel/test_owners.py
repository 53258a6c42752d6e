"""The owners walk (iter/task_file, bpf/owners.bpf.c) against /proc/<pid>/fd.

Processes hold real sockets at known fds: TCP over IPv4 and IPv6 (a listener,
both ends of a connection, a dup()ed fd), beside sockets that must not be
reported (UDP, a raw socket of protocol TCP, a unix pair), each in our network
namespace and in one the test makes; every holder forks, so each socket is
held by two processes. The walk must report exactly the TCP fds /proc lists,
with the sock address the iter/tcp rows use, and the monitor must then name the
owner and fd of every pre-existing socket from it: joined in the kernel by the
start-up walk, or, when the kernel's holders map cannot take them all, here.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator

from sockwatch import monitor as monitor_mod
from sockwatch import records
from sockwatch.kernel.loader import LoaderConfig, Probes
from sockwatch.monitor import Monitor
from tests.kernel import daemon_util as du

# A loopback connection, both ends and the listener held by the script's process.
CONNECTED = """
import json, os, socket, sys
lst = socket.socket()
lst.bind(("127.0.0.1", 0))
lst.listen()
cli = socket.create_connection(lst.getsockname())
srv, _ = lst.accept()
"""

HOLDER = CONNECTED + """
l6 = socket.socket(socket.AF_INET6)
l6.bind(("::1", 0))
l6.listen()
others = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM),
          socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP),
          *socket.socketpair()]
tcp = [lst.fileno(), cli.fileno(), srv.fileno(), l6.fileno(), os.dup(cli.fileno())]
child = os.fork()
if child == 0:  # holds every socket too, until stdin closes
    sys.stdin.read()
    os._exit(0)
print(json.dumps({"pid": os.getpid(), "child": child, "tcp": tcp,
                  "others": [s.fileno() for s in others]}), flush=True)
sys.stdin.read()
os.waitpid(child, 0)
"""


@contextlib.contextmanager
def _running(script: str, prefix: tuple[str, ...] = ()) -> Iterator[subprocess.Popen]:
    """A holder script running until the block ends: then its stdin closes, it
    exits, and it is reaped."""
    proc = subprocess.Popen([*prefix, sys.executable, "-c", textwrap.dedent(script)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        yield proc
    finally:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.close()
        proc.wait(timeout=10)
        proc.stdout.close()


def _holders_maps() -> set[int]:
    """Ids of the kernel's maps named "holders" (bpf/owners.bpf.h)."""
    out = subprocess.run(["bpftool", "-j", "map", "show"], capture_output=True, text=True,
                         check=True).stdout
    return {m["id"] for m in json.loads(out) if m.get("name") == "holders"}


def _entries(map_id: int) -> list:
    out = subprocess.run(["bpftool", "-j", "map", "dump", "id", str(map_id)],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def _walk(mon: Monitor) -> list[tuple[int, int, int, int, bytes]]:
    assert mon.probes is not None
    return [row for chunk in mon.probes.owner_chunks()
            for row in records.OWNER.iter_unpack(chunk)]


def test_owner_walk_matches_proc_fd_in_every_namespace_and_after_fork(netns_pair):
    ns = ("ip", "netns", "exec", netns_pair.a)
    with _running(HOLDER) as ours, _running(HOLDER, ns) as theirs:
        infos = [json.loads(h.stdout.readline()) for h in (ours, theirs)]
        before = _holders_maps()
        with Monitor(LoaderConfig(stack_latency=False)) as mon:  # no hook saw the sockets
            [holders_map] = _holders_maps() - before
            _check_walk(mon, infos, holders_map)


def _check_walk(mon: Monitor, infos: list[dict], holders_map: int) -> None:
    """The owner walk against /proc, then the rows the start-up walk joined."""
    walk = _walk(mon)
    assert records.OWNER.size == 40  # struct sw_owner
    by_pid: dict[int, dict[int, tuple[int, int, bytes]]] = {}
    for skaddr, ino, tgid, fd, comm in walk:
        assert fd not in by_pid.setdefault(tgid, {}), "an fd reported twice"
        by_pid[tgid][fd] = (skaddr, ino, comm)
    addr_of_ino: dict[int, int] = {}
    for info in infos:
        truth = du.socket_fds(info["pid"])
        assert set(info["tcp"]) | set(info["others"]) <= set(truth)
        for pid in (info["pid"], info["child"]):
            assert du.socket_fds(pid) == truth  # the fork shares the fd table's sockets
            seen = by_pid.get(pid, {})
            # exactly the TCP fds: no UDP, raw or unix socket, nothing missing
            assert {fd: ino for fd, (_a, ino, _c) in seen.items()} == \
                {fd: truth[fd] for fd in info["tcp"]}
            assert {c for _a, _i, c in seen.values()} == {b"python" + bytes(10)}
            for _fd, (skaddr, ino, _c) in seen.items():
                assert addr_of_ino.setdefault(ino, skaddr) == skaddr  # one sock, one address
    # the dup()ed fd is the same socket as the connection's client end
    pid, (_lst, cli, _srv, _l6, dup) = infos[0]["pid"], infos[0]["tcp"]
    assert by_pid[pid][cli][0] == by_pid[pid][dup][0]

    # Our namespace's sockets predate the monitor: their rows (keyed by the same
    # address) get the holder with the lowest pid, its lowest fd, and its name,
    # joined by the start-up walk in the kernel.
    info = infos[0]
    truth = du.socket_fds(info["pid"])
    want = {addr_of_ino[truth[fd]]: fd for fd in sorted(info["tcp"], reverse=True)}
    _check_owners(mon, want, info, truth, records.Attrib.FD_TABLE)
    # The kernel's holders map is emptied by the next walk, and the owners stay.
    assert len(_entries(holders_map)) >= len(want)
    mon.reconcile()
    assert _entries(holders_map) == []
    _check_owners(mon, want, info, truth, records.Attrib.FD_TABLE)


def _check_owners(mon: Monitor, want: dict[int, int], info: dict, truth: dict[int, int],
                  attrib: records.Attrib) -> None:
    """The rows of ``want`` (sock address -> lowest fd) name the holder's parent (the
    lower pid), that fd, its name and inode, learned as ``attrib`` says."""
    rows = {c.key: c for c in mon.connections(refresh=False) if c.key in want}
    assert set(rows) == set(want)
    for key, c in rows.items():
        assert (c.tgid, c.fd, c.comm, c.ev.ino) == \
            (min(info["pid"], info["child"]), want[key], "python", truth[want[key]])
        assert c.seen_by == "snapshot" and c.ev.attrib == attrib


def test_owners_the_kernel_map_cannot_hold_are_named_here(monkeypatch):
    """With a holders map too small for the host's sockets (it is sized as the socks
    map), the kernel joins what it holds and says how many it could not take; the
    rest are read from the fd tables and named here, so every row still gets its
    holder."""
    missed: list[int] = []
    real = Probes.map_owners

    def counted(self: Probes) -> int:
        missed.append(real(self))
        return missed[-1]

    monkeypatch.setattr(Probes, "map_owners", counted)
    with _running(HOLDER) as holder:
        info = json.loads(holder.stdout.readline())
        with Monitor(LoaderConfig(stack_latency=False, socks_max_entries=2)) as mon:
            # the map takes two sockets; both processes hold at least two more
            assert len(missed) == 1 and missed[0] >= 4
            truth = du.socket_fds(info["pid"])
            addr = {ino: key for key, ino, _t, _f, _c in _walk(mon)}
            want = {addr[truth[fd]]: fd for fd in sorted(info["tcp"], reverse=True)}
            rows = {c.key: c for c in mon.connections(refresh=False) if c.key in want}
            assert set(rows) == set(want)
            for key, c in rows.items():
                assert (c.tgid, c.fd, c.comm) == \
                    (min(info["pid"], info["child"]), want[key], "python")
            joined = [c for c in mon.connections(refresh=False)
                      if c.ev.attrib == records.Attrib.FD_TABLE]
            assert len(joined) <= 2


IN_FLIGHT = CONNECTED + """
a, b = socket.socketpair()
socket.send_fds(a, [b"x"], [cli.fileno()])
ino = os.fstat(cli.fileno()).st_ino
cli.close()  # now only the message in flight holds it: no fd table does
print(json.dumps({"pid": os.getpid(), "ino": ino}), flush=True)
sys.stdin.readline()
_msg, fds, _flags, _addr = socket.recv_fds(b, 1, 1)
print(json.dumps({"fd": fds[0]}), flush=True)
sys.stdin.read()
"""


def test_a_socket_no_fd_table_holds_waits_without_a_read_of_the_fd_tables(monkeypatch):
    """A socket held only by an SCM_RIGHTS message in flight has an inode but no
    holder. After a whole join at start its row waits: nobody reads the fd tables
    for it then or at the next look. Once a process receives it, the look after
    the wait names that process and fd."""
    reads: list[int] = []
    real_chunks = Probes.owner_chunks

    def counted(self: Probes, *args: int) -> Iterator[bytes]:
        reads.append(1)
        return real_chunks(self, *args)

    monkeypatch.setattr(Probes, "owner_chunks", counted)
    with _running(IN_FLIGHT) as holder:
        info = json.loads(holder.stdout.readline())
        with Monitor(LoaderConfig(stack_latency=False)) as mon:
            [row] = [c for c in mon.connections(refresh=False) if c.ev.ino == info["ino"]]
            assert row.tgid == 0 and row.owner_is_guess
            assert mon.resolve_owners(fds=False) == 0
            assert reads == []
            holder.stdin.write("\n")
            holder.stdin.flush()
            fd = json.loads(holder.stdout.readline())["fd"]
            now = time.monotonic  # the wait is over: the clock runs on, one wait ahead
            monkeypatch.setattr(monitor_mod.time, "monotonic",
                                lambda: now() + monitor_mod.UNOWNED_RETRY_S)
            assert mon.resolve_owners(fds=False) == 1 and reads == [1]
            [row] = [c for c in mon.connections(refresh=False) if c.ev.ino == info["ino"]]
            assert (row.tgid, row.fd, row.comm) == (info["pid"], fd, "python")
