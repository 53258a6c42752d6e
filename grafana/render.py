"""Draws a dashboard's panels from Prometheus answers into one PNG, laid out on
Grafana's 24-column grid: time series as lines (stacked where the panel
stacks), heatmaps from the bucket rates (de-accumulated per ``le``, as
Grafana does for the heatmap format), tables and stats from instant queries.

A way to look at the dashboards without a Grafana: the queries are the
dashboard's own, run the way its panels run them (grafana.model.evaluate).

    python -m grafana.render --prometheus http://127.0.0.1:9090 \\
        --instance 127.0.0.1:9873 --process nginx --minutes 15 --out /tmp/dash

tests/kernel/test_dashboards.py calls render() with SOCKWATCH_RENDER_DIR set.
Needs matplotlib (pip install '.[render]' in the checkout).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import matplotlib
import numpy

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)
from matplotlib.gridspec import GridSpec  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402

from grafana import build, model  # noqa: E402

GRID_INCH = 0.42  # one Grafana grid row (30 px) in the picture
LEGEND_RE = re.compile(r"\{\{\s*(\w+)\s*\}\}")


def human(value: float, unit: str) -> str:
    """A value as Grafana's unit would print it, roughly."""
    if not math.isfinite(value):
        return "-"
    if unit == "percentunit":
        return f"{value * 100:.3g} %"
    if unit == "bool_on_off":
        return "on" if value else "off"
    if unit == "s":
        for scale, suffix in ((1, "s"), (1e-3, "ms"), (1e-6, "µs"), (1e-9, "ns")):
            if abs(value) >= scale or scale == 1e-9:
                return f"{value / scale:.3g} {suffix}" if value else "0"
    base, suffix = (1024, {"bytes": "B", "Bps": "B/s"}[unit]) if unit in ("bytes", "Bps") else \
        (1000, {"cps": "c/s", "pps": "p/s", "ops": "/s"}.get(unit, ""))
    for prefix in ("", "k", "M", "G", "T"):
        if abs(value) < base or prefix == "T":
            return f"{value:.3g} {prefix}{'i' if base == 1024 and prefix else ''}{suffix}".strip()
        value /= base
    return str(value)


def legend(fmt: str, labels: dict[str, str], expr: str) -> str:
    if fmt:
        return LEGEND_RE.sub(lambda m: labels.get(m.group(1), ""), fmt).strip()
    return ", ".join(f"{k}={v}" for k, v in labels.items() if k != "__name__") or expr[:40]


def times(values: list[list[Any]]) -> list[dt.datetime]:
    return [dt.datetime.fromtimestamp(float(t)) for t, _ in values]


def numbers(values: list[list[Any]]) -> list[float]:
    return [float(v) for _, v in values]


def draw_series(ax: Any, panel: dict[str, Any], answers: list[model.Answer]) -> None:
    unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "short")
    stacked = panel.get("fieldConfig", {}).get("defaults", {}).get("custom", {}).get(
        "stacking", {}).get("mode") == "normal"
    lines = [(legend(a.target.get("legendFormat", ""), s["metric"], a.expr), s["values"])
             for a in answers for s in a.series]
    if stacked and lines:
        # align on the union of timestamps, missing points as 0 (what stacking draws)
        ts = sorted({float(t) for _, vs in lines for t, _ in vs})
        ys = [[dict((float(t), float(v)) for t, v in vs).get(t, 0.0) for t in ts] for _, vs in lines]
        ax.stackplot([dt.datetime.fromtimestamp(t) for t in ts], ys,
                     labels=[n for n, _ in lines], alpha=0.7)
    else:
        for name, vs in lines:
            ax.plot(times(vs), numbers(vs), label=name, linewidth=1.2)
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: human(v, unit)))
    ax.xaxis.set_major_formatter(matplotlib.dates.DateFormatter("%H:%M:%S"))
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    if lines:
        ax.legend(fontsize=6, loc="upper left", ncol=2 if len(lines) > 4 else 1, framealpha=0.6)


