"""Command line: ``sockwatch daemon | table | top | trace | latency | probes``.

Every failure reaches the user as one line on stderr and a non-zero status:
2 for bad arguments, 1 for everything else (no privileges, missing BPF
objects, a hook that cannot attach). Never a traceback.

Each command imports its views, the monitor and the HTTP client when it runs.
The daemon starts loading its BPF programs (in a child, where the verifier
takes about 0.2 s) before it imports the exporter, so the two overlap on a
start that should take well under half a second.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from sockwatch import __version__
from sockwatch import config as configuration
from sockwatch.errors import NotPrivilegedError, SockwatchError, UsageError
from sockwatch.kernel import features, loader
from sockwatch.views import TOP_VIEWS

if TYPE_CHECKING:
    from sockwatch.views.filters import Filter
    from sockwatch.views.trace import TracePrinter

CAP_SYS_ADMIN, CAP_PERFMON, CAP_BPF = 21, 38, 39

EPILOG_TABLE = """examples:
  sockwatch table                      every TCP socket with its process and fd
  sockwatch table --state established --port 443
  sockwatch table --pid 1234 --json    one process, as JSON
  sockwatch table --closed             recently closed connections, with results
  sockwatch table --latency            with receive-queue wait, accept wait, handshake
"""
EPILOG_TRACE = """examples:
  sockwatch trace                      connect/accept/listen/close/fail as they happen
  sockwatch trace --comm curl --json   one JSON object per line
  sockwatch trace --duration 10        stop after ten seconds
"""
EPILOG_TOP = """examples:
  sockwatch top                        live view; keys are shown on screen, ? for help
  sockwatch top --url http://127.0.0.1:9873   the same, from a running daemon
  sockwatch top --once --view listeners        one frame to stdout, for a ticket
  sockwatch top --once --json --pid 1234       one frame as JSON, with every socket
"""
EPILOG_DAEMON = """examples:
  sockwatch daemon                                 config from /etc/sockwatch/sockwatch.toml if present
  sockwatch daemon --config ./sockwatch.toml --check-config
  sockwatch daemon --listen 0.0.0.0:9873           expose /metrics beyond localhost
  sockwatch daemon --print-example-config > /etc/sockwatch/sockwatch.toml
"""
EPILOG_LATENCY = """examples:
  sockwatch latency                    attach, sample 5 s, print each layer per interface
  sockwatch latency --interval 30 --interface eth0
  sockwatch latency --json             the shape of the daemon's /api/latency
  sockwatch latency --url http://127.0.0.1:9873   since a running daemon started

layers (one line each: count, p50, p99, and a bar over the log2 buckets):
  connections  handshake client/server, accept queue (established -> accept()),
               lifetime client/server
  tx           tcp (write -> leaves TCP), qdisc (queued -> to driver),
               driver (driver start -> transmitted)
  rx           driver (received -> TCP), tcp (TCP -> socket queue),
               socket (socket queue -> read())
The kernel times one packet in eight through the qdisc, driver and rx tcp layers
and counts it eight times: their counts estimate packets; interface totals are exact.
"""
EPILOG_PROBES = """examples:
  sockwatch probes                     kernel facts and the variant chosen per hook
  sockwatch probes --attach raw_tp     check that a forced mode can attach
