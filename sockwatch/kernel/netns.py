"""Run one call inside another network namespace, from a short-lived thread.

iter/tcp walks the sockets of the namespace its reader was in when it created
the iterator, so walking a container's sockets means creating the iterator
there. setns(CLONE_NEWNET) changes only the calling thread, and the thread
ends right after: the rest of the process never leaves its own namespace.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
from typing import Callable, TypeVar

CLONE_NEWNET = 0x40000000
T = TypeVar("T")

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def inode(path: str) -> int:
    return os.stat(path).st_ino


def call_in(path: str, fn: Callable[[], T]) -> T:
    """``fn()`` evaluated in the network namespace at ``path`` (a /proc/*/ns/net or /run/netns file)."""
    box: dict[str, object] = {}

    def target() -> None:
        try:
            fd = os.open(path, os.O_RDONLY)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns({path}): {os.strerror(err)}")
            finally:
                os.close(fd)
            box["value"] = fn()
        except BaseException as exc:  # handed to the caller's thread
            box["error"] = exc

    t = threading.Thread(target=target, name="sockwatch-netns")
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]  # type: ignore[return-value]


def find_paths(wanted: set[int], pids: set[int], proc_root: str = "/proc") -> dict[int, str]:
    """A path for each namespace inode in ``wanted``: /run/netns names first, then pids."""
    found: dict[int, str] = {}
    candidates = [f"/run/netns/{n}" for n in _listdir("/run/netns")]
    candidates += [f"{proc_root}/{pid}/ns/net" for pid in sorted(pids)]
    for path in candidates:
        if len(found) == len(wanted):
            break
        try:
            ino = inode(path)
        except OSError:
            continue  # ENOENT/ESRCH: the process or the name is gone
        if ino in wanted and ino not in found:
            found[ino] = path
    return found


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except FileNotFoundError:
        return []
