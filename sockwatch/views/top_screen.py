"""The screens of ``sockwatch top`` as lines of styled text, for any width and height.

Pure layout: the curses loop paints these lines, ``--once`` prints them. Columns
are data (title, width, value, format, priority): a narrow terminal drops the
highest priority numbers first and a wide one shows them all, and sorting uses
the same ``value`` the cell shows, so "sort by any column" needs no extra code.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from sockwatch.views import TOP_VIEWS
from sockwatch.views.top_model import Frame

INTERVALS = (0.5, 1.0, 2.0, 3.0, 5.0, 10.0)
Segment = tuple[str, str]  # (text, style): "" plain, title, head, sort, sel, key, dim
Line = list[Segment]


# -- cell formats ----------------------------------------------------------------------
def rate(x: float | None) -> str:
    """Events per second in at most five characters."""
    if x is None:
        return "-"
    if x == 0:
        return "0"
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if x >= div:
            v = x / div
            return f"{v:.1f}{unit}" if v < 10 else f"{v:.0f}{unit}"
    return f"{x:.1f}" if x < 10 else f"{x:.0f}"


def size(x: float | None) -> str:
    """Bytes (or bytes per second) in binary units, at most five characters."""
    if x is None:
        return "-"
    for unit in ("", "K", "M", "G", "T"):
        if x < 1024 or unit == "T":
            if not unit:
                return f"{x:.0f}"
            return f"{x:.1f}{unit}" if x < 10 else f"{x:.0f}{unit}"
        x /= 1024
    return "?"


def duration(s: float | None) -> str:
    """Seconds as us/ms/s/m/h in at most six characters; "-" when unknown."""
    if s is None:
        return "-"
    if s < 1e-3:
        return f"{s * 1e6:.0f}us"
    if s < 1:
        ms = s * 1e3
        return f"{ms:.1f}ms" if ms < 10 else f"{ms:.0f}ms"
    if s < 100:
        return f"{s:.1f}s"
    if s < 6000:
        return f"{s / 60:.0f}m"
    return f"{s / 3600:.0f}h"


def micros(us: float | None) -> str:
    return duration(None if us is None else us / 1e6)


def count(n: int | None) -> str:
    return "-" if n is None else str(n) if n < 10000 else rate(n)


def endpoint(d: dict[str, Any], side: str) -> str:
    addr, port = d[f"{side}_addr"], d[f"{side}_port"]
    return f"[{addr}]:{port}" if d["family"] == "ipv6" else f"{addr}:{port}"


# -- columns ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Column:
    title: str
    width: int
    value: Callable[[Any], Any]  # what the cell shows and what sorting orders by
    fmt: Callable[[Any], str] = str
    priority: int = 0  # 0: always; higher numbers are dropped first when narrow
    left: bool = False
    flex: bool = False  # takes the width left over
    help: str = ""


def _c(title: str, width: int, value: Callable, fmt: Callable = str, priority: int = 0,
       help: str = "", **kw: Any) -> Column:
    return Column(title, width, value, fmt, priority, help=help, **kw)


PROCESS_COLUMNS = (
    _c("PID", 7, lambda r: r.pid, lambda v: str(v) if v else "-", help="process id"),
    _c("USER", 8, lambda r: r.user, priority=1, left=True, help="owner of the process"),
    _c("PROCESS", 10, lambda r: r.process, left=True, flex=True, help="task name"),
    _c("CONN", 4, lambda r: r.conns, count, help="sockets held, any state"),
    _c("EST", 4, lambda r: r.count("ESTAB"), count, help="established"),
    _c("LSN", 3, lambda r: r.count("LISTEN"), count, 2, help="listening"),
    _c("SYN", 3, lambda r: r.syn, count, 2, help="handshakes under way"),
    _c("OTH", 3, lambda r: r.other, count, 3, help="closing states (FIN-WAIT, CLOSE-WAIT...)"),
    _c("OUT/s", 5, lambda r: r.out_s, rate, help="new outgoing connections (connect) per second"),
    _c("IN/s", 5, lambda r: r.in_s, rate, help="new incoming connections (accept) per second"),
    _c("FL/s", 4, lambda r: r.fail_s, rate, help="failed connects per second"),
    _c("TX/s", 6, lambda r: r.tx_s, size, help="payload bytes sent per second"),
    _c("RX/s", 6, lambda r: r.rx_s, size, help="payload bytes received per second"),
    _c("RTR/s", 5, lambda r: r.retr_s, rate, help="segments retransmitted per second"),
    _c("HS50", 6, lambda r: r.hs_p50, duration, help="handshake p50 over the window"),
    _c("HS99", 6, lambda r: r.hs_p99, duration, help="handshake p99 over the window"),
    _c("RQW50", 6, lambda r: r.rcvq_wait_p50_us, micros, 3,
       help="receive-queue wait p50 (data queued -> read)"),
    _c("RQWMX", 6, lambda r: r.rcvq_wait_max_us, micros, 3, help="receive-queue wait max"),
)

CONNECTION_COLUMNS = (
    _c("FD", 4, lambda c: c.d["fd"], lambda v: "-" if v is None else str(v),
       help="file descriptor"),
    _c("ROLE", 6, lambda c: c.d["role"], priority=2, left=True, help="client/server"),
    _c("STATE", 10, lambda c: c.d["state"], left=True, help="TCP state"),
    _c("LOCAL", 15, lambda c: endpoint(c.d, "local"), left=True, flex=True, help="local address"),
    _c("REMOTE", 15, lambda c: endpoint(c.d, "remote"), left=True, flex=True,
       help="remote address"),
    _c("AGE", 5, lambda c: c.d["age_s"], duration, help="since the first state seen"),
    _c("TX/s", 5, lambda c: c.tx_s, size, help="payload bytes sent per second"),
    _c("RX/s", 5, lambda c: c.rx_s, size, help="payload bytes received per second"),
    _c("SENT", 5, lambda c: c.d["bytes_sent"], size, 1, help="payload bytes sent"),
    _c("RECV", 5, lambda c: c.d["bytes_received"], size, 1, help="payload bytes received"),
    _c("RTT", 6, lambda c: c.d["rtt_us"] or None, micros,
       help="smoothed round-trip time ('-': no sample yet, or a listener)"),
    _c("HS", 6, lambda c: c.handshake_s, duration, help="handshake time"),
    _c("RETR", 4, lambda c: c.d["retransmits"], count, 2, help="segments retransmitted"),
    _c("RQW50", 6, lambda c: c.d.get("rcvq_wait_p50_us"), micros, 3,
       help="receive-queue wait p50"),
    _c("RQWMX", 6, lambda c: c.d.get("rcvq_wait_max_us"), micros, 3,
       help="receive-queue wait max"),
    _c("INODE", 8, lambda c: c.d["ino"], priority=4, help="socket inode (ls -l /proc/PID/fd)"),
)

LISTENER_COLUMNS = (
    _c("PID", 7, lambda r: r.pid, lambda v: str(v) if v else "-", help="process id"),
    _c("PROCESS", 12, lambda r: r.process, left=True, flex=True, help="task name"),
    _c("LOCAL", 21, lambda r: endpoint(r.d, "local"), left=True, help="listening address"),
    _c("PORT", 5, lambda r: r.port, help="listening port"),
    _c("FD", 4, lambda r: r.d["fd"], lambda v: "-" if v is None else str(v), 1,
       help="file descriptor"),
    _c("BACKLOG", 7, lambda r: r.d.get("backlog"), count, help="listen() backlog"),
    _c("ESTAB", 5, lambda r: r.established, count, help="accepted connections alive"),
    _c("ACC/s", 5, lambda r: r.accepts_s, rate, help="accepts per second"),
    _c("AQW50", 6, lambda r: r.accept_wait_p50_us, micros,
       help="accept-queue wait p50 (established -> accept())"),
)


def _bar(layer: dict[str, Any], width: int) -> str:
    """The log2 distribution in ``width`` characters, denser glyphs for more samples."""
    counts, prev = [], 0
    for _le, cum in layer["buckets"]:
        counts.append(cum - prev)
        prev = cum
    if not counts or width <= 0:
        return ""
    per = max(1, -(-len(counts) // width))
    cells = [sum(counts[i:i + per]) for i in range(0, len(counts), per)]
    top = max(cells) or 1
    glyphs = " .:-=+*#%@"
    return "".join(glyphs[0 if not n else 1 + (len(glyphs) - 2) * n // top] for n in cells)


def _mean(layer: dict[str, Any]) -> float | None:
    return layer["sum_seconds"] / layer["count"] if layer["count"] else None


LATENCY_COLUMNS = (
    _c("DIR", 3, lambda r: r["direction"], left=True, help="tx or rx (blank: per connection)"),
    _c("LAYER", 16, lambda r: r["layer"], left=True, help="what the time was spent in"),
    _c("IFACE", 8, lambda r: r["interface"], left=True, help="network interface"),
    _c("COUNT", 6, lambda r: r["count"], count, help="observations since start"),
    _c("P50", 6, lambda r: r["p50_seconds"], duration,
       help="median (interpolated in its log2 bucket)"),
    _c("P99", 6, lambda r: r["p99_seconds"], duration,
       help="99th percentile (interpolated in its log2 bucket)"),
    _c("MEAN", 6, _mean, duration, help="sum / count"),
    _c("1us..134s", 14, lambda r: r["p50_seconds"], flex=True, left=True,
       help="distribution over log2 buckets, 1us at the left"),
)
COLUMNS = {"processes": PROCESS_COLUMNS, "connections": CONNECTION_COLUMNS,
           "listeners": LISTENER_COLUMNS, "latency": LATENCY_COLUMNS}
DEFAULT_SORT = {"processes": ("TX/s", True), "connections": ("TX/s", True),
                "listeners": ("ACC/s", True), "latency": ("COUNT", True)}


def fit(columns: Sequence[Column], width: int) -> list[tuple[Column, int]]:
    """The columns that fit ``width`` (dropping by priority) with their widths."""
    shown = list(columns)
    used = lambda cols: sum(c.width for c in cols) + len(cols) - 1  # noqa: E731
    for prio in sorted({c.priority for c in columns if c.priority}, reverse=True):
        if used(shown) <= width:
            break
        shown = [c for c in shown if c.priority != prio]
    spare = max(0, width - used(shown))
    flex = [c for c in shown if c.flex]
    out = []
    for c in shown:
        extra = 0
        if c in flex:
            extra = spare // len(flex) + (1 if flex.index(c) < spare % len(flex) else 0)
        out.append((c, c.width + extra))
    return out


def _cell(text: str, w: int, left: bool) -> str:
    if len(text) > w:
        text = text[:w - 1] + "~" if left else text[-w:]
    return text.ljust(w) if left else text.rjust(w)


# -- state of the screen -----------------------------------------------------------------
@dataclass
class UIState:
    view: str = "processes"
    sort: dict[str, tuple[str, bool]] = field(default_factory=lambda: dict(DEFAULT_SORT))
    filter: str = ""
    editing: bool = False  # typing a filter
    selected: dict[str, int] = field(default_factory=dict)  # view -> row index
    top: dict[str, int] = field(default_factory=dict)  # view -> first row shown
    pid: int | None = None  # the process drilled into ("connections" view)
    paused: bool = False
    interval: float = 2.0
    help: int = 0  # 0: no help; 1: the keys; 2: the columns of the view

    def sort_by(self, step: int) -> None:
        """Move the sort column left or right."""
        cols = [c.title for c in COLUMNS[self.view]]
        title, desc = self.sort[self.view]
        i = cols.index(title) if title in cols else 0
        self.sort[self.view] = (cols[(i + step) % len(cols)], desc)

    def reverse(self) -> None:
        title, desc = self.sort[self.view]
        self.sort[self.view] = (title, not desc)

    def faster(self, step: int) -> None:
        i = min(range(len(INTERVALS)), key=lambda k: abs(INTERVALS[k] - self.interval))
        self.interval = INTERVALS[max(0, min(len(INTERVALS) - 1, i + step))]


def _sort_key(value: Any) -> tuple:
    """Unknown values ("-") after known ones whichever the direction."""
    if value is None:
        return (0, 0)
    return (1, value.lower() if isinstance(value, str) else value)


def rows(frame: Frame, state: UIState, view: str | None = None) -> list[Any]:
    """The rows of a view (the current one by default), filtered and sorted."""
    text = state.filter.lower()
    view = view or state.view
    if view == "processes":
        items: list[Any] = [p for p in frame.processes if not text or p.matches(text)]
    elif view == "connections":
        proc = next((p for p in frame.processes if p.pid == state.pid), None)
        conns = proc.connections if proc else []
        items = conns if not text or (proc and (text in proc.process.lower()
                                                or text == str(proc.pid))) \
            else [c for c in conns if c.matches(text)]
    elif view == "listeners":
        items = [ln for ln in frame.listeners if not text or ln.matches(text)]
    else:
        items = [ly for ly in frame.latency.get("layers", []) if not text
                 or text in f"{ly['direction']} {ly['layer']} {ly['interface']}".lower()]
    title, desc = state.sort[view]
    col = next((c for c in COLUMNS[view] if c.title == title), None)
    if col is not None:
        known = [r for r in items if col.value(r) is not None]
        unknown = [r for r in items if col.value(r) is None]
        known.sort(key=lambda r: _sort_key(col.value(r)), reverse=desc)
        items = known + unknown
    return items


# -- the screen --------------------------------------------------------------------------
KEYS = ("q quit  enter open  esc back  </> sort column  r reverse  / filter  c clear  "
        "space pause  +/- interval  ? help")
KEYS_NARROW = "q:quit enter:open esc:back <>:sort r:rev /:filter spc:pause +-:rate ?:help"

HELP = [
    "sockwatch top: every TCP socket on this host by process, from the kernel (eBPF)",
    "",
    "  q, Ctrl-C      quit",
    "  up/down j/k    move the selection; PgUp/PgDn, Home/End",
    "  enter, right   open the selected process: its fd -> socket -> 5-tuple rows",
    "  esc, left      back to the processes",
    "  1 2 3 4        views: processes, connections (of one process), listeners,",
    "                 latency (per-layer histograms per interface)",
    "  < >            sort by the column to the left / right (marked v or ^)",
    "  r              reverse the sort order",
    "  /              filter by process, pid, user, port, address or state:",
    "                 enter keeps it, esc drops it; c clears it",
    "  space          pause / resume (rates stay exact: the window keeps counting)",
    "  + -            refresh less / more often (0.5 s to 10 s)",
    "  ? h            this help (again: what each column shows); other keys close it",
    "",
    "Rates are per second over the refresh window; '-' means not known.",
]


def _table(cols: Sequence[Column], items: list[Any], state: UIState, width: int,
           height: int, selectable: bool) -> list[Line]:
    title, desc = state.sort[state.view]
    # the sorted column gets room for its order mark, right before its title
    placed = fit([dataclasses.replace(c, width=max(c.width, len(c.title) + 1))
                  if c.title == title else c for c in cols], width)
    mark = "v" if desc else "^"
    head: Line = []
    for i, (c, w) in enumerate(placed):
        sep = " " if i < len(placed) - 1 else ""
        if c.title == title:
            head.append((_cell(mark + c.title, w, c.left) + sep, "sort"))
        else:
            head.append((_cell(c.title, w, c.left) + sep, "head"))
    out: list[Line] = [head]
    body = max(0, height - 1)
    sel = min(state.selected.get(state.view, 0), max(0, len(items) - 1))
    top = state.top.get(state.view, 0)
    if sel < top:
        top = sel
    elif sel >= top + body:
        top = sel - body + 1
    top = max(0, min(top, max(0, len(items) - body)))
    state.selected[state.view], state.top[state.view] = sel, top
    for idx in range(top, min(len(items), top + body)):
        r = items[idx]
        cells = []
        for c, w in placed:
            if c.title.startswith("1us"):
                cells.append(_cell(_bar(r, w), w, True))
            else:
                cells.append(_cell(c.fmt(c.value(r)), w, c.left))
        out.append([(" ".join(cells), "sel" if selectable and idx == sel else "")])
    return out


def _interfaces(frame: Frame, width: int) -> list[Line]:
    ifs = frame.latency.get("interfaces") or []
    if not ifs:
        return []
    out: list[Line] = [[("", "")], [("IFACE     DRIVER      RX pkts  RX bytes  TX pkts  TX bytes"
                                     "  DRV ERRS"[:width], "head")]]
    for i in ifs:
        out.append([(f"{i['interface'][:9]:<9} {i['driver'][:10]:<10} {count(i['rx_packets']):>8}"
                     f" {size(i['rx_bytes']):>9} {count(i['tx_packets']):>8}"
                     f" {size(i['tx_bytes']):>9} {count(i['driver_errors']):>9}"[:width], "")])
    return out


def _header(frame: Frame | None, source: str, state: UIState, width: int) -> list[Line]:
    status = "PAUSED" if state.paused else f"every {state.interval:g}s"
    if frame is not None and frame.window is None:
        status += ", rates from the next refresh"
    title = f"sockwatch top - {source} - {status} - {time.strftime('%H:%M:%S')}"
    if frame is None:
        return [[(title, "title")], [("reading the first sample...", "")], [("", "")]]
    h = frame.host
    states = " ".join(f"{s} {n}" for s, n in h.states.most_common())
    modes = ",".join(sorted(set(frame.modes.values()))) or "-"
    line1 = f"conns {h.conns}: {states or 'none'}  lost {frame.lost}  probes {modes}"
    line2 = (f"conn/s out {rate(h.out_s)} in {rate(h.in_s)} fail {rate(h.fail_s)}  "
             f"tx {size(h.tx_s)}/s rx {size(h.rx_s)}/s  rtx {rate(h.retr_s)}/s  "
             f"hs p50 {duration(h.hs_p50)} p99 {duration(h.hs_p99)}")
    return [[(title, "title")], [(line1, "")], [(line2, "")]]


def _view_bar(frame: Frame | None, state: UIState, n: int) -> Line:
    """The views with their keys (the current one in brackets), then what is applied."""
    tabs = []
    for i, name in enumerate(TOP_VIEWS, 1):
        if name == "connections" and state.view == name and frame is not None:
            proc = next((p for p in frame.processes if p.pid == state.pid), None)
            name = f"{state.pid} {proc.process}" if proc else f"{state.pid} (gone)"
        tabs.append(f"[{i}:{name}]" if TOP_VIEWS[i - 1] == state.view else f"{i}:{name}")
    bar = " ".join(tabs)
    if state.filter or state.editing:  # before the rest: it must show in 80 columns
        bar += f"  filter: {state.filter}" + ("_" if state.editing else "")
    title, desc = state.sort[state.view]
    bar += f"  {n} rows  sort {title} {'v' if desc else '^'}"
    return [(bar, "key" if state.editing else "dim")]


def render(frame: Frame | None, source: str, state: UIState, width: int,
           height: int | None) -> list[Line]:
    """The whole screen; ``height`` None: every row (for --once into a pipe)."""
    width = max(20, width)
    if state.help == 1:
        lines = [[(ln, "title" if i == 0 else "")] for i, ln in enumerate(HELP)]
        lines.append([(f"? again: what each column of the {state.view} view shows", "key")])
        return [_clip(line, width) for line in (lines[:height] if height else lines)]
    if state.help == 2:
        lines = [[(f"Columns of the {state.view} view (any key closes this):", "title")]]
        lines += [[(f"  {c.title:<7} {c.help}", "")] for c in COLUMNS[state.view]]
        return [_clip(line, width) for line in (lines[:height] if height else lines)]
    out = _header(frame, source, state, width)
    items = rows(frame, state) if frame is not None else []
    out.append(_view_bar(frame, state, len(items)))
    extra = _interfaces(frame, width) if frame is not None and state.view == "latency" else []
    if height:
        extra = extra[:height // 3]  # the layers keep most of the screen
    body = (height - len(out) - 1 - len(extra)) if height else len(items) + 1
    if body >= 1:
        out += _table(COLUMNS[state.view], items, state, width, body,
                      selectable=height is not None)
    out += extra
    if height:
        out = out[:height - 1]
        out += [[("", "")]] * (height - 1 - len(out))
        out.append([(KEYS if width >= len(KEYS) else KEYS_NARROW, "key")])
    return [[(text[:width], style) for text, style in _clip(line, width)] for line in out]


def _clip(line: Line, width: int) -> Line:
    """Segments cut at ``width`` characters in all."""
    out, used = [], 0
    for text, style in line:
        if used >= width:
            break
        out.append((text[:width - used], style))
        used += len(text)
    return out


def plain(lines: list[Line]) -> str:
    """The screen as text without escape codes (--once, NO_COLOR, pipes)."""
    return "\n".join("".join(t for t, _ in line).rstrip() for line in lines) + "\n"
