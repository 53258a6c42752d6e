"""Process metadata, and how rows get their owner from the kernel's fd tables.

The walk itself (iter/task_file) is checked against /proc in
tests/kernel/test_owners.py; here its answer is fixed by the test, to pin the
rules Monitor.resolve_owners applies to it.
"""

from __future__ import annotations

import os

import pytest

from sockwatch import processes, records
from sockwatch.records import Attrib, Kind


@pytest.mark.parametrize(
    "content, expected",
    [
        ("0::/system.slice/nginx.service\n", "/system.slice/nginx.service"),
        ("12:pids:/user.slice\n1:name=systemd:/user.slice/session-1.scope\n0::/init.scope\n",
         "/init.scope"),
        ("4:memory:/docker/abc\n1:name=systemd:/docker/abc\n", "/docker/abc"),
        ("", ""),
    ],
)
def test_cgroup_parsing(tmp_path, content, expected):
    """cgroup v2 has one 0:: line; hybrid systems list v1 lines too and v2 must win."""
    (tmp_path / "42").mkdir()
    (tmp_path / "42" / "cgroup").write_text(content)
    assert processes._cgroup(str(tmp_path), 42) == expected


def test_cgroup_v1_prefers_name_systemd(tmp_path):
    """On a v1-only host the first line is an arbitrary controller; systemd's path names the unit."""
    (tmp_path / "42").mkdir()
    (tmp_path / "42" / "cgroup").write_text(
        "11:memory:/mem-group\n1:name=systemd:/system.slice/nginx.service\n")
    assert processes._cgroup(str(tmp_path), 42) == "/system.slice/nginx.service"


def test_cgroup_of_vanished_process_is_empty(tmp_path):
    assert processes._cgroup(str(tmp_path), 42) == ""


def test_process_cache_describes_this_process_and_remembers_it():
    """Looked up once per (pid, start time): the same object comes back while it lives."""
    cache = processes.ProcessCache()
    info = cache.lookup(os.getpid())
    assert info is not None
    assert info.pid == os.getpid() and info.start_time > 0
    assert "python" in info.name.lower() or "pytest" in " ".join(info.cmdline)
    assert cache.lookup(os.getpid()) is info


def test_process_cache_unknown_pid_is_none():
    cache = processes.ProcessCache()
    pid_max = int(open("/proc/sys/kernel/pid_max").read())
    assert cache.lookup(pid_max + 1) is None


class OwnerWalk:
    """Probes.owner_chunks() as the kernel would answer for ``holders`` (sock
    address -> [(pid, fd, comm)] in pid order), counting the walks."""

    def __init__(self, holders: dict[int, list[tuple[int, int, bytes]]]):
        self.holders = holders
        self.walks = 0

    def owner_chunks(self):
        self.walks += 1
        rows = sorted((pid, fd, key, comm) for key, held in self.holders.items()
                      for pid, fd, comm in held)
        yield b"".join(records.OWNER.pack(key, 1, pid, fd, comm) for pid, fd, key, comm in rows)


def _monitor(tmp_path, monkeypatch, holders):
    from sockwatch import monitor as monitor_mod

    (tmp_path / "self" / "ns").mkdir(parents=True)
    (tmp_path / "self" / "ns" / "net").write_text("")
    mon = monitor_mod.Monitor(proc_root=str(tmp_path))
    mon.probes = OwnerWalk(holders)
    clock = [1000.0]
    monkeypatch.setattr(monitor_mod.time, "monotonic", lambda: clock[0])
    return mon, clock


