#!/usr/bin/env python3
"""Benchmark of the sockwatch core: what watching every TCP socket costs the host.

Runs, in one invocation and in alternating rounds:

- a loopback connect/accept/close loop (bench/loadgen.c, its own processes),
  without sockwatch and with the sockwatch engine running in a child process;
- a syscall loop that makes no connection (getpid), without sockwatch, with
  the default hooks, and with ``precise_accept`` (the opt-in accept syscall-exit
  hook, which puts every syscall of every task on the slow path).

and prints the throughput ratios (median with / median without), the engine's
CPU seconds per 100k connections and peak RSS, lost events (connections the
load generator completed minus the CLOSE records the engine read for its port,
server side and client side apart), and the time from ``Monitor.start()`` to
the first full table with ``--hold`` pre-existing loopback connections open.

Run as root from the checkout:

    PYTHONPATH=/work/main /opt/sockwatch/venv/bin/python bench/connections.py

See bench/README.md for the flags and what each figure means.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
LOADGEN_SRC = HERE / "loadgen.c"

# Targets from the issue: (figure, comparison, bound).
TARGET_CONN_RATIO = 0.97
TARGET_SYSCALL_RATIO = 0.98
TARGET_RSS_MB = 40.0
TARGET_START_S = 0.5


# ---------------------------------------------------------------------------
# The engine child: sockwatch's Monitor in its own process, driven over pipes.
# ---------------------------------------------------------------------------


def _vm_status() -> dict[str, float]:
    """VmRSS and VmHWM of this process in MB."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:", "RssAnon:", "RssFile:")):
                key, value = line.split(":", 1)
                out[key] = int(value.split()[0]) / 1024
    return out


def _cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _bpf_prog_ids() -> list[int]:
    """Ids of the BPF programs this process holds (program and link fds)."""
    ids = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            if not os.readlink(f"/proc/self/fd/{fd}").startswith("anon_inode:bpf"):
                continue
            with open(f"/proc/self/fdinfo/{fd}") as f:
                for line in f:
                    if line.startswith("prog_id:"):
                        ids.add(int(line.split()[1]))
        except (FileNotFoundError, ValueError):
            continue
    return sorted(ids)


def _bpf_prog_stats() -> dict[str, tuple[int, int]]:
    """hook -> (run_time_ns, run_cnt) of the programs this process holds.

    The kernel only counts while BPF stats are enabled (bpf_enable_stats).
    """
    progs: dict[int, tuple[int, int]] = {}
    hooks: dict[int, str] = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
            if not target.startswith("anon_inode:bpf"):
                continue
            with open(f"/proc/self/fdinfo/{fd}") as f:
                info = dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)
        except (FileNotFoundError, ValueError):
            continue
        if "prog_id" not in info:
            continue
        pid = int(info["prog_id"])
        if "run_cnt" in info:
            progs[pid] = (int(info["run_time_ns"]), int(info["run_cnt"]))
        name = info.get("tp_name") or info.get("target_name")
        if name:
            hooks[pid] = name
    return {hooks.get(pid, str(pid)): v for pid, v in progs.items()}


def _bpf_fds() -> list[str]:
    held = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except FileNotFoundError:
            continue
        if target.startswith("anon_inode:bpf-"):
            held.append(f"{fd}->{target}")
    return held


class _PortCounter:
    """Counts OPEN/CLOSE records of the bench server's connections, by role.

    Reads five fields straight from the raw records (offsets from the ctypes
    mirror of struct sw_event, so they follow the header). Server-role sockets
    have the bench port as their local port, client-role sockets as their
    remote port. The CPU it takes is measured and taken out of the engine's
    figure: it is the benchmark's bookkeeping, not the product's work.
    """

    def __init__(self, port: int):
        from sockwatch import records

        self.port = port
        self.size = records.EVENT_SIZE
        fields = sorted(
            (self._offset(records, name), name)
            for name in ("kind", "result", "sport", "dport", "sock.role")
        )
        fmt, pos, self.order = "<", 0, []
        for off, name in fields:
            size = self._size(records, name)
            fmt += f"{off - pos}x" if off > pos else ""
            fmt += {1: "B", 2: "H"}[size]
            pos = off + size
            self.order.append(name)
        self._unpack = __import__("struct").Struct(fmt).unpack_from
        self._open, self._close = int(records.Kind.OPEN), int(records.Kind.CLOSE)
        self._server, self._client = int(records.Role.SERVER), int(records.Role.CLIENT)
        self._ok = int(records.Result.OK)
        self.server_open = self.server_close = 0
        self.client_open = self.client_close = 0
        self.close_not_ok = 0
        self.records = 0
        self.cpu_s = 0.0

    @staticmethod
    def _offset(records: Any, name: str) -> int:
        if "." in name:
            outer, inner = name.split(".")
            return getattr(records.SwEvent, outer).offset + getattr(records.SwSock, inner).offset
        return getattr(records.SwEvent, name).offset

    @staticmethod
    def _size(records: Any, name: str) -> int:
        if "." in name:
            return getattr(records.SwSock, name.split(".")[1]).size
        return getattr(records.SwEvent, name).size

    def count_raw(self, blob: bytes, offsets: list[int]) -> None:
        t = time.process_time()
        self.records += len(offsets)
        port = self.port
        if port:
            idx = {n: i for i, n in enumerate(self.order)}
            ik, ir, isp, idp, irole = (idx[n] for n in ("kind", "result", "sport", "dport",
                                                         "sock.role"))
            unpack = self._unpack
            for off in offsets:
                v = unpack(blob, off)
                if v[isp] == port and v[irole] == self._server:
                    self._tally(v[ik], v[ir], True)
                elif v[idp] == port and v[irole] == self._client:
                    self._tally(v[ik], v[ir], False)
        self.cpu_s += time.process_time() - t

    def _tally(self, kind: int, result: int, server: bool) -> None:
        if kind == self._close:
            if server:
                self.server_close += 1
            else:
                self.client_close += 1
            self.close_not_ok += result != self._ok
        elif kind == self._open:
            if server:
                self.server_open += 1
            else:
                self.client_open += 1

    def as_dict(self) -> dict[str, Any]:
        return {
            "server_open": self.server_open,
            "server_close": self.server_close,
            "client_open": self.client_open,
            "client_close": self.client_close,
            "close_not_ok": self.close_not_ok,
            "records": self.records,
            "counting_cpu_s": self.cpu_s,
        }


