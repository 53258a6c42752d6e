"""``/proc/<pid>/fd`` walking on a fake proc root, and process metadata.

This is how sockets that predate sockwatch get an owner and how fds are
filled in. /proc changes under the walk all the time (processes exit, fds
close, hidepid hides others), so each of those must be survived, not fatal.
"""

from __future__ import annotations

import os

import pytest

from sockwatch import processes
from sockwatch.seed import procfs


def _proc(tmp_path, layout: dict[int, dict[int, str]]) -> str:
    """A proc root with <pid>/fd/<n> -> target symlinks (targets need not exist)."""
    root = tmp_path / "proc"
    root.mkdir()
    for pid, fds in layout.items():
        fd_dir = root / str(pid) / "fd"
        fd_dir.mkdir(parents=True)
        for fd, target in fds.items():
            os.symlink(target, fd_dir / str(fd))
    # non-pid entries every real /proc has
    (root / "net").mkdir()
    (root / "self").mkdir()
    (root / "meminfo").write_text("MemTotal: 1 kB\n")
    return str(root)


LAYOUT = {
    300: {0: "/dev/null", 3: "socket:[12345]", 4: "pipe:[1]", 9: "socket:[777]"},
    20: {5: "socket:[12345]", 6: "anon_inode:[eventfd]", 7: "/tmp/socket:[1]"},
    4000: {1: "socket:[999]"},
}


def test_socket_owners_maps_inode_to_holders_sorted_by_pid(tmp_path):
    """A socket shared after fork() lists every holder, lowest pid first; non-sockets ignored."""
    root = _proc(tmp_path, LAYOUT)
    owners = procfs.socket_owners([300, 20, 4000], proc_root=root)
    assert owners == {12345: [(20, 5), (300, 3)], 777: [(300, 9)], 999: [(4000, 1)]}


def test_socket_owners_all_pids_when_none_given(tmp_path):
    """Without a pid list it walks every numeric entry and skips net/, self/, meminfo."""
    root = _proc(tmp_path, LAYOUT)
    assert sorted(procfs.all_pids(root)) == [20, 300, 4000]
    assert procfs.socket_owners(None, proc_root=root) == procfs.socket_owners(
        [20, 300, 4000], proc_root=root)


def test_socket_owners_only_requested_pids(tmp_path):
    root = _proc(tmp_path, LAYOUT)
    assert procfs.socket_owners([300, 300], proc_root=root) == {12345: [(300, 3)], 777: [(300, 9)]}
    assert procfs.socket_owners([], proc_root=root) == {}


def test_vanished_pid_is_skipped(tmp_path):
    """A process that exited between choosing pids and walking them is not an error."""
    root = _proc(tmp_path, LAYOUT)
    assert procfs.socket_owners([31337, 4000], proc_root=root) == {999: [(4000, 1)]}
    # a pid directory without an fd directory (zombie, or fd as a plain file)
    (tmp_path / "proc" / "55").mkdir()
    (tmp_path / "proc" / "56").mkdir()
    (tmp_path / "proc" / "56" / "fd").write_text("")
    assert procfs.socket_owners([55, 56, 4000], proc_root=root) == {999: [(4000, 1)]}


_readlink = os.readlink


def _named(path: str | int, dir_fd: int | None = None) -> str:
    """The path a call names, also by an open directory's fd (the walk reads
    /proc/<pid>/fd through one)."""
    if isinstance(path, int):
        return _readlink(f"/proc/self/fd/{path}")
    if dir_fd is not None:
        return os.path.join(_readlink(f"/proc/self/fd/{dir_fd}"), path)
    return str(path)


def test_unreadable_fd_dir_is_skipped(tmp_path, monkeypatch):
    """Another user's process (EACCES) or hidepid must not abort the whole walk."""
    root = _proc(tmp_path, LAYOUT)
    denied = f"{root}/300/fd"
    real_listdir = os.listdir

    def listdir(path):
        if _named(path) == denied:
            raise PermissionError(13, "Permission denied", path)
        return real_listdir(path)

    monkeypatch.setattr(procfs.os, "listdir", listdir)
    assert procfs.socket_owners([20, 300], proc_root=root) == {12345: [(20, 5)]}


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a mode-000 directory anyway")
def test_unreadable_fd_dir_really_unreadable(tmp_path):
    """The same, through real file permissions (only meaningful when not root)."""
    root = _proc(tmp_path, LAYOUT)
    fd_dir = tmp_path / "proc" / "300" / "fd"
    fd_dir.chmod(0)
    try:
        assert procfs.socket_owners([20, 300], proc_root=root) == {12345: [(20, 5)]}
    finally:
        fd_dir.chmod(0o755)


@pytest.mark.parametrize("exc", [FileNotFoundError, ProcessLookupError, PermissionError])
def test_fd_closed_between_listdir_and_readlink(tmp_path, monkeypatch, exc):
    """An fd that disappears mid-walk is skipped; the process's other sockets still count."""
    root = _proc(tmp_path, LAYOUT)
    gone = f"{root}/300/fd/3"
    real_readlink = os.readlink

    def readlink(path, *a, dir_fd=None, **kw):
        if _named(path, dir_fd) == gone:
            raise exc(2, "gone", path)
        return real_readlink(path, *a, dir_fd=dir_fd, **kw)

    monkeypatch.setattr(procfs.os, "readlink", readlink)
    assert procfs.socket_owners([300], proc_root=root) == {777: [(300, 9)]}


# -- process metadata ---------------------------------------------------------------


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


def test_unowned_socket_waits_before_the_next_whole_proc_walk(tmp_path, monkeypatch):
    """A socket no process holds (an orphan) costs one walk of all of /proc, not one
    per view refresh; sockets whose owner is known keep being looked up at once."""
    from recfactory import raw
    from sockwatch import monitor as monitor_mod
    from sockwatch.records import Attrib, Kind

    root = _proc(tmp_path, {300: {3: "socket:[12345]"}})
    (tmp_path / "proc" / "self" / "ns").mkdir()
    (tmp_path / "proc" / "self" / "ns" / "net").write_text("")
    mon = monitor_mod.Monitor(proc_root=root)
    mon.table.apply(raw(kind=Kind.SNAPSHOT, skaddr=1, tgid=0, attrib=Attrib.NONE, ino=4444))
    walks = []
    real = procfs.socket_owners
    monkeypatch.setattr(monitor_mod.procfs, "socket_owners",
                        lambda pids, proc_root: walks.append(pids) or real(pids, proc_root))
    clock = [1000.0]
    monkeypatch.setattr(monitor_mod.time, "monotonic", lambda: clock[0])
    assert mon.resolve_owners() == 0
    assert mon.resolve_owners() == 0
    assert walks == [None]  # one walk of every process, then it waits
    mon.table.apply(raw(kind=Kind.OPEN, skaddr=2, tgid=300, ino=12345, fd=-1))
    assert mon.resolve_owners() == 1  # a known owner: only its fds, at once
    assert walks == [None, {300}]
    clock[0] += monitor_mod.UNOWNED_RETRY_S
    assert mon.resolve_owners() == 0
    assert walks == [None, {300}, None]  # looked for again after the wait
