"""Builds sockwatch's Grafana dashboards with Grafana's foundation SDK.

The dashboards are code so that every panel goes through the SDK's typed
builders (a misspelt option is an AttributeError here, not a panel Grafana
silently ignores), and so that the PromQL of the four dashboards shares one
set of selectors and one way of writing a quantile or a heatmap. The JSON in
grafana/dashboards/ is what users import; tests/unit/test_dashboards.py fails
when it differs from what this script builds.

    python -m grafana.build            # rewrite grafana/dashboards/*.json
    python -m grafana.build --check    # exit 1 if the JSON is out of date
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.builders import common as cb
from grafana_foundation_sdk.builders import heatmap, prometheus, stat, table, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models import heatmap as heatmodel
from grafana_foundation_sdk.models import prometheus as promql
from grafana_foundation_sdk.models.dashboard import (
    DashboardCursorSync,
    DashboardLinkType,
    DataSourceRef,
    DataTransformerConfig,
    VariableRefresh,
    VariableSort,
)

OUT = Path(__file__).resolve().parent / "dashboards"
# Grafana 12's dashboard schema (apps/dashboard/pkg/migration/schemaversion: LATEST_VERSION).
# The SDK models v41; v42 only rewrites hideFrom overrides, which no panel here has,
# so the JSON is the same in both and Grafana runs no migration on import.
SCHEMA_VERSION = 42
TAG = "sockwatch"
DS = DataSourceRef(type_val="prometheus", uid="${datasource}")
INST = 'instance=~"$instance"'
# :regex escapes the name's regex characters (a task name may hold dots or brackets)
PROC = f'{INST}, process=~"${{process:regex}}"'
RATE = "[$__rate_interval]"
OK = PROC + ', result="ok"'
PEERS = PROC + ', state!="LISTEN"'  # per-connection series of connections, not listeners
FAILED = PROC + ', result!="ok"'


def sel(metric: str, matchers: str = INST) -> str:
    return f"{metric}{{{matchers}}}"


def rate(metric: str, matchers: str = INST) -> str:
    return f"rate({sel(metric, matchers)}{RATE})"


def quantile(q: float, histogram: str, matchers: str = INST, by: str = "") -> str:
    keep = ", ".join(["le", *filter(None, [by])])
    return f"histogram_quantile({q}, sum by ({keep}) ({rate(histogram + '_bucket', matchers)}))"


def target(expr: str, legend: str = "", ref: str = "A", instant: bool = False,
           fmt: promql.PromQueryFormat | None = None) -> prometheus.Dataquery:
    t = prometheus.Dataquery().expr(expr).ref_id(ref).datasource(DS)
    if legend:
        t = t.legend_format(legend)
    if instant:
        t = t.instant()
    if fmt is not None:
        t = t.format(fmt)
    return t


def targets(*pairs: tuple[str, str]) -> list[prometheus.Dataquery]:
    """(expr, legend) pairs as range queries with refIds A, B, ..."""
    return [target(e, legend, chr(ord("A") + i)) for i, (e, legend) in enumerate(pairs)]


def series(title: str, description: str, unit: str, *pairs: tuple[str, str], w: int = 12,
           h: int = 8, stack: bool = False, min_zero: bool = True) -> timeseries.Panel:
    p = (timeseries.Panel().title(title).description(description).datasource(DS).unit(unit)
         .targets(targets(*pairs)).span(w).height(h).fill_opacity(10))
    if min_zero:
        p = p.min(0)
    if stack:
        p = p.stacking(cb.StackingConfig().mode(common.StackingMode.NORMAL)).fill_opacity(40)
    return p


def quantiles(title: str, description: str, histogram: str, matchers: str = INST,
              by: str = "", w: int = 12) -> timeseries.Panel:
    """p50 and p99 of a histogram, one line per ``by`` label value."""
    label = " ".join(f"{{{{{b.strip()}}}}}" for b in by.split(",") if b.strip())
    return series(title, description, "s",
                  (quantile(0.5, histogram, matchers, by), f"p50 {label}".strip()),
                  (quantile(0.99, histogram, matchers, by), f"p99 {label}".strip()), w=w)


def heat(title: str, description: str, histogram: str, matchers: str = INST,
         w: int = 12) -> heatmap.Panel:
    """Prometheus buckets drawn as they are (no re-bucketing): rate per ``le``."""
    expr = f"sum by (le) ({rate(histogram + '_bucket', matchers)})"
    return (heatmap.Panel().title(title).description(description).datasource(DS)
            .with_target(target(expr, "{{le}}", fmt=promql.PromQueryFormat.HEATMAP))
            .calculate(False).y_axis(heatmap.YAxisConfig().unit("s"))
            .rows_frame(heatmap.RowsHeatmapOptions().layout(common.HeatmapCellLayout.LE))
            .cell_values(heatmap.CellValues().unit("ops"))
            .color(heatmap.HeatmapColorOptions().mode(heatmodel.HeatmapColorMode.SCHEME)
                   .scheme("Spectral").steps(64).fill("dark-orange")
                   # latency distributions are skewed: Grafana's own default scale
                   .scale(heatmodel.HeatmapColorScale.EXPONENTIAL).exponent(0.5))
            .span(w).height(8))


def tabled(title: str, description: str, *pairs: tuple[str, str], w: int = 12,
           h: int = 8) -> table.Panel:
    """Instant queries in table format, merged into one row per label set."""
    ts = [target(e, legend, chr(ord("A") + i), instant=True, fmt=promql.PromQueryFormat.TABLE)
          for i, (e, legend) in enumerate(pairs)]
    p = table.Panel().title(title).description(description).datasource(DS).targets(ts).span(w).height(h)
    if len(ts) > 1:
        p = p.with_transformation(DataTransformerConfig(id_val="merge", options={}))
    names = {f"Value #{t.build().ref_id}": legend for t, (_, legend) in zip(ts, pairs)}
    if len(ts) == 1:
        names = {"Value": pairs[0][1]}
    return p.with_transformation(DataTransformerConfig(
        id_val="organize", options={"excludeByName": {"Time": True, "job": True},
                                    "renameByName": names}))


def by_state(title: str, description: str) -> timeseries.Panel:
    """Live sockets of the selected processes by TCP state, stacked."""
    return series(title, description, "short",
                  (f"sum by (state) ({sel('sockwatch_connections', PROC)})", "{{state}}"),
                  stack=True)


def single(title: str, description: str, expr: str, unit: str, w: int = 6) -> stat.Panel:
    return (stat.Panel().title(title).description(description).datasource(DS).unit(unit)
            .with_target(target(expr, instant=True)).span(w).height(4))


# --------------------------------------------------------------------------------------
# Variables
# --------------------------------------------------------------------------------------


def datasource_var() -> db.DatasourceVariable:
    return db.DatasourceVariable("datasource").label("Data source").type("prometheus")


def label_var(name: str, label: str, query: str, multi: bool = True) -> db.QueryVariable:
    v = (db.QueryVariable(name).label(label).datasource(DS).query(query)
         .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED).sort(VariableSort.ALPHABETICAL_ASC))
    if multi:
        v = v.multi(True).include_all(True).all_value(".*")
    return v


def instance_var() -> db.QueryVariable:
    return label_var("instance", "Instance", "label_values(sockwatch_build_info, instance)")


def process_var(multi: bool = True) -> db.QueryVariable:
    return label_var("process", "Process", f"label_values({sel('sockwatch_connections')}, process)",
                     multi)


def dashboard(uid: str, title: str, description: str, variables: list[Any]) -> db.Dashboard:
    d = (db.Dashboard(title).uid(uid).description(description).tags([TAG])
         .time("now-1h", "now").refresh("30s").timezone("browser")
         .tooltip(DashboardCursorSync.CROSSHAIR)
         .link(db.DashboardLink("sockwatch").type(DashboardLinkType.DASHBOARDS).tags([TAG])
               .as_dropdown(True).include_vars(True).keep_time(True))
         # Grafana's built-in annotations (alerts, manual notes), as every saved dashboard has
         .annotation(db.AnnotationQuery().name("Annotations & Alerts").built_in(1).enable(True)
                     .hide(True).icon_color("rgba(0, 211, 255, 1)").type("dashboard")
                     .datasource(DataSourceRef(type_val="grafana", uid="-- Grafana --"))))
    for v in variables:
        d = d.with_variable(v)
    return d


# --------------------------------------------------------------------------------------
# The four dashboards
# --------------------------------------------------------------------------------------

def bytes_rate(direction: str) -> str:
    return f"sum({rate(f'sockwatch_{direction}_bytes_total', PROC)})"


def host_overview() -> db.Dashboard:
    return (dashboard("sockwatch-host", "sockwatch / Host overview",
                      "Every TCP socket on the host, as sockwatch sees it from the kernel.",
                      [datasource_var(), instance_var(), process_var()])
        .with_row(db.Row("Connections"))
        .with_panel(by_state(
            "Connections by state",
            "Live TCP sockets by state (listeners included), for the selected processes. "
            "Bad: CLOSE-WAIT that only grows means an application does not close sockets its "
            "peer closed; a pile of TIME-WAIT or SYN-SENT means connection churn or an "
            "unreachable peer."))
        .with_panel(series(
            "New connections/s, in and out",
            "Connections accepted (in) and outgoing connects that succeeded (out), per second. "
            "Bad: a sudden drop to zero on a busy host (clients cannot reach it, or it stopped "
            "connecting out), or a jump that matches failures below.",
            "cps",
            (f"sum({rate('sockwatch_accepts_total', PROC)})", "in (accepted)"),
            (f"sum({rate('sockwatch_connects_total', OK)})",
             "out (connected)")))
        .with_panel(series(
            "Connect failures by result",
            "Outgoing connects that failed, per second, by how: refused (RST, nothing "
            "listening), timeout (SYNs unanswered), reset, aborted (the application gave up), "
            "unreachable, error. Bad: anything sustained above zero; timeouts point at "
            "firewalls or dead peers, refusals at a service that is down.",
            "cps",
            (f"sum by (result) ({rate('sockwatch_connects_total', FAILED)})",
             "{{result}}")))
        .with_panel(series(
            "Accept rate by port",
            "Connections accepted per second by listening port. Bad: a port whose rate falls "
            "to zero while clients still connect (see accept-queue latency), or traffic on a "
            "port nothing should serve.",
            "cps",
            (f"sum by (port) ({rate('sockwatch_accepts_total', PROC)})", "port {{port}}")))
        .with_row(db.Row("Traffic"))
        .with_panel(series(
            "Bytes/s",
            "Application payload sent and received per second (retransmissions counted once). "
            "Bad: a flat line at zero while connections are open (stuck peers), or a rate "
            "near the link's capacity.",
            "Bps", (bytes_rate("sent"), "sent"), (bytes_rate("received"),
                                                          "received")))
        .with_panel(series(
            "Retransmits/s by process",
            "TCP segments retransmitted per second. Bad: anything sustained above zero on a "
            "LAN; compared with bytes/s it says how lossy the path is.",
            "short", (f"sum by (process) ({rate('sockwatch_retransmits_total', PROC)})",
                      "{{process}}")))
        .with_row(db.Row("Latency"))
        .with_panel(heat(
            "Handshake latency",
            "Connections per second by handshake time (SYN_SENT->ESTABLISHED for clients, "
            "SYN_RECV->ESTABLISHED for servers), in the exporter's log2 buckets. Bad: a band "
            "above ~1 s, which is a SYN retransmission (a lost SYN or a full SYN queue).",
            "sockwatch_handshake_seconds"))
        .with_panel(quantiles(
            "Handshake latency p50 / p99",
            "Median and 99th percentile handshake time by role. Bad: p99 near 1 s or 3 s "
            "(SYN retransmits), or p50 far above the network round trip.",
            "sockwatch_handshake_seconds", by="role"))
        .with_panel(heat(
            "Accept-queue wait",
            "Connections per second by how long they waited established in a listener's "
            "accept queue before accept() returned them. Bad: a band in the tens of "
            "milliseconds or more: the application accepts too slowly (and its backlog fills).",
            "sockwatch_accept_queue_seconds"))
        .with_panel(quantiles(
            "Accept-queue wait p50 / p99",
            "Median and 99th percentile of the accept-queue wait. Bad: p99 growing with load, "
            "the sign of an accept loop that cannot keep up.",
            "sockwatch_accept_queue_seconds"))
        .with_row(db.Row("Processes"))
        .with_panel(tabled(
            "Top processes",
            "The ten processes moving the most payload (bytes/s sent + received), with their "
            "live sockets and connect attempts per second. Bad: an unexpected name at the top, "
            "or a process with many sockets and no traffic (a leak).",
            (f"topk(10, sum by (process) ({rate('sockwatch_sent_bytes_total', PROC)} + "
             f"{rate('sockwatch_received_bytes_total', PROC)}))", "bytes/s"),
            (f"sum by (process) ({sel('sockwatch_connections', PROC)})", "sockets"),
            (f"sum by (process) ({rate('sockwatch_connects_total', PROC)})", "connects/s"),
            w=24)))


def process_drilldown() -> db.Dashboard:
    return (dashboard("sockwatch-process", "sockwatch / Process drill-down",
                      "One process (by its kernel task name): its sockets, rates, failures, "
                      "peers and latency.",
                      [datasource_var(), instance_var(), process_var(multi=False)])
        .with_panel(by_state(
            "Connections of $process by state",
            "The process's live TCP sockets by state. Bad: CLOSE-WAIT growing (it does not "
            "close what peers closed), or the count rising without bound (a leak)."))
        .with_panel(tabled(
            "Listening sockets",
            "Ports the process listens on and how many sockets listen on each. Bad: a port "
            "missing after a restart, or one that should not be open.",
            (f"sum by (port) ({sel('sockwatch_listening_sockets', PROC)})", "sockets")))
        .with_panel(series(
            "Connects/s by result",
            "The process's outgoing connection attempts per second, by result. Bad: any "
            "result other than ok sustained (see the failure ratio).",
            "cps", (f"sum by (result) ({rate('sockwatch_connects_total', PROC)})", "{{result}}")))
        .with_panel(series(
            "Connect failure ratio",
            "Share of the process's connection attempts that failed. Bad: above a few percent; "
            "100 % means its upstream is down or unreachable.",
            "percentunit",
            (f"sum({rate('sockwatch_connects_total', FAILED)}) / "
             f"sum({rate('sockwatch_connects_total', PROC)})", "failed")))
        .with_panel(series(
            "Accepts/s by port",
            "Connections the process accepted per second, by listening port. Bad: zero while "
            "clients report timeouts (its accept loop is stuck).",
            "cps", (f"sum by (port) ({rate('sockwatch_accepts_total', PROC)})", "port {{port}}"),
            w=8))
        .with_panel(series(
            "Bytes/s",
            "Payload the process sent and received per second (retransmissions counted once). "
            "Bad: traffic stopping while its sockets stay open (a stuck peer or a stuck "
            "process), or a rate pinned at a limit.",
            "Bps", (bytes_rate("sent"), "sent"), (bytes_rate("received"), "received"), w=8))
        .with_panel(series(
            "Retransmits/s",
            "TCP segments the process retransmitted per second (timeouts, fast retransmits "
            "and tail-loss probes). Bad: sustained above zero on a LAN or loopback: loss, or "
            "ACKs delayed past the retransmission timer.",
            "short", (f"sum({rate('sockwatch_retransmits_total', PROC)})", "retransmits"),
            w=8))
        .with_panel(tabled(
            "Peers (capped)",
            "The process's connections with the most payload sent, one row per local/remote "
            "pair, at most 20 (and at most metrics.per_connection_limit exported). Needs "
            "metrics.per_connection = true in sockwatch.toml. Bad: peers you do not expect, "
            "or a peer with a large smoothed RTT.",
            (f"topk(20, sum by (local, remote, state) "
             f"({sel('sockwatch_connection_sent_bytes', PEERS)}))", "sent bytes"),
            (f"max by (local, remote, state) ({sel('sockwatch_connection_rtt_seconds', PEERS)})",
             "srtt"), w=24))
        .with_panel(series(
            "Latency: smoothed RTT by peer",
            "The kernel's smoothed round-trip time of each of the process's connections "
            "(per-connection series, capped; needs metrics.per_connection = true), worst 10. "
            "Bad: RTT well above the path's base latency (queueing, bufferbloat) or rising.",
            "s", (f"topk(10, max by (remote) ({sel('sockwatch_connection_rtt_seconds', PEERS)}))",
                  "{{remote}}"), w=24)))


STACK = "sockwatch_stack_latency_seconds"
LAYER = INST + ', interface=~"$interface", direction="{}", layer="{}"'
PATH = INST + ', interface=~"$interface"'
LAYERS = {
    ("tx", "tcp"): "from the application's write entering TCP to its data leaving TCP for IP",
    ("tx", "qdisc"): "queued in the interface's qdisc (net_dev_queue -> net_dev_start_xmit)",
    ("tx", "driver"): "inside the driver's transmit (net_dev_start_xmit -> net_dev_xmit)",
    ("rx", "driver"): "from the driver's receive (netif_receive_skb / GRO) to TCP",
    ("rx", "tcp"): "from TCP to the socket's receive queue (sk_data_ready)",
    ("rx", "socket"): "waiting in the socket's receive queue until the application read it",
}


def kernel_path() -> db.Dashboard:
    d = (dashboard("sockwatch-kernel-path", "sockwatch / Kernel path",
                   "Where time goes between the application and the wire, per layer of the "
                   "kernel's network stack and per interface.",
                   [datasource_var(), instance_var(),
                    label_var("interface", "Interface",
                              f"label_values({sel(STACK + '_count')}, interface)")])
         .with_panel(single(
             "Stack probes",
             "1 when the per-packet stack probes are loaded, 0 when turned off "
             "(--no-stack-latency / [probes] stack_latency = false). Bad: 0 when you expect "
             "per-layer latency; every panel below is then empty.",
             f"max({sel('sockwatch_stack_probes_enabled')})", "bool_on_off", w=24)))
    for direction, name in (("tx", "Send"), ("rx", "Receive")):
        d = d.with_row(db.Row(f"{name} path (per-layer latency, heatmaps)"))
        for (dr, layer), what in LAYERS.items():
            if dr == direction:
                d = d.with_panel(heat(
                    f"{name}: {layer}",
                    f"Packets per second by time spent {what}, for the selected interfaces. "
                    "Bad: a band far above the rest of the distribution, or the whole "
                    "distribution drifting up with load.",
                    STACK, LAYER.format(direction, layer), w=8))
        d = d.with_panel(quantiles(
            f"{name} path p50 / p99 by layer",
            f"Median and 99th percentile of each {name.lower()}-path layer "
            f"({', '.join(l for (dr, l) in LAYERS if dr == direction)}), per interface. Bad: "
            "one layer's p99 standing far above the others: that layer is the bottleneck.",
            STACK, f'{PATH}, direction="{direction}"', by="layer, interface", w=24))
    return (d
        .with_row(db.Row("Qdisc and driver"))
        .with_panel(quantiles(
            "Qdisc wait p50 / p99 by interface",
            "Time packets wait in each interface's queueing discipline before the driver "
            "takes them. Bad: milliseconds or more: the qdisc is shaping or the device is "
            "backed up (bufferbloat).",
            STACK, f'{PATH}, direction="tx", layer="qdisc"', by="interface"))
        .with_panel(quantiles(
            "Driver latency p50 / p99 by interface and direction",
            "Time in the driver: transmit (start_xmit -> xmit done) and receive (driver -> "
            "TCP). Bad: a driver far slower than its peers, or rising with load (interrupt "
            "or NAPI starvation).",
            STACK, f'{PATH}, layer="driver"', by="interface, direction"))
        .with_row(db.Row("Interfaces"))
        .with_panel(series(
            "Packets/s by interface",
            "Packets per second per interface and direction, as the stack probes count them. "
            "Bad: a sudden drop (link or driver trouble) or an imbalance you do not expect.",
            "pps", (f"sum by (interface, direction) "
                    f"({rate('sockwatch_interface_packets_total', PATH)})",
                    "{{interface}} {{direction}}"), w=8))
        .with_panel(series(
            "Bytes/s by interface",
            "Bytes per second per interface and direction. Bad: a rate pinned at the link's "
            "(or a shaper's) capacity: expect qdisc wait to grow with it.",
            "Bps", (f"sum by (interface, direction) "
                    f"({rate('sockwatch_interface_bytes_total', PATH)})",
                    "{{interface}} {{direction}}"), w=8))
        .with_panel(series(
            "Driver errors/s by interface",
            "Transmit errors the drivers reported (net_dev_xmit with a non-zero return), per "
            "second. Bad: anything above zero.",
            "short", (f"sum by (interface) "
                      f"({rate('sockwatch_interface_driver_errors_total', PATH)})",
                      "{{interface}}"), w=8)))


OWN = " and on (instance) sockwatch_build_info"  # process_* of sockwatch, not of other jobs


def health() -> db.Dashboard:
    return (dashboard("sockwatch-health", "sockwatch / health",
                      "Is sockwatch seeing everything, and what does watching cost?",
                      [datasource_var(), instance_var()])
        .with_row(db.Row("Completeness"))
        .with_panel(series(
            "Lost events/s by source",
            "Records or rows sockwatch had to drop, per second, by the stage that dropped "
            "them (ring buffer full, socket map full, totals map full, decode, table full, "
            "recursion, undelivered). Bad: anything above zero: counts and tables are then "
            "incomplete; raise the matching size in sockwatch.toml.",
            "short", (f"sum by (source) ({rate('sockwatch_lost_events_total')})", "{{source}}")))
        .with_panel(series(
            "Map and table fill",
            "Entries in sockwatch's tables as a share of their capacity, and the fullest each "
            "ring buffer was found since the daemon started. Bad: approaching 100 %: new "
            "sockets or records will be dropped (and counted in lost events).",
            "percentunit",
            (f"max by (table) ({sel('sockwatch_table_entries')} / "
             f"{sel('sockwatch_table_capacity')})", "{{table}}"),
            (f"max by (ring) ({sel('sockwatch_ringbuf_peak_bytes')} / "
             f"{sel('sockwatch_ringbuf_size_bytes')})", "ring buffer {{ring}} (fullest)")))
        .with_panel(series(
            "Reconciliation removals/s",
            "Connections removed by the periodic kernel walk because their close was never "
            "seen, per second. Bad: sustained above zero: close events are being lost.",
            "short", (f"sum({rate('sockwatch_reconcile_removed_total')})", "removed"),
            (f"sum({rate('sockwatch_untracked_closes_total')})", "untracked closes"),
            (f"sum({rate('sockwatch_decode_errors_total')})", "decode errors")))
        .with_panel(series(
            "Label values folded into other",
            "Distinct process names and ports folded into the label value 'other' by the caps "
            "(metrics.top_processes, metrics.top_ports). Bad: growing: per-process panels "
            "hide some processes; raise the cap if the series budget allows.",
            "short", (f"sum by (label) ({sel('sockwatch_folded_label_values_total')})",
                      "{{label}}")))
        .with_panel(tabled(
            "Attach mode per hook",
            "The probe variant attached for every kernel hook (tp_btf, raw_tp, tracepoint, "
            "fentry, kprobe). Bad: a hook missing, or a slower fallback than the kernel "
            "should allow (sockwatch probes explains why).",
            (f"max by (instance, hook, mode) ({sel('sockwatch_probe_attach_info')})", "attached"),
            w=24, h=7))
        .with_row(db.Row("Cost"))
        .with_panel(series(
            "Scrape duration",
            "Time the exporter spent collecting one scrape (before exposition). Bad: near the "
            "scrape timeout, or growing with the number of connections.",
            "s", (f"max by (instance) ({sel('sockwatch_scrape_duration_seconds')})",
                  "{{instance}}"), w=8))
        .with_panel(series(
            "Daemon CPU",
            "CPU time the sockwatch daemon used per second of wall time (1 = one core). "
            "Bad: a sustained share of a core; the probes' cost in the traced "
            "applications does not show here (see bench/).",
            "percentunit", (f"rate({sel('process_cpu_seconds_total')}{RATE}){OWN}",
                            "{{instance}}"), w=8))
        .with_panel(series(
            "Daemon memory",
            "Resident memory of the sockwatch daemon. Bad: growing without bound with a "
            "steady number of connections (a leak).",
            "bytes", (f"{sel('process_resident_memory_bytes')}{OWN}", "{{instance}}"),
            (f"{sel('process_virtual_memory_bytes')}{OWN}", "virtual {{instance}}"), w=8))
        .with_panel(tabled(
            "Build and uptime",
            "sockwatch version and kernel of each instance, and seconds since it started. "
            "Bad: an uptime that keeps resetting (the service restarts).",
            (f"max by (instance, version, kernel) ({sel('sockwatch_build_info')})", "up"),
            (f"max by (instance) (time() - {sel('sockwatch_start_time_seconds')})", "uptime s"),
            w=24, h=5)))


DASHBOARDS = {
    "host-overview": host_overview,
    "process-drilldown": process_drilldown,
    "kernel-path": kernel_path,
    "health": health,
}


def number_panels(doc: dict[str, Any]) -> dict[str, Any]:
    """Stable panel ids (Grafana links and shares panels by id; the SDK leaves them unset)."""
    for i, panel in enumerate(doc.get("panels", []), start=1):
        panel["id"] = i
    return doc


def build(name: str) -> dict[str, Any]:
    """One dashboard as the JSON document written to grafana/dashboards/<name>.json."""
    model = DASHBOARDS[name]().build()
    model.schema_version = SCHEMA_VERSION
    return number_panels(json.loads(json.dumps(model, cls=JSONEncoder)))


def render_json(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Generate grafana/dashboards/*.json")
    ap.add_argument("--check", action="store_true",
                    help="do not write; exit 1 naming each file that differs from the generator")
    args = ap.parse_args(argv)
    stale = []
    for name in DASHBOARDS:
        path = OUT / f"{name}.json"
        text = render_json(build(name))
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(path.name)
        else:
            OUT.mkdir(exist_ok=True)
            path.write_text(text)
    if stale:
        print(f"out of date (run python -m grafana.build): {', '.join(stale)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
