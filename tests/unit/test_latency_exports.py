"""Monitor.latency(), GET /api/latency and the stack metrics, over fixed Probes-API values.

The histograms are raw slot lists as the kernel lays them out; the collector
is scraped through prometheus_client's real exposition and parser, so the
names, labels and values checked are those Prometheus would store.
"""

from __future__ import annotations

import json
import threading

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from fakeprobes import FakeProbes, monitor_over
from sockwatch import latency
from sockwatch.exporters.api import EventLog, build_routes
from sockwatch.exporters.http import Request
from sockwatch.exporters.metrics import SockwatchCollector
from sockwatch.records import HIST_COUNT, Hist
from sockwatch.totals import BOUNDS_S
from test_latency import hist, observe

OTHER = 4026532777


LINKS = {1: ("lo", "loopback"), 2: ("veth1", "veth"), 3: ("veth2", "veth")}


def setup(enabled: bool = True, links: dict | None = None):
    """A monitor over fixed maps; every namespace holds ``links`` (at the time of reading)."""
    hists = [hist({}) for _ in range(HIST_COUNT)]
    hists[Hist.ACCEPT_QUEUE] = observe(200_000_000, 205_000_000)
    hists[Hist.HANDSHAKE_CLIENT] = observe(90_000)
    probes = FakeProbes(hists, {}, {}, enabled)
    links = LINKS if links is None else links
    mon = monitor_over(probes, lambda ns: dict(links))
    own = mon.netns
    probes._stack = {
        ("rx", "socket", OTHER, 2): observe(200_000_000, 201_000_000),
        ("tx", "qdisc", OTHER, 2): observe(4_000),
        ("tx", "qdisc", OTHER, 3): observe(9_000),
        ("tx", "driver", own, 1): observe(1_000),
    }
    probes._totals = {(OTHER, 2): (10, 1500, 12, 2000, 1), (OTHER, 3): (5, 500, 6, 600, 0),
                      (own, 1): (3, 300, 3, 300, 0)}
    return mon, probes


def test_monitor_latency_names_interfaces_per_namespace():
    mon, _ = setup()
    rep = mon.latency()
    assert rep["enabled"] is True
    labels = [(e["interface"], e["direction"], e["layer"]) for e in rep["layers"][5:]]
    assert labels == [("lo", "tx", "driver"), (f"veth1@{OTHER}", "tx", "qdisc"),
                      (f"veth1@{OTHER}", "rx", "socket"), (f"veth2@{OTHER}", "tx", "qdisc")]
    assert [(i["interface"], i["netns"], i["driver"]) for i in rep["interfaces"]] == [
        ("lo", mon.netns, "loopback"), (f"veth1@{OTHER}", OTHER, "veth"),
        (f"veth2@{OTHER}", OTHER, "veth")]
    accept = next(e for e in rep["layers"] if e["layer"] == "accept_queue")
    assert accept["count"] == 2 and BOUNDS_S[17] < accept["p50_seconds"] <= BOUNDS_S[18]


def test_names_learned_while_an_interface_existed_outlive_it():
    links = dict(LINKS)
    watched, _ = setup(links=links)
    watched.name_interfaces()  # what reconcile() and the sampling loop do periodically
    late, _ = setup(links=links)
    links.clear()  # every veth deleted before anyone asked for a report
    assert f"veth1@{OTHER}" in {i["interface"] for i in watched.latency()["interfaces"]}
    assert f"if2@{OTHER}" in {i["interface"] for i in late.latency()["interfaces"]}


def test_monitor_latency_with_stack_off_reads_no_stack_maps():
    mon, _ = setup(enabled=False)  # FakeProbes asserts if a stack map is read
    rep = mon.latency()
    assert rep["enabled"] is False and rep["interfaces"] == []
    assert len(rep["layers"]) == len(latency.CONNECTION_LAYERS)


