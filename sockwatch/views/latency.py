"""``sockwatch latency``: where the time goes, layer by layer and interface by interface.

Renders the report of ``latency.report`` (from this process's probes or a
daemon's /api/latency) as bcc's log2 histograms do, but one line per layer:
count, p50, p99 and a sparkline over the log2 buckets. Every line shares one
axis (the buckets any shown layer uses), so shapes can be compared by eye.
"""

from __future__ import annotations

import json
from typing import Any, TextIO

from sockwatch.errors import SockwatchError
from sockwatch.views import fields

Report = dict[str, Any]
RAMP = " ▁▂▃▄▅▆▇█"
ASCII_RAMP = " .:-=+*#@"
NAME_WIDTH = 18


def matches(label: str, wanted: str) -> bool:
    """``eth0`` picks eth0 in every namespace; ``eth0@4026532001`` one namespace's."""
    return label == wanted or label.split("@", 1)[0] == wanted


def select(report: Report, interface: str | None) -> Report:
    """The report narrowed to one interface's layers and totals."""
    if interface is None:
        return report
    if not report["enabled"]:
        raise SockwatchError("the stack probes are off: there are no per-interface layers "
                             "to show for --interface")
    layers = [e for e in report["layers"] if e["interface"] and matches(e["interface"], interface)]
    ifaces = [i for i in report["interfaces"] if matches(i["interface"], interface)]
    if not layers and not ifaces:
        seen = ", ".join(sorted({i["interface"] for i in report["interfaces"]})) or "none"
        raise SockwatchError(f"no traffic seen on interface {interface!r} (seen: {seen})")
    return {**report, "layers": layers, "interfaces": ifaces}


def _slot_counts(entry: dict[str, Any]) -> list[int]:
    """Per-slot counts back from the cumulative buckets; the overflow slot last."""
    running = [n for _le, n in entry["buckets"]] + [entry["count"]]
    return [n - prev for prev, n in zip([0] + running, running)]


def _axis(layers: list[dict[str, Any]]) -> tuple[int, int] | None:
    """First and last slot any layer uses."""
    used = [k for e in layers for k, n in enumerate(_slot_counts(e)) if n]
    return (min(used), max(used)) if used else None


def _bound(layers: list[dict[str, Any]], k: int) -> str:
    bounds = layers[0]["buckets"]  # the same finite bounds in every layer
    if k >= len(bounds):
        return f">{fields.human_duration(bounds[-1][0])}"
    return f"<={fields.human_duration(bounds[k][0])}"


def sparkline(counts: list[int], ramp: str) -> str:
    """One character per slot, scaled to the fullest; any non-zero slot shows."""
    top = max(counts, default=0)
    steps = len(ramp) - 1
    return "".join(ramp[0] if not n else ramp[max(1, -(-n * steps // top))] for n in counts)


def _line(name: str, entry: dict[str, Any], axis: tuple[int, int] | None, ramp: str) -> str:
    bar = sparkline(_slot_counts(entry)[axis[0] : axis[1] + 1], ramp) if axis else ""
    return (f"{name:<{NAME_WIDTH}} {entry['count']:>9} "
            f"{fields.human_duration(entry['p50_seconds']):>8} "
            f"{fields.human_duration(entry['p99_seconds']):>8}  |{bar}|").rstrip()


def _interface_line(i: dict[str, Any]) -> str:
    driver = f" ({i['driver']})" if i["driver"] else ""
    return (f"{i['interface']}{driver}: rx {i['rx_packets']} pkts "
            f"{fields.human_bytes(i['rx_bytes'])}, tx {i['tx_packets']} pkts "
            f"{fields.human_bytes(i['tx_bytes'])}, driver errors {i['driver_errors']}")


def render(report: Report, out: TextIO, as_json: bool) -> None:
    if as_json:
        json.dump(report, out, indent=1)
        out.write("\n")
        return
    utf = (getattr(out, "encoding", None) or "utf-8").lower().replace("-", "").startswith("utf")
    ramp = RAMP if utf else ASCII_RAMP
    layers = report["layers"]
    axis = _axis(layers)
    if axis:
        out.write(f"buckets: log2, one character each, {_bound(layers, axis[0])} .. "
                  f"{_bound(layers, axis[1])}\n")
    out.write(f"{'LAYER':<{NAME_WIDTH}} {'COUNT':>9} {'P50':>8} {'P99':>8}\n")
    connection = [e for e in layers if not e["interface"]]
    if connection:
        out.write("connections\n")
        for e in connection:
            out.write(_line("  " + e["layer"].replace("_", " "), e, axis, ramp) + "\n")
    interfaces = report["interfaces"]
    for label in dict.fromkeys(i["interface"] for i in interfaces):  # one block per name
        for iface in interfaces:
            if iface["interface"] == label:
                out.write(_interface_line(iface) + "\n")
        for e in layers:
            if e["interface"] == label:
                out.write(_line(f"  {e['direction']} {e['layer']}", e, axis, ramp) + "\n")
    if not report["enabled"]:
        out.write("stack probes off: no per-interface layers "
                  "(--no-stack-latency or probes.stack_latency = false)\n")
