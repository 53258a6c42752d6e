"""What /metrics serves besides sockwatch's own families: the daemon's process_*
metrics, which the health dashboard reads for the daemon's CPU and memory."""

from __future__ import annotations

import os
import time

import psutil
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from sockwatch.exporters.metrics import SockwatchCollector, build_registry
from sockwatch.monitor import Monitor


def test_registry_serves_the_daemons_process_metrics() -> None:
    # A monitor that was never started: the sockwatch collector yields nothing,
    # so everything read here comes from the process collector, about this process.
    text = generate_latest(build_registry(SockwatchCollector(Monitor()))).decode()
    got = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}

    me = psutil.Process(os.getpid())
    assert got["process_cpu_seconds_total"] > 0
    assert got["process_cpu_seconds_total"] <= sum(me.cpu_times()[:2]) + 0.1
    rss = me.memory_info().rss
    assert 0.5 * rss < got["process_resident_memory_bytes"] < 2 * rss
    assert abs(got["process_start_time_seconds"] - me.create_time()) < 2
    assert got["process_start_time_seconds"] <= time.time()
    assert abs(got["process_open_fds"] - len(os.listdir("/proc/self/fd"))) <= 2
    assert not any(name.startswith("sockwatch_") for name in got)