def engine_child(argv: list[str]) -> int:
    """Start a Monitor, measure start to full table, run it, report as JSON lines.

    Protocol (one JSON object per line on the original stdout):
      -> {"event": "ready", ...}     after start() and the first connections()
      <- "begin"                     load starts: CPU reading taken
      -> {"event": "begun"}
      <- "end"                       load over: stop run(), drain once more,
      -> {"event": "report", ...}    CPU reading, counters
      -> {"event": "closed", ...}    after Monitor.close()
    stdin EOF or SIGTERM stop the monitor and close it without a report.
    """
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--hold-port", type=int, default=0)
    ap.add_argument("--hold-count", type=int, default=0)
    ap.add_argument("--precise-accept", action="store_true")
    ap.add_argument("--ringbuf-bytes", type=int, default=0)
    ap.add_argument("--no-stack-latency", action="store_true")
    ap.add_argument("--every-open", action="store_true")
    ap.add_argument("--raw", action="store_true",
                    help="diagnosis: drain the ring buffer but decode nothing")
    args = ap.parse_args(argv)

    # Keep the protocol channel private: anything else printing goes to stderr.
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    lock = threading.Lock()

    def say(obj: dict) -> None:
        with lock:
            proto.write(json.dumps(obj) + "\n")
            proto.flush()

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())

    t_spawn = time.monotonic()
    from sockwatch.kernel.loader import LoaderConfig
    from sockwatch.monitor import Monitor, Walk
    import sockwatch

    import_s = time.monotonic() - t_spawn
    cfg = LoaderConfig(precise_accept=args.precise_accept,
                       stack_latency=not args.no_stack_latency, hold_opens=not args.every_open)
    if args.ringbuf_bytes:
        cfg = dataclasses.replace(cfg, ringbuf_bytes=args.ringbuf_bytes)
    mon = Monitor(cfg)
    try:
        t0 = time.monotonic()
        mon.start()
        conns = mon.connections()
        start_s = time.monotonic() - t0
        hp = args.hold_port
        hold_seen = sum(
            1 for c in conns if hp and c.ev.saddr == "127.0.0.1" and hp in (c.ev.sport, c.ev.dport)
        )
        hold_owned = sum(
            1
            for c in conns
            if hp and c.ev.saddr == "127.0.0.1" and hp in (c.ev.sport, c.ev.dport) and c.fd >= 0
        )
        assert mon.probes is not None
        say(
            {
                "event": "ready",
                "pid": os.getpid(),
                "module": os.path.dirname(sockwatch.__file__),
                "import_s": import_s,
                "start_s": start_s,
                "table_live": len(conns),
                "hold_seen": hold_seen,
                "hold_with_fd": hold_owned,
                "hold_expected": 2 * args.hold_count + 1 if hp else 0,
                "hooks": {h.hook: h.mode for h in mon.probes.plan.hooks},
                "prog_ids": _bpf_prog_ids(),
                "ring_bytes": mon.cfg.ringbuf_bytes,
                "rss_after_start_mb": _vm_status().get("VmRSS", 0.0),
                "status_after_start_mb": _vm_status(),
            }
        )

        # Count every record the engine drains: run()'s own polls *and* the
        # polls inside reconcile(), which never reach run()'s callbacks.
        polled = _PortCounter(args.port)
        delivered = {"records": 0}  # what run(on_batch=...) hands a consumer
        timing = {"polls": 0, "poll_s": 0.0, "max_batch": 0, "max_gap_s": 0.0,
                  "reconciles": 0, "reconcile_s": 0.0, "last": time.monotonic()}
        if not hasattr(mon, "poll_raw"):
            raise RuntimeError("Monitor.poll_raw() missing: this benchmark needs the raw hot path")
        orig_poll_raw, orig_reconcile = mon.poll_raw, mon.reconcile

        def counting_poll_raw() -> tuple:
            t = time.monotonic()
            blob, offsets = orig_poll_raw()
            done = time.monotonic()
            timing["max_gap_s"] = max(timing["max_gap_s"], t - timing["last"])
            timing["last"] = t
            timing["polls"] += 1
            timing["poll_s"] += done - t
            timing["max_batch"] = max(timing["max_batch"], len(offsets))
            polled.count_raw(blob, offsets)
            return blob, offsets

        def on_batch(blob: bytes, offsets: list[int]) -> None:
            delivered["records"] += len(offsets)

        def timed_reconcile() -> Walk:
            t = time.monotonic()
            try:
                return orig_reconcile()
            finally:
                timing["reconciles"] += 1
                timing["reconcile_s"] += time.monotonic() - t

        mon.poll_raw = counting_poll_raw  # type: ignore[method-assign]
        mon.reconcile = timed_reconcile  # type: ignore[method-assign]

        state: dict[str, Any] = {}
        stats_fd = -1
        if args.raw:
            # Per-program run time, counted by the kernel while this fd is open.
            from sockwatch.kernel.libbpf import lib

            stats_fd = lib().so.bpf_enable_stats(0)  # BPF_STATS_RUN_TIME

        def ended_total() -> int:
            for _ in range(5):
                try:
                    return sum(list(mon.table.ended.values()))
                except RuntimeError:  # resized while we looked
                    continue
            return -1

        def commands() -> None:
            for line in sys.stdin:
                cmd = line.strip()
                if cmd == "begin":
                    state["begin"] = (time.monotonic(), _cpu_seconds(), ended_total(),
                                      polled.records, polled.cpu_s, delivered["records"])
                    state["prog_stats"] = _bpf_prog_stats()
                    timing["max_gap_s"] = 0.0
                    timing["max_batch"] = 0
                    say({"event": "begun"})
                elif cmd == "end":
                    state["end"] = True
                    break
            stop.set()

        threading.Thread(target=commands, daemon=True).start()
        if args.raw:
            # Kernel side plus the cheapest possible reader: bytes out, nothing decoded.
            assert mon._reader is not None
            while not stop.wait(0.1):
                polled.records += len(mon._reader.drain()[1])
            polled.records += len(mon._reader.drain()[1])
        else:
            mon.run(stop, on_batch=on_batch)
        if state.get("end") and "begin" in state:
            if not args.raw:
                on_batch(*mon.poll_raw())  # what the load left since the last tick
            cpu1, t1 = _cpu_seconds(), time.monotonic()
            tb, cpu0, ended0, records0, count_cpu0, delivered0 = state["begin"]
            counting_cpu = polled.cpu_s - count_cpu0
            ru = resource.getrusage(resource.RUSAGE_SELF)
            loss = mon.loss()
            prog_stats = {}
            if stats_fd >= 0:
                before = state.get("prog_stats", {})
                prog_stats = {k: (ns - before.get(k, (0, 0))[0], n - before.get(k, (0, 0))[1])
                              for k, (ns, n) in _bpf_prog_stats().items()}
                os.close(stats_fd)
            say(
                {
                    "event": "report",
                    "window_s": t1 - tb,
                    "cpu_s": cpu1 - cpu0 - counting_cpu,  # without the bench's own counting
                    "bench_counting_cpu_s": counting_cpu,
                    "maxrss_mb": ru.ru_maxrss / 1024,
                    **{k.lower() + "_mb": v for k, v in _vm_status().items()},
                    "records_read": mon._reader.records_read if mon._reader else -1,
                    "records_in_window": polled.records - records0,
                    "ended_in_window": ended_total() - ended0,
                    "table_live": len(mon.table.live),
                    "table_counters": dict(mon.table.counters),
                    "loss": dataclasses.asdict(loss),
                    "port": polled.as_dict(),
                    "delivered_to_on_batch": delivered["records"] - delivered0,
                    "timing": {k: v for k, v in timing.items() if k != "last"},
                    "bpf_prog_stats": prog_stats,  # hook -> [ns, runs] in the window
                }
            )
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which fails loudly
        say({"event": "error", "error": f"{type(exc).__name__}: {exc}"})
        return 1
    finally:
        mon.close()
        say({"event": "closed", "bpf_fds_left": _bpf_fds()})
    return 0


