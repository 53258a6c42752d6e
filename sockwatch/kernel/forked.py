"""Run one step in a short-lived forked child and take over the fds it opened.

Loading BPF objects makes libbpf parse the kernel's BTF (/sys/kernel/btf/vmlinux,
about 11 MB of heap while it lasts) for every object. In the daemon that
transient was its peak RSS, and glibc kept the freed heap afterwards. Done in a
child, the parse never touches the daemon's memory: the child loads and attaches,
hands the program, map and link fds over a unix socket (SCM_RIGHTS) and exits.
The kernel objects live as long as any process holds an fd to them, so from
then on they are the parent's alone: a parent that dies, even by kill -9,
still detaches everything.

The child dies with the parent (PR_SET_PDEATHSIG), so a parent killed
mid-load leaves nothing attached either.
"""

from __future__ import annotations

import array
import ctypes
import os
import pickle
import signal
import socket
import traceback
from typing import Callable, Generic, TypeVar

from sockwatch.errors import SockwatchError

T = TypeVar("T")

PR_SET_PDEATHSIG = 1
MAX_FDS = 253  # SCM_MAX_FD: the most fds one message can carry
MAX_MESSAGE = 1 << 20


class ChildFailed(SockwatchError):
    """The child ended without answering (killed, or it crashed in C code)."""


def _die_with(parent: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def _portable(exc: BaseException) -> BaseException:
    """The exception itself when it survives pickling; else one that says where it came from."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001 - any pickling failure: describe it instead
        return ChildFailed("".join(traceback.format_exception(exc)).rstrip())


def _child(fn: Callable[[], tuple[T, list[int]]], sock: socket.socket, parent: int) -> None:
    """Run ``fn`` and send (ok, value or exception, fd numbers) with its fds; never returns."""
    try:
        _die_with(parent)
        try:
            value, fds = fn()
            if len(fds) > MAX_FDS:
                raise ChildFailed(f"{len(fds)} fds to hand over, one message carries {MAX_FDS}")
            message = pickle.dumps((True, value, fds))
        except BaseException as exc:  # handed to the parent, which raises it
            fds = []
            message = pickle.dumps((False, _portable(exc), fds))
        socket.send_fds(sock, [message], fds)
    finally:
        os._exit(0)  # no atexit handlers, no flushing of the parent's buffers


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit status {os.waitstatus_to_exitcode(status)}"


def _receive(sock: socket.socket) -> tuple[bytes, list[int]]:
    """One message and its fds, close-on-exec (socket.recv_fds of Python 3.11 does
    not pass its flags on, so it cannot ask for that)."""
    fds = array.array("i")
    message, ancdata, _flags, _addr = sock.recvmsg(
        MAX_MESSAGE, socket.CMSG_SPACE(MAX_FDS * fds.itemsize), socket.MSG_CMSG_CLOEXEC)
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
    return message, list(fds)


class InChild(Generic[T]):
    """``fn`` running in a forked child: the parent goes on with other work until
    it asks for the ``result``. ``fn`` returns (value, the fds value refers to).

    Start it while the process has no other threads that hold locks the child
    could need (at start, before any are started).
    """

    def __init__(self, fn: Callable[[], tuple[T, list[int]]]):
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:
            mine.close()
            _child(fn, theirs, parent)
        theirs.close()
        self._sock: socket.socket | None = mine
        self._pid = pid

    def result(self) -> tuple[T, dict[int, int]]:
        """Wait for the child; returns (value, the fds value refers to).

        Returns ``value`` and a map from each of the child's fd numbers to the
        parent's copy of that fd (close-on-exec). An exception raised by ``fn`` is
        raised here. Once only.
        """
        if self._sock is None:
            raise ChildFailed("the child's answer was taken or dropped already")
        try:
            message, fds = _receive(self._sock)
        except BaseException:
            self.cancel()
            raise
        status = self._reap()
        if not message:
            raise ChildFailed(f"the loading process ended without an answer "
                              f"({_describe(status)})")
        ok, value, child_fds = pickle.loads(message)
        if not ok:
            raise value
        if len(fds) != len(child_fds):
            for fd in fds:
                os.close(fd)
            raise ChildFailed(f"the loading process sent {len(fds)} of {len(child_fds)} fds")
        return value, dict(zip(child_fds, fds))

    def cancel(self) -> None:
        """Drop the step: kill the child (its fds close with it, so nothing it
        attached stays) and reap it. Nothing happens once the result was taken."""
        if self._sock is not None:
            os.kill(self._pid, signal.SIGKILL)
            self._reap()

    def _reap(self) -> int:
        assert self._sock is not None
        self._sock.close()  # fds still in flight close with it
        self._sock = None
        return os.waitpid(self._pid, 0)[1]