def test_unowned_socket_waits_before_the_next_walk(tmp_path, monkeypatch):
    """A socket no process holds (an orphan) costs one walk of every fd table, not
    one per view refresh, and waits twice as long after each miss; a socket with no
    inode has no file and costs none."""
    from recfactory import raw
    from sockwatch.monitor import UNOWNED_RETRY_S

    mon, clock = _monitor(tmp_path, monkeypatch, {2: [(300, 3, b"srv")]})
    mon.table.apply(raw(kind=Kind.SNAPSHOT, skaddr=1, tgid=0, attrib=Attrib.NONE, ino=4444))
    mon.table.apply(raw(kind=Kind.SNAPSHOT, skaddr=5, tgid=0, attrib=Attrib.NONE, ino=0))
    assert mon.resolve_owners() == 0
    assert mon.resolve_owners() == 0
    assert mon.probes.walks == 1  # one walk, then it waits
    mon.table.apply(raw(kind=Kind.OPEN, skaddr=2, tgid=300, ino=12345, fd=-1))
    assert mon.resolve_owners() == 1  # a new row is looked up at once
    assert mon.probes.walks == 2
    assert (mon.table.live[2].fd, mon.table.live[2].comm) == (3, "srv")
    clock[0] += UNOWNED_RETRY_S
    assert mon.resolve_owners() == 0
    assert mon.probes.walks == 3  # looked for again after the wait
    clock[0] += UNOWNED_RETRY_S
    assert mon.resolve_owners() == 0
    assert mon.probes.walks == 3  # missed twice: it waits twice as long
    clock[0] += UNOWNED_RETRY_S
    assert mon.resolve_owners() == 0
    assert mon.probes.walks == 4
    mon.probes.holders[1] = [(77, 9, b"late")]
    clock[0] += 4 * UNOWNED_RETRY_S
    assert mon.resolve_owners() == 1  # held at last: named at the next look
    assert (mon.table.live[1].tgid, mon.table.live[1].fd) == (77, 9)


def test_shared_socket_goes_to_the_attributed_process_else_the_lowest_pid(tmp_path, monkeypatch):
    """After fork() both processes hold the socket: the one the kernel saw use it
    wins; a guess (or an attributed process that no longer holds it) takes the
    lowest pid. Names are the leader's comm, as /proc/<pid>/stat shows it."""
    from recfactory import raw

    shared = [(200, 4, b"parent"), (201, 4, b"child")]
    mon, _ = _monitor(tmp_path, monkeypatch, {1: shared, 2: shared, 3: shared})
    mon.table.apply(raw(kind=Kind.OPEN, skaddr=1, tgid=201, fd=-1, attrib=Attrib.CONNECT))
    mon.table.apply(raw(kind=Kind.SNAPSHOT, skaddr=2, tgid=0, attrib=Attrib.NONE))
    mon.table.apply(raw(kind=Kind.OPEN, skaddr=3, tgid=999, fd=-1, attrib=Attrib.CONNECT))
    assert mon.resolve_owners() == 3
    owners = {k: (mon.table.live[k].tgid, mon.table.live[k].comm) for k in (1, 2, 3)}
    assert owners == {1: (201, "child"), 2: (200, "parent"), 3: (200, "parent")}
    assert mon.resolve_owners() == 0  # named rows are settled: no walk for them
    assert mon.probes.walks == 1


def test_a_comm_cut_at_15_characters_is_named_as_psutil_names_it(tmp_path, monkeypatch):
    """The kernel keeps 15 characters of a name; psutil (what views showed before)
    completes a cut one from the command line. Shorter names need no lookup."""
    from recfactory import raw

    me = os.getpid()
    long_comm = b"python-with-a-l"  # 15 bytes: possibly cut
    mon, _ = _monitor(tmp_path, monkeypatch, {1: [(me, 3, long_comm)], 2: [(me, 4, b"short")]})
    looked_up = []
    real = mon.processes.lookup
    monkeypatch.setattr(mon.processes, "lookup", lambda pid: looked_up.append(pid) or real(pid))
    for key in (1, 2):
        mon.table.apply(raw(kind=Kind.SNAPSHOT, skaddr=key, tgid=0, attrib=Attrib.NONE))
    assert mon.resolve_owners() == 2
    assert looked_up == [me]
    assert mon.table.live[1].comm == real(me).name
    assert mon.table.live[2].comm == "short"