# ---------------------------------------------------------------------------
# The parent: build, orchestrate rounds, report.
# ---------------------------------------------------------------------------


class BenchError(RuntimeError):
    pass


def read_json_line(proc: subprocess.Popen, timeout: float, what: str) -> dict:
    """Next JSON line from a child's stdout (opened unbuffered), or BenchError."""
    deadline = time.monotonic() + timeout
    buf = b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise BenchError(f"{what}: no answer within {timeout:.0f} s")
        ready, _, _ = select.select([proc.stdout], [], [], left)
        if not ready:
            continue
        chunk = os.read(proc.stdout.fileno(), 1)
        if not chunk:
            raise BenchError(f"{what}: exited (rc={proc.poll()}) before answering")
        buf += chunk
        if chunk == b"\n":
            try:
                return json.loads(buf)
            except json.JSONDecodeError as exc:
                raise BenchError(f"{what}: bad line {buf!r}") from exc


def send(proc: subprocess.Popen, line: str) -> None:
    proc.stdin.write(line.encode() + b"\n")
    proc.stdin.flush()


def kill_group(proc: subprocess.Popen | None) -> None:
    """SIGKILL a child started with start_new_session, and its process group."""
    if proc is None:
        return
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


def stop_engine(proc: subprocess.Popen | None) -> None:
    """EOF on stdin, then SIGTERM, then SIGKILL: the engine closes its Monitor first."""
    if proc is None or proc.poll() is not None:
        return
    try:
        proc.stdin.close()
    except OSError:
        pass
    try:
        proc.wait(timeout=5)
        return
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        kill_group(proc)


def bpftool_progs(names: set[str] | None) -> dict[int, str]:
    """id -> name of loaded BPF programs (whose name is one of ``names``)."""
    if not shutil.which("bpftool"):
        return {}
    out = subprocess.run(["bpftool", "-j", "prog", "list"], capture_output=True, text=True)
    try:
        progs = json.loads(out.stdout or "[]")
    except json.JSONDecodeError:
        return {}
    return {p["id"]: p.get("name", "") for p in progs if names is None or p.get("name", "") in names}


def sockwatch_program_names() -> set[str]:
    from sockwatch.kernel import loader

    names = {loader.SNAPSHOT_PROGRAM}
    for table in (loader._TP_PROGRAMS, loader._FUNCTION_PROGRAMS):
        for variants in table.values():
            names.update(variants.values())
    return {n[:15] for n in names}  # the kernel keeps 15 characters


