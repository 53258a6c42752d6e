"""Kernel histogram slots -> cumulative buckets, quantiles and the /api/latency report.

Slot lists are built the way bpf/maps.bpf.h hist_observe fills them (slot k:
at most 2**k us, the last slot larger, the ns sum at HIST_STRIDE - 1), so the
expected numbers follow from the kernel's layout, not from this code.
"""

from __future__ import annotations

import json

import pytest

from sockwatch import latency
from sockwatch.records import HIST_COUNT, HIST_SLOTS, HIST_STRIDE, Hist
from sockwatch.totals import BOUNDS_S, cumulative_buckets

US = 1e-6
OVERFLOW = HIST_SLOTS - 1


def hist(counts: dict[int, int], sum_ns: int = 0) -> list[int]:
    slots = [0] * HIST_STRIDE
    for k, n in counts.items():
        slots[k] = n
    slots[HIST_STRIDE - 1] = sum_ns
    return slots


def observe(*waits_ns: int) -> list[int]:
    """hist_observe in Python: round up to us, slot = ceil(log2(us)), clipped."""
    slots = [0] * HIST_STRIDE
    for ns in waits_ns:
        us = (ns + 999) // 1000
        k = 0 if us <= 1 else min((us - 1).bit_length(), OVERFLOW)
        slots[k] += 1
        slots[HIST_STRIDE - 1] += ns
    return slots


# -- quantiles ---------------------------------------------------------------------

def test_empty_histogram_has_no_quantiles():
    assert latency.quantile(hist({}), 0.5) is None
    assert latency.quantile(hist({}), 0.99) is None


def test_one_slot_interpolates_inside_its_bounds():
    # 10 values in slot 8: (128 us, 256 us]
    slots = hist({8: 10})
    assert latency.quantile(slots, 0.5) == pytest.approx((128 + 64) * US)
    assert latency.quantile(slots, 0.99) == pytest.approx((128 + 128 * 0.99) * US)
    assert latency.quantile(slots, 1.0) == pytest.approx(256 * US)
    assert latency.quantile(slots, 0.0) == pytest.approx(128 * US)


def test_first_slot_starts_at_zero():
    assert latency.quantile(hist({0: 4}), 0.5) == pytest.approx(0.5 * US)


def test_all_in_overflow_answers_the_largest_finite_bound():
    slots = hist({OVERFLOW: 3}, sum_ns=3 * 200 * 10**9)
    assert latency.quantile(slots, 0.5) == BOUNDS_S[-1]
    assert latency.quantile(slots, 0.99) == BOUNDS_S[-1]


def test_rank_falls_in_the_slot_holding_it():
    # 90 fast (slot 3: 4-8 us), 10 slow (slot 18: 131-262 ms): p50 fast, p99 slow
    slots = hist({3: 90, 18: 10})
    p50, p99 = latency.quantile(slots, 0.5), latency.quantile(slots, 0.99)
    assert 4 * US < p50 <= 8 * US
    assert BOUNDS_S[17] < p99 <= BOUNDS_S[18]
    # rank 99 of 100: 9 of the 10 slow values, 90% of the way through the slot
    assert p99 == pytest.approx(BOUNDS_S[17] + (BOUNDS_S[18] - BOUNDS_S[17]) * 0.9)


def test_quantile_brackets_real_waits():
    """A 200 ms wait (a sleeping reader) lands in (131 ms, 262 ms] and p50 says so."""
    slots = observe(*[200_000_000] * 20)
    assert BOUNDS_S[17] < latency.quantile(slots, 0.5) <= BOUNDS_S[18]


def test_quantile_rejects_nonsense():
    with pytest.raises(ValueError):
        latency.quantile(hist({1: 1}), 1.5)
    with pytest.raises(ValueError):
        latency.quantile([0] * HIST_SLOTS, 0.5)  # not a kernel histogram


# -- buckets and one layer ------------------------------------------------------------

def test_cumulative_buckets_run_up_to_inf():
    buckets, total = cumulative_buckets(hist({0: 1, 5: 2, OVERFLOW: 4}, sum_ns=7_500_000_000))
    assert len(buckets) == HIST_SLOTS
    assert buckets[0] == ("1e-06", 1)
    assert buckets[5][1] == 3 and buckets[-2][1] == 3
    assert buckets[-1] == ("+Inf", 7)
    assert total == pytest.approx(7.5)


def test_layer_entry_shape():
    e = latency.layer("tx", "qdisc", "veth0", hist({4: 3, 6: 1}, sum_ns=90_000))
    assert set(e) == {"direction", "layer", "interface", "count", "sum_seconds", "buckets",
                      "p50_seconds", "p99_seconds"}
    assert (e["direction"], e["layer"], e["interface"], e["count"]) == ("tx", "qdisc", "veth0", 4)
    assert e["sum_seconds"] == pytest.approx(90e-6)
    assert len(e["buckets"]) == HIST_SLOTS - 1  # finite bounds; +Inf is "count"
    assert e["buckets"][4] == [BOUNDS_S[4], 3] and e["buckets"][-1] == [BOUNDS_S[-1], 4]
    assert all(a[1] <= b[1] for a, b in zip(e["buckets"], e["buckets"][1:]))


