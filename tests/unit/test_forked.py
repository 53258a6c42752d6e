"""forked.InChild: a step run in a forked child, its fds handed back.

The loader runs libbpf there so that the kernel BTF it parses never lands in the
daemon's memory; these check the hand-over itself, without BPF or privileges.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from sockwatch.errors import AttachError
from sockwatch.kernel import forked


def _pipes() -> tuple[dict[str, int], list[int]]:
    """Runs in the child: opens two pipes and describes them by the child's fd numbers."""
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    os.write(w1, b"one")
    os.write(w2, b"two")
    ends = {"first": r1, "second": r2, "pid": os.getpid()}
    return ends, [r1, r2]


def test_fds_opened_in_the_child_are_the_parents_after_it_exits():
    ends, fds = forked.InChild(_pipes).result()
    try:
        assert ends["pid"] != os.getpid()
        with pytest.raises(ChildProcessError):
            os.waitpid(ends["pid"], os.WNOHANG)  # already reaped
        assert os.read(fds[ends["first"]], 3) == b"one"
        assert os.read(fds[ends["second"]], 3) == b"two"
        # close-on-exec: a helper the daemon runs never holds its BPF objects
        assert not os.get_inheritable(fds[ends["first"]])
    finally:
        for fd in fds.values():
            os.close(fd)


def _refuse() -> tuple[None, list[int]]:
    raise AttachError("the kernel's verifier rejected program 'x'\nR1 invalid mem access")


def test_an_error_in_the_child_is_raised_in_the_parent_whole():
    with pytest.raises(AttachError) as err:
        forked.InChild(_refuse).result()
    assert str(err.value).splitlines() == ["the kernel's verifier rejected program 'x'",
                                           "R1 invalid mem access"]


class _Unpicklable(Exception):
    def __reduce__(self):  # type: ignore[override]
        raise TypeError("not today")


def _raise_unpicklable() -> tuple[None, list[int]]:
    raise _Unpicklable("deep in the loader")


def test_an_error_that_cannot_cross_is_described_with_its_traceback():
    with pytest.raises(forked.ChildFailed) as err:
        forked.InChild(_raise_unpicklable).result()
    assert "_Unpicklable: deep in the loader" in str(err.value)
    assert "_raise_unpicklable" in str(err.value)


def _die() -> tuple[None, list[int]]:
    os.kill(os.getpid(), signal.SIGKILL)
    raise AssertionError("unreachable")


def test_a_child_that_dies_without_answering_is_an_error_not_a_hang():
    with pytest.raises(forked.ChildFailed, match="killed by SIGKILL"):
        forked.InChild(_die).result()


def _running(pid: int) -> bool:
    """Alive and not a zombie (whoever reaps orphans here may take its time)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_the_child_dies_with_its_parent():
    """A parent killed mid-load must not leave a child holding attached programs."""
    r, w = os.pipe()
    middle = os.fork()
    if middle == 0:  # the "daemon": forks the loading child, then is killed
        os.close(r)

        def report_and_wait() -> tuple[None, list[int]]:
            os.write(w, f"{os.getpid()}\n".encode())
            signal.pause()
            return None, []

        try:
            forked.InChild(report_and_wait).result()
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        child = int(f.readline())
    os.kill(middle, signal.SIGKILL)
    os.waitpid(middle, 0)
    for _ in range(200):
        if not _running(child):
            return
        time.sleep(0.01)
    pytest.fail(f"loading child {child} outlived its parent")


def test_a_cancelled_child_is_killed_and_reaped_and_its_fds_never_arrive():
    """The daemon starts loading before it imports the exporter; if it fails in
    between, the child and what it opened must go."""
    r, w = os.pipe()

    def report_and_wait() -> tuple[None, list[int]]:
        os.write(w, f"{os.getpid()}\n".encode())
        signal.pause()
        return None, []

    step = forked.InChild(report_and_wait)
    os.close(w)
    with os.fdopen(r) as f:
        child = int(f.readline())
    open_before = set(os.listdir("/proc/self/fd"))
    step.cancel()
    assert not os.path.exists(f"/proc/{child}")  # killed and reaped, no zombie
    assert set(os.listdir("/proc/self/fd")) <= open_before
    with pytest.raises(forked.ChildFailed, match="taken or dropped"):
        step.result()
    step.cancel()  # once is enough; again does nothing
