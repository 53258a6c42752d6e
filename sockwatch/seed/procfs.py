"""Who holds a socket: the ``/proc/<pid>/fd`` walk, modelled on psutil's.

The kernel names the owning task of most sockets at the event; this fills in
what it cannot: the fd number (no cheap hook gives it), and the owner of
sockets that predate sockwatch. It is run in batches at view time, never per
record.
"""

from __future__ import annotations

import os
from typing import Iterable


def _socket_fds(proc_root: str, pid: int) -> list[tuple[int, int]]:
    """(fd, inode) for every socket fd of one process.

    The readlinks are relative to the open fd directory: the kernel then resolves
    one name per fd instead of the whole /proc/<pid>/fd/<n> path, which is a
    quarter of the walk's time with thousands of fds (measured).
    """
    try:
        fd_dir = os.open(f"{proc_root}/{pid}/fd", os.O_RDONLY | os.O_DIRECTORY)
    except (FileNotFoundError, ProcessLookupError, PermissionError, NotADirectoryError):
        return []  # ENOENT/ESRCH: the process exited; EACCES: not ours to read
    out = []
    try:
        readlink = os.readlink
        for name in os.listdir(fd_dir):
            try:
                target = readlink(name, dir_fd=fd_dir)
            except (FileNotFoundError, ProcessLookupError, PermissionError):
                continue  # ENOENT: the fd was closed between listdir and readlink
            if target.startswith("socket:["):
                out.append((int(name), int(target[8:-1])))
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass  # the process exited while we listed its fds
    finally:
        os.close(fd_dir)
    return out


def all_pids(proc_root: str = "/proc") -> list[int]:
    return [int(p) for p in os.listdir(proc_root) if p.isdigit()]


def socket_owners(
    pids: Iterable[int] | None = None, proc_root: str = "/proc"
) -> dict[int, list[tuple[int, int]]]:
    """inode -> [(pid, fd), ...] over ``pids`` (all processes when None).

    Threads share their process's fd table, so only thread-group leaders
    listed in /proc are walked. A socket shared after fork() lists every
    holder, lowest pid first.
    """
    owners: dict[int, list[tuple[int, int]]] = {}
    for pid in sorted(all_pids(proc_root) if pids is None else set(pids)):
        for fd, ino in _socket_fds(proc_root, pid):
            owners.setdefault(ino, []).append((pid, fd))
    return owners
