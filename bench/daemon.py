#!/usr/bin/env python3
"""Benchmark of ``sockwatch daemon``: scrapes with many live connections, and churn.

Targets (from the issue):

- scrape p99 <= 50 ms with 10k live connections;
- daemon RSS <= 40 MB with 10k and <= 80 MB with 100k live connections;
- start (spawn) to first good scrape <= 0.5 s;
- daemon CPU <= 3 % of one core while 10k new connections per second come and go.

Live phase, for each N in ``--live``: a helper (C, built here with gcc) opens N
established loopback connections (2N sockets plus one listener, client side spread
over source addresses 127.77.0.x), *then* the daemon is spawned, so those
connections reach it through its iter/tcp snapshot and the /proc walk. Measured:
spawn to the first 200 answer of /metrics that contains sockwatch_build_info, the
latency of ``--scrapes`` sequential scrapes (p50/p99/max, full body read), the
/metrics size, VmRSS/VmHWM after the scrapes, the daemon's CPU while idle with N
connections (reconciles included), and a check that /api/connections lists all 2N+1
sockets of the helper with their pids and fds.

Churn phase: a paced C load generator (client workers doing connect / send 1 byte /
recv 1 byte / wait for EOF / close against two server processes that
accept / recv / send / close) runs at ``--rate`` connections/s for ``--seconds``
while the daemon runs. Measured: daemon CPU (utime+stime from /proc/<pid>/stat)
over the load plus a 0.5 s drain, RSS, the achieved rate, lost events
(sockwatch_lost_events_total), and how many of the connections the daemon counted.

Run as root from the checkout:

    cd /work/main
    PYTHONPATH=/work/main /opt/sockwatch/venv/bin/python bench/daemon.py --live 10000,100000

The daemon watches every socket on the host, so TCP load from anything else running
beside the benchmark is work for it too: before each measurement the script waits
(up to --quiet-wait s) until the host opens fewer than --quiet-threshold TCP
connections/s and its CPUs are less than --quiet-cpu % busy, and reports other
processes' connection rate (from /proc/net/snmp) and the CPU load during each window
next to the figures.

Flags: --live, --rate, --seconds, --workers, --servers, --scrapes, --idle-seconds,
--quiet-wait, --quiet-threshold, --quiet-cpu, --skip-live, --skip-churn, --py-spy PATH (profile
the daemon while scraping with N live connections, and in an extra, unmeasured churn
run), --json.
"""

from __future__ import annotations

import argparse
import compileall
import collections
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

TARGET_SCRAPE_P99_MS = 50.0  # at 10k live connections
TARGET_RSS_MB = {10000: 40.0, 100000: 80.0}
TARGET_START_S = 0.5
TARGET_CPU_PCT = 3.0  # of one core, at 10k new connections/s
CLK_TCK = os.sysconf("SC_CLK_TCK")