def test_api_latency_returns_the_monitor_report():
    mon, _ = setup()
    routes = build_routes(mon, CollectorRegistry(auto_describe=False), EventLog(), threading.Event())
    resp = routes["/api/latency"](Request("GET", "/api/latency", {}, {}))
    assert resp.status == 200 and resp.content_type == "application/json"
    assert json.loads(resp.body) == mon.latency()
    mon.probes = None
    assert routes["/api/latency"](Request("GET", "/api/latency", {}, {})).status == 503


def scrape(mon, **kw) -> dict:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SockwatchCollector(mon, **kw))
    text = generate_latest(registry).decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def samples(family, suffix: str = "") -> dict:
    return {tuple(sorted(s.labels.items())): s.value for s in family.samples
            if s.name == family.name + suffix}


def test_stack_metrics_names_labels_and_values():
    mon, _ = setup()
    fams = scrape(mon)
    accept = fams["sockwatch_accept_queue_seconds"]
    assert accept.type == "histogram"
    assert samples(accept, "_count") == {(): 2}
    assert samples(accept, "_sum") == {(): pytest.approx(0.405)}

    stack = fams["sockwatch_stack_latency_seconds"]
    assert stack.type == "histogram"
    counts = samples(stack, "_count")
    assert counts == {
        (("direction", "rx"), ("interface", f"veth1@{OTHER}"), ("layer", "socket")): 2,
        (("direction", "tx"), ("interface", f"veth1@{OTHER}"), ("layer", "qdisc")): 1,
        (("direction", "tx"), ("interface", f"veth2@{OTHER}"), ("layer", "qdisc")): 1,
        (("direction", "tx"), ("interface", "lo"), ("layer", "driver")): 1,
    }
    sock_buckets = {s.labels["le"]: s.value for s in stack.samples
                    if s.name.endswith("_bucket") and s.labels["layer"] == "socket"}
    assert sock_buckets["0.131072"] == 0 and sock_buckets["0.262144"] == 2

    packets = samples(fams["sockwatch_interface_packets"], "_total")
    assert packets[(("direction", "rx"), ("interface", f"veth1@{OTHER}"))] == 10
    assert packets[(("direction", "tx"), ("interface", "lo"))] == 3
    octets = samples(fams["sockwatch_interface_bytes"], "_total")
    assert octets[(("direction", "tx"), ("interface", f"veth1@{OTHER}"))] == 2000
    errors = samples(fams["sockwatch_interface_driver_errors"], "_total")
    assert errors == {(("interface", f"veth1@{OTHER}"),): 1, (("interface", f"veth2@{OTHER}"),): 0,
                      (("interface", "lo"),): 0}
    assert samples(fams["sockwatch_stack_probes_enabled"]) == {(): 1}
    hooks = samples(fams["sockwatch_probe_attach_info"])
    assert (("hook", "net_dev_queue"), ("mode", "tp_btf")) in hooks


def test_interface_label_is_capped_and_folded_values_add_up():
    mon, _ = setup()
    fams = scrape(mon, top_interfaces=2)
    packets = samples(fams["sockwatch_interface_packets"], "_total")
    # lo and veth1 are admitted (sorted key order); veth2 is folded into "other"
    assert packets[(("direction", "rx"), ("interface", "other"))] == 5
    assert {dict(k)["interface"] for k in packets} == {"lo", f"veth1@{OTHER}", "other"}
    folded = samples(fams["sockwatch_folded_label_values"], "_total")
    assert folded[(("label", "interface"),)] == 1


def test_stack_metrics_with_stack_off():
    mon, _ = setup(enabled=False)
    fams = scrape(mon)
    assert samples(fams["sockwatch_stack_probes_enabled"]) == {(): 0}
    assert samples(fams["sockwatch_stack_latency_seconds"], "_count") == {}
    assert samples(fams["sockwatch_accept_queue_seconds"], "_count") == {(): 2}
