#!/usr/bin/env python3
"""Bounded state: the daemon under 1M connect/close cycles and 150k live connections.

Phases, one daemon throughout (config: ``--table-cap`` live rows, the default
65536-entry kernel socks map, everything else default):

1. **baseline**: after ``--warmup-cycles`` (20k) cycles that fill the bounded
   closed ring, and two reconciliations: VmRSS, fds, table rows;
2. **churn**: ``--cycles`` (1M) loopback connect / 1 byte each way / close,
   paced at ``--rate`` by bench/daemon.py's C helper (``swbench churn``), in
   runs of ``--churn-seconds`` until the cycles are done; then two
   reconciliations: table rows must match what ``ss`` counts on the host, and RSS
   be back at the baseline (within ``--rss-slack-mb``);
3. **hold**: ``--hold`` (150k) established loopback connections opened while the
   daemon runs (``swbench hold``: workers of 9000 each, from their own source
   address 127.77.w.1, since one source address has ~28k ephemeral ports and
   RLIMIT_NOFILE's hard limit here is 20000): 2 x hold sockets, more than the
   table cap and the kernel map: rows refused are counted (lost_events
   table_full), map evictions are counted (map_evictions_total), RSS must stay
   under ``--rss-cap-mb`` and the daemon must keep answering;
4. **release**: the connections close; after two reconciliations the table is
   back to what ``ss`` counts (the host is shared: its sockets are the truth).

Run as root from the checkout:

    PYTHONPATH=. /opt/sockwatch/venv/bin/python bench/bounds.py

Prints one line per figure with PASS/MISS. The host may be shared: other
processes' sockets are in the table too (the baseline is taken in the same run,
and the report prints the host's other TCP opens per second).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from daemon import C_SOURCE, Daemon, Helper, code_version, losses, metric, tcp_opens  # noqa: E402

PER_WORKER = 9000


def log(msg: str) -> None:
    print(f"[bounds {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def state(d: Daemon) -> dict[str, Any]:
    """What the daemon holds now, from its /metrics and /proc."""
    t0 = time.monotonic()
    status, body = d.get("/metrics", timeout=120)
    took = time.monotonic() - t0
    text = body.decode()
    with open(f"/proc/{d.pid}/status") as f:
        st = {k: int(v.split()[0]) for k, v in (ln.split(":", 1) for ln in f)
              if k in ("VmRSS", "VmHWM")}
    return {
        "scrape_status": status, "scrape_s": round(took, 3),
        "rss_mb": round(st["VmRSS"] / 1024, 1), "hwm_mb": round(st["VmHWM"] / 1024, 1),
        "fds": len(os.listdir(f"/proc/{d.pid}/fd")),
        "table_rows": metric(text, "sockwatch_table_entries", table="connections"),
        "socks_map": metric(text, "sockwatch_table_entries", table="socks_map"),
        "evictions": metric(text, "sockwatch_map_evictions_total", map="socks"),
        "lost": losses(text),
        "untracked_closes": metric(text, "sockwatch_untracked_closes_total"),
        "ss_sockets": len(subprocess.run(["ss", "-tanH", "state", "big"], capture_output=True,
                                         text=True).stdout.splitlines()),
    }


def settle(d: Daemon, reconcile: float) -> dict[str, Any]:
    """Two reconciliations later: what the daemon holds."""
    time.sleep(2 * reconcile + 0.5)
    return state(d)


def churn(exe: Path, cycles: int, args: argparse.Namespace, d: Daemon | None = None
          ) -> dict[str, Any]:
    """``cycles`` paced connect/close cycles, in runs of --churn-seconds."""
    done, runs = 0, []
    while done < cycles:
        secs = min(args.churn_seconds, max(1.0, (cycles - done) / args.rate))
        h = Helper([str(exe), "churn", str(args.rate), str(secs), "8", "2"])
        try:
            h.line(10)  # port
            h.line(10)  # started
            res = h.line(secs + 60)
        finally:
            h.close()
        done += res["ok"]
        runs.append(res)
        if d is not None:
            log(f"churn: {done} cycles so far ({res['ok'] / res['seconds']:.0f}/s, "
                f"{res['failed']} failed); daemon {state(d)['rss_mb']} MB")
    return {"cycles": done, "failed": sum(r["failed"] for r in runs),
            "seconds": round(sum(r["seconds"] for r in runs), 1)}


def run(args: argparse.Namespace, exe: Path, workdir: Path) -> dict[str, Any]:
    rep: dict[str, Any] = {"version": code_version(), "args": vars(args)}
    cfg = (f"[tables]\nmax_connections = {args.table_cap}\n"
           f"reconcile_interval_seconds = {args.reconcile}\n")
    d = Daemon(workdir, cfg, "bounds")
    try:
        d.first_good_scrape(30)
        opens0, t0 = tcp_opens(), time.monotonic()
        churn(exe, args.warmup_cycles, args)  # fills the bounded closed ring first
        rep["baseline"] = base = settle(d, args.reconcile)
        log(f"baseline after {args.warmup_cycles} warm-up cycles: {base}")
        rep["churn"] = churn(exe, args.cycles, args, d)
        rep["after_churn"] = after = settle(d, args.reconcile)
        log(f"after churn {after}")

        holder = Helper([str(exe), "hold", str(args.hold), str(PER_WORKER)])
        try:
            info = holder.line(120 + args.hold / 500)
            rep["hold_open_s"] = info["seconds"]
            rep["held"] = held = settle(d, args.reconcile)
            rep["held_alive"] = d.proc.poll() is None
            log(f"holding {args.hold}: {held}")
        finally:
            holder.close()
        rep["released"] = rel = settle(d, args.reconcile)
        log(f"released: {rel}")
        rep["host_other_opens_per_s"] = round(
            (tcp_opens() - opens0 - 2 * rep["churn"]["cycles"] - 2 * args.hold)
            / (time.monotonic() - t0), 1)
    finally:
        rep["exit"] = d.stop()
    return rep


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def render(rep: dict[str, Any], args: argparse.Namespace) -> str:
    b, c, h, r = rep["baseline"], rep["after_churn"], rep["held"], rep["released"]
    def rows_ok(x: dict[str, Any]) -> str:
        # other processes' sockets come and go: ss (full sockets: no TIME-WAIT or
        # SYN-RECV minisockets, which sockwatch does not list either) is the truth
        return (f"{x['table_rows']:.0f} rows (ss: {x['ss_sockets']} sockets) "
                f"{verdict(x['table_rows'] <= x['ss_sockets'] + max(50, 0.05 * x['ss_sockets']))}")

    lines = [
        f"sockwatch bounds, {rep['version']} (shared host: other processes opened "
        f"{rep['host_other_opens_per_s']} TCP conns/s meanwhile)",
        f"baseline (after {args.warmup_cycles} warm-up cycles): {rows_ok(b)}, RSS "
        f"{b['rss_mb']} MB, {b['fds']} fds",
        f"churn: {rep['churn']['cycles']} connect/close cycles in {rep['churn']['seconds']} s "
        f"({rep['churn']['failed']} failed)",
        f"after churn: {rows_ok(c)}; RSS {c['rss_mb']} MB "
        f"(+{c['rss_mb'] - b['rss_mb']:.1f}, slack {args.rss_slack_mb}) "
        f"{verdict(c['rss_mb'] - b['rss_mb'] <= args.rss_slack_mb)}; fds {c['fds']} "
        f"{verdict(c['fds'] <= b['fds'] + 2)}; lost {c['lost']}",
        f"holding {args.hold} connections ({2 * args.hold} sockets, opened in "
        f"{rep['hold_open_s']} s): table {h['table_rows']:.0f} rows (cap {args.table_cap}) "
        f"{verdict(h['table_rows'] <= args.table_cap)}, table_full "
        f"{h['lost'].get('table_full', 0):.0f}; socks map {h['socks_map']:.0f}/65536, "
        f"evictions {h['evictions']:.0f} {verdict(h['evictions'] > 0)}; RSS {h['rss_mb']} MB "
        f"(peak {h['hwm_mb']}, cap {args.rss_cap_mb}) {verdict(h['hwm_mb'] <= args.rss_cap_mb)}; "
        f"scrape {h['scrape_s']} s status {h['scrape_status']}; daemon alive "
        f"{verdict(rep['held_alive'])}; lost {h['lost']}",
        f"released: {rows_ok(r)}; "
        f"RSS {r['rss_mb']} MB; fds {r['fds']}; untracked closes {r['untracked_closes']:.0f} "
        f"(evicted sockets closing)",
        f"daemon exit {rep['exit']} {verdict(rep['exit'] == 0)}",
    ]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cycles", type=int, default=1_000_000)
    p.add_argument("--warmup-cycles", type=int, default=20_000)
    p.add_argument("--rate", type=float, default=10000, help="churn connections/s")
    p.add_argument("--churn-seconds", type=float, default=30)
    p.add_argument("--hold", type=int, default=150_000)
    p.add_argument("--table-cap", type=int, default=100_000, help="tables.max_connections")
    p.add_argument("--rss-cap-mb", type=float, default=200)
    p.add_argument("--rss-slack-mb", type=float, default=10)
    p.add_argument("--reconcile", type=float, default=5.0)
    p.add_argument("--json-out")
    args = p.parse_args(argv)
    if os.geteuid() != 0 or not shutil.which("gcc"):
        print("bounds.py: run as root, with gcc installed", file=sys.stderr)
        return 2
    # SIGTERM ends the run early but still stops the daemon and the helpers
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    with tempfile.TemporaryDirectory(prefix="sw-bounds-") as tmp:
        workdir = Path(tmp)
        src, exe = workdir / "swbench.c", workdir / "swbench"
        src.write_text(C_SOURCE)
        subprocess.run(["gcc", "-O2", "-Wall", "-o", str(exe), str(src)], check=True)
        rep = run(args, exe, workdir)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(rep, indent=1))
    print(render(rep, args))
    return 0 if rep["exit"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
