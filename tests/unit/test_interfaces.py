"""Interface names and drivers: the cache's rules, and one real read of our own namespace.

The cache tests drive ``InterfaceNames`` with a namespace reader that returns
what a namespace's RTM_GETLINK dump would at that moment, and a clock the test
moves; reading our own namespace's links needs no privileges, so the last tests
run the real reader.
"""

from __future__ import annotations

import os

from sockwatch.interfaces import InterfaceNames, NamespaceLinks, read_links

OWN, OTHER = 4026531840, 4026532777


class Namespaces:
    """What each namespace holds right now; counts how often each was read."""

    def __init__(self, links: dict[int, dict[int, tuple[str, str]] | None]):
        self.links = links
        self.reads: dict[int, int] = {}

    def __call__(self, ns: int):
        self.reads[ns] = self.reads.get(ns, 0) + 1
        links = self.links.get(ns)
        return None if links is None else dict(links)


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def names(links, **kw):
    clock = Clock()
    return InterfaceNames(OWN, links, clock=clock, **kw), clock


def test_own_namespace_bare_others_tagged_with_their_inode():
    ns = Namespaces({OWN: {1: ("lo", "loopback"), 2: ("eth0", "virtio_net")},
                     OTHER: {2: ("veth1", "veth")}})
    cache, _ = names(ns)
    got = cache.resolve([(OWN, 2), (OTHER, 2), (OWN, 1)])
    assert got == {(OWN, 2): ("eth0", "virtio_net"), (OTHER, 2): (f"veth1@{OTHER}", "veth"),
                   (OWN, 1): ("lo", "loopback")}
    assert ns.reads == {OWN: 1, OTHER: 1}  # one dump per namespace, not per key


def test_vanished_interface_keeps_its_last_name():
    ns = Namespaces({OTHER: {2: ("veth1", "veth")}})
    cache, clock = names(ns, stale_s=30.0)
    assert cache.resolve([(OTHER, 2)])[(OTHER, 2)] == (f"veth1@{OTHER}", "veth")
    ns.links[OTHER] = {}  # the veth was deleted
    clock.now += 60  # stale: read again
    assert cache.resolve([(OTHER, 2)])[(OTHER, 2)] == (f"veth1@{OTHER}", "veth")
    assert ns.reads[OTHER] == 2
    ns.links[OTHER] = None  # the whole namespace is gone
    clock.now += 60
    assert cache.resolve([(OTHER, 2)])[(OTHER, 2)] == (f"veth1@{OTHER}", "veth")


def test_interface_that_appears_later_is_picked_up_after_retry():
    ns = Namespaces({OWN: {1: ("lo", "loopback")}})
    cache, clock = names(ns, retry_s=1.0)
    assert cache.resolve([(OWN, 7)])[(OWN, 7)] == ("if7", "")
    ns.links[OWN][7] = ("eth7", "e1000")
    clock.now += 0.5  # within retry_s: no new dump for the unknown index
    assert cache.resolve([(OWN, 7)])[(OWN, 7)] == ("if7", "")
    assert ns.reads[OWN] == 1
    clock.now += 0.6
    assert cache.resolve([(OWN, 7)])[(OWN, 7)] == ("eth7", "e1000")
    assert ns.reads[OWN] == 2


def test_known_names_are_not_reread_until_stale_and_renames_then_show():
    ns = Namespaces({OWN: {3: ("eth0", "virtio_net")}})
    cache, clock = names(ns, retry_s=1.0, stale_s=30.0)
    cache.resolve([(OWN, 3)])
    clock.now += 10
    cache.resolve([(OWN, 3)])
    assert ns.reads[OWN] == 1
    ns.links[OWN] = {3: ("uplink", "virtio_net")}
    clock.now += 25
    assert cache.resolve([(OWN, 3)])[(OWN, 3)] == ("uplink", "virtio_net")


def test_unreachable_namespace_gives_index_names():
    cache, _ = names(Namespaces({}))
    assert cache.resolve([(OTHER, 4)]) == {(OTHER, 4): (f"if4@{OTHER}", "")}


def test_cache_is_bounded_oldest_seen_first():
    ns = Namespaces({OWN: {i: (f"v{i}", "veth") for i in range(1, 6)}})
    cache, clock = names(ns, max_entries=3)
    cache.resolve([(OWN, 1)])
    assert len(cache._known) == 3
    ns.links[OWN] = {}
    clock.now += 60
    assert cache.resolve([(OWN, 5), (OWN, 1)]) == {(OWN, 5): ("v5", "veth"), (OWN, 1): ("if1", "")}


def test_read_links_of_our_own_namespace():
    """Every namespace has lo at index 1; its driver comes from the link type."""
    links = read_links()
    assert links[1] == ("lo", "loopback")
    assert all(isinstance(i, int) and name for i, (name, _d) in links.items())


def test_reader_reads_our_namespace_directly_and_cannot_enter_a_missing_one():
    own = os.stat("/proc/self/ns/net").st_ino
    reader = NamespaceLinks(own)
    assert reader(own)[1] == ("lo", "loopback")
    assert reader(1) is None  # no namespace has inode 1: nothing to enter
