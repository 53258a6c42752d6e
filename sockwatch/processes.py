"""Process metadata (name, cmdline, user, cgroup) that survives pid reuse.

Entries are keyed on (pid, start time): a recycled pid is a new process and
gets a new entry, so two processes never share a name in the tables.
"""

from __future__ import annotations

from dataclasses import dataclass

import psutil


@dataclass(frozen=True, slots=True)
class ProcessInfo:
    pid: int
    start_time: float  # seconds since the epoch, as psutil reports it
    name: str
    cmdline: tuple[str, ...]
    user: str
    cgroup: str


def _cgroup(proc_root: str, pid: int) -> str:
    try:
        with open(f"{proc_root}/{pid}/cgroup") as f:
            lines = f.read().splitlines()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return ""  # ENOENT/ESRCH: exited; EACCES: hidepid
    # cgroup v2 has one line "0::/path"; with v1 prefer the unified or name=systemd line.
    for line in lines:
        if line.startswith("0::"):
            return line[3:]
    for line in lines:
        if line.split(":", 2)[1:2] == ["name=systemd"]:
            return line.split(":", 2)[2]
    return lines[0].split(":", 2)[-1] if lines else ""


class ProcessCache:
    """Looks processes up once and remembers them until they are gone."""

    def __init__(self, proc_root: str = "/proc", capacity: int = 65536):
        self._proc_root = proc_root
        self._capacity = capacity
        self._by_key: dict[tuple[int, float], ProcessInfo] = {}

    def lookup(self, pid: int) -> ProcessInfo | None:
        """The process now running as ``pid``, or None if there is none."""
        try:
            proc = psutil.Process(pid)
            start = proc.create_time()
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            return None
        key = (pid, start)
        info = self._by_key.get(key)
        if info is None:
            info = self._describe(proc, pid, start)
            if info is None:
                return None
            if len(self._by_key) >= self._capacity:
                self._by_key.clear()  # crude but bounded; entries are cheap to rebuild
            self._by_key[key] = info
        return info

    def _describe(self, proc: psutil.Process, pid: int, start: float) -> ProcessInfo | None:
        try:
            with proc.oneshot():
                name = proc.name()
                cmdline = tuple(proc.cmdline())
                try:
                    user = proc.username()
                except KeyError:  # uid with no passwd entry
                    user = str(proc.uids().real)
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            return None
        except psutil.AccessDenied:
            name, cmdline, user = "?", (), "?"
        return ProcessInfo(pid, start, name, cmdline, user, _cgroup(self._proc_root, pid))
