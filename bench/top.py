#!/usr/bin/env python3
"""Benchmark of ``sockwatch top``: the cost of one frame with a big table.

Forks ``--procs`` (500) processes that each listen on loopback and hold
``--pairs`` (10) connections to themselves, so the table has procs x (2 x pairs
+ 1) live sockets (10,500 by default) owned by ``--procs`` processes, all of
them moving no data. Then, in this process:

- ``table``: what ``sockwatch table --json`` does for one snapshot (a kernel
  walk, owners, one ``connection_dict`` per socket): the baseline;
- ``sample``: what top reads each refresh with its probes attached here
  (the same plus users, loss and latency), ``model``: rates and per-process
  rows from two consecutive samples, ``render``: the process view, sorted,
  laid out at 80x24 and at 200x60 (what the curses loop paints);
- the same sample read from a daemon (``--url``), when ``--daemon`` is given.

Prints the median of ``--frames`` frames for each stage, the frame total as a
fraction of the default 2 s refresh interval, and the ratio to the baseline.
Keys are answered from the last frame, so only ``render`` is on the key path.

Run as root from the checkout:

    PYTHONPATH=$PWD /opt/sockwatch/venv/bin/python bench/top.py
"""

from __future__ import annotations

import argparse
import ctypes
import os
import resource
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("SOCKWATCH_BPF_DIR", str(ROOT / "sockwatch" / "bpf_objects"))

from sockwatch.kernel.loader import LoaderConfig  # noqa: E402
from sockwatch.views import table as table_view  # noqa: E402
from sockwatch.views import top_screen as screen  # noqa: E402
from sockwatch.views.top import collector_paused  # noqa: E402
from sockwatch.views.filters import Filter  # noqa: E402
from sockwatch.views.top_model import TopModel  # noqa: E402
from sockwatch.views.top_source import LocalSource, RemoteSource, Source  # noqa: E402

REFRESH_S = 2.0  # top's default interval


def hold(index: int, pairs: int, ready: int) -> None:
    """A child: name itself, listen, connect ``pairs`` times to itself, wait for SIGTERM."""
    ctypes.CDLL(None).prctl(15, f"swbench-{index:03d}".encode(), 0, 0, 0)  # PR_SET_NAME
    srv = socket.create_server(("127.0.0.1", 0), backlog=pairs)
    port = srv.getsockname()[1]
    held = [socket.create_connection(("127.0.0.1", port)) for _ in range(pairs)]
    held += [srv.accept()[0] for _ in range(pairs)]
    os.write(ready, b".")
    signal.sigwait({signal.SIGTERM})
    os._exit(0)


def spawn(procs: int, pairs: int) -> list[int]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 4 * pairs + 64), hard))
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # children wait for it
    r, w = os.pipe()
    pids = []
    for i in range(procs):
        pid = os.fork()
        if pid == 0:
            os.close(r)
            hold(i, pairs, w)
        pids.append(pid)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    os.close(w)
    got = 0
    while got < procs:
        chunk = os.read(r, procs)
        if not chunk:
            raise SystemExit(f"only {got} of {procs} holders started")
        got += len(chunk)
    os.close(r)
    return pids


def reap(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    for pid in pids:
        os.waitpid(pid, 0)


def frames(source: Source, n: int, pause: float) -> dict[str, list[float]]:
    """Time ``n`` frames after a first one (the model needs two samples for rates)."""
    model = TopModel()
    model.update(source.sample())
    times: dict[str, list[float]] = {"sample": [], "model": [], "render 80x24": [],
                                     "render 200x60": [], "rows": []}
    for _ in range(n):
        time.sleep(pause)
        with collector_paused():  # as Sampler.step makes a frame
            t0 = time.perf_counter()
            sample = source.sample()
            t1 = time.perf_counter()
            frame = model.update(sample)
            t2 = time.perf_counter()
        state = screen.UIState()
        screen.render(frame, source.label, state, 80, 24)
        t3 = time.perf_counter()
        screen.render(frame, source.label, state, 200, 60)
        t4 = time.perf_counter()
        times["sample"].append(t1 - t0)
        times["model"].append(t2 - t1)
        times["render 80x24"].append(t3 - t2)
        times["render 200x60"].append(t4 - t3)
        times["rows"].append(len(sample.connections))
    return times


def table_baseline(source: LocalSource, n: int) -> list[float]:
    """Snapshots as ``table --json`` takes them, after one that names every owner."""
    source.monitor.connections()
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        table_view.rows_of(source.monitor.connections(), Filter())
        out.append(time.perf_counter() - t0)
    return out


def start_daemon(port: int) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "sockwatch", "daemon", "--listen",
                             f"127.0.0.1:{port}"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    for line in proc.stderr:
        if "serving" in line:
            return proc
    raise SystemExit(f"daemon did not start: exit {proc.wait()}")


def ms(values: list[float]) -> str:
    return f"{statistics.median(values) * 1000:8.1f} ms"


def report(name: str, times: dict[str, list[float]], baseline: float) -> None:
    print(f"\n{name}: {int(statistics.median(times['rows']))} sockets per sample")
    for stage in ("sample", "model", "render 80x24", "render 200x60"):
        print(f"  {stage:<14} {ms(times[stage])}")
    total = [sum(v) for v in zip(times["sample"], times["model"], times["render 80x24"])]
    frame = statistics.median(total)
    print(f"  {'frame':<14} {ms(total)}  = {frame / REFRESH_S:.1%} of the {REFRESH_S:g} s "
          f"refresh; {frame / baseline:.2f}x one `table --json` snapshot")
    keys = statistics.median(times["render 200x60"])
    print(f"  key path (render only): {keys * 1000:.1f} ms")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--procs", type=int, default=500)
    ap.add_argument("--pairs", type=int, default=10, help="connections each process holds")
    ap.add_argument("--frames", type=int, default=5)
    ap.add_argument("--daemon", action="store_true", help="also read through a daemon's API")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root (loads the BPF programs)")
    t0 = time.perf_counter()
    pids = spawn(args.procs, args.pairs)
    print(f"{args.procs} processes holding {args.procs * (2 * args.pairs + 1)} loopback sockets "
          f"(started in {time.perf_counter() - t0:.1f} s); {os.cpu_count()} CPUs, shared")
    try:
        local = LocalSource(LoaderConfig(hold_opens=True), Filter())  # as `sockwatch top`
        try:
            baseline = statistics.median(table_baseline(local, args.frames))
            print(f"baseline: one `sockwatch table --json` snapshot {baseline * 1000:.1f} ms")
            report("probes attached here", frames(local, args.frames, 0.5), baseline)
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            print(f"  peak RSS of this process (probes, table, frames): {rss:.0f} MB")
        finally:
            local.close()
        if args.daemon:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            daemon = start_daemon(port)
            try:
                remote = RemoteSource(f"http://127.0.0.1:{port}", Filter(), timeout=60)
                report("from a daemon (--url)", frames(remote, args.frames, 0.5), baseline)
            finally:
                daemon.terminate()
                daemon.wait()
    finally:
        reap(pids)


if __name__ == "__main__":
    main()
