"""(network namespace, ifindex) -> interface name and driver, across interfaces coming and going.

The kernel keys its per-interface histograms and totals by ifindex, which
means nothing outside its namespace and nothing once the interface is gone.
Names are read with one RTM_GETLINK dump per namespace, made inside that
namespace (``netns.call_in``): libc's if_nameindex(), whose netlink socket
belongs to the calling thread's namespace. (pyroute2 did the same dump, but
importing it costs the daemon 10.5 MB of RSS and 0.1 s of start-up: its
package loads its whole NDB/IPDB/conntrack stack.) Names are cached:

- a vanished interface keeps its last name, so its counters stay attributed;
- an index not in the cache triggers a fresh dump of its namespace (at most
  once per ``retry_s``), so an interface that appears later is picked up;
- every namespace is dumped again after ``stale_s``, so renames show up.

The driver comes from the ethtool ioctl (ETHTOOL_GDRVINFO), which answers for
the namespace its socket was made in; /sys/class/net shows the namespace
sysfs was mounted in, not the thread's. Devices without ethtool ops are
"loopback" when their hardware type says so (SIOCGIFHWADDR), else "".
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import socket
import struct
import threading
import time
from typing import Callable, Iterable

from sockwatch.kernel import netns

SIOCETHTOOL = 0x8946
ETHTOOL_GDRVINFO = 0x3
DRVINFO_SIZE = 196  # struct ethtool_drvinfo
IFREQ = struct.Struct("16sP")  # ifr_name, ifr_data (a pointer)
SIOCGIFHWADDR = 0x8927
IFREQ_SIZE = 40  # struct ifreq: ifr_name, then a 24-byte union (here ifr_hwaddr)
ARPHRD_LOOPBACK = 772

Link = tuple[str, str]  # name, driver
Key = tuple[int, int]  # netns inode, ifindex


def ethtool_driver(sock: socket.socket, name: str) -> str:
    """The driver name ethtool reports, or "" when the device has no ethtool ops."""
    info = ctypes.create_string_buffer(DRVINFO_SIZE)
    struct.pack_into("I", info, 0, ETHTOOL_GDRVINFO)
    try:
        fcntl.ioctl(sock.fileno(), SIOCETHTOOL, IFREQ.pack(name.encode(), ctypes.addressof(info)))
    except OSError:  # EOPNOTSUPP (lo, tunnels), ENODEV (gone since the dump)
        return ""
    return info.raw[4:36].split(b"\0", 1)[0].decode(errors="replace")


def hardware_type(sock: socket.socket, name: str) -> int:
    """The device's ARPHRD_* type (ifr_hwaddr.sa_family), or -1 when it is gone."""
    try:
        ifreq = fcntl.ioctl(sock.fileno(), SIOCGIFHWADDR, name.encode().ljust(IFREQ_SIZE, b"\0"))
    except OSError:
        return -1
    return struct.unpack_from("H", ifreq, 16)[0]


def read_links() -> dict[int, Link]:
    """ifindex -> (name, driver) for the calling thread's network namespace."""
    links: dict[int, Link] = {}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for index, name in socket.if_nameindex():
            driver = ethtool_driver(sock, name) or (
                "loopback" if hardware_type(sock, name) == ARPHRD_LOOPBACK else "")
            links[index] = (name, driver)
    return links


class NamespaceLinks:
    """Reads the links of any namespace by inode: ours directly, others from inside.

    A namespace is entered through a /run/netns name or a process in it
    (``netns.find_paths``); the path found is kept until entering it fails.
    """

    def __init__(self, own_netns: int, proc_root: str = "/proc"):
        self.own_netns = own_netns
        self._proc_root = proc_root
        self._paths: dict[int, str] = {}

    def __call__(self, ns: int) -> dict[int, Link] | None:
        """The namespace's links, or None when no way into it exists (any more)."""
        if ns == self.own_netns:
            return read_links()
        path = self._paths.get(ns) or netns.find_paths({ns}, self._pids(), self._proc_root).get(ns)
        if path is None:
            return None
        try:
            if netns.inode(path) != ns:  # the process died and its pid was reused
                raise FileNotFoundError(path)
            links = netns.call_in(path, read_links)
        except OSError:
            self._paths.pop(ns, None)
            return None
        self._paths[ns] = path
        return links

    def _pids(self) -> set[int]:
        return {int(p) for p in os.listdir(self._proc_root) if p.isdigit()}


class InterfaceNames:
    """The cache: last-known (name, driver) per (netns, ifindex), safe from any thread."""

    def __init__(self, own_netns: int, read: Callable[[int], dict[int, Link] | None] | None = None,
                 *, retry_s: float = 1.0, stale_s: float = 30.0, max_entries: int = 4096,
                 clock: Callable[[], float] = time.monotonic):
        self.own_netns = own_netns
        self._read = read or NamespaceLinks(own_netns)
        self.retry_s, self.stale_s, self.max_entries = retry_s, stale_s, max_entries
        self._clock = clock
        self._known: dict[Key, Link] = {}
        self._read_at: dict[int, float] = {}  # netns -> when its links were last read
        self._lock = threading.Lock()

    def label(self, ns: int, name: str) -> str:
        """The name people see: bare in our namespace, ``name@<inode>`` in others."""
        return name if ns == self.own_netns else f"{name}@{ns}"

    def resolve(self, keys: Iterable[Key]) -> dict[Key, Link]:
        """(label, driver) for each key; ``if<index>`` for one never seen by name."""
        keys = set(keys)
        with self._lock:
            now = self._clock()
            for ns in {ns for ns, _ in keys}:
                read_at = self._read_at.get(ns)
                missing = any(k not in self._known for k in keys if k[0] == ns)
                if read_at is None or now - read_at >= (self.retry_s if missing else self.stale_s):
                    self._refresh(ns, now)
            out = {}
            for ns, ifindex in keys:
                name, driver = self._known.get((ns, ifindex), (f"if{ifindex}", ""))
                out[(ns, ifindex)] = (self.label(ns, name), driver)
            return out

    def _refresh(self, ns: int, now: float) -> None:
        self._read_at.pop(ns, None)  # re-inserted last, as below
        self._read_at[ns] = now
        links = self._read(ns)
        for ifindex, link in (links or {}).items():
            self._known.pop((ns, ifindex), None)  # re-inserted last: eviction is oldest-seen first
            self._known[(ns, ifindex)] = link
        while len(self._known) > self.max_entries:
            del self._known[next(iter(self._known))]
        while len(self._read_at) > self.max_entries:
            del self._read_at[next(iter(self._read_at))]
