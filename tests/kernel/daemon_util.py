"""Plumbing for the daemon tests: a real ``sockwatch daemon`` subprocess, a real
Prometheus server, named workload processes, and what the kernel says about
BPF programs.

Everything here starts processes; every ``start_*`` has a matching stop that
waits for the process, so the conftest guard finds no children left behind.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sockwatch.kernel.loader import default_objects_dir

ROOT = Path(__file__).resolve().parents[2]
READY_RE = re.compile(r"serving (https?)://[^ ]+:(\d+)/metrics; .*ready in (\d+) ms")


def daemon_env(**extra: str) -> dict[str, str]:
    """The test's environment (SOCKWATCH_BPF_DIR from tests/conftest.py) running the checkout."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT)
    env.setdefault("SOCKWATCH_BPF_DIR", str(default_objects_dir()))
    env.pop("JOURNAL_STREAM", None)  # plain log lines with level names, not <6>
    env.update(extra)
    return env


def sockwatch_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "sockwatch", *args]


def free_port() -> int:
    """A port free right now (the caller retries if someone takes it meanwhile)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def to_toml(cfg: dict[str, dict[str, Any]]) -> str:
    """Enough TOML for sockwatch configs: sections of scalars, plus sub-tables."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return json.dumps(v)  # a TOML basic string for everything used here
        return repr(v)

    out = []
    for section, body in cfg.items():
        out.append(f"[{section}]")
        subs = {k: v for k, v in body.items() if isinstance(v, dict)}
        out += [f"{k} = {value(v)}" for k, v in body.items() if k not in subs]
        for name, sub in subs.items():
            out.append(f"[{section}.{name}]")
            out += [f"{k} = {value(v)}" for k, v in sub.items()]
        out.append("")
    return "\n".join(out)


# --------------------------------------------------------------------------------------
# HTTP
# --------------------------------------------------------------------------------------


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes
    seconds: float

    @property
    def text(self) -> str:
        return self.body.decode()

    def json(self) -> Any:
        return json.loads(self.body)


def http_get(host: str, port: int, path: str, *, headers: dict[str, str] | None = None,
             timeout: float = 5.0, tls: ssl.SSLContext | None = None) -> Reply:
    """One GET on a fresh connection; raises OSError if there is no answer in time."""
    t0 = time.perf_counter()
    if tls is not None:
        conn = http.client.HTTPSConnection(host, port, timeout=timeout, context=tls)
    else:
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        body = resp.read()
        return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, body,
                     time.perf_counter() - t0)
    finally:
        conn.close()


# --------------------------------------------------------------------------------------
# BPF programs as the kernel lists them
# --------------------------------------------------------------------------------------


def prog_ids_held_by(pid: int) -> set[int]:
    """IDs of the BPF programs a process holds, through program or link fds.

    Read from /proc/<pid>/fdinfo (``prog_id:``), which needs nothing from
    bpftool; program IDs are allocated cyclically, so an ID seen here and later
    missing from the kernel's list means that program was freed.
    """
    ids: set[int] = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except FileNotFoundError:
        return ids
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target not in ("anon_inode:bpf-prog", "anon_inode:bpf_link"):
                continue
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                for line in f:
                    if line.startswith("prog_id:"):
                        ids.add(int(line.split()[1]))
        except (FileNotFoundError, ProcessLookupError):
            continue  # the fd closed (or the process exited) while we looked
    return ids


def socket_fds(pid: int) -> dict[int, int]:
    """fd -> socket inode of ``pid``, from /proc/<pid>/fd: the ground truth.

    A busy process opens and closes sockets while we list them; an fd that is
    gone by the time we read its link is simply not in the answer.
    """
    out: dict[int, int] = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            continue
        if target.startswith("socket:["):
            out[int(fd)] = int(target[len("socket:["):-1])
    return out


def loaded_programs() -> list[dict[str, Any]]:
    """``bpftool prog show --json``: every BPF program in the kernel."""
    out = subprocess.run(["bpftool", "prog", "show", "--json"], capture_output=True,
                         text=True, check=True, timeout=30).stdout
    return json.loads(out or "[]")


def programs_of(pid: int, ids: set[int]) -> list[dict[str, Any]]:
    """Programs still loaded that belonged to ``pid``: by the IDs it held, and by
    bpftool's ``pids`` field when this bpftool was built with it."""
    left = []
    for prog in loaded_programs():
        owners = {p.get("pid") for p in prog.get("pids", [])}
        if prog["id"] in ids or pid in owners:
            left.append(prog)
    return left


def wait_programs_gone(pid: int, ids: set[int], timeout: float = 5.0) -> list[dict[str, Any]]:
    """The kernel frees a program after its last reference drops, in deferred work:
    poll briefly rather than read once."""
    deadline = time.monotonic() + timeout
    while True:
        left = programs_of(pid, ids)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