def draw_heatmap(ax: Any, panel: dict[str, Any], answers: list[model.Answer]) -> None:
    series = [s for a in answers for s in a.series]
    les = sorted(series, key=lambda s: float(s["metric"].get("le", "inf")))
    if not les:
        return
    ts = sorted({float(t) for s in les for t, _ in s["values"]})
    cum = [[dict((float(t), float(v)) for t, v in s["values"]).get(t, 0.0) for t in ts]
           for s in les]
    rows = [[max(0.0, c - (cum[i - 1][j] if i else 0.0)) for j, c in enumerate(row)]
            for i, row in enumerate(cum)]
    used = [i for i, r in enumerate(rows) if any(v > 0 for v in r)]
    lo, hi = (max(0, used[0] - 1), min(len(rows), used[-1] + 2)) if used else (0, len(rows))
    # empty cells stay blank, as in Grafana, instead of taking the scale's lowest colour
    grid = numpy.ma.masked_equal(numpy.array(rows[lo:hi]), 0.0)
    x = matplotlib.dates.date2num([dt.datetime.fromtimestamp(t) for t in ts])
    mesh = ax.pcolormesh(x, range(len(grid)), grid, cmap="Spectral_r", shading="nearest")
    labels = [human(float(s["metric"].get("le", "inf")), "s") if s["metric"].get("le") != "+Inf"
              else "+Inf" for s in les[lo:hi]]
    step = max(1, len(labels) // 8)
    ax.set_yticks(range(0, len(labels), step), labels[::step])
    ax.xaxis_date()
    ax.xaxis.set_major_formatter(matplotlib.dates.DateFormatter("%H:%M:%S"))
    ax.tick_params(labelsize=7)
    plt.colorbar(mesh, ax=ax, pad=0.01).ax.tick_params(labelsize=6)


def draw_table(ax: Any, panel: dict[str, Any], answers: list[model.Answer]) -> None:
    def labels(s: dict[str, Any]) -> dict[str, str]:
        return {k: v for k, v in s["metric"].items() if k not in ("__name__", "job")}

    # Grafana's merge transformation: one row per value of the labels all queries share
    shared = set.intersection(*[set(labels(s)) for a in answers for s in a.series])
    rows: dict[tuple, dict[str, str]] = {}
    columns: list[str] = []
    for a in answers:
        name = a.target.get("legendFormat") or a.target["refId"]
        columns.append(name)
        for s in a.series:
            found = labels(s)
            row = rows.setdefault(tuple(sorted((k, found[k]) for k in shared)), {})
            row.update(found)
            row[name] = f"{float(s['values'][-1][1]):.4g}"
    keys = sorted({k for r in rows.values() for k in r} - set(columns))
    ax.axis("off")
    if rows:
        body = [[r.get(k, "") for k in keys + columns] for r in list(rows.values())[:12]]
        t = ax.table(cellText=body, colLabels=keys + columns, loc="upper center", cellLoc="left")
        t.auto_set_font_size(False)
        t.set_fontsize(7)


def draw_stat(ax: Any, panel: dict[str, Any], answers: list[model.Answer]) -> None:
    unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "short")
    values = [float(s["values"][-1][1]) for a in answers for s in a.series]
    ax.axis("off")
    ax.text(0.5, 0.4, human(values[0], unit) if values else "No data", ha="center",
            va="center", fontsize=22, color="tab:green" if values else "tab:red")


DRAW = {"timeseries": draw_series, "heatmap": draw_heatmap, "table": draw_table,
        "stat": draw_stat}