C_SOURCE = r"""
// Helpers for bench/daemon.py. Every mode is bounded: hold lives until stdin EOF,
// churn for the given seconds; children die with their parent (PR_SET_PDEATHSIG).
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#ifndef IP_BIND_ADDRESS_NO_PORT
#define IP_BIND_ADDRESS_NO_PORT 24
#endif

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void die(const char *what) { perror(what); exit(1); }

static void child_setup(const char *name) {
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    prctl(PR_SET_NAME, name);
}

static void raise_nofile(long n) {
    struct rlimit rl = {n, n};
    if (setrlimit(RLIMIT_NOFILE, &rl)) die("setrlimit");
}

static int listener(int *port) {
    int fd = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(0x7f000001)};
    socklen_t len = sizeof a;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(fd, (void *)&a, sizeof a) || listen(fd, 4096)) die("listen");
    getsockname(fd, (void *)&a, &len);
    *port = ntohs(a.sin_port);
    return fd;
}

/* connect from 127.<net>.<hi>.<lo>: the kernel picks the port per 4-tuple at connect */
static int connect_from(unsigned src, int port) {
    int fd = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    struct sockaddr_in s = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(src)};
    struct sockaddr_in d = {.sin_family = AF_INET, .sin_port = htons(port),
                            .sin_addr.s_addr = htonl(0x7f000001)};
    if (fd < 0) return -1;
    setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
    if (bind(fd, (void *)&s, sizeof s) || connect(fd, (void *)&d, sizeof d)) {
        int e = errno; close(fd); errno = e; return -1;
    }
    return fd;
}

/* hold N PER: N established connections in ceil(N/PER) worker processes. Each worker
 * listens on its own port, connects from its own source address 127.77.<w>.1 and
 * accepts, so it holds 2*PER+1 sockets (RLIMIT_NOFILE's hard limit may be low and
 * raising it needs CAP_SYS_RESOURCE). Kept until stdin reaches EOF. */
static void hold_worker(int w, long n, int ready) {
    int port, lfd = listener(&port);
    long i, accepted = 0;
    char name[16];
    snprintf(name, sizeof name, "swb-hold-%d", w);
    child_setup(name);
    for (i = 0; i < n; i++) {
        if (connect_from(0x7f4d0001 + ((unsigned)w << 8), port) < 0) die("connect");
        if ((i + 1) % 1000 == 0 || i + 1 == n)      /* accept before the backlog fills */
            for (; accepted <= i; accepted++)
                if (accept(lfd, NULL, NULL) < 0) die("accept");
    }
    char msg[64];
    int len = snprintf(msg, sizeof msg, "%d %d %ld\n", w, port, n);
    if (write(ready, msg, len) != len) die("write");
    for (;;) pause();
}

static int hold(long n, long per) {
    struct rlimit rl;
    int ready[2], workers = (int)((n + per - 1) / per), w;
    pid_t pids[1024];
    if (workers > 1024) { fprintf(stderr, "too many workers\n"); return 1; }
    getrlimit(RLIMIT_NOFILE, &rl);
    if ((rlim_t)(2 * per + 64) > rl.rlim_max) {
        fprintf(stderr, "RLIMIT_NOFILE hard limit %ld < %ld\n", (long)rl.rlim_max, 2 * per + 64);
        return 1;
    }
    raise_nofile(rl.rlim_max);
    if (pipe(ready)) die("pipe");
    double t0 = now();
    for (w = 0; w < workers; w++) {
        long mine = (w + 1) * per <= n ? per : n - w * per;
        if ((pids[w] = fork()) == 0) hold_worker(w, mine, ready[1]);
    }
    close(ready[1]);
    FILE *in = fdopen(ready[0], "r");
    int ports[1024], got = 0, ww, port;
    long cnt;
    while (got < workers && fscanf(in, "%d %d %ld", &ww, &port, &cnt) == 3) {
        ports[ww] = port;
        got++;
    }
    if (got < workers) { fprintf(stderr, "a hold worker failed\n"); return 1; }
    printf("{\"connections\": %ld, \"seconds\": %.3f, \"pids\": [", n, now() - t0);
    for (w = 0; w < workers; w++) printf("%s%d", w ? ", " : "", pids[w]);
    printf("], \"ports\": [");
    for (w = 0; w < workers; w++) printf("%s%d", w ? ", " : "", ports[w]);
    printf("]}\n");
    fflush(stdout);
    char c;
    while (read(0, &c, 1) > 0) {}
    for (w = 0; w < workers; w++) { kill(pids[w], SIGKILL); waitpid(pids[w], NULL, 0); }
    return 0;
}

struct counts { long ok, fail, accepted; };

/* churn RATE SECONDS WORKERS SERVERS: paced connect/1B/1B/close, server closes first */
static int churn(double rate, double seconds, int workers, int servers) {
    int port, lfd = listener(&port), w;
    struct counts *cnt = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS,
                              -1, 0);
    pid_t srv[64], cli[64];
    memset(cnt, 0, sizeof *cnt);
    for (w = 0; w < servers; w++) {
        if ((srv[w] = fork()) == 0) {
            child_setup("swb-churn-srv");
            for (;;) {
                char b;
                int fd = accept(lfd, NULL, NULL);
                if (fd < 0) continue;
                if (read(fd, &b, 1) == 1 && write(fd, &b, 1) == 1)
                    __sync_fetch_and_add(&cnt->accepted, 1);
                close(fd);
            }
        }
    }
    printf("{\"port\": %d}\n", port);
    fflush(stdout);
    double t0 = now() + 0.05, t_end = t0 + seconds, per = rate / workers;
    for (w = 0; w < workers; w++) {
        if ((cli[w] = fork()) == 0) {
            child_setup("swb-churn-cli");
            unsigned src = 0x7f4e0001 + w;                         /* 127.78.0.1 + w */
            long i, ok = 0, fail = 0;
            for (i = 0;; i++) {
                double due = t0 + i / per + (double)w / rate, t = now();
                if (due >= t_end || t >= t_end) break;
                if (due > t) {
                    double d = due - t;
                    struct timespec ts = {(time_t)d, (long)((d - (time_t)d) * 1e9)};
                    nanosleep(&ts, NULL);
                }
                char b = 'x';
                int fd = connect_from(src, port);
                if (fd < 0) { fail++; continue; }
                if (write(fd, &b, 1) == 1 && read(fd, &b, 1) == 1) {
                    while (read(fd, &b, 1) > 0) {}
                    ok++;
                } else {
                    fail++;
                }
                close(fd);
            }
            __sync_fetch_and_add(&cnt->ok, ok);
            __sync_fetch_and_add(&cnt->fail, fail);
            _exit(0);
        }
    }
    while (now() < t0) {}
    printf("{\"started\": true}\n");
    fflush(stdout);
    for (w = 0; w < workers; w++) waitpid(cli[w], NULL, 0);
    double elapsed = now() - t0;
    usleep(100000);  /* the servers finish their last connections */
    for (w = 0; w < servers; w++) { kill(srv[w], SIGKILL); waitpid(srv[w], NULL, 0); }
    printf("{\"ok\": %ld, \"failed\": %ld, \"accepted\": %ld, \"seconds\": %.3f}\n",
           cnt->ok, cnt->fail, cnt->accepted, elapsed);
    fflush(stdout);
    return 0;
}

int main(int argc, char **argv) {
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (argc == 4 && !strcmp(argv[1], "hold")) return hold(atol(argv[2]), atol(argv[3]));
    if (argc == 6 && !strcmp(argv[1], "churn"))
        return churn(atof(argv[2]), atof(argv[3]), atoi(argv[4]), atoi(argv[5]));
    fprintf(stderr, "usage: swbench hold N PER | churn RATE SECONDS WORKERS SERVERS\n");
    return 2;
}
"""