# --------------------------------------------------------------------------------------
# The daemon
# --------------------------------------------------------------------------------------


class DaemonFailed(Exception):
    pass


@dataclass
class Daemon:
    """A running ``sockwatch daemon`` with its stderr collected line by line."""

    proc: subprocess.Popen
    config_path: Path
    spawned_at: float  # time.monotonic() just before Popen
    port: int = 0
    scheme: str = "http"
    tls: ssl.SSLContext | None = None
    lines: list[str] = field(default_factory=list)
    _cond: threading.Condition = field(default_factory=threading.Condition)
    _reader: threading.Thread | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self.lines.append("")  # EOF marker, so waiters wake
            self._cond.notify_all()

    def log(self) -> str:
        with self._cond:
            return "\n".join(self.lines)

    def wait_log(self, pattern: str, timeout: float = 10.0, start: int = 0) -> re.Match | None:
        """The first log line at index >= ``start`` matching ``pattern`` (a regex)."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines[start:]:
                    m = rx.search(line)
                    if m:
                        return m
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and self.lines[-1:] == [""]):
                    return None
                self._cond.wait(min(left, 0.2))

    def log_mark(self) -> int:
        with self._cond:
            return len(self.lines)

    def get(self, path: str, **kw: Any) -> Reply:
        kw.setdefault("tls", self.tls)
        return http_get("127.0.0.1", self.port, path, **kw)

    def metrics(self) -> str:
        r = self.get("/metrics", timeout=30)  # a host with 200k sockets takes seconds
        assert r.status == 200, (r.status, r.body[:200])
        return r.text

    def prog_ids(self) -> set[int]:
        return prog_ids_held_by(self.pid)

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, then SIGKILL if it does not end in ``timeout``; always reaped."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            if self.wait(timeout) is None:
                self.proc.kill()
                self.proc.wait()
        if self._reader:
            self._reader.join(timeout=5)
        return self.proc.returncode


def spawn_daemon(config_path: Path, *args: str) -> Daemon:
    """Start the daemon without waiting for it (see ``start_daemon``)."""
    t0 = time.monotonic()
    proc = subprocess.Popen(
        sockwatch_cmd("daemon", "--config", str(config_path), *args),
        cwd=ROOT, env=daemon_env(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True,
    )
    d = Daemon(proc, config_path, t0)
    d._reader = threading.Thread(target=d._read_stderr, daemon=True)
    d._reader.start()
    return d


def start_daemon(config_dir: Path, config: dict[str, dict[str, Any]] | None = None,
                 *args: str, tls: ssl.SSLContext | None = None, timeout: float = 20.0,
                 name: str = "sockwatch") -> Daemon:
    """Write ``config`` (listen.address set to a free port), start the daemon and
    return once it logged that it is serving. Retries if the port was taken."""
    for attempt in range(5):
        cfg = {s: dict(v) for s, v in (config or {}).items()}
        cfg.setdefault("listen", {})["address"] = f"127.0.0.1:{free_port()}"
        path = config_dir / f"{name}.toml"
        path.write_text(to_toml(cfg))
        d = spawn_daemon(path, *args)
        d.tls = tls
        m = d.wait_log(READY_RE.pattern, timeout)
        if m:
            d.scheme, d.port = m.group(1), int(m.group(2))
            return d
        d.stop()
        if "cannot listen" in d.log() and attempt < 4:
            continue  # someone took the port between free_port() and bind()
        raise DaemonFailed(f"daemon did not start (exit {d.proc.returncode}):\n{d.log()}")
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------------------
# Named workload processes
# --------------------------------------------------------------------------------------

# Prepended to workload scripts: the process renames itself so the comm the
# kernel records (the ``process`` label) is one the test chose.
NAMED_PRELUDE = """\
import ctypes, json, os, socket, sys, time
NAME = sys.argv[1]
if ctypes.CDLL(None, use_errno=True).prctl(15, NAME.encode(), 0, 0, 0) != 0:  # PR_SET_NAME
    raise SystemExit("prctl failed")
def say(**kw):
    print(json.dumps(kw), flush=True)
def recv_exact(s, n):
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise EOFError(f"{len(buf)} of {n} bytes")
        buf += chunk
    return buf
