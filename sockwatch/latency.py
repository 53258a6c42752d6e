"""Per-layer latency as people and scripts read it: quantiles and the report shape.

The kernel counts every layer in log2 slots of microseconds (bpf/maps.bpf.h
hist_observe) and user space expands them once, with
``totals.cumulative_buckets``; this module adds quantiles and assembles the
report that ``Monitor.latency()``, ``GET /api/latency`` and ``sockwatch
latency --json`` share. Everything here is pure: slot lists in, dicts out.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

from sockwatch.records import HIST_SLOTS, Hist
from sockwatch.totals import BOUNDS_S, cumulative_buckets

# Connection-level histograms, always present (interface "" and direction "").
CONNECTION_LAYERS: tuple[tuple[str, Hist], ...] = (
    ("handshake_client", Hist.HANDSHAKE_CLIENT),
    ("handshake_server", Hist.HANDSHAKE_SERVER),
    ("accept_queue", Hist.ACCEPT_QUEUE),
    ("lifetime_client", Hist.LIFETIME_CLIENT),
    ("lifetime_server", Hist.LIFETIME_SERVER),
)
# Per-interface layers in the order a byte meets them: write() -> wire, wire -> read().
STACK_LAYERS: tuple[tuple[str, str], ...] = (
    ("tx", "tcp"), ("tx", "qdisc"), ("tx", "driver"),
    ("rx", "driver"), ("rx", "tcp"), ("rx", "socket"),
)  # fmt: skip

StackKey = tuple[str, str, int, int]  # direction, layer, netns inode, ifindex
IfKey = tuple[int, int]  # netns inode, ifindex


def quantile(slots: list[int], q: float) -> float | None:
    """The ``q`` quantile in seconds, or None for an empty histogram.

    Interpolated linearly inside the log2 slot that holds the rank, the way
    Prometheus' histogram_quantile() does: taking the slot's upper bound
    would overstate by up to 2x, and the same rule as the dashboards means
    ``sockwatch latency`` and Grafana print the same p99 for the same
    buckets. A rank in the overflow slot answers its lower bound (the
    largest finite bound, again as histogram_quantile does).
    """
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"a quantile lies in [0, 1], not {q}")
    running = [n for _le, n in cumulative_buckets(slots)[0]]
    count = running[-1]
    if not count:
        return None
    rank = q * count
    below = 0
    for k, upto in enumerate(running):
        if upto >= rank and upto > below:
            if k == HIST_SLOTS - 1:
                return BOUNDS_S[-1]
            low = BOUNDS_S[k - 1] if k else 0.0
            return low + (BOUNDS_S[k] - low) * (rank - below) / (upto - below)
        below = upto
    raise AssertionError("unreachable: the last cumulative count is the total")


def layer(direction: str, name: str, interface: str, slots: list[int]) -> dict[str, Any]:
    """One entry of the report's ``layers``.

    ``buckets`` are the finite ``le`` bounds with cumulative counts; the
    ``+Inf`` bucket is ``count`` (JSON has no infinity).
    """
    buckets, sum_seconds = cumulative_buckets(slots)
    return {
        "direction": direction,
        "layer": name,
        "interface": interface,
        "count": buckets[-1][1],
        "sum_seconds": sum_seconds,
        "buckets": [[bound, n] for bound, (_le, n) in zip(BOUNDS_S, buckets)],
        "p50_seconds": quantile(slots, 0.5),
        "p99_seconds": quantile(slots, 0.99),
    }


def add_slots(into: list[int] | None, slots: list[int]) -> list[int]:
    """Slot-wise sum (counts and the ns sum alike): histograms of one label merged."""
    return list(slots) if into is None else [a + b for a, b in zip(into, slots)]


def by_label(stack: Mapping[StackKey, list[int]],
             label: Callable[[int, int], str]) -> dict[tuple[str, str, str], list[int]]:
    """Stack histograms keyed (direction, layer, label of (netns, ifindex)), merged
    where labels coincide (an interface re-created under a new index, or the cap's
    ``other``)."""
    out: dict[tuple[str, str, str], list[int]] = {}
    for (direction, name, ns, ifindex), slots in stack.items():
        key = (direction, name, label(ns, ifindex))
        out[key] = add_slots(out.get(key), slots)
    return out


def _path_order(key: tuple[str, str, str]) -> tuple[str, int, str, str]:
    direction, name, label = key
    try:
        rank = STACK_LAYERS.index((direction, name))
    except ValueError:
        rank = len(STACK_LAYERS)  # a layer this version does not know: last
    return label, rank, direction, name


def report(enabled: bool, hists: list[list[int]], stack: Mapping[StackKey, list[int]],
           interface_totals: Mapping[IfKey, tuple[int, int, int, int, int]],
           names: Mapping[IfKey, tuple[str, str]]) -> dict[str, Any]:
    """The shape of /api/latency.

    ``hists`` is ``Probes.histograms()``, ``stack`` ``Probes.stack_histograms()``,
    ``interface_totals`` ``Probes.interface_totals()``; ``names`` gives each
    (netns, ifindex) of those its (label, driver), the label being the interface
    name, with ``@<netns inode>`` for namespaces other than the daemon's.
    """
    layers = [layer("", name, "", hists[h]) for name, h in CONNECTION_LAYERS]
    merged = by_label(stack, lambda ns, ifindex: names[(ns, ifindex)][0])
    for key in sorted(merged, key=_path_order):
        layers.append(layer(*key, merged[key]))
    interfaces = []
    for ns, ifindex in interface_keys(stack, interface_totals):
        label, driver = names[(ns, ifindex)]
        rx_p, rx_b, tx_p, tx_b, errors = interface_totals.get((ns, ifindex), (0, 0, 0, 0, 0))
        interfaces.append({"interface": label, "netns": ns, "ifindex": ifindex,
                           "driver": driver, "rx_packets": rx_p, "rx_bytes": rx_b,
                           "tx_packets": tx_p, "tx_bytes": tx_b, "driver_errors": errors})
    interfaces.sort(key=lambda i: (i["interface"], i["netns"], i["ifindex"]))
    return {"enabled": enabled, "layers": layers, "interfaces": interfaces}


def interface_keys(stack: Iterable[StackKey], totals: Iterable[IfKey]) -> set[IfKey]:
    """Every (netns, ifindex) a report or a scrape needs a name for."""
    return {(k[2], k[3]) for k in stack} | set(totals)
