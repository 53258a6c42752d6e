#!/usr/bin/env python3
"""Soak: sockwatch under a mixed workload for a long time, looking for slow leaks.

Two daemons from the checkout watch the same host:

- the **primary** runs for the whole soak; its RSS, fd count, table fill, the
  fill of its kernel socket map and its loss counters are sampled every
  ``--sample-every`` seconds. RSS growth per hour is the least-squares slope of
  VmRSS over the samples after ``--warmup`` seconds (the first minutes fill
  caches and the closed ring, which is bounded; growth after that is a leak);
- the **restarted** one is stopped every ``--restart-every`` seconds, alternately
  with SIGTERM (must exit 0) and SIGKILL (every BPF program it held must be gone
  from the kernel within 5 s), and started again: the time from spawn to a
  /api/connections answer that lists the soak's bulk flows is reported.

The workload, in this process (threads named so the kernel's per-process totals
can be told apart from everything else on the host):

- ``swsoak-short``: ``--rate`` paced short connections/s (connect, 1 byte each
  way, the server closes first, the client reads EOF and closes);
- ``swsoak-bulk``: ``--bulk`` long flows open for the whole soak, each sending
  ``--bulk-rate`` bytes/s;
- ``swsoak-refuse``: ``--refuse-rate`` connects/s to a port nobody listens on.

Loss, at the end: the primary's ``sockwatch_lost_events_total`` by source, and
the workload's own connections checked against what the primary counted
(``sockwatch_connects_total{process="swsoak-short",result="ok"}`` against the
connects that succeeded, the same for ``swsoak-refuse`` and ``result="refused"``,
``sockwatch_accepts_total{process="swsoak-srv"}`` against the accepts).

Run as root from the checkout:

    PYTHONPATH=. /opt/sockwatch/venv/bin/python bench/soak.py --minutes 30

The machine may be shared: the daemons watch every socket on the host, so other
work's connections are in the table fill and the loss counters (the workload's
own counts are exact). The report prints the host's other TCP opens per second.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from daemon import Daemon, code_version, losses, metric, tcp_opens  # noqa: E402

TARGET_RSS_MB_PER_H = 1.0
LIBC = ctypes.CDLL(None, use_errno=True)
PR_SET_NAME = 15


def log(msg: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def name_thread(name: str) -> None:
    """Set the calling thread's kernel comm: the kernel's totals are keyed by it."""
    LIBC.prctl(PR_SET_NAME, name.encode()[:15], 0, 0, 0)


# -- workload ------------------------------------------------------------------------------
class Workload:
    """Short connections, long bulk flows and refusals, until ``stop`` is set."""

    def __init__(self, rate: float, bulk: int, bulk_rate: int, refuse_rate: float):
        self.rate, self.bulk, self.bulk_rate, self.refuse_rate = rate, bulk, bulk_rate, refuse_rate
        self.stop = threading.Event()
        self.counts = {"short_ok": 0, "short_failed": 0, "accepted": 0, "refused": 0,
                       "refuse_other": 0, "bulk_bytes": 0}
        self.lock = threading.Lock()
        self.short_srv = self._listener()
        self.bulk_srv = self._listener()
        self.port = self.short_srv.getsockname()[1]
        self.bulk_port = self.bulk_srv.getsockname()[1]
        with socket.socket() as s:  # a port nobody listens on
            s.bind(("127.0.0.1", 0))
            self.closed_port = s.getsockname()[1]
        self.bulk_local_ports: list[int] = []
        self.threads: list[threading.Thread] = []

    @staticmethod
    def _listener() -> socket.socket:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        s.listen(1024)
        s.settimeout(0.5)
        return s

    def count(self, key: str, n: int = 1) -> None:
        with self.lock:
            self.counts[key] += n

    def start(self) -> None:
        targets = [self._short_server, self._short_clients, self._refusals, self._bulk_server]
        targets += [self._bulk_client] * self.bulk
        for target in targets:
            t = threading.Thread(target=target, daemon=True)
            t.start()
            self.threads.append(t)
        deadline = time.monotonic() + 10
        while len(self.bulk_local_ports) < self.bulk and time.monotonic() < deadline:
            time.sleep(0.05)

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(10)
        self.short_srv.close()
        self.bulk_srv.close()

    def _paced(self, rate: float):
        """Yield at ``rate`` per second until stopped (catching up if late, never bursting)."""
        t0, i = time.monotonic(), 0
        while not self.stop.is_set():
            due = t0 + i / rate
            delay = due - time.monotonic()
            if delay > 0:
                self.stop.wait(delay)
            elif delay < -1.0:  # fell behind (host busy): do not burst to catch up
                t0, i = time.monotonic(), 0
            i += 1
            yield

    def _accepted(self, srv: socket.socket):
        """Connections accepted on ``srv`` until stopped (the timeout lets it look)."""
        while not self.stop.is_set():
            try:
                yield srv.accept()[0]
            except (socket.timeout, OSError):
                continue

    def _short_server(self) -> None:
        name_thread("swsoak-srv")
        for conn in self._accepted(self.short_srv):
            with conn:
                conn.settimeout(5)
                try:
                    if conn.recv(1):
                        conn.sendall(b"y")
                        self.count("accepted")
                except OSError:
                    pass

    def _short_clients(self) -> None:
        name_thread("swsoak-short")
        for _ in self._paced(self.rate):
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=5) as c:
                    c.sendall(b"x")
                    c.recv(1)
                    while c.recv(64):
                        pass
                self.count("short_ok")
            except OSError:
                self.count("short_failed")

    def _refusals(self) -> None:
        name_thread("swsoak-refuse")
        for _ in self._paced(self.refuse_rate):
            try:
                socket.create_connection(("127.0.0.1", self.closed_port), timeout=5).close()
                self.count("refuse_other")
            except ConnectionRefusedError:
                self.count("refused")
            except OSError:
                self.count("refuse_other")

    def _bulk_server(self) -> None:
        name_thread("swsoak-bsrv")
        for conn in self._accepted(self.bulk_srv):
            threading.Thread(target=self._drain, args=(conn,), daemon=True).start()

    def _drain(self, conn: socket.socket) -> None:
        name_thread("swsoak-bsrv")
        conn.settimeout(1)
        with conn:
            while not self.stop.is_set():
                try:
                    if not conn.recv(1 << 16):
                        return
                except socket.timeout:
                    continue
                except OSError:
                    return

    def _bulk_client(self) -> None:
        name_thread("swsoak-bulk")
        chunk = b"b" * (1 << 14)
        with socket.create_connection(("127.0.0.1", self.bulk_port), timeout=5) as c:
            with self.lock:
                self.bulk_local_ports.append(c.getsockname()[1])
            for _ in self._paced(self.bulk_rate / len(chunk)):
                c.sendall(chunk)
                self.count("bulk_bytes", len(chunk))


# -- what we sample ------------------------------------------------------------------------
def proc_status(pid: int) -> dict[str, float]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:", "Threads:")):
                key, value = line.split(":", 1)
                out[key] = int(value.split()[0])
    return out


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def held_bpf_ids(pid: int, kind: str) -> set[int]:
    """``prog_id`` or ``map_id`` of every BPF fd a process holds (from fdinfo)."""
    ids = set()
    for fd in os.listdir(f"/proc/{pid}/fdinfo"):
        try:
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                for line in f:
                    if line.startswith(f"{kind}:"):
                        ids.add(int(line.split()[1]))
        except OSError:
            continue
    return ids


def socks_map_entries(pid: int) -> int | None:
    """Entries in the daemon's kernel socket map (bpftool dump, keys counted)."""
    for map_id in held_bpf_ids(pid, "map_id"):
        info = subprocess.run(["bpftool", "map", "show", "id", str(map_id), "-j"],
                              capture_output=True, text=True)
        if info.returncode == 0 and json.loads(info.stdout).get("name") == "socks":
            dump = subprocess.run(["bpftool", "map", "dump", "id", str(map_id), "-j"],
                                  capture_output=True, text=True)
            return len(json.loads(dump.stdout)) if dump.returncode == 0 else None
    return None