"""


def spawn_named(name: str, script: str, *args: object) -> subprocess.Popen:
    """Run a Python snippet as a process whose comm is ``name`` (<= 15 chars)."""
    assert len(name) <= 15, "the kernel keeps 15 characters of a task name"
    return subprocess.Popen(
        [sys.executable, "-c", NAMED_PRELUDE + textwrap.dedent(script), name, *map(str, args)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def read_json_line(proc: subprocess.Popen, timeout: float = 30.0) -> dict[str, Any]:
    """The next JSON line a workload printed (fails with its stderr if it died)."""
    assert proc.stdout is not None
    result: list[str] = []
    t = threading.Thread(target=lambda: result.append(proc.stdout.readline()), daemon=True)
    t.start()
    t.join(timeout)
    if not result or not result[0]:
        reap(proc)
        raise AssertionError(f"workload printed nothing (exit {proc.returncode}): "
                             f"{proc.stderr.read() if proc.stderr else ''}")
    return json.loads(result[0])


def reap(proc: subprocess.Popen, timeout: float = 10.0) -> int:
    """Wait for a child, killing it if it does not end in time."""
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    for f in (proc.stdin, proc.stdout, proc.stderr):
        if f:
            try:
                f.close()
            except OSError:
                pass
    return proc.returncode


# --------------------------------------------------------------------------------------
# Prometheus
# --------------------------------------------------------------------------------------

PROMETHEUS = "/usr/bin/prometheus"
PROMTOOL = "/usr/bin/promtool"
POLICY_RC = Path("/usr/sbin/policy-rc.d")


def ensure_prometheus() -> str | None:
    """Make /usr/bin/prometheus and promtool available; the reason if we cannot.

    Installs the Debian package when missing and running as root, with a
    policy-rc.d that keeps the package's service from starting (we run the
    binary ourselves, never the system service).
    """
    if os.access(PROMETHEUS, os.X_OK) and os.access(PROMTOOL, os.X_OK):
        return None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return "prometheus is not installed and apt-get is not usable here (need root and apt)"
    made_policy = False
    if not POLICY_RC.exists():
        POLICY_RC.write_text("#!/bin/sh\n# sockwatch tests: do not start services\nexit 101\n")
        POLICY_RC.chmod(0o755)
        made_policy = True
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    try:
        cmd = ["apt-get", "install", "-y", "-q", "prometheus"]
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        if p.returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env, timeout=600)
            p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"apt-get install prometheus failed: {exc}"
    finally:
        if made_policy:
            POLICY_RC.unlink()
    if p.returncode != 0 or not os.access(PROMETHEUS, os.X_OK):
        tail = (p.stderr or p.stdout).strip().splitlines()[-1:] or ["?"]
        return f"apt-get install prometheus failed: {tail[0]}"
    return None


@dataclass
class Prometheus:
    proc: subprocess.Popen
    port: int
    log_path: Path

    def api(self, path: str, params: dict[str, str]) -> dict[str, Any]:
        """GET /api/v1/<path>: the decoded reply, a refused query's error reply included."""
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                return json.load(resp)
        except urllib.error.HTTPError as exc:  # 400/422 carry {"status": "error", ...}
            return json.load(exc)

    def query(self, promql: str) -> list[dict[str, Any]]:
        """Instant query through the HTTP API: the ``result`` vector."""
        doc = self.api("query", {"query": promql})
        assert doc["status"] == "success", doc
        return doc["data"]["result"]

    def scalar(self, promql: str) -> float | None:
        """The single value of a query, None if it returned no series."""
        res = self.query(promql)
        assert len(res) <= 1, f"{promql} returned {len(res)} series: {res}"
        return float(res[0]["value"][1]) if res else None

    def targets(self) -> list[dict[str, Any]]:
        url = f"http://127.0.0.1:{self.port}/api/v1/targets"
        with urllib.request.urlopen(url, timeout=10) as resp:
            return json.load(resp)["data"]["activeTargets"]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        return reap(self.proc, 20)


def start_prometheus(workdir: Path, target: str, scheme: str = "http",
                     interval: str = "1s") -> Prometheus:
    """Run /usr/bin/prometheus directly, scraping ``target`` every ``interval``."""
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = workdir / "prometheus.yml"
    cfg.write_text(textwrap.dedent(f"""\
        global:
          scrape_interval: {interval}
          scrape_timeout: {interval}
          evaluation_interval: {interval}
        scrape_configs:
          - job_name: sockwatch
            scheme: {scheme}
            static_configs:
              - targets: ['{target}']
        """))
    log_path = workdir / "prometheus.log"
    for attempt in range(5):
        port = free_port()
        with open(log_path, "w") as log:
            proc = subprocess.Popen(
                [PROMETHEUS, f"--config.file={cfg}", f"--storage.tsdb.path={workdir / 'data'}",
                 f"--web.listen-address=127.0.0.1:{port}", "--log.level=info"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=workdir)
        prom = Prometheus(proc, port, log_path)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=2) as r:
                    if r.status == 200:
                        return prom
            except OSError:
                pass
            time.sleep(0.1)
        prom.stop()
        text = log_path.read_text()
        if "address already in use" in text and attempt < 4:
            continue
        raise AssertionError(f"prometheus did not become ready:\n{text[-3000:]}")
    raise AssertionError("unreachable")