def code_version() -> str:
    """The checkout's commit, and whether its sockwatch/ or bpf/ differ from it."""
    def git(*a: str) -> str:
        return subprocess.run(["git", "-C", str(ROOT), *a], capture_output=True,
                              text=True).stdout.strip()
    head = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--", "sockwatch", "bpf")
    return head + (" + uncommitted changes in sockwatch/ or bpf/" if dirty else "")


def log(msg: str) -> None:
    print(f"[daemon-bench] {msg}", file=sys.stderr, flush=True)


# -- processes ------------------------------------------------------------------------------
class Helper:
    """A C helper in its own process group, reading JSON lines from its stdout."""

    def __init__(self, argv: list[str]):
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, start_new_session=True)

    def line(self, timeout: float) -> dict:
        import select
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise RuntimeError(f"helper {self.proc.args[1]} said nothing for {timeout}s")
        text = self.proc.stdout.readline()
        if not text:
            raise RuntimeError(f"helper {self.proc.args[1]} exited {self.proc.wait()}")
        return json.loads(text)

    def close(self) -> None:
        try:
            if self.proc.stdin:
                self.proc.stdin.close()
            self.proc.wait(10)
        except (subprocess.TimeoutExpired, BrokenPipeError):
            pass
        finally:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Daemon:
    """``sockwatch daemon`` from the checkout, with a config file of its own."""

    def __init__(self, workdir: Path, config: str, tag: str):
        self.port = free_port()
        cfg = workdir / f"{tag}.toml"
        cfg.write_text(config)
        self.log_path = workdir / f"{tag}.log"
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env.setdefault("SOCKWATCH_BPF_DIR", str(ROOT / "sockwatch" / "bpf_objects"))
        with open(self.log_path, "wb") as err:
            self.spawned = time.monotonic()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "sockwatch", "daemon", "--config", str(cfg),
                 "--listen", f"127.0.0.1:{self.port}"],
                cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=err, stderr=err)
        self.pid = self.proc.pid

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def get(self, path: str, timeout: float = 60) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(self.url(path), timeout=timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def first_good_scrape(self, timeout: float) -> tuple[float, bytes]:
        """Seconds from spawn to the first 200 /metrics with sockwatch_build_info."""
        deadline = self.spawned + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited {self.proc.returncode}: {self.stderr()}")
            try:
                status, body = self.get("/metrics", timeout=timeout)
                if status == 200 and b"sockwatch_build_info" in body:
                    return time.monotonic() - self.spawned, body
            except OSError:
                pass
            time.sleep(0.005)
        raise RuntimeError(f"no good scrape within {timeout}s: {self.stderr()}")

    def cpu_seconds(self) -> float:
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime

    def memory_mb(self) -> dict[str, float]:
        out = {}
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    key, value = line.split(":", 1)
                    out[key] = round(int(value.split()[0]) / 1024, 1)
        return out

    def threads(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/task"))

    def stderr(self) -> str:
        return self.log_path.read_text(errors="replace")[-2000:]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return -9


def metric(text: str, name: str, **labels: str) -> float | None:
    """Sum of the samples of ``name`` whose labels include ``labels`` (None: no sample)."""
    total = None
    for m in re.finditer(rf"^{name}(?:\{{([^}}]*)\}})? (\S+)$", text, re.M):
        have = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total = (total or 0.0) + float(m.group(2))
    return total


def losses(text: str) -> dict[str, float]:
    """sockwatch_lost_events_total by source (whatever sources the daemon exports)."""
    return {src: float(v) for src, v in re.findall(
        r'^sockwatch_lost_events_total\{source="([^"]*)"\} (\S+)$', text, re.M)}


def tcp_opens() -> int:
    """ActiveOpens + PassiveOpens of this network namespace (/proc/net/snmp)."""
    with open("/proc/net/snmp") as f:
        lines = [line.split() for line in f if line.startswith("Tcp:")]
    row = dict(zip(lines[0][1:], lines[1][1:]))
    return int(row["ActiveOpens"]) + int(row["PassiveOpens"])


def cpu_busy_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + v[4]  # idle + iowait
    return sum(v) - idle, sum(v)


def host_busy(since: tuple[int, int]) -> float:
    """Percent of all CPUs busy since ``since`` (a cpu_busy_ticks() reading)."""
    busy, total = cpu_busy_ticks()
    return round(100 * (busy - since[0]) / max(1, total - since[1]), 1)


def wait_for_quiet(max_wait: float, threshold: float, cpu_threshold: float) -> dict[str, float]:
    """Wait (bounded) until the host opens fewer than ``threshold`` TCP connections/s
    and its CPUs are less than ``cpu_threshold`` % busy.

    The daemon watches every socket on the host: another benchmark or test running
    beside this one makes it work for that load too, and competes for the CPUs.
    Returns what was seen and how long we waited, for the report.
    """
    start = time.monotonic()
    while True:
        a, t, c = tcp_opens(), time.monotonic(), cpu_busy_ticks()
        time.sleep(1.0)
        rate = (tcp_opens() - a) / (time.monotonic() - t)
        busy = host_busy(c)
        waited = time.monotonic() - start
        quiet = rate < threshold and busy < cpu_threshold
        if quiet or waited >= max_wait:
            if not quiet:
                log(f"host still busy ({rate:.0f} TCP opens/s, CPUs {busy} % busy) after "
                    f"{waited:.0f} s: measuring anyway, figures include that load")
            return {"host_opens_per_s": round(rate), "host_cpu_busy_pct": busy,
                    "waited_s": round(waited)}
        if int(waited) % 30 == 0:
            log(f"host busy: {rate:.0f} TCP opens/s from other processes, CPUs {busy} % "
                "busy; waiting")


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    s = sorted(values)
    return s[max(0, min(len(s) - 1, int(round(q / 100 * len(s) + 0.5)) - 1))]


def pow2_at_least(n: int) -> int:
    p = 1
    while p < n:
        p <<= 1
    return p


# -- profiling --------------------------------------------------------------------------------
def py_spy(pyspy: str | None, pid: int, seconds: float, out: Path) -> subprocess.Popen | None:
    if not pyspy:
        return None
    return subprocess.Popen([pyspy, "record", "--pid", str(pid), "--duration", str(int(seconds)),
                             "--rate", "200", "--nonblocking", "--threads", "--format", "raw",
                             "--output", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def summarize_profile(path: Path, top: int = 12) -> dict[str, Any]:
    """Self and inclusive sample shares per function from py-spy's collapsed stacks."""
    if not path.exists():
        return {"error": "py-spy wrote nothing"}
    own: collections.Counter = collections.Counter()
    incl: collections.Counter = collections.Counter()
    threads: collections.Counter = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        n = int(n)
        frames = stack.split(";")
        total += n
        threads[frames[0]] += n
        funcs = [re.sub(r" \(.*?/(sockwatch|site-packages|lib/python3[.\d]*)/", r" (\1/", f)
                 for f in frames[1:]]
        own[funcs[-1] if funcs else frames[0]] += n
        for f in set(funcs):
            incl[f] += n
    share = lambda c: [(k, round(100 * v / total, 1)) for k, v in c.most_common(top)]  # noqa: E731
    return {"samples": total, "threads": share(threads), "self": share(own),
            "inclusive": share(incl)}


# -- phases -------------------------------------------------------------------------------------
def live_run(n: int, exe: Path, workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    res: dict[str, Any] = {"connections": n}
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    per = min(9000, (hard - 64) // 2) if hard != resource.RLIM_INFINITY else 9000
    workers = -(-n // per)
    sockets = 2 * n + workers
    socks_entries = max(65536, pow2_at_least(int(sockets * 1.25) + 8192))
    config = (f"[probes]\nsocks_max_entries = {socks_entries}\n"
              f"[tables]\nmax_connections = {socks_entries}\n")
    res["config"] = {"socks_max_entries": socks_entries, "max_connections": socks_entries}
    res["holders"] = workers
    res["sockets"] = sockets
    holder = Helper([str(exe), "hold", str(n), str(per)])
    daemon = None
    try:
        info = holder.line(timeout=60 + n / 1000)
        res["open_seconds"] = info["seconds"]
        log(f"{n} connections held by {workers} processes (opened in {info['seconds']:.1f} s); "
            "starting the daemon")
        res["quiet"] = wait_for_quiet(args.quiet_wait, args.quiet_threshold, args.quiet_cpu)
        load0 = os.getloadavg()[0]
        opens0, topen0, busy0 = tcp_opens(), time.monotonic(), cpu_busy_ticks()
        daemon = Daemon(workdir, config, f"live-{n}")
        first_s, body = daemon.first_good_scrape(timeout=120)
        res["start_to_first_scrape_s"] = round(first_s, 3)
        res["table_entries_at_first_scrape"] = metric(body.decode(), "sockwatch_table_entries",
                                                      table="connections")
        m = re.search(r"ready in (\d+) ms \(([^)]*)\)", daemon.stderr())
        res["daemon_reported_ready_ms"] = int(m.group(1)) if m else None
        res["daemon_start_split"] = m.group(2) if m else None

        lat, sizes, collect = [], [], []
        for _ in range(args.scrapes):
            t = time.perf_counter()
            status, body = daemon.get("/metrics")
            lat.append((time.perf_counter() - t) * 1000)
            if status != 200:
                raise RuntimeError(f"scrape answered {status}: {body[:200]!r}")
            sizes.append(len(body))
            collect.append(metric(body.decode(), "sockwatch_scrape_duration_seconds") * 1000)
        res["scrape_ms"] = {"p50": round(statistics.median(lat), 1),
                            "p99": round(pct(lat, 99), 1), "max": round(max(lat), 1),
                            "n": len(lat)}
        res["collect_ms_p50"] = round(statistics.median(collect), 1)
        res["metrics_bytes"] = sizes[-1]
        res["metrics_series"] = sum(1 for line in body.decode().splitlines()
                                    if line and not line.startswith("#"))
        text = body.decode()
        res["table_entries"] = metric(text, "sockwatch_table_entries", table="connections")
        res["lost_events"] = losses(text)
        res["memory_after_scrapes_mb"] = daemon.memory_mb()

        cpu0, t0 = daemon.cpu_seconds(), time.monotonic()
        time.sleep(args.idle_seconds)
        res["idle_cpu_pct"] = round(100 * (daemon.cpu_seconds() - cpu0)
                                    / (time.monotonic() - t0), 2)
        res["memory_after_idle_mb"] = daemon.memory_mb()
        # our scrapes open connections too (one per scrape, two sockets each)
        res["host_opens_per_s_during"] = max(0, round(
            (tcp_opens() - opens0 - 2 * (args.scrapes + 2)) / (time.monotonic() - topen0)))
        res["host_cpu_busy_pct_during"] = host_busy(busy0)  # the daemon's own CPU included

        if args.py_spy:
            out = workdir / f"live-{n}.prof"
            spy = py_spy(args.py_spy, daemon.pid, 5, out)
            end = time.monotonic() + 5
            while time.monotonic() < end:
                daemon.get("/metrics")
            spy.wait(30)
            res["profile_scrapes"] = summarize_profile(out)

        # Every held socket, with its owner, through the API (its own cost is reported too).
        t = time.perf_counter()
        status, body = daemon.get("/api/connections", timeout=600)
        res["api_connections_s"] = round(time.perf_counter() - t, 2)
        res["api_connections_bytes"] = len(body)
        rows = json.loads(body) if status == 200 else []
        pids, ports = set(info["pids"]), set(info["ports"])
        ours = [r for r in rows if r["pid"] in pids
                and (r["local_port"] in ports or r["remote_port"] in ports)]
        attributed = sum(1 for r in ours if r["fd"] is not None)
        res["api_sockets_attributed"] = f"{attributed}/{sockets}"
        res["api_ok"] = attributed == sockets
        del rows, ours, body
        res["memory_after_api_mb"] = daemon.memory_mb()
        res["load_avg_1m_at_start"] = load0
    finally:
        if daemon:
            res["exit_status"] = daemon.stop()
            if res["exit_status"] != 0:
                res["daemon_log_tail"] = daemon.stderr()
        holder.close()
    return res


def churn_run(exe: Path, workdir: Path, args: argparse.Namespace, profile: bool = False
              ) -> dict[str, Any]:
    res: dict[str, Any] = {"target_rate": args.rate, "seconds": args.seconds}
    # Room for our process names even when other tests beside us spawn many distinct
    # ones (the caps are sticky: the first names seen keep their label).
    config = "[metrics]\ntop_processes = 10000\ntop_ports = 10000\n"
    daemon = Daemon(workdir, config, "churn-profile" if profile else "churn")
    load = None
    try:
        daemon.first_good_scrape(timeout=60)
        res["quiet"] = wait_for_quiet(args.quiet_wait, args.quiet_threshold, args.quiet_cpu)
        cpu0, t0, o0 = daemon.cpu_seconds(), time.monotonic(), tcp_opens()
        time.sleep(args.idle_seconds)
        res["idle_cpu_pct"] = round(100 * (daemon.cpu_seconds() - cpu0)
                                    / (time.monotonic() - t0), 2)
        res["host_opens_per_s_idle"] = round((tcp_opens() - o0) / (time.monotonic() - t0))
        res["memory_idle_mb"] = daemon.memory_mb()
        before = daemon.get("/metrics")[1].decode()
        res["load_avg_1m_at_start"] = os.getloadavg()[0]
        load = Helper([str(exe), "churn", str(args.rate), str(args.seconds), str(args.workers),
                       str(args.servers)])
        port = load.line(timeout=10)["port"]
        load.line(timeout=10)  # started
        cpu0, t0, o0, busy0 = daemon.cpu_seconds(), time.monotonic(), tcp_opens(), cpu_busy_ticks()
        spy = py_spy(args.py_spy, daemon.pid, args.seconds, workdir / "churn.prof") \
            if profile else None
        done = load.line(timeout=args.seconds + 60)
        time.sleep(0.5)  # the daemon reads the ring buffer every 100 ms: let it drain
        cpu1, t1, o1 = daemon.cpu_seconds(), time.monotonic(), tcp_opens()
        res["host_cpu_busy_pct_during"] = host_busy(busy0)  # the load itself included
        res["memory_mb"] = daemon.memory_mb()
        if spy:
            spy.wait(args.seconds + 30)
            res["profile"] = summarize_profile(workdir / "churn.prof")
        after = daemon.get("/metrics")[1].decode()
        res["connections_ok"] = done["ok"]
        res["connections_failed"] = done["failed"]
        res["accepted"] = done["accepted"]
        res["achieved_rate"] = round(done["ok"] / done["seconds"])
        res["window_s"] = round(t1 - t0, 2)
        res["cpu_seconds"] = round(cpu1 - cpu0, 2)
        res["cpu_pct"] = round(100 * (cpu1 - cpu0) / (t1 - t0), 1)
        res["cpu_us_per_connection"] = round(1e6 * (cpu1 - cpu0) / max(1, done["ok"]), 1)
        res["cpu_pct_above_idle"] = round(res["cpu_pct"] - res["idle_cpu_pct"], 1)
        # connections other processes opened meanwhile (each of ours counts twice: both ends)
        res["host_foreign_opens_per_s"] = max(0, round((o1 - o0 - 2 * done["ok"]) / (t1 - t0)))
        lb, la = losses(before), losses(after)
        res["lost_events"] = {k: la[k] - lb.get(k, 0.0) for k in la}
        res["ringbuf"] = {"size_bytes": metric(after, "sockwatch_ringbuf_size_bytes", ring="events"),
                          "peak_bytes": metric(after, "sockwatch_ringbuf_peak_bytes", ring="events")}
        counted = {}
        for key, name, labels in (
                ("connects_ok", "sockwatch_connects_total",
                 {"process": "swb-churn-cli", "result": "ok"}),
                ("accepts", "sockwatch_accepts_total",
                 {"process": "swb-churn-srv", "port": str(port)})):
            now_n = metric(after, name, **labels)
            # None: folded into "other", the label cap was taken by other processes' names
            counted[key] = None if now_n is None else now_n - (metric(before, name, **labels) or 0)
        res["daemon_counted"] = counted
        res["threads"] = daemon.threads()
    finally:
        if load:
            load.close()
        res["exit_status"] = daemon.stop()
        if res["exit_status"] != 0:
            res["daemon_log_tail"] = daemon.stderr()
    return res


# -- report -------------------------------------------------------------------------------------
def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def figures(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per target: figure, value, target, PASS/MISS and the margin."""
    rows = []

    def add(name: str, value: float, unit: str, target: float) -> None:
        ok = value <= target
        margin = "" if ok else f"{value / target:.1f}x the target (+{value - target:.3g} {unit})"
        rows.append({"figure": name, "value": value, "unit": unit, "target": f"<= {target:g}",
                     "verdict": verdict(ok), "miss_by": margin})

    for r in report.get("live", []):
        n = r["connections"]
        k = f"{n // 1000}k live"
        if "error" in r:
            rows.append({"figure": f"{k}: run", "value": r["error"].strip().splitlines()[-1],
                         "unit": "", "target": "",
                         "verdict": "MISS", "miss_by": ""})
            continue
        add(f"{k}: start to first good scrape", r["start_to_first_scrape_s"], "s",
            TARGET_START_S)
        if n <= 10000:
            add(f"{k}: scrape p99", r["scrape_ms"]["p99"], "ms", TARGET_SCRAPE_P99_MS)
        rss_target = TARGET_RSS_MB.get(n)
        if rss_target is not None:
            add(f"{k}: RSS after scrapes", r["memory_after_scrapes_mb"]["VmRSS"], "MB",
                rss_target)
    c = report.get("churn")
    if c and "error" not in c:
        add(f"churn {c['target_rate']}/s: daemon CPU", c["cpu_pct"], "% of a core",
            TARGET_CPU_PCT)
    elif c:
        rows.append({"figure": "churn: run", "value": c["error"].strip().splitlines()[-1],
                     "unit": "", "target": "",
                     "verdict": "MISS", "miss_by": ""})
    return rows


def render(report: dict[str, Any]) -> str:
    out = [f"sockwatch daemon benchmark  kernel {platform.release()}, {os.cpu_count()} CPUs, "
           f"code {report.get('code')}"]
    if report.get("code_at_end", report.get("code")) != report.get("code"):
        out.append(f"WARNING: the checkout changed during the run, to {report['code_at_end']}")
    for r in report.get("live", []):
        n = r["connections"]
        if "error" in r:
            out.append(f"\n{n} live connections: FAILED: {r['error'].strip().splitlines()[-1]}")
            continue
        s = r["scrape_ms"]
        m = r["memory_after_scrapes_mb"]
        out += [
            f"\n{n} live connections ({r['sockets']} sockets in {r['holders']} processes, "
            f"opened before the daemon started; socks map {r['config']['socks_max_entries']})",
            f"  start to first good scrape {r['start_to_first_scrape_s']:.3f} s "
            f"(daemon says ready in {r['daemon_reported_ready_ms']} ms; table had "
            f"{r['table_entries_at_first_scrape']:.0f} entries at that scrape)",
            f"  daemon's start             {r['daemon_start_split']}",
            f"  scrape latency (n={s['n']})   p50 {s['p50']} ms  p99 {s['p99']} ms  "
            f"max {s['max']} ms  (collect p50 {r['collect_ms_p50']} ms)",
            f"  /metrics size              {r['metrics_bytes']} bytes, "
            f"{r['metrics_series']} samples; table {r['table_entries']:.0f} entries",
            f"  RSS after scrapes          VmRSS {m['VmRSS']} MB  VmHWM {m['VmHWM']} MB",
            f"  idle CPU with these held   {r['idle_cpu_pct']} % of a core "
            f"(reconcile included); RSS after idle {r['memory_after_idle_mb']['VmRSS']} MB",
            f"  /api/connections           {r['api_sockets_attributed']} held sockets with "
            f"pid+fd, in {r['api_connections_s']} s; RSS after "
            f"{r['memory_after_api_mb']['VmRSS']} MB (HWM {r['memory_after_api_mb']['VmHWM']})",
            f"  lost events {r['lost_events']}; daemon exit {r['exit_status']}",
            f"  noise: host TCP opens/s before start {r['quiet']['host_opens_per_s']}, "
            f"during {r['host_opens_per_s_during']}; CPUs busy before "
            f"{r['quiet']['host_cpu_busy_pct']} %, during {r['host_cpu_busy_pct_during']} % "
            f"(daemon included); load avg {r['load_avg_1m_at_start']:.2f}",
        ]
    c = report.get("churn")
    if c and "error" not in c:
        dc = c["daemon_counted"]
        out += [
            f"\nchurn: {c['target_rate']} connections/s for {c['seconds']} s "
            f"({c['workers']} paced client processes, {c['servers']} servers)",
            f"  achieved                   {c['achieved_rate']} conn/s "
            f"({c['connections_ok']} ok, {c['connections_failed']} failed)",
            f"  daemon CPU                 {c['cpu_pct']} % of a core over {c['window_s']} s "
            f"({c['cpu_us_per_connection']} us per connection); idle before: "
            f"{c['idle_cpu_pct']} %, so {c['cpu_pct_above_idle']} % above idle",
            f"  daemon RSS                 VmRSS {c['memory_mb']['VmRSS']} MB  "
            f"VmHWM {c['memory_mb']['VmHWM']} MB",
            f"  lost events                {c['lost_events']}",
            f"  ring buffer                fullest {c['ringbuf']['peak_bytes']:.0f} of "
            f"{c['ringbuf']['size_bytes']:.0f} bytes when read",
            f"  counted by the daemon      connects ok {dc['connects_ok']}, "
            f"accepts {dc['accepts']} of {c['connections_ok']} (None: our label was "
            "folded into 'other')",
            f"  daemon exit {c['exit_status']}; RSS idle before {c['memory_idle_mb']['VmRSS']} MB",
            f"  noise: other processes' TCP opens/s idle {c['host_opens_per_s_idle']}, during "
            f"{c['host_foreign_opens_per_s']}; CPUs busy before {c['quiet']['host_cpu_busy_pct']} %"
            f", during {c['host_cpu_busy_pct_during']} % (load included); "
            f"load avg {c['load_avg_1m_at_start']:.2f}",
        ]
    elif c:
        out.append(f"\nchurn: FAILED: {c['error'].strip().splitlines()[-1]}")
    out.append("\ntargets")
    for row in figures(report):
        value = row["value"]
        out.append(f"  {row['verdict']:<4}  {row['figure']:<38} {value} {row['unit']} "
                   f"(target {row['target']}){'  ' + row['miss_by'] if row['miss_by'] else ''}")
    for name, prof in report.get("profiles", {}).items():
        out.append(f"\nprofile ({name}, py-spy, {prof.get('samples')} samples): threads "
                   f"{prof.get('threads')}")
        for kind in ("self", "inclusive"):
            out.append(f"  top {kind}:")
            for func, share in prof.get(kind, []):
                out.append(f"    {share:5.1f} %  {func}")
    return "\n".join(out)


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--live", default="10000,100000",
                    help="live connection counts, comma-separated (default 10000,100000)")
    ap.add_argument("--rate", type=int, default=10000, help="new connections per second")
    ap.add_argument("--seconds", type=float, default=10.0, help="churn duration")
    ap.add_argument("--workers", type=int, default=8, help="paced client processes")
    ap.add_argument("--servers", type=int, default=2, help="server processes")
    ap.add_argument("--scrapes", type=int, default=50, help="sequential scrapes per size")
    ap.add_argument("--idle-seconds", type=float, default=6.0,
                    help="idle CPU window (covers one 5 s reconcile)")
    ap.add_argument("--quiet-wait", type=float, default=120.0,
                    help="wait up to this long for other TCP load on the host to stop")
    ap.add_argument("--quiet-threshold", type=float, default=200.0,
                    help="host TCP opens/s below which the host counts as quiet")
    ap.add_argument("--quiet-cpu", type=float, default=30.0,
                    help="host CPU busy %% below which the host counts as quiet")
    ap.add_argument("--skip-live", action="store_true")
    ap.add_argument("--skip-churn", action="store_true")
    ap.add_argument("--py-spy", metavar="PATH",
                    help="py-spy binary: profile the daemon (extra, unmeasured runs)")
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    args = ap.parse_args(argv)
    args.live = [] if args.skip_live else [int(x) for x in args.live.split(",") if x]
    if not 1 <= args.workers <= 64 or not 1 <= args.servers <= 64:
        ap.error("--workers and --servers must be 1..64")
    if args.seconds <= 0 or args.seconds > 300 or args.rate <= 0:
        ap.error("--seconds must be in (0, 300] and --rate positive")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("daemon.py: run as root (the daemon loads BPF programs)", file=sys.stderr)
        return 1
    if not shutil.which("gcc"):
        print("daemon.py: needs gcc to build its load helpers", file=sys.stderr)
        return 1
    report: dict[str, Any] = {"kernel": platform.release(), "cpus": os.cpu_count(),
                              "argv": sys.argv, "code": code_version(), "live": [],
                              "profiles": {}}
    # The daemon as installed runs from bytecode (pip compiles it): without it
    # every start compiles the package again, which costs start time and, in
    # memory the compiler leaves fragmented, about 1 MB of RSS.
    compileall.compile_dir(ROOT / "sockwatch", quiet=1)
    with tempfile.TemporaryDirectory(prefix="sockwatch-daemon-bench-") as tmp:
        workdir = Path(tmp)
        exe = workdir / "swbench"
        src = workdir / "swbench.c"
        src.write_text(C_SOURCE)
        subprocess.run(["gcc", "-O2", "-Wall", "-o", str(exe), str(src)], check=True)
        for n in args.live:
            log(f"live: {n} connections")
            try:
                r = live_run(n, exe, workdir, args)
            except (RuntimeError, OSError, json.JSONDecodeError) as exc:
                r = {"connections": n, "error": str(exc)}
            if "profile_scrapes" in r:
                report["profiles"][f"{n} live, scraping"] = r.pop("profile_scrapes")
            report["live"].append(r)
            log(json.dumps(r))
        if not args.skip_churn:
            log(f"churn: {args.rate}/s for {args.seconds} s")
            try:
                c = churn_run(exe, workdir, args)
                c.update(workers=args.workers, servers=args.servers)
            except (RuntimeError, OSError, json.JSONDecodeError) as exc:
                c = {"error": str(exc)}
            report["churn"] = c
            log(json.dumps(c))
            if args.py_spy and "error" not in c:
                log("churn again under py-spy (not measured)")
                p = churn_run(exe, workdir, args, profile=True)
                report["profiles"]["churn"] = p.get("profile", {})
    report["code_at_end"] = code_version()
    if report["code_at_end"] != report["code"]:
        log(f"the checkout changed during the run ({report['code']} -> {report['code_at_end']}):"
            " figures may mix versions")
    report["targets"] = figures(report)
    if args.json:
        json.dump(report, sys.stdout, indent=1)
        print()
    else:
        print(render(report))
    failed_exit = [r for r in report["live"] if r.get("exit_status") not in (0, None)]
    if report.get("churn", {}).get("exit_status") not in (0, None):
        failed_exit.append(report["churn"])
    return 1 if failed_exit else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