@dataclass
class Bench:
    args: argparse.Namespace
    loadgen: str
    hold_port: int = 0
    env: dict = field(default_factory=dict)
    engine_stderr_dir: str = ""
    live: list = field(default_factory=list)  # children to clean up on the way out
    names: set = field(default_factory=set)  # sockwatch's program names
    seq: int = 0
    # Program ids of every engine this run started: freed only after an RCU grace
    # period, a stopped engine's programs can still be listed (detached, never
    # run) at the start of the next run, and are no sign of another sockwatch.
    ours: set = field(default_factory=set)

    def _popen(self, cmd: list[str], stderr: Any = None) -> subprocess.Popen:
        proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr,
            bufsize=0, start_new_session=True, env=self.env,
        )
        self.live.append(proc)
        return proc

    def start_engine(self, port: int, precise: str) -> tuple[subprocess.Popen, dict]:
        self.seq += 1
        err_path = os.path.join(self.engine_stderr_dir, f"engine-{self.seq}.stderr")
        err = open(err_path, "wb")
        cmd = [sys.executable, str(Path(__file__).resolve()), "--engine-child",
               "--port", str(port), "--hold-port", str(self.hold_port),
               "--hold-count", str(self.args.hold)]
        if self.args.ringbuf_mb:
            cmd += ["--ringbuf-bytes", str(int(self.args.ringbuf_mb * (1 << 20)))]
        if self.args.no_stack_latency:
            cmd.append("--no-stack-latency")
        if self.args.every_open:
            cmd.append("--every-open")
        if precise == "precise":
            cmd.append("--precise-accept")
        elif precise == "raw":
            cmd.append("--raw")
        proc = self._popen(cmd, stderr=err)
        err.close()
        try:
            ready = read_json_line(proc, 60, "engine start")
        except BenchError as exc:
            raise BenchError(f"{exc}; stderr: {Path(err_path).read_text()[-2000:]}") from exc
        if ready.get("event") != "ready":
            raise BenchError(f"engine failed to start: {ready}; stderr: "
                             f"{Path(err_path).read_text()[-2000:]}")
        return proc, ready

    def finish_engine(self, proc: subprocess.Popen) -> tuple[dict, dict]:
        send(proc, "end")
        report = read_json_line(proc, 60, "engine report")
        if report.get("event") != "report":
            raise BenchError(f"engine did not report: {report}")
        closed = read_json_line(proc, 30, "engine close")
        proc.stdin.close()
        proc.wait(timeout=10)
        return report, closed

    def run_load(self, kind: str, engine: str | None) -> dict:
        """One round: loadgen ``kind`` (conn|getpid), engine None|default|precise|raw."""
        a = self.args
        if kind == "conn":
            cmd = [self.loadgen, "conn", str(a.clients), str(a.servers), str(a.seconds)]
        else:
            cmd = [self.loadgen, "getpid", str(a.getpid_seconds)]
        load = eng = None
        result: dict[str, Any] = {"kind": kind, "engine": engine or "none",
                                  "loadavg": os.getloadavg()[0]}
        if a.quiet_wait > 0:
            # Shared machine: wait (a bounded time) until no other sockwatch is attached.
            deadline = time.monotonic() + a.quiet_wait
            while bpftool_progs(self.names) and time.monotonic() < deadline:
                time.sleep(0.5)
        foreign: set[int] = set(bpftool_progs(self.names))
        try:
            load = self._popen(cmd)
            first = read_json_line(load, 30, "loadgen")
            port = first.get("port", 0)
            if engine:
                eng, ready = self.start_engine(port, precise=engine)
                result["ready"] = ready
            time.sleep(a.settle)
            if eng:
                send(eng, "begin")
                if read_json_line(eng, 30, "engine begin").get("event") != "begun":
                    raise BenchError("engine did not acknowledge begin")
            send(load, "go")
            duration = a.seconds if kind == "conn" else a.getpid_seconds
            result["load"] = read_json_line(load, duration + 60, "loadgen result")
            load.wait(timeout=30)
            # Other sockwatch instances (tests beside us) tax every run they overlap.
            if eng:
                self.ours |= set(result["ready"]["prog_ids"])
            foreign |= set(bpftool_progs(self.names))
            result["foreign_progs"] = sorted(foreign - self.ours)
            if eng:
                time.sleep(a.drain_wait)  # the last closes land in the ring buffer
                result["engine_report"], result["engine_closed"] = self.finish_engine(eng)
                result["engine_rc"] = eng.returncode
        finally:
            stop_engine(eng)
            kill_group(load)
            for p in (load, eng):
                if p in self.live:
                    self.live.remove(p)
        return result


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def summarize(rounds: list[dict], holder: dict, args: argparse.Namespace) -> dict:
    def rates(kind: str, engine: str) -> list[float]:
        return [r["load"]["rate"] for r in rounds if r["kind"] == kind and r["engine"] == engine]

    conn_base, conn_sw = rates("conn", "none"), rates("conn", "default")
    conn_raw = rates("conn", "raw")
    raw_runs = [r for r in rounds if r["kind"] == "conn" and r["engine"] == "raw"]
    gp_base, gp_sw, gp_pr = (rates("getpid", e) for e in ("none", "default", "precise"))
    sw_conn = [r for r in rounds if r["kind"] == "conn" and r["engine"] == "default"]
    engines = [r for r in rounds if r["engine"] != "none"]

    lost_server = lost_client = 0
    made = 0
    cpu_per_100k, cpu_share, on_batch_missed, us_per_record = [], [], 0, []
    loss_totals: dict[str, int] = {}
    for r in sw_conn:
        load, rep = r["load"], r["engine_report"]
        made += load["accepted"]
        lost_server += load["accepted"] - rep["port"]["server_close"]
        lost_client += load["completed"] - rep["port"]["client_close"]
        on_batch_missed += rep["records_in_window"] - rep["delivered_to_on_batch"]
        if load["accepted"]:
            cpu_per_100k.append(rep["cpu_s"] / load["accepted"] * 1e5)
        cpu_share.append(rep["cpu_s"] / rep["window_s"])
        if rep["records_in_window"]:
            us_per_record.append(rep["cpu_s"] / rep["records_in_window"] * 1e6)
    for r in sw_conn:
        for k, v in r["engine_report"]["loss"].items():
            loss_totals[k] = loss_totals.get(k, 0) + v
    other_loss = sum(r["engine_report"]["loss"].get("ringbuf_full", 0)
                     for r in engines if r not in sw_conn)
    real_loss = sum(loss_totals.get(k, 0) for k in
                    ("ringbuf_full", "socks_map_full", "decode_errors", "table_full",
                     "totals_map_full"))
    starts = [r["ready"]["start_s"] for r in engines]
    hold_ok = all(r["ready"]["hold_seen"] == r["ready"]["hold_expected"] for r in engines)
    # Runs that started with a table of about the expected size: another process
    # holding many sockets (a scale test beside us) inflates RSS and start time.
    expect = 2 * args.hold + 1
    clean = [r for r in engines if r["ready"]["table_live"] <= expect + 1000] or engines
    rss = [r["engine_report"]["maxrss_mb"] for r in clean]
    rss_all = [r["engine_report"]["maxrss_mb"] for r in engines]
    starts_clean = [r["ready"]["start_s"] for r in clean]
    rss_conn = [r["engine_report"]["maxrss_mb"] for r in sw_conn]

    def ratio(w: list[float], wo: list[float]) -> float:
        return median(w) / median(wo) if w and wo else float("nan")

    def pairwise(kind: str, engine: str) -> list[float]:
        """Per-round ratio: with / baseline of the same round."""
        out = []
        for i in range(args.rounds):
            w = [r["load"]["rate"] for r in rounds
                 if r["round"] == i and r["kind"] == kind and r["engine"] == engine]
            b = [r["load"]["rate"] for r in rounds
                 if r["round"] == i and r["kind"] == kind and r["engine"] == "none"]
            if w and b:
                out.append(w[0] / b[0])
        return out

    first = engines[0]["ready"] if engines else {}
    noisy = [r for r in rounds if r.get("foreign_progs")]
    loadavgs = [r["loadavg"] for r in rounds]
    return {
        "machine": {"cpus": os.cpu_count(), "kernel": platform.release(),
                    "loadavg_before": holder.get("loadavg_before"),
                    "loadavg_min": min(loadavgs, default=0), "loadavg_max": max(loadavgs, default=0),
                    "runs_with_foreign_sockwatch": len(noisy), "runs": len(rounds)},
        "config": {"seconds": args.seconds, "getpid_seconds": args.getpid_seconds,
                   "rounds": args.rounds, "clients": args.clients, "servers": args.servers,
                   "hold_connections": args.hold},
        "sockwatch": {"module": first.get("module"), "source": holder.get("source"),
                      "hooks": first.get("hooks"),
                      "precise_hooks": next((r["ready"]["hooks"] for r in engines
                                             if r["engine"] == "precise"), None)},
        "conn": {
            "baseline_rates": conn_base, "sockwatch_rates": conn_sw,
            "baseline_median": median(conn_base), "sockwatch_median": median(conn_sw),
            "ratio": ratio(conn_sw, conn_base), "ratio_per_round": pairwise("conn", "default"),
            "connections_with_sockwatch": made,
            "lost_server": lost_server, "lost_client": lost_client,
            "missed_by_on_batch": on_batch_missed,
            "loss_counters": loss_totals, "loss_counters_total": real_loss,
            "ringbuf_full_outside_conn_runs": other_loss,
            "loop_cpu_us_per_connection": median([
                r["load"]["cpu_s"] / r["load"]["accepted"] * 1e6 for r in rounds
                if r["kind"] == "conn" and r["engine"] == "none" and r["load"].get("accepted")
                and "cpu_s" in r["load"]]),
            "client_errors": sum(r["load"]["client_errors"] for r in rounds
                                 if r["kind"] == "conn"),
            "cpu_s_per_100k": median(cpu_per_100k), "cpu_s_per_100k_rounds": cpu_per_100k,
            "cpu_share_of_one_core": median(cpu_share),
            "cpu_us_per_record": median(us_per_record),
            "records_per_connection": (
                median([r["engine_report"]["records_in_window"] / r["load"]["accepted"]
                        for r in sw_conn if r["load"]["accepted"]])),
            "raw_drain": {
                "rates": conn_raw, "ratio": ratio(conn_raw, conn_base),
                "ratio_per_round": pairwise("conn", "raw"),
                "ringbuf_full": sum(r["engine_report"]["loss"]["ringbuf_full"] for r in raw_runs),
                "cpu_s_per_100k": median([r["engine_report"]["cpu_s"] / r["load"]["accepted"] * 1e5
                                          for r in raw_runs if r["load"]["accepted"]]),
                # Time inside sockwatch's BPF programs per connection of the loop
                # (host-wide runs, so other sockets' traffic is included).
                "bpf_ns_per_connection": median([
                    sum(ns for ns, _ in r["engine_report"]["bpf_prog_stats"].values())
                    / r["load"]["accepted"] for r in raw_runs
                    if r["load"]["accepted"] and r["engine_report"]["bpf_prog_stats"]]),
                "bpf_runs_per_connection": {
                    hook: median([r["engine_report"]["bpf_prog_stats"][hook][1] / r["load"]["accepted"]
                                  for r in raw_runs if r["load"]["accepted"]])
                    for hook in (raw_runs[0]["engine_report"]["bpf_prog_stats"] if raw_runs else {})},
                "bpf_ns_per_run": {
                    hook: median([r["engine_report"]["bpf_prog_stats"][hook][0]
                                  / max(1, r["engine_report"]["bpf_prog_stats"][hook][1])
                                  for r in raw_runs])
                    for hook in (raw_runs[0]["engine_report"]["bpf_prog_stats"] if raw_runs else {})},
            },
            "rss_mb_conn_max": max(rss_conn) if rss_conn else float("nan"),
            "max_poll_gap_s": max((r["engine_report"]["timing"]["max_gap_s"] for r in sw_conn),
                                  default=float("nan")),
            "max_batch": max((r["engine_report"]["timing"]["max_batch"] for r in sw_conn),
                             default=0),
        },
        "getpid": {
            "baseline_rates": gp_base, "sockwatch_rates": gp_sw, "precise_rates": gp_pr,
            "ratio": ratio(gp_sw, gp_base), "ratio_per_round": pairwise("getpid", "default"),
            "precise_ratio": ratio(gp_pr, gp_base),
            "precise_ratio_per_round": pairwise("getpid", "precise"),
            "baseline_ns_per_call": 1e9 / median(gp_base) if gp_base else float("nan"),
        },
        "engine": {
            "peak_rss_mb": max(rss) if rss else float("nan"),
            "peak_rss_mb_all_runs": max(rss_all) if rss_all else float("nan"),
            "runs_with_expected_table": sum(r["ready"]["table_live"] <= expect + 1000
                                            for r in engines),
            "runs": len(engines),
            "table_at_start_max": max((r["ready"]["table_live"] for r in engines), default=0),
            "start_s_median_expected_table": median(starts_clean),
            "rss_after_start_mb": median([r["ready"]["status_after_start_mb"].get("VmRSS", 0)
                                          for r in clean]),
            "rss_anon_after_start_mb": median([r["ready"]["status_after_start_mb"].get("RssAnon", 0)
                                               for r in clean]),
            "rss_file_after_start_mb": median([r["ready"]["status_after_start_mb"].get("RssFile", 0)
                                               for r in clean]),
            "start_s_median": median(starts), "start_s_max": max(starts, default=float("nan")),
            "start_s_all": starts, "hold_all_seen": hold_ok,
            "hold_seen": [r["ready"]["hold_seen"] for r in engines],
            "hold_expected": first.get("hold_expected"),
            "import_s_median": median([r["ready"]["import_s"] for r in engines]),
            "bpf_fds_left": [r["engine_closed"]["bpf_fds_left"] for r in engines
                             if r["engine_closed"]["bpf_fds_left"]],
        },
    }


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def render(s: dict, warnings: list[str]) -> str:
    c, g, e = s["conn"], s["getpid"], s["engine"]
    cfg, m = s["config"], s["machine"]
    lost = c["lost_server"] + c["lost_client"] + c["loss_counters_total"]
    lines = [
        f"sockwatch core benchmark: {m['cpus']} CPUs, Linux {m['kernel']}, "
        f"load average before {m['loadavg_before']}",
        f"  {cfg['rounds']} alternating rounds, {cfg['seconds']} s connection loop "
        f"({cfg['clients']} client + {cfg['servers']} server processes), "
        f"{cfg['getpid_seconds']} s getpid loop; {cfg['hold_connections']} connections held open",
        f"  engine: {s['sockwatch']['source']} (snapshot taken at start)",
        "  hooks: "
        + ", ".join(f"{k}={v}" for k, v in (s["sockwatch"]["hooks"] or {}).items()),
        "",
        f"{'figure':<44} {'value':>14}  {'target':<9} verdict",
    ]

    def row(name: str, value: str, target: str = "", ok: bool | None = None, note: str = ""):
        v = "" if ok is None else verdict(ok)
        lines.append(f"{name:<44} {value:>14}  {target:<9} {v:<7} {note}".rstrip())

    def per_round(xs: list[float]) -> str:
        return "rounds " + " ".join(f"{x:.3f}" for x in xs)

    row("connection loop, baseline (median)", f"{c['baseline_median']:,.0f}/s",
        note="rounds " + " ".join(f"{x:,.0f}" for x in c["baseline_rates"]))
    row("connection loop, with sockwatch (median)", f"{c['sockwatch_median']:,.0f}/s",
        note="rounds " + " ".join(f"{x:,.0f}" for x in c["sockwatch_rates"]))
    row("connection loop ratio", f"{c['ratio']:.3f}", f">= {TARGET_CONN_RATIO}",
        c["ratio"] >= TARGET_CONN_RATIO, per_round(c["ratio_per_round"]))
    row("lost events (server/client/counters)",
        f"{c['lost_server']}/{c['lost_client']}/{c['loss_counters_total']}", "= 0", lost == 0,
        f"of {c['connections_with_sockwatch']:,} connections x 2 sockets")
    row("daemon CPU per 100k connections", f"{c['cpu_s_per_100k']:.2f} s",
        note=f"{100 * c['cpu_share_of_one_core']:.0f} % of one core during the loop; "
        f"{c['cpu_us_per_record']:.1f} us per record read, "
        f"{c['records_per_connection']:.2f} records read per connection")
    if lost:
        lines.append(f"{'':<44} {'':>14}  {'':<9} {'':<7} (CPU and RSS are lower bounds: "
                     "the engine did not process the records it lost)")
    row("daemon peak RSS (ru_maxrss, max over runs)", f"{e['peak_rss_mb']:.1f} MB",
        f"<= {TARGET_RSS_MB:.0f} MB", e["peak_rss_mb"] <= TARGET_RSS_MB,
        f"after start {e['rss_after_start_mb']:.1f} MB (anon {e['rss_anon_after_start_mb']:.1f}, "
        f"file-backed {e['rss_file_after_start_mb']:.1f} incl. the ring buffers)")
    row(f"start to full table ({e['hold_expected']} held sockets)",
        f"{e['start_s_median_expected_table']:.3f} s", f"<= {TARGET_START_S}",
        e["start_s_median_expected_table"] <= TARGET_START_S and e["hold_all_seen"],
        f"max {e['start_s_max']:.3f} s; all held sockets in table: "
        f"{'yes' if e['hold_all_seen'] else 'NO ' + str(e['hold_seen'])}")
    if e["runs_with_expected_table"] < e["runs"]:
        judged = ("RSS and start time above are from the other runs"
                  if e["runs_with_expected_table"] else
                  "no run had the expected table: RSS and start time above include those sockets")
        lines.append(
            f"noise: in {e['runs'] - e['runs_with_expected_table']} of {e['runs']} engine runs the "
            f"host had other sockets open (table up to {e['table_at_start_max']:,} rows at start); "
            f"{judged} (all runs: peak RSS {e['peak_rss_mb_all_runs']:.0f} MB, "
            f"start up to {e['start_s_max']:.1f} s)")
    if c["ringbuf_full_outside_conn_runs"]:
        lines.append(f"note: {c['ringbuf_full_outside_conn_runs']} records were also lost "
                     "(ringbuf_full) during getpid runs: other processes' connections")
    raw = c["raw_drain"]
    if raw["rates"]:
        row("diagnosis: ratio, ring drained, nothing decoded", f"{raw['ratio']:.3f}",
            note=f"kernel side + bytes-only reader; {per_round(raw['ratio_per_round'])}; "
            f"ringbuf_full {raw['ringbuf_full']}; CPU {raw['cpu_s_per_100k']:.2f} s/100k")
        if raw["bpf_runs_per_connection"]:
            row("diagnosis: time in BPF programs per connection",
                f"{raw['bpf_ns_per_connection'] / 1000:.2f} us",
                note="; ".join(f"{h} {raw['bpf_runs_per_connection'][h]:.1f} runs x "
                               f"{raw['bpf_ns_per_run'][h]:.0f} ns"
                               for h in raw["bpf_runs_per_connection"]
                               if raw["bpf_runs_per_connection"][h]))
        loop = c["loop_cpu_us_per_connection"]
        bpf = raw["bpf_ns_per_connection"] / 1000
        eng = c["cpu_s_per_100k"] * 10
        if loop == loop and bpf == bpf and eng == eng:  # not NaN
            row("diagnosis: ratio predicted from CPU time", f"{loop / (loop + bpf + eng):.3f}",
                note=f"CPU-bound loop: {loop:.0f} us/connection baseline (loadgen rusage), "
                f"+{bpf:.1f} us BPF, +{eng:.1f} us engine")
    if g["baseline_rates"]:
        row("getpid loop, baseline (median)", f"{g['baseline_ns_per_call']:.1f} ns/call",
            note="rounds " + " ".join(f"{x / 1e6:.2f}M/s" for x in g["baseline_rates"]))
        row("getpid loop ratio, default hooks", f"{g['ratio']:.3f}", f">= {TARGET_SYSCALL_RATIO}",
            g["ratio"] >= TARGET_SYSCALL_RATIO, per_round(g["ratio_per_round"]))
        row("getpid loop ratio, precise_accept (opt-in)", f"{g['precise_ratio']:.3f}",
            note="info: syscall-exit hook; " + per_round(g["precise_ratio_per_round"]))
    if c["missed_by_on_batch"]:
        lines.append(f"note: {c['missed_by_on_batch']} records were drained inside "
                     "reconcile() and never reached run(on_batch=...) (e.g. /api/events)")
    if c["client_errors"]:
        lines.append(f"note: {c['client_errors']} client errors in the connection loop")
    if m["runs_with_foreign_sockwatch"]:
        lines.append(f"noise: other sockwatch instances had programs attached during "
                     f"{m['runs_with_foreign_sockwatch']} of {m['runs']} runs (baselines included)")
    lines.append(f"noise: 1-min load average at run starts {m['loadavg_min']:.2f}..{m['loadavg_max']:.2f}"
                 f" on {m['cpus']} CPUs")
    for w in warnings:
        lines.append(f"WARNING: {w}")
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=5.0, help="connection loop length per run")
    ap.add_argument("--getpid-seconds", type=float, help="getpid loop length (default --seconds)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds (median over them)")
    ap.add_argument("--clients", type=int, default=2, help="client processes")
    ap.add_argument("--servers", type=int, default=1, help="server processes")
    ap.add_argument("--hold", type=int, default=2000,
                    help="loopback connections held open during the whole run")
    ap.add_argument("--settle", type=float, default=0.3,
                    help="pause between starting the engine and the load")
    ap.add_argument("--drain-wait", type=float, default=0.15,
                    help="pause between the end of the load and the final drain")
    ap.add_argument("--skip-getpid", action="store_true", help="connection loop only")
    ap.add_argument("--no-stack-latency", action="store_true",
                    help="the engine without the per-packet stack probes (the core alone)")
    ap.add_argument("--every-open", action="store_true",
                    help="the engine sends every OPEN at once, as for sockwatch trace "
                    "(default: as the daemon, OPENs held until the next drain)")
    ap.add_argument("--ringbuf-mb", type=float, default=0,
                    help="experiment: give the engine a ring buffer of this size "
                    "(default: the product's)")
    ap.add_argument("--quiet-wait", type=float, default=0.0, metavar="SECONDS",
                    help="before each run, wait up to SECONDS until no other sockwatch "
                    "instance has programs attached (for shared machines)")
    ap.add_argument("--diagnose", action="store_true",
                    help="also run the connection loop with an engine that drains the ring "
                    "buffer without decoding (kernel-side cost plus the cheapest reader)")
    ap.add_argument("--json", action="store_true", help="machine-readable output")
    ap.add_argument("--json-out", metavar="PATH", help="also write the full JSON to PATH")
    args = ap.parse_args(argv)
    if args.getpid_seconds is None:
        args.getpid_seconds = args.seconds
    return args