def render(doc: dict[str, Any], answers: list[model.Answer], values: dict[str, str],
           out: Path) -> Path:
    """One PNG of the dashboard ``doc`` from its evaluated queries."""
    panels = doc["panels"]
    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels)
    width, height = 22, rows * GRID_INCH + 0.6
    fig = plt.figure(figsize=(width, height))
    grid = GridSpec(rows, 24, figure=fig, hspace=0, wspace=0, left=0.005, right=0.995,
                    top=1 - 0.6 / height, bottom=0)
    # room inside each grid cell for the title, tick labels and y labels (inches)
    pad_top, pad_bottom, pad_left, pad_right = 0.3, 0.35, 0.75, 0.1
    subtitle = ", ".join(f"{k}={v}" for k, v in values.items() if not k.startswith("__"))
    fig.suptitle(f"{doc['title']}   ({subtitle})", fontsize=14, y=0.995, va="top")
    by_panel: dict[int, list[model.Answer]] = {}
    for a in answers:
        by_panel.setdefault(a.panel["id"], []).append(a)
    for p in panels:
        g = p["gridPos"]
        box = grid[g["y"]:g["y"] + g["h"], g["x"]:g["x"] + g["w"]].get_position(fig)
        if p["type"] == "row":
            pad = (0, 0, 0, 0)
        else:
            pad = (pad_left / width, pad_bottom / height, pad_right / width, pad_top / height)
        ax = fig.add_axes((box.x0 + pad[0], box.y0 + pad[1], box.width - pad[0] - pad[2],
                           box.height - pad[1] - pad[3]))
        if p["type"] == "row":
            ax.axis("off")
            ax.text(0, 0.5, p["title"], fontsize=12, fontweight="bold", va="center")
            continue
        got = by_panel.get(p["id"], [])
        title = model.substitute(p["title"], values)
        if any(a.has_data for a in got):
            ax.set_title(title, fontsize=9, loc="left")
            DRAW[p["type"]](ax, p, got)
        else:
            ax.set_title(title, fontsize=9, loc="left", color="red")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.text(0.5, 0.5, "No data", ha="center", va="center", color="red", fontsize=14)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out


def http_api(base: str) -> model.Api:
    def api(path: str, params: dict[str, str]) -> dict[str, Any]:
        url = f"{base.rstrip('/')}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=30) as resp:
                return json.load(resp)
        except urllib.error.HTTPError as exc:
            return json.load(exc)
    return api


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Draw sockwatch's dashboards from a Prometheus "
                                 "into PNG files, one per dashboard.")
    ap.add_argument("--prometheus", required=True, help="base URL, e.g. http://127.0.0.1:9090")
    ap.add_argument("--instance", default=".*", help="value of $instance (default: all)")
    ap.add_argument("--process", default=".*", help="value of $process (default: all)")
    ap.add_argument("--interface", default=".*", help="value of $interface (default: all)")
    ap.add_argument("--minutes", type=float, default=15, help="time range ending now")
    ap.add_argument("--rate-interval", default="1m", help="value of $__rate_interval")
    ap.add_argument("--out", type=Path, required=True, help="directory for <dashboard>.png")
    ap.add_argument("dashboards", nargs="*", help=f"which of {', '.join(build.DASHBOARDS)} "
                    "(default: all)")
    args = ap.parse_args(argv)
    unknown = set(args.dashboards) - build.DASHBOARDS.keys()
    if unknown:
        ap.error(f"unknown dashboard {', '.join(sorted(unknown))}")
    end = time.time()
    start = end - args.minutes * 60
    step = max(1.0, (end - start) / 300)
    values = {"instance": args.instance, "process": args.process, "interface": args.interface,
              "__rate_interval": args.rate_interval, "__interval": f"{step:g}s",
              "__range": f"{int(end - start)}s"}
    api = http_api(args.prometheus)
    try:
        for name in args.dashboards or build.DASHBOARDS:
            doc = build.build(name)
            path = render(doc, model.evaluate(doc, api, values, start, end, step), values,
                          args.out / f"{name}.png")
            print(path)
    except OSError as exc:
        print(f"render: cannot query {args.prometheus}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
