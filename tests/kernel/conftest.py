"""Kernel-test fixtures: a started Monitor, network namespaces joined by veth,
and a guard that fails any test leaving BPF programs, namespaces or veth links
behind."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import uuid
from dataclasses import dataclass
from typing import Iterator

import psutil
import pytest

from sockwatch.kernel.loader import LoaderConfig, default_objects_dir
from sockwatch.monitor import Monitor

def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "kernel tests need root (they load BPF programs and make namespaces)"
    if not os.path.exists("/sys/kernel/btf/vmlinux"):
        return "kernel tests need kernel BTF (/sys/kernel/btf/vmlinux)"
    if not (default_objects_dir() / "lifecycle.bpf.o").exists():
        return f"BPF objects not built in {default_objects_dir()}: run make -C bpf"
    if not shutil.which("bpftool") or not shutil.which("ip"):
        return "kernel tests need bpftool and iproute2"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = _why_not()
    for item in items:
        if "tests/kernel" in str(item.fspath):
            item.add_marker(pytest.mark.kernel)
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))


def bpf_fds() -> list[str]:
    """BPF objects (programs, links, maps) this test process still holds."""
    held = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except FileNotFoundError:
            continue  # the fd listdir itself used
        # bpf-prog, bpf-map, bpf_link, btf: every kind of BPF object an fd can hold
        if target.startswith(("anon_inode:bpf", "anon_inode:btf")):
            held.append(f"{fd}->{target}")
    return held


# Namespaces made by the current test (other sockwatch runs may make their own).
MADE_NAMESPACES: set[str] = set()


def netns_names() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


@pytest.fixture(autouse=True)
def leaves_nothing_behind() -> Iterator[None]:
    """No BPF object, child process or namespace made by this test may outlive it.

    Checked per process so tests can run beside other sockwatch instances;
    .ci/run also compares `bpftool prog list` before and after the whole run.
    """
    MADE_NAMESPACES.clear()
    yield
    assert bpf_fds() == [], f"BPF objects still held: {bpf_fds()}"
    children = psutil.Process().children(recursive=True)
    assert not children, f"processes left running: {[c.pid for c in children]}"
    left = MADE_NAMESPACES & netns_names()
    assert not left, f"network namespaces left: {sorted(left)}"


@pytest.fixture
def monitor() -> Iterator[Monitor]:
    """A Monitor with the default (auto) attach plan, started and closed around the test."""
    mon = Monitor(LoaderConfig())
    mon.start()
    try:
        yield mon
    finally:
        mon.close()


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)


@dataclass
class NetnsPair:
    """Two namespaces joined by a veth pair: ``a`` at addr_a, ``b`` at addr_b."""

    a: str
    b: str
    veth_a: str
    veth_b: str
    addr_a: str
    addr_b: str

    def popen(self, ns: str, script: str, *args: str) -> subprocess.Popen:
        """Run a Python snippet inside namespace ``ns`` as its own process."""
        return subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-c", textwrap.dedent(script), *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )


@pytest.fixture
def netns_pair() -> Iterator[NetnsPair]:
    """Namespaces made and removed by this test; traffic stays between them."""
    tag = uuid.uuid4().hex[:6]
    pair = NetnsPair(f"swt-{tag}-a", f"swt-{tag}-b", f"swa{tag}", f"swb{tag}",
                     "10.213.0.1", "10.213.0.2")
    MADE_NAMESPACES.update((pair.a, pair.b))
    try:
        run(["ip", "netns", "add", pair.a])
        run(["ip", "netns", "add", pair.b])
        run(["ip", "link", "add", pair.veth_a, "netns", pair.a, "type", "veth",
             "peer", "name", pair.veth_b, "netns", pair.b])
        for ns, dev, addr in ((pair.a, pair.veth_a, pair.addr_a), (pair.b, pair.veth_b, pair.addr_b)):
            run(["ip", "-n", ns, "addr", "add", f"{addr}/30", "dev", dev])
            run(["ip", "-n", ns, "link", "set", dev, "up"])
            run(["ip", "-n", ns, "link", "set", "lo", "up"])
        yield pair
    finally:
        for ns in (pair.a, pair.b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