def main(argv: list[str]) -> int:
    if argv[:1] == ["--engine-child"]:
        return engine_child(argv[1:])
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("needs root: the engine loads BPF programs", file=sys.stderr)
        return 2
    if not shutil.which("gcc"):
        print("needs gcc to build bench/loadgen.c", file=sys.stderr)
        return 2

    names = sockwatch_program_names()
    progs_before = bpftool_progs(names)
    warnings: list[str] = []
    tmp = tempfile.mkdtemp(prefix="sockwatch-bench-")
    holder = None
    bench = None
    rounds: list[dict] = []
    try:
        loadgen = os.path.join(tmp, "loadgen")
        subprocess.run(["gcc", "-O2", "-Wall", "-o", loadgen, str(LOADGEN_SRC)], check=True)
        # Freeze the package for the whole run: the checkout may be edited (and its
        # BPF objects rebuilt) while we measure; every engine must be the same code.
        src = _snapshot_package(tmp)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([src] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        env.pop("SOCKWATCH_BPF_DIR", None)  # the snapshot's own objects
        bench = Bench(args, loadgen, env=env, engine_stderr_dir=tmp, names=names)
        holder_info = {"loadavg_before": tuple(round(x, 2) for x in os.getloadavg()),
                       "source": _source_version()}
        holder = bench._popen([loadgen, "hold", str(args.hold)])
        held = read_json_line(holder, 60, "holder")
        bench.hold_port = held["port"]

        def progress(r: dict) -> None:
            extra = ""
            if "engine_report" in r:
                rep = r["engine_report"]
                extra = (f" cpu {rep['cpu_s']:.2f}s rss {rep['maxrss_mb']:.1f}MB"
                         f" start {r['ready']['start_s']:.3f}s")
                if r["kind"] == "conn" and r["engine"] != "raw":
                    extra += (f" lost {r['load']['accepted'] - rep['port']['server_close']}/"
                              f"{r['load']['completed'] - rep['port']['client_close']}")
            print(f"  round {r['round']} {r['kind']:<6} {r['engine']:<8} "
                  f"{r['load']['rate']:>12,.0f}/s{extra}", file=sys.stderr, flush=True)

        for i in range(args.rounds):
            conn_order = ["none", "default"] + (["raw"] if args.diagnose else [])
            if i % 2:
                conn_order.reverse()
            for engine in conn_order:
                r = bench.run_load("conn", None if engine == "none" else engine)
                r["round"] = i
                rounds.append(r)
                progress(r)
            if args.skip_getpid:
                continue
            gp = ["none", "default", "precise"]
            gp = gp[i % 3:] + gp[: i % 3]
            for engine in gp:
                r = bench.run_load("getpid", None if engine == "none" else engine)
                r["round"] = i
                rounds.append(r)
                progress(r)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (BenchError, subprocess.CalledProcessError, OSError) as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 1
    finally:
        if bench is not None:
            for p in list(bench.live):
                if p is holder:
                    continue
                stop_engine(p) if p.args[0] == sys.executable else kill_group(p)
        if holder is not None:
            try:
                holder.stdin.close()
                holder.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                pass
            kill_group(holder)
        left = _processes_running(tmp)
        if left:
            print(f"WARNING: loadgen processes left: {left}; killing them", file=sys.stderr)
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        shutil.rmtree(tmp, ignore_errors=True)

    # Programs our engines loaded must all be gone (freed after an RCU grace
    # period: give them a moment). Ids are exact; names would also match the
    # programs of other sockwatch instances running beside the benchmark.
    ours = {i for r in rounds if "ready" in r for i in r["ready"].get("prog_ids", [])}
    for _ in range(30):
        progs_after = bpftool_progs(None)
        leaked = sorted(i for i in progs_after if i in ours)
        if not leaked:
            break
        time.sleep(0.2)
    if leaked:
        warnings.append(f"BPF programs loaded by the engine are still loaded: ids {leaked}")
    if not ours and any(r["engine"] != "none" for r in rounds):
        warnings.append("could not read the engine's program ids: leak check by name only")
    others = {i: n for i, n in progs_after.items() if n in names and i not in progs_before}
    if others and not leaked:
        print(f"note: sockwatch-named programs not loaded by this benchmark appeared during the "
              f"run (another sockwatch instance or test): {sorted(others.items())}",
              file=sys.stderr)
    summary = summarize(rounds, holder_info, args)
    if summary["engine"]["bpf_fds_left"]:
        warnings.append(f"engine still held BPF fds after close: {summary['engine']['bpf_fds_left']}")
    if any(r.get("engine_rc") not in (None, 0) for r in rounds):
        warnings.append("an engine child exited with a non-zero status")
    summary["warnings"] = warnings
    full = dict(summary, rounds=rounds)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(full, f, indent=2)
    if args.json:
        print(json.dumps(full, indent=2))
    else:
        print(render(summary, warnings))
    return 0


def _snapshot_package(tmp: str) -> str:
    """Copy the sockwatch package (with its BPF objects) under ``tmp``; returns the root."""
    import sockwatch

    pkg = Path(sockwatch.__file__).resolve().parent
    root = os.path.join(tmp, "src")
    shutil.copytree(pkg, os.path.join(root, "sockwatch"),
                    ignore=shutil.ignore_patterns("__pycache__"))
    return root


def _source_version() -> str:
    """``git describe`` of the checkout the package comes from, '+dirty' if edited."""
    import sockwatch

    top = Path(sockwatch.__file__).resolve().parent.parent
    out = subprocess.run(["git", "-C", str(top), "describe", "--always", "--dirty"],
                         capture_output=True, text=True)
    return f"{top} {out.stdout.strip() or '(not a git checkout)'}"


def _processes_running(tmpdir: str) -> list[int]:
    """Pids whose executable lives in our temp dir (the loadgen)."""
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            exe = os.readlink(f"/proc/{name}/exe")
        except OSError:
            continue
        if exe.startswith(tmpdir + "/"):
            pids.append(int(name))
    return pids


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
