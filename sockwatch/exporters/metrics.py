"""The Prometheus collector: reads tables and BPF maps at scrape time.

Nothing here runs per record. At scrape the collector takes the monitor's
lock once, aggregates the live table into bounded label sets (process names
and ports go through the same sticky caps as the totals), reads the kernel's
counters, and yields metric families. Label values: ``process`` is the
kernel's task name; no pid, ephemeral port or 5-tuple labels unless
per-connection series are asked for, and then capped.
"""

from __future__ import annotations

import collections
import platform
import time
from typing import Any, Iterator

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client import ProcessCollector
from prometheus_client.registry import Collector, CollectorRegistry

from sockwatch import __version__, latency, records
from sockwatch.monitor import Monitor
from sockwatch.records import Role, state_name
from sockwatch.totals import LabelCap, cumulative_buckets

P = "sockwatch_"


def build_registry(collector: Collector) -> CollectorRegistry:
    """What /metrics serves: sockwatch's collector plus the standard process_*
    metrics of the daemon itself (CPU seconds, resident memory, open fds, start
    time), which a private registry does not get by default and which the health
    dashboard needs to show what watching costs."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    ProcessCollector(registry=registry)
    return registry


def _family(kind: type, name: str, doc: str, labels: list[str],
            values: dict[tuple[str, ...], Any]) -> Metric:
    """One labelled family, its series in a stable order. A histogram's value is
    the (buckets, sum) pair its add_metric takes."""
    m = kind(P + name, doc, labels=labels)
    for key, v in sorted(values.items()):
        m.add_metric(list(key), *(v if isinstance(v, tuple) else (v,)))
    return m


def _histograms(name: str, doc: str, labels: list[str],
                slots: dict[tuple[str, ...], list[int]]) -> Metric:
    """Kernel log2 histograms as one Prometheus histogram family."""
    return _family(HistogramMetricFamily, name, doc, labels,
                   {key: cumulative_buckets(s) for key, s in slots.items()})


class SockwatchCollector(Collector):
    """Yields every sockwatch metric from one consistent read of the monitor."""

    def __init__(self, monitor: Monitor, per_connection: bool = False,
                 per_connection_limit: int = 1000, top_processes: int = 20, top_ports: int = 20,
                 top_interfaces: int = 64):
        self.monitor = monitor
        self.per_connection = per_connection
        self.per_connection_limit = per_connection_limit
        self.processes = LabelCap(top_processes)
        self.ports = LabelCap(top_ports)
        self.interfaces = LabelCap(top_interfaces)
        self.start_time = time.time()
        self._reported: dict[tuple[str, str], int] = {}  # bounded by the label caps

    def describe(self) -> Iterator[Metric]:
        return iter(())  # registration must not trigger a scrape

    def _monotonic(self, name: str, proc: str, value: int) -> int:
        """Never report less than before: live bytes are refreshed periodically and a
        close can land between reading the kernel's totals and the table."""
        key = (name, proc)
        value = max(value, self._reported.get(key, 0))
        self._reported[key] = value
        return value

    def _process(self, comm: bytes | str) -> str:
        name = comm if isinstance(comm, str) else records.decode_comm(comm)
        return self.processes(name or "unknown")

    def collect(self) -> Iterator[Metric]:
        started = time.perf_counter()
        mon = self.monitor
        probes = mon.probes
        if probes is None:
            return
        # Totals first, then drain: a connection the kernel has already added to its
        # totals must leave the live table before live bytes are summed, or it would
        # count twice. Counters are also clamped (below) so nothing can go backwards.
        totals = probes.totals()
        mon.sync()
        kernel_stats = probes.stats()
        transitions = probes.transitions()
        hists = probes.histograms()
        loss = mon.loss()

        connects: collections.Counter = collections.Counter()
        accepts: collections.Counter = collections.Counter()
        sent: collections.Counter = collections.Counter()
        received: collections.Counter = collections.Counter()
        retrans: collections.Counter = collections.Counter()
        by_kind = {records.Total.SENT_BYTES: sent, records.Total.RECEIVED_BYTES: received,
                   records.Total.RETRANSMITS: retrans}
        for key, n in totals.items():
            proc = self._process(key.comm)
            if key.what == records.Total.CONNECT:
                connects[(proc, records.Result(key.result).name.lower())] += n
            elif key.what == records.Total.ACCEPT:
                accepts[(proc, self.ports(str(key.port)))] += n
            else:
                by_kind[key.what][proc] += n

        by_state: collections.Counter = collections.Counter()  # (state number, process)
        listeners: collections.Counter = collections.Counter()
        procs: dict[bytes | str, str] = {}  # owner as the table gives it -> label value
        listener = Role.LISTENER
        with mon.lock:
            table = mon.table
            # The one loop per live row of a scrape (200k rows: about 0.1 s), under
            # the lock: no call per row that a dict lookup can replace.
            for (state, role, b_recv, b_sent, b_retr, segs_retr, sport, fin), name in \
                    table.scan(records.LIVE.unpack_from):
                proc = procs.get(name)
                if proc is None:
                    proc = procs[name] = self._process(name)
                by_state[(state, proc)] += 1
                if role == listener:
                    listeners[(self.ports(str(sport)), proc)] += 1
                    continue
                # live payload so far; the kernel adds the final count at close
                sent[proc] += b_sent - b_retr
                received[proc] += b_recv - fin if b_recv > fin else 0
                retrans[proc] += segs_retr
            ended = table.ended_by_name()
            counters = dict(table.counters)
            live_count = len(table)
            per_conn = ([table.row(key).connection()
                         for _, key in zip(range(self.per_connection_limit), table.live)]
                        if self.per_connection else [])

        yield _family(CounterMetricFamily, "connects", "Outgoing connection attempts by result.",
                      ["process", "result"], connects)
        yield _family(CounterMetricFamily, "accepts", "Connections accepted, by listening port.",
                      ["process", "port"], accepts)
        yield _family(CounterMetricFamily, "connections_closed",
                      "Connections ended, by role and result.", ["role", "result"],
                      {(r.name.lower(), x.name.lower()): n for (r, x), n in ended.items()})
        yield _family(CounterMetricFamily, "state_transitions",
                      "TCP state transitions seen in the kernel.", ["from", "to"],
                      {(state_name(o), state_name(n)): v for (o, n), v in transitions.items()})
        yield _family(GaugeMetricFamily, "connections", "Live TCP sockets by state and process.",
                      ["state", "process"],
                      {(state_name(state), proc): n for (state, proc), n in by_state.items()})
        yield _family(GaugeMetricFamily, "listening_sockets",
                      "Listening sockets by port and process.", ["port", "process"], listeners)
        for name, doc, values in (
            ("sent_bytes", "Application payload sent (retransmissions counted once).", sent),
            ("received_bytes", "Application payload received.", received),
            ("retransmits", "TCP segments retransmitted.", retrans),
        ):
            m = CounterMetricFamily(P + name, doc, labels=["process"])
            for proc, n in sorted(values.items()):
                m.add_metric([proc], self._monotonic(name, proc, n))
            yield m
        Hist = records.Hist
        yield _histograms("handshake_seconds", "Handshake time: SYN_SENT->ESTABLISHED (client), "
                          "SYN_RECV->ESTABLISHED (server).", ["role"],
                          {("client",): hists[Hist.HANDSHAKE_CLIENT],
                           ("server",): hists[Hist.HANDSHAKE_SERVER]})
        yield _histograms("connection_lifetime_seconds", "Lifetime of connections that ended.",
                          ["role"], {("client",): hists[Hist.LIFETIME_CLIENT],
                                     ("server",): hists[Hist.LIFETIME_SERVER]})
        yield _histograms("accept_queue_seconds", "Accept-queue wait: connection established "
                          "-> returned by accept().", [], {(): hists[Hist.ACCEPT_QUEUE]})
        yield from self._stack(probes.stack_enabled)
        if per_conn:
            yield from self._per_connection(per_conn)

        # -- sockwatch itself ------------------------------------------------------
        m = CounterMetricFamily(P + "lost_events", "Records or rows lost, by the stage that dropped them.",
                                labels=["source"])
        m.add_metric(["ringbuf_full"], loss.ringbuf_full)
        m.add_metric(["socks_map_full"], loss.socks_map_full)
        m.add_metric(["totals_map_full"], loss.totals_map_full)
        m.add_metric(["decode"], loss.decode_errors)
        m.add_metric(["table_full"], loss.table_full)
        m.add_metric(["recursion"], loss.recursion_misses)
        m.add_metric(["undelivered"], loss.undelivered)
        yield m
        yield CounterMetricFamily(P + "decode_errors", "Malformed records from the kernel.",
                                  value=loss.decode_errors)
        yield CounterMetricFamily(P + "rescued_records",
                                  "Records the main ring buffer refused (its lock timed out) "
                                  "that the rescue ring buffer took: delivered, not lost.",
                                  value=kernel_stats[records.Stat.RESCUED])
        yield CounterMetricFamily(P + "untracked_closes",
                                  "Closes of sockets opened before sockwatch started (or evicted).",
                                  value=kernel_stats[records.Stat.UNTRACKED_CLOSE])
        yield CounterMetricFamily(P + "reconcile_removed",
                                  "Connections removed because their close was never seen.",
                                  value=counters.get("reconciled_removed", 0)
                                  + counters.get("stale_replaced", 0))
        m = CounterMetricFamily(P + "folded_label_values",
                                "Distinct label values folded into 'other' by the cap.",
                                labels=["label"])
        m.add_metric(["process"], self.processes.folded)
        m.add_metric(["port"], self.ports.folded)
        m.add_metric(["interface"], self.interfaces.folded)
        yield m
        m = GaugeMetricFamily(P + "table_entries", "Entries in sockwatch's tables.", labels=["table"])
        m.add_metric(["connections"], live_count)
        m.add_metric(["socks_map"], mon.socks_entries)
        yield m
        m = CounterMetricFamily(P + "map_evictions", "Entries a full LRU map evicted "
                                "(socks: sockets whose close will be untracked).",
                                labels=["map"])
        m.add_metric(["socks"], loss.socks_evicted)
        yield m
        m = GaugeMetricFamily(P + "table_capacity", "Capacity of sockwatch's tables and maps.",
                              labels=["table"])
        m.add_metric(["connections"], mon.table.max_live)
        m.add_metric(["socks_map"], probes.socks_capacity)
        yield m
        size = GaugeMetricFamily(P + "ringbuf_size_bytes", "Size of each ring buffer.",
                                 labels=["ring"])
        peak = GaugeMetricFamily(P + "ringbuf_peak_bytes", "The most a ring buffer held "
                                 "when it was read, since start: its headroom against loss.",
                                 labels=["ring"])
        for name, ring_size, ring_peak in probes.ring.fill():
            size.add_metric([name], ring_size)
            peak.add_metric([name], ring_peak)
        yield size
        yield peak
        m = GaugeMetricFamily(P + "probe_attach_info", "The variant attached for each hook (value 1).",
                              labels=["hook", "mode"])
        for hook in probes.plan.hooks:
            m.add_metric([hook.hook, hook.mode], 1)
        yield m
        m = GaugeMetricFamily(P + "build_info", "sockwatch version and kernel (value 1).",
                              labels=["version", "kernel"])
        m.add_metric([__version__, platform.release()], 1)
        yield m
        yield GaugeMetricFamily(P + "start_time_seconds", "When this sockwatch started (Unix time).",
                                value=self.start_time)
        yield GaugeMetricFamily(P + "scrape_duration_seconds",
                                "Time spent collecting this scrape, before exposition.",
                                value=time.perf_counter() - started)

    def _stack(self, enabled: bool) -> Iterator[Metric]:
        """Per-interface stack latency and totals, interfaces named through the monitor's
        cache and capped: ``name`` in our namespace, ``name@<netns inode>`` in others."""
        stack, totals, names = self.monitor.stack_maps()
        # admitted in (netns, ifindex) order: the first namespace's boot-time NICs come first
        capped = {key: self.interfaces(label) for key, (label, _driver) in sorted(names.items())}

        def label(ns: int, ifindex: int) -> str:
            return capped[(ns, ifindex)]

        yield _histograms("stack_latency_seconds",
                          "Time data spends in one layer of the kernel path, per interface "
                          "(tx: tcp, qdisc, driver; rx: driver, tcp, socket).",
                          ["direction", "layer", "interface"], latency.by_label(stack, label))
        packets: collections.Counter = collections.Counter()
        octets: collections.Counter = collections.Counter()
        errors: collections.Counter = collections.Counter()
        for key, (rx_p, rx_b, tx_p, tx_b, errs) in totals.items():
            iface = label(*key)
            packets.update({(iface, "rx"): rx_p, (iface, "tx"): tx_p})
            octets.update({(iface, "rx"): rx_b, (iface, "tx"): tx_b})
            errors[(iface,)] += errs
        yield _family(CounterMetricFamily, "interface_packets", "Packets per interface and "
                      "direction, as the stack probes saw them.", ["interface", "direction"], packets)
        yield _family(CounterMetricFamily, "interface_bytes", "Bytes per interface and direction, "
                      "as the stack probes saw them.", ["interface", "direction"], octets)
        yield _family(CounterMetricFamily, "interface_driver_errors", "Transmits the driver "
                      "refused (net_dev_xmit rc != 0).", ["interface"], errors)
        yield GaugeMetricFamily(P + "stack_probes_enabled",
                                "1 when the per-packet stack latency probes are attached.",
                                value=1 if enabled else 0)

    def _per_connection(self, conns: list) -> Iterator[Metric]:
        labels = ["process", "pid", "local", "remote", "state"]
        sent = GaugeMetricFamily(P + "connection_sent_bytes", "Payload sent by one connection.",
                                 labels=labels)
        rtt = GaugeMetricFamily(P + "connection_rtt_seconds", "Smoothed RTT of one connection.",
                                labels=labels)
        for conn in conns:
            ev = conn.ev
            values = [conn.process, str(conn.tgid),
                      records.format_endpoint(ev.family, ev.saddr, ev.sport),
                      records.format_endpoint(ev.family, ev.daddr, ev.dport),
                      state_name(ev.state)]
            sent.add_metric(values, ev.payload_sent)
            rtt.add_metric(values, ev.srtt_us / 1e6)
        yield sent
        yield rtt