def test_layer_all_in_overflow_keeps_the_count():
    e = latency.layer("", "lifetime_client", "", hist({OVERFLOW: 2}))
    assert e["count"] == 2 and e["buckets"][-1][1] == 0
    assert e["p50_seconds"] == BOUNDS_S[-1]


def test_empty_layer_has_null_quantiles():
    e = latency.layer("", "accept_queue", "", hist({}))
    assert e["count"] == 0 and e["p50_seconds"] is None and e["p99_seconds"] is None


# -- the report -----------------------------------------------------------------------

OWN, OTHER = 4026531840, 4026532999


def kernel_hists() -> list[list[int]]:
    hists = [hist({}) for _ in range(HIST_COUNT)]
    hists[Hist.HANDSHAKE_CLIENT] = hist({7: 2}, sum_ns=200_000)
    hists[Hist.ACCEPT_QUEUE] = observe(200_000_000)
    return hists


STACK = {
    ("rx", "socket", OTHER, 2): observe(200_000_000, 210_000_000),
    ("tx", "tcp", OTHER, 2): observe(5_000, 7_000),
    ("rx", "driver", OTHER, 2): observe(3_000),
    ("tx", "qdisc", OWN, 1): observe(1_000),
}
TOTALS = {(OTHER, 2): (10, 1500, 12, 2000, 1), (OWN, 3): (1, 60, 0, 0, 0)}
NAMES = {(OTHER, 2): (f"veth1@{OTHER}", "veth"), (OWN, 1): ("lo", "loopback"),
         (OWN, 3): ("eth0", "virtio_net")}


def test_report_shape_and_order():
    rep = latency.report(True, kernel_hists(), STACK, TOTALS, NAMES)
    assert set(rep) == {"enabled", "layers", "interfaces"} and rep["enabled"] is True
    conn = [(e["direction"], e["layer"], e["interface"]) for e in rep["layers"][:5]]
    assert conn == [("", "handshake_client", ""), ("", "handshake_server", ""),
                    ("", "accept_queue", ""), ("", "lifetime_client", ""),
                    ("", "lifetime_server", "")]
    stack = [(e["interface"], e["direction"], e["layer"]) for e in rep["layers"][5:]]
    # by interface, then in the order data travels: tx tcp, qdisc, driver; rx driver, tcp, socket
    assert stack == [("lo", "tx", "qdisc"), (f"veth1@{OTHER}", "tx", "tcp"),
                     (f"veth1@{OTHER}", "rx", "driver"), (f"veth1@{OTHER}", "rx", "socket")]
    accept = rep["layers"][2]
    assert accept["count"] == 1 and BOUNDS_S[17] < accept["p50_seconds"] <= BOUNDS_S[18]


def test_report_interfaces_cover_totals_and_layers():
    rep = latency.report(True, kernel_hists(), STACK, TOTALS, NAMES)
    by_name = {i["interface"]: i for i in rep["interfaces"]}
    assert sorted(by_name) == ["eth0", "lo", f"veth1@{OTHER}"]
    assert by_name[f"veth1@{OTHER}"] == {
        "interface": f"veth1@{OTHER}", "netns": OTHER, "ifindex": 2, "driver": "veth",
        "rx_packets": 10, "rx_bytes": 1500, "tx_packets": 12, "tx_bytes": 2000,
        "driver_errors": 1}
    # lo has a layer but no totals yet: zeros, not absent
    assert by_name["lo"]["tx_packets"] == 0 and by_name["lo"]["driver"] == "loopback"


def test_report_is_strict_json():
    rep = latency.report(True, kernel_hists(), STACK, TOTALS, NAMES)
    assert json.loads(json.dumps(rep, allow_nan=False)) == rep


def test_report_with_stack_off_has_connection_layers_only():
    rep = latency.report(False, kernel_hists(), {}, {}, {})
    assert rep["enabled"] is False and rep["interfaces"] == []
    assert [e["layer"] for e in rep["layers"]] == [n for n, _ in latency.CONNECTION_LAYERS]


def test_same_label_merges_slot_by_slot():
    """An interface re-created with a new index keeps one set of layers under its name."""
    stack = {("tx", "driver", OWN, 5): hist({2: 1}, 3_000), ("tx", "driver", OWN, 9): hist({2: 2, 4: 1}, 20_000)}
    merged = latency.by_label(stack, lambda ns, i: "eth1")
    assert merged == {("tx", "driver", "eth1"): hist({2: 3, 4: 1}, 23_000)}