def prog_loaded(ids: set[int]) -> set[int]:
    out = subprocess.run(["bpftool", "prog", "show", "-j"], capture_output=True, text=True)
    return {p["id"] for p in json.loads(out.stdout or "[]")} & ids


def slope_per_hour(samples: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, value) samples, per hour."""
    n = len(samples)
    if n < 2:
        return 0.0
    mt = sum(t for t, _ in samples) / n
    mv = sum(v for _, v in samples) / n
    var = sum((t - mt) ** 2 for t, _ in samples)
    return 3600 * sum((t - mt) * (v - mv) for t, v in samples) / var if var else 0.0


# -- the soak ------------------------------------------------------------------------------
def daemon_config(reconcile: float) -> str:
    return ("[metrics]\ntop_processes = 10000\ntop_ports = 10000\n"
            f"[tables]\nreconcile_interval_seconds = {reconcile}\n")


def restart(old: Daemon | None, how: int, workdir: Path, tag: str, wl: Workload,
            reconcile: float) -> tuple[Daemon, dict[str, Any]]:
    """Stop ``old`` with ``how``, start anew, time it until it serves the bulk flows."""
    event: dict[str, Any] = {"signal": signal.Signals(how).name if old else None}
    if old is not None:
        ids = held_bpf_ids(old.pid, "prog_id")
        old.proc.send_signal(how)
        event["exit"] = old.proc.wait(30)
        deadline = time.monotonic() + 5
        while prog_loaded(ids) and time.monotonic() < deadline:
            time.sleep(0.1)
        event["programs_left"] = len(prog_loaded(ids))
    d = Daemon(workdir, daemon_config(reconcile), tag)
    event["first_scrape_s"] = round(d.first_good_scrape(30)[0], 3)
    deadline = d.spawned + 30
    want = set(wl.bulk_local_ports)
    while time.monotonic() < deadline:
        status, body = d.get("/api/connections?port=%d" % wl.bulk_port)
        if status == 200:
            have = {r["local_port"] for r in json.loads(body) if r["pid"] == os.getpid()}
            if want <= have:
                event["correct_data_s"] = round(time.monotonic() - d.spawned, 3)
                break
        time.sleep(0.05)
    else:
        event["correct_data_s"] = None
    return d, event


def run(args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="sw-soak-"))
    report: dict[str, Any] = {"version": code_version(), "minutes": args.minutes,
                              "rate": args.rate, "bulk": args.bulk,
                              "bulk_rate": args.bulk_rate, "refuse_rate": args.refuse_rate,
                              "samples": [], "restarts": []}
    primary = Daemon(workdir, daemon_config(args.reconcile), "primary")
    primary.first_good_scrape(30)
    wl = Workload(args.rate, args.bulk, args.bulk_rate, args.refuse_rate)
    other = None
    t0 = time.monotonic()
    opens0 = tcp_opens()
    try:
        wl.start()
        other, ev = restart(None, signal.SIGTERM, workdir, "restarted-0", wl, args.reconcile)
        report["restarts"].append(ev)
        end = t0 + args.minutes * 60
        next_sample = t0
        next_restart = t0 + args.restart_every
        kills = 0
        while time.monotonic() < end:
            now = time.monotonic()
            if now >= next_sample:
                text = primary.get("/metrics")[1].decode()
                st = proc_status(primary.pid)
                sample = {
                    "t_s": round(now - t0, 1),
                    "rss_kb": st["VmRSS"], "hwm_kb": st["VmHWM"], "threads": st["Threads"],
                    "fds": fd_count(primary.pid),
                    "table_entries": metric(text, "sockwatch_table_entries", table="connections"),
                    "table_capacity": metric(text, "sockwatch_table_capacity",
                                             table="connections"),
                    "socks_map_entries": socks_map_entries(primary.pid),
                    "socks_map_capacity": metric(text, "sockwatch_table_capacity",
                                                 table="socks_map"),
                    "lost": losses(text),
                    "host_opens": tcp_opens() - opens0,
                    "workload": dict(wl.counts),
                    "restarted_rss_kb": proc_status(other.pid)["VmRSS"],
                }
                report["samples"].append(sample)
                log(f"t={sample['t_s']:.0f}s rss={st['VmRSS']} kB fds={sample['fds']} "
                    f"table={sample['table_entries']:.0f} socks_map={sample['socks_map_entries']} "
                    f"lost={sum(sample['lost'].values()):.0f} workload={wl.counts}")
                next_sample += args.sample_every
            if now >= next_restart:
                how = signal.SIGKILL if kills % 2 else signal.SIGTERM
                kills += 1
                other, ev = restart(other, how, workdir, f"restarted-{kills}", wl, args.reconcile)
                report["restarts"].append(ev)
                log(f"restart: {ev}")
                next_restart += args.restart_every
            time.sleep(min(1.0, max(0.05, min(next_sample, next_restart) - time.monotonic())))
        report["elapsed_s"] = round(time.monotonic() - t0, 1)
    finally:
        wl.stop.set()
        time.sleep(1.0)
        primary.proc.poll()
        text = primary.get("/metrics")[1].decode() if primary.proc.returncode is None else ""
        wl.close()
        if other is not None:
            report["restarted_exit"] = other.stop()
    time.sleep(2 * args.reconcile)
    text = primary.get("/metrics")[1].decode()
    report["final"] = {
        "workload": wl.counts,
        "host_other_opens_per_s": round(
            (tcp_opens() - opens0 - 2 * wl.counts["short_ok"] - wl.counts["refused"])
            / max(1.0, report.get("elapsed_s", 1)), 1),
        "counted_short_ok": metric(text, "sockwatch_connects_total",
                                   process="swsoak-short", result="ok"),
        "counted_refused": metric(text, "sockwatch_connects_total",
                                  process="swsoak-refuse", result="refused"),
        "counted_accepts": metric(text, "sockwatch_accepts_total", process="swsoak-srv"),
        "lost": losses(text),
        "decode_errors": metric(text, "sockwatch_decode_errors_total"),
        "reconcile_removed": metric(text, "sockwatch_reconcile_removed_total"),
    }
    report["primary_exit"] = primary.stop()
    return report


def summarize(report: dict[str, Any], warmup: float) -> str:
    samples = report["samples"]
    steady = [(s["t_s"], s["rss_kb"] / 1024) for s in samples if s["t_s"] >= warmup]
    growth = slope_per_hour(steady)
    fin = report["final"]
    wc = fin["workload"]
    lines = [
        f"sockwatch soak, {report['version']}, {report.get('elapsed_s', 0) / 60:.1f} min "
        f"(shared host: other processes opened {fin['host_other_opens_per_s']} TCP conns/s)",
        f"workload: {report['rate']}/s short, {report['bulk']} bulk flows x "
        f"{report['bulk_rate']} B/s, {report['refuse_rate']}/s refused; made {wc}",
    ]
    if samples:
        first, last = samples[0], samples[-1]
        lines += [
            f"primary RSS: {first['rss_kb'] / 1024:.1f} MB at start, "
            f"{last['rss_kb'] / 1024:.1f} MB at end, peak {max(s['hwm_kb'] for s in samples) / 1024:.1f} MB; "
            f"growth after {warmup:.0f} s warm-up: {growth:+.2f} MB/h "
            f"(target < {TARGET_RSS_MB_PER_H} MB/h: {'PASS' if growth < TARGET_RSS_MB_PER_H else 'MISS'})",
            f"primary fds: {min(s['fds'] for s in samples)}..{max(s['fds'] for s in samples)}; "
            f"threads {min(s['threads'] for s in samples)}..{max(s['threads'] for s in samples)}",
            f"table fill: {max(s['table_entries'] or 0 for s in samples):.0f} / "
            f"{last['table_capacity']:.0f} max; kernel socks map: "
            f"{max(s['socks_map_entries'] or 0 for s in samples)} / "
            f"{last['socks_map_capacity']:.0f} max",
        ]
    made = {"short_ok": (wc["short_ok"], fin["counted_short_ok"]),
            "refused": (wc["refused"], fin["counted_refused"]),
            "accepted": (wc["accepted"], fin["counted_accepts"])}
    lines.append("workload seen by the primary (made / counted): "
                 + ", ".join(f"{k} {a}/{b:.0f}" if b is not None else f"{k} {a}/none"
                             for k, (a, b) in made.items()))
    lost = {k: v for k, v in fin["lost"].items()}
    lines.append(f"lost_events_total by source (host-wide): {lost}; decode errors "
                 f"{fin['decode_errors']}; reconcile removals {fin['reconcile_removed']}")
    rs = report["restarts"]
    ok = [r for r in rs if r.get("correct_data_s") is not None]
    lines.append(
        f"restarts: {len(rs) - 1} (SIGTERM/SIGKILL alternating); exits "
        f"{sorted({r.get('exit') for r in rs[1:]}, key=str)}; programs left after stop: "
        f"{sum(r.get('programs_left', 0) for r in rs)}; spawn->correct data max "
        f"{max((r['correct_data_s'] for r in ok), default=None)} s, "
        f"{len(rs) - len(ok)} never correct")
    lines.append(f"daemon exits: primary {report['primary_exit']}, last restarted "
                 f"{report.get('restarted_exit')}")
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--rate", type=float, default=50.0, help="short connections/s")
    p.add_argument("--bulk", type=int, default=2, help="long bulk flows")
    p.add_argument("--bulk-rate", type=int, default=1 << 20, help="bytes/s per bulk flow")
    p.add_argument("--refuse-rate", type=float, default=5.0, help="refused connects/s")
    p.add_argument("--restart-every", type=float, default=120.0, help="seconds")
    p.add_argument("--sample-every", type=float, default=30.0, help="seconds")
    p.add_argument("--warmup", type=float, default=180.0, help="seconds left out of RSS growth")
    p.add_argument("--reconcile", type=float, default=5.0, help="daemons' reconcile interval")
    p.add_argument("--json-out", help="also write the whole report here")
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("soak.py: run as root (it loads BPF programs)", file=sys.stderr)
        return 2
    # SIGTERM ends the soak early but still stops the daemons and the workload
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    report = run(args)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=1))
    print(summarize(report, args.warmup))
    return 0 if report["primary_exit"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