"""


def _effective_caps() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return 0


def require_bpf_privileges() -> None:
    """Fail in one line before touching libbpf when BPF cannot be loaded."""
    if os.geteuid() == 0:
        return
    caps = _effective_caps()
    has = lambda cap: bool(caps >> cap & 1)  # noqa: E731
    if has(CAP_SYS_ADMIN) or (has(CAP_BPF) and has(CAP_PERFMON)):
        return
    raise NotPrivilegedError(
        "needs root, or CAP_BPF and CAP_PERFMON, to load its BPF programs "
        f"(running as uid {os.getuid()})"
    )


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text}")
    return value


def _port(text: str) -> int:
    value = _positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"not a port: {text}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text}")
    return value


def _interface(text: str) -> str:
    """An interface name (at most 15 bytes, as the kernel's IFNAMSIZ allows), optionally
    ``@<netns inode>`` as the latency report names interfaces of other namespaces."""
    name, at, ns = text.partition("@")
    if not name or len(name.encode()) > 15 or any(c.isspace() or c == "/" for c in name):
        raise argparse.ArgumentTypeError(f"not an interface name: {text!r}")
    if at and not ns.isdigit():
        raise argparse.ArgumentTypeError(f"expected NAME or NAME@<netns inode>, not {text!r}")
    return text


def _state(text: str) -> str:
    from sockwatch.views import fields

    name = fields.normalize_state(text)
    if name is None:
        choices = ", ".join(sorted(fields.STATE_ALIASES))
        raise argparse.ArgumentTypeError(f"unknown state {text!r} (one of: {choices})")
    return name


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        sub = self.prog.removeprefix("sockwatch").strip()  # main() adds "sockwatch: "
        raise UsageError(f"{sub}: {message}" if sub else message)


def build_parser() -> argparse.ArgumentParser:
    kernel = argparse.ArgumentParser(add_help=False)
    g = kernel.add_argument_group("kernel probes")
    g.add_argument(
        "--attach",
        choices=loader.ATTACH_MODES,
        default="auto",
        help="force one attach flavour (default: the best this kernel allows)",
    )
    g.add_argument(
        "--precise-accept",
        action="store_true",
        help="hook the accept syscall exit for exact fds of accepted sockets "
        "(costs a little on every syscall of every task)",
    )
    g.add_argument(
        "--no-stack-latency",
        action="store_true",
        help="leave out the per-packet probes (per-interface stack latency, receive-queue "
        "wait): cheaper; connection-level histograms stay",
    )

    filters = argparse.ArgumentParser(add_help=False)
    f = filters.add_argument_group("filters")
    f.add_argument("--pid", type=_positive_int, action="append", default=[],
                   help="only this process (repeatable)")
    f.add_argument("--comm", help="only processes whose name contains this")
    f.add_argument("--port", type=_port, help="only sockets with this local or remote port")
    f.add_argument("--json", action="store_true", help="machine-readable output")

    source = argparse.ArgumentParser(add_help=False)
    source.add_argument("--url", metavar="URL",
                        help="read from a running daemon (e.g. http://127.0.0.1:9873) "
                        "instead of attaching probes")

    p = _Parser(
        prog="sockwatch",
        description="Watch every TCP socket on this host from inside the kernel (eBPF).",
    )
    p.add_argument("--version", action="version", version=f"sockwatch {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    t = sub.add_parser(
        "table", parents=[kernel, filters, source], epilog=EPILOG_TABLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        help="live table of TCP sockets: process, fd, 5-tuple, state, bytes, age",
        description="Print every TCP socket with the process and fd that hold it.",
    )
    t.add_argument("--state", type=_state, help="only this state (ss names: established, listen, ...)")
    t.add_argument("--closed", action="store_true",
                   help="recently closed connections instead of live ones")
    t.add_argument("--watch", type=_positive_float, metavar="SECONDS",
                   help="keep watching this long before printing (fills --closed)")
    t.add_argument("--latency", action="store_true",
                   help="add receive-queue wait (p50, max), accept-queue wait and handshake "
                   "columns")

    tr = sub.add_parser(
        "trace", parents=[kernel, filters, source], epilog=EPILOG_TRACE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        help="stream connection events: connect, accept, listen, close, failures",
        description="Stream TCP connection events as they happen, until Ctrl-C.",
    )
    tr.add_argument("--duration", type=_positive_float, metavar="SECONDS", help="stop after this long")
    tr.add_argument("--count", type=_positive_int, metavar="N", help="stop after N events")

    tp = sub.add_parser(
        "top", parents=[kernel, filters, source], epilog=EPILOG_TOP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        help="live view by process: connections, rates, failures, latency",
        description="Live terminal view: which process is making or taking connections, "
        "failing them, moving bytes or waiting; drill down to its sockets.",
    )
    tp.add_argument("--interval", type=_positive_float, default=2.0, metavar="SECONDS",
                    help="refresh period and rate window (default 2)")
    tp.add_argument("--once", action="store_true",
                    help="print one frame (rates over one interval) and exit")
    tp.add_argument("--view", choices=TOP_VIEWS, default="processes",
                    help="the view to start in (connections: of --pid, or the busiest)")
    tp.add_argument("--sort", metavar="COLUMN", help="column title to sort by, e.g. RX/s")
    tp.add_argument("--filter", default="", metavar="TEXT",
                    help="start with this filter: process, pid, user, port or address")
    lat = sub.add_parser(
        "latency", parents=[kernel, source], epilog=EPILOG_LATENCY,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        help="per-layer latency along the kernel path, per interface",
        description="Where the time goes between write() and the wire and between the wire\n"
        "and read(): log2 histograms per layer, measured in the kernel. Standalone it\n"
        "attaches and samples for --interval; with --url it reads a daemon's histograms\n"
        "(counted since it started).",
    )
    lat.add_argument("--json", action="store_true",
                     help="machine-readable output (the daemon's /api/latency shape)")
    lat.add_argument("--interface", type=_interface, metavar="NAME",
                     help="only this interface's layers and totals (NAME matches in every "
                     "namespace, NAME@<netns inode> in one)")
    lat.add_argument("--interval", type=_positive_float, default=5.0, metavar="SECONDS",
                     help="how long to sample when attaching (default 5; Ctrl-C prints early)")

    d = sub.add_parser(
        "daemon", epilog=EPILOG_DAEMON, formatter_class=argparse.RawDescriptionHelpFormatter,
        help="run as a service: probes, tables, /metrics and the JSON API",
        description="Attach the probes, keep the tables, and serve /metrics, /healthz and /api/*.",
    )
    d.add_argument("--config", type=Path, metavar="PATH",
                   help=f"TOML config (default {configuration.DEFAULT_PATH}, if it exists)")
    d.add_argument("--check-config", action="store_true",
                   help="validate the config and flags, print the result, and exit")
    d.add_argument("--print-example-config", action="store_true",
                   help="print a config file with every key and its default, and exit")
    d.add_argument("--listen", metavar="HOST:PORT", help="overrides listen.address")
    d.add_argument("--attach", choices=loader.ATTACH_MODES, help="overrides probes.attach")
    d.add_argument("--precise-accept", action="store_true", default=None,
                   help="overrides probes.precise_accept")
    d.add_argument("--no-stack-latency", action="store_false", dest="stack_latency", default=None,
                   help="overrides probes.stack_latency with false")
    d.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info")

    pr = sub.add_parser(
        "probes", parents=[kernel], epilog=EPILOG_PROBES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        help="kernel facts and the attach mode chosen for each hook",
        description="Probe what this kernel allows, attach every hook once, and report.",
    )
    pr.add_argument("--json", action="store_true", help="machine-readable output")
    return p


def _loader_config(args: argparse.Namespace, hold_opens: bool = True) -> loader.LoaderConfig:
    """The probes for a command: ``trace`` prints every OPEN as it comes, so it holds none."""
    return loader.LoaderConfig(attach_mode=args.attach, precise_accept=args.precise_accept,
                               stack_latency=not args.no_stack_latency, hold_opens=hold_opens)


def _filter(args: argparse.Namespace) -> Filter:
    """The --pid/--comm/--port/--state filter of table and trace."""
    from sockwatch.views.filters import Filter

    return Filter(
        pids=frozenset(args.pid),
        comm=args.comm,
        port=args.port,
        state=getattr(args, "state", None),
    )


def _stop_on_signals(stop: threading.Event) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())


def cmd_table(args: argparse.Namespace) -> int:
    from sockwatch.client import DaemonClient
    from sockwatch.monitor import Monitor
    from sockwatch.views import table as table_view

    flt = _filter(args)
    if args.url:
        client = DaemonClient(args.url)
        rows = client.get("/api/connections", comm=args.comm, port=args.port,
                          state=args.state, closed=1 if args.closed else None)
        if flt.pids:
            rows = [r for r in rows if r["pid"] in flt.pids]
        table_view.render(rows, sys.stdout, args.json, args.latency)
        return 0
    with Monitor(_loader_config(args)) as mon:
        if args.watch:
            stop = threading.Event()
            _stop_on_signals(stop)
            timer = threading.Timer(args.watch, stop.set)
            timer.start()
            try:
                mon.run(stop)
            finally:
                timer.cancel()
        if args.closed:
            mon.poll()
            with mon.lock:
                conns = mon.table.recently_closed()
        else:
            conns = mon.connections()
        table_view.render(table_view.rows_of(conns, flt), sys.stdout, args.json, args.latency)
    return 0


def _trace_remote(args: argparse.Namespace, stop: threading.Event,
                  printer: TracePrinter) -> None:
    from sockwatch.client import DaemonClient

    client = DaemonClient(args.url, timeout=10)
    flt = _filter(args)
    seq = client.get("/api/events", after=1 << 62)["seq"]  # start from now
    deadline = time.monotonic() + args.duration if args.duration else None
    while not stop.is_set() and (deadline is None or time.monotonic() < deadline):
        got = client.get("/api/events", after=seq, wait=1)
        seq = got["seq"]
        events = [e for e in got["events"] if flt.dict_matches(e)]
        printer(events, args.count)
        if args.count and printer.printed >= args.count:
            return


def cmd_trace(args: argparse.Namespace) -> int:
    from sockwatch.monitor import Monitor
    from sockwatch.views import trace as trace_view

    stop = threading.Event()
    _stop_on_signals(stop)
    if args.url:
        printer = trace_view.TracePrinter(sys.stdout, args.json, None)
        printer.header()
        _trace_remote(args, stop, printer)
        return 0
    flt = _filter(args)
    with Monitor(_loader_config(args, hold_opens=False)) as mon:
        printer = trace_view.TracePrinter(sys.stdout, args.json, mon.started_ns)
        printer.header()

        def on_events(events: list) -> None:
            printer(trace_view.dicts_of(events, flt), args.count)
            if args.count and printer.printed >= args.count:
                stop.set()

        timer = threading.Timer(args.duration, stop.set) if args.duration else None
        if timer:
            timer.start()
        try:
            mon.run(stop, on_events)
            mon.flush(on_events)  # what arrived since the last tick
        finally:
            if timer:
                timer.cancel()
        lost = mon.loss()
        if lost.ringbuf_full or lost.decode_errors:
            print(f"sockwatch: {lost.ringbuf_full} events lost (ring buffer full), "
                  f"{lost.decode_errors} malformed", file=sys.stderr)
    return 0


def cmd_top(args: argparse.Namespace) -> int:
    from sockwatch.views import top, top_screen, top_source

    state = top_screen.UIState(view=args.view, filter=args.filter,
                               interval=args.interval, pid=args.pid[0] if args.pid else None)
    if args.sort:
        titles = [c.title for c in top_screen.COLUMNS[args.view]]
        match = [t for t in titles if t.lower() == args.sort.lower()]
        if not match:
            raise UsageError(f"top: --sort: no column {args.sort!r} in the {args.view} view "
                             f"(one of: {', '.join(titles)})")
        state.sort[args.view] = (match[0], True)
    if not (args.once or args.json) and not (sys.stdin.isatty() and sys.stdout.isatty()):
        raise UsageError("top: not a terminal: use --once or --json for scripts")
    flt = _filter(args)
    if args.url:
        source: top_source.Source = top_source.RemoteSource(args.url, flt)
    else:
        source = top_source.LocalSource(_loader_config(args), flt)
    try:
        top.run(source, state, args.once, args.json)
    finally:
        source.close()
    return 0


def _daemon_config(args: argparse.Namespace) -> configuration.Config:
    overrides: dict[str, dict] = {}
    if args.listen is not None:
        overrides.setdefault("listen", {})["address"] = args.listen
    if args.attach is not None:
        overrides.setdefault("probes", {})["attach"] = args.attach
    if args.precise_accept is not None:
        overrides.setdefault("probes", {})["precise_accept"] = args.precise_accept
    if args.stack_latency is not None:
        overrides.setdefault("probes", {})["stack_latency"] = args.stack_latency
    return configuration.load(args.config, overrides)


def cmd_daemon(args: argparse.Namespace) -> int:
    if args.print_example_config:
        sys.stdout.write(configuration.to_toml_example())
        return 0
    cfg = _daemon_config(args)  # exits 2 on any problem, before anything is loaded
    if args.check_config:
        print(f"sockwatch: config OK ({cfg.source})")
        return 0
    require_bpf_privileges()
    loading = loader.Loading(loader.LoaderConfig.from_settings(cfg["probes"]))
    try:
        from sockwatch.daemon import Daemon, setup_logging  # while the verifier works

        setup_logging(args.log_level)
        return Daemon(cfg, args.config, loading).run()
    finally:
        loading.cancel()  # a no-op once the daemon took the probes


def _check_interface_exists(name: str | None) -> None:
    """A bare name must exist here; NAME@<netns> is checked against the report instead."""
    if name is None or "@" in name:
        return
    try:
        socket.if_nametoindex(name)
    except OSError:
        raise UsageError(f"latency: no interface named {name!r} in this network namespace "
                         "(use NAME@<netns inode> for another)") from None


def cmd_latency(args: argparse.Namespace) -> int:
    from sockwatch.client import DaemonClient
    from sockwatch.monitor import Monitor
    from sockwatch.views import latency as latency_view

    if args.url:
        report = DaemonClient(args.url).get("/api/latency")
    else:
        if args.interface and args.no_stack_latency:
            raise UsageError("latency: --interface needs the per-interface stack probes, "
                             "which --no-stack-latency leaves out")
        _check_interface_exists(args.interface)
        stop = threading.Event()
        with Monitor(_loader_config(args)) as mon:
            _stop_on_signals(stop)
            print(f"sockwatch: sampling for {args.interval:g} s (Ctrl-C prints early) ...",
                  file=sys.stderr, flush=True)
            end = time.monotonic() + args.interval
            while (left := end - time.monotonic()) > 0 and not stop.wait(min(left, 1.0)):
                mon.name_interfaces()  # an interface may be gone by the end of the sample
            report = mon.latency()
    latency_view.render(latency_view.select(report, args.interface), sys.stdout, args.json)
    return 0


def cmd_probes(args: argparse.Namespace) -> int:
    from sockwatch.views import probes as probes_view

    objects = loader.default_objects_dir()
    probe_obj = objects / "probe.bpf.o"
    if not probe_obj.exists():
        raise SockwatchError(f"BPF objects missing ({probe_obj}): {loader.BUILD_HINT}")
    cfg = dataclasses.replace(_loader_config(args), probe_every_type=True)
    error, stack = None, None
    try:
        t0 = time.perf_counter()
        probes = loader.load(cfg, objects)
        feats, plan, stack = probes.features, probes.plan, probes.stack_enabled
        probes.close()
        attach_ms = (time.perf_counter() - t0) * 1000
    except SockwatchError as exc:
        error = str(exc).splitlines()[0]
        feats = features.probe_kernel(str(probe_obj), mount=cfg.attach_mode == "tracepoint")
        plan = None
    probes_view.render(feats, plan, error, stack, sys.stdout, args.json)
    if error:
        print(f"sockwatch: {error}", file=sys.stderr)
        return 1
    if not args.json:
        print(f"attached and detached every hook in {attach_ms:.0f} ms")
    return 0


COMMANDS = {"daemon": cmd_daemon, "table": cmd_table, "top": cmd_top, "trace": cmd_trace,
            "latency": cmd_latency, "probes": cmd_probes}


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        # The daemon validates its config first (exit 2 before anything loads) and then checks.
        if args.command != "daemon" and not getattr(args, "url", None):
            require_bpf_privileges()
        return COMMANDS[args.command](args)
    except SockwatchError as exc:
        print(f"sockwatch: {exc}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:
        # stdout closed early (| head): not an error worth a traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        return 130
