"""The real ``sockwatch top`` in a real terminal (tmux), with a real workload.

The workload is a named process that keeps three loopback connections echoing
data, opens a short connection every few milliseconds and fails a connect to a
bound but not listening port. Each test checks what top shows against what the
workload knows (its pid, port, fds from /proc) and kills every process and the
tmux server it started. Other sockwatch runs may share the host: everything is
filtered by the workload's pid or port.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import time
import uuid
from pathlib import Path
from typing import Callable, Iterator

import psutil
import pytest

from tests.kernel import daemon_util as du

ROOT = Path(__file__).resolve().parents[2]
NAME = "swtop-work"

WORKLOAD = """
import threading
srv = socket.create_server(("127.0.0.1", 0), backlog=128)
port = srv.getsockname()[1]
closed = socket.socket()
closed.bind(("127.0.0.1", 0))  # bound, never listening: connects to it are refused
refused = closed.getsockname()[1]

def echo(c):
    try:
        while data := c.recv(65536):
            c.sendall(data)
    except OSError:
        pass
    c.close()

def accept():
    while True:
        c, _ = srv.accept()
        threading.Thread(target=echo, args=(c,), daemon=True).start()

threading.Thread(target=accept, daemon=True).start()
keep = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
say(port=port, refused=refused)
chunk = b"x" * 32768
while True:
    for k in keep:
        k.sendall(chunk)
        recv_exact(k, len(chunk))
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"hi")
    recv_exact(s, 2)
    s.close()
    try:
        socket.create_connection(("127.0.0.1", refused), timeout=1).close()
    except OSError:
        pass
    time.sleep(0.02)
"""


@pytest.fixture
def workload() -> Iterator[tuple[psutil.Process, int]]:
    proc = du.spawn_named(NAME, WORKLOAD)
    try:
        info = du.read_json_line(proc)
        yield psutil.Process(proc.pid), info["port"]
    finally:
        proc.kill()
        du.reap(proc)


def top_cmd(*args: str) -> list[str]:
    return du.sockwatch_cmd("top", *args)


class Tmux:
    """A private tmux server (its own socket) running one command in one pane."""

    def __init__(self, cmd: list[str], width: int, height: int):
        if not shutil.which("tmux"):
            pytest.skip("tmux is not installed (scripts/install.sh --test installs it)")
        self.sock = f"swtop-{uuid.uuid4().hex[:8]}"
        env = du.daemon_env()
        line = " ".join(f"{k}={shlex.quote(env[k])}" for k in ("PYTHONPATH", "SOCKWATCH_BPF_DIR"))
        self.tmux("new-session", "-d", "-s", "t", "-x", str(width), "-y", str(height),
                  "-c", str(ROOT),
                  f"env {line} TERM=xterm-256color {shlex.join(cmd)}; echo top-exit=$?; sleep 60")
        # a detached session starts at tmux's default size whatever -x/-y say
        self.tmux("resize-window", "-t", "t", "-x", str(width), "-y", str(height))
        self.pid = int(self.tmux("display-message", "-p", "-t", "t", "#{pane_pid}"))

    def tmux(self, *args: str) -> str:
        return subprocess.run(["tmux", "-L", self.sock, *args], check=True, capture_output=True,
                              text=True, timeout=10).stdout.rstrip("\n")

    def keys(self, *keys: str, literal: bool = False) -> None:
        self.tmux("send-keys", "-t", "t", *(["-l"] if literal else []), *keys)

    def screen(self) -> list[str]:
        """Every row of the pane, blank ones included."""
        rows = int(self.tmux("display-message", "-p", "-t", "t", "#{pane_height}"))
        lines = self.tmux("capture-pane", "-p", "-t", "t").splitlines()
        return lines + [""] * (rows - len(lines))

    def exited(self) -> str | None:
        """top's exit status once it has ended (the shell prints it), else None."""
        m = re.search(r"top-exit=(\d+)", "\n".join(self.screen()))
        return m.group(1) if m else None

    def wait_exit(self, timeout: float = 10) -> str | None:
        deadline = time.monotonic() + timeout
        while self.exited() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        return self.exited()

    def wait(self, what: str, ok: Callable[[list[str]], bool], timeout: float = 20) -> list[str]:
        deadline = time.monotonic() + timeout
        while True:
            lines = self.screen()
            if ok(lines):
                return lines
            if self.exited() is not None or time.monotonic() > deadline:
                raise AssertionError(f"waiting for {what}; screen:\n" + "\n".join(lines))
            time.sleep(0.2)

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.sock, "kill-server"], capture_output=True, timeout=10)
        try:
            psutil.Process(self.pid).wait(10)
        except psutil.NoSuchProcess:
            pass
        except psutil.TimeoutExpired:
            psutil.Process(self.pid).kill()


@pytest.fixture
def tmux_top() -> Iterator[Callable[..., Tmux]]:
    made: list[Tmux] = []

    def start(*args: str, width: int = 200, height: int = 40) -> Tmux:
        t = Tmux(top_cmd(*args), width, height)
        made.append(t)
        return t

    yield start
    for t in made:
        t.close()


def header_index(lines: list[str], first: str) -> int:
    return next(i for i, ln in enumerate(lines) if ln.split()[:1] == [first])


def table(lines: list[str], first: str = "PID") -> tuple[list[str], list[list[str]]]:
    """Column titles (sort marker dropped) and the rows under them, split on blanks."""
    i = header_index(lines, first)
    titles = [t.lstrip("v^") for t in lines[i].split()]
    body = []
    for ln in lines[i + 1:-1]:
        if not ln.strip():
            break
        body.append(ln.split())
    return titles, body


def row_of(lines: list[str], pid: int) -> dict[str, str] | None:
    titles, body = table(lines)
    for cells in body:
        if cells[0] == str(pid):
            return dict(zip(titles, cells))
    return None


def nonzero(cell: str) -> bool:
    return cell not in ("0", "-")


def view_bar(lines: list[str]) -> str:
    return lines[3]


def test_top_in_tmux_keys_views_resize_and_quit(workload, tmux_top):
    proc, port = workload
    pid = proc.pid
    t = tmux_top("--interval", "1")

    def busy(lines: list[str]) -> bool:
        if not any(ln.lstrip().startswith("PID") for ln in lines):
            return False
        row = row_of(lines, pid)
        return bool(row) and nonzero(row["TX/s"]) and nonzero(row["RX/s"])

    lines = t.wait("the workload with byte rates", busy)
    assert lines[0].startswith("sockwatch top - probes attached here - every 1s")
    row = row_of(lines, pid)
    assert row.get("PROCESS") == NAME and row.get("USER") == "root", "\n".join(lines)
    # listener + 3 kept connections, both ends in this one process
    assert int(row["CONN"]) >= 7 and int(row["EST"]) >= 6 and int(row["LSN"]) == 1, row
    assert nonzero(row["OUT/s"]) and nonzero(row["IN/s"]) and nonzero(row["FL/s"]), row
    assert row["HS50"] != "-", row  # the short connections' handshakes
    assert "q quit" in lines[-1] and "/ filter" in lines[-1]

    # sort: "<" moves the sort column left, from TX/s to CONN; "r" reverses it
    titles = table(lines)[0]
    t.keys(*["<"] * (titles.index("TX/s") - titles.index("CONN")))
    lines = t.wait("sorted by CONN", lambda ls: "vCONN" in ls[4])
    conns = [int(r[table(lines)[0].index("CONN")]) for r in table(lines)[1]]
    assert conns == sorted(conns, reverse=True) and len(conns) > 1
    t.keys("r")
    lines = t.wait("sorted by CONN ascending", lambda ls: "^CONN" in ls[4])
    conns = [int(r[table(lines)[0].index("CONN")]) for r in table(lines)[1]]
    assert conns == sorted(conns)

    # filter by pid: only the workload is left
    t.keys("/")
    t.keys(str(pid), literal=True)
    t.keys("Enter")
    lines = t.wait("filtered", lambda ls: f"filter: {pid}" in view_bar(ls)
                   and len(table(ls)[1]) == 1)
    assert table(lines)[1][0][0] == str(pid)

    # drill down: the workload's fds, sockets and 5-tuples
    t.keys("Enter")
    def drilled(ls: list[str]) -> bool:
        """The drill-down, once /proc has named the fds of the workload's clients
        (a frame drawn before that shows "-" for them)."""
        if f"[2:{pid} {NAME}]" not in view_bar(ls) or ls[4].split()[:1] != ["FD"]:
            return False
        titles, body = table(ls, "FD")
        clients = [dict(zip(titles, r)) for r in body]
        return all(r["FD"] != "-" for r in clients if r["REMOTE"] == f"127.0.0.1:{port}")

    lines = t.wait("the drill-down", drilled)
    titles, body = table(lines, "FD")
    rows = [dict(zip(titles, r)) for r in body]
    socket_fds = du.socket_fds(pid)
    listening = [r for r in rows if r["STATE"] == "LISTEN"]
    assert [r["LOCAL"] for r in listening] == [f"127.0.0.1:{port}"], rows
    established = [r for r in rows if r["STATE"] == "ESTAB"]
    assert len(established) >= 6
    kept = [r for r in established if r["REMOTE"] == f"127.0.0.1:{port}"]
    assert len(kept) >= 3 and all(int(r["FD"]) in socket_fds for r in kept), rows
    assert any(nonzero(r["TX/s"]) for r in kept), rows
    assert all(r["RTT"] != "-" for r in established)

    t.keys("Escape")
    t.wait("back to processes", lambda ls: "[1:processes]" in view_bar(ls))

    # listeners: the workload's port with its accept rate
    t.keys("3")
    lines = t.wait("listeners", lambda ls: "[3:listeners]" in view_bar(ls)
                   and ls[4].split()[:1] == ["PID"])
    t.keys("c")  # clear the filter
    lines = t.wait("the workload's listener accepting", lambda ls: any(
        r[:1] == [str(pid)] and str(port) in r and nonzero(r[-2]) for r in table(ls)[1]))
    titles = table(lines)[0]
    assert titles[-2:] == ["ACC/s", "AQW50"]

    # latency: the kernel's handshake histograms
    t.keys("4")
    lines = t.wait("latency", lambda ls: any("handshake_client" in ln for ln in ls))
    hs = next(ln for ln in lines if "handshake_client" in ln).split()
    assert int(hs[1]) > 0 and hs[2] != "-"

    # help, then what each column shows, then any key closes it
    t.keys("?")
    t.wait("help", lambda ls: any("this help" in ln for ln in ls))
    t.keys("?")
    t.wait("column help", lambda ls: ls[0].startswith("Columns of the latency view")
           and ls[1].split()[:1] == ["DIR"])
    t.keys("x")
    t.wait("help closed", lambda ls: "[4:latency]" in view_bar(ls))

    # pause freezes the rows (the title says so); space again resumes
    t.keys("1")
    t.keys("space")
    t.wait("paused", lambda ls: "PAUSED" in ls[0])
    frozen = [ln for ln in t.screen()[1:-1]]
    time.sleep(2.5)  # two refreshes of a busy workload
    assert [ln for ln in t.screen()[1:-1]] == frozen
    t.keys("space")
    t.wait("resumed", lambda ls: "every 1s" in ls[0])

    # the refresh interval
    t.keys("+")
    t.wait("slower refresh", lambda ls: "every 2s" in ls[0])

    # resize: 80x24 (the minimum), smaller than that, and larger; never a crash
    for w, h in ((80, 24), (50, 12), (160, 50), (80, 24)):
        t.tmux("resize-window", "-t", "t", "-x", str(w), "-y", str(h))
        lines = t.wait(f"redrawn at {w}x{h}", lambda ls: len(ls) == h
                       and ls[0].startswith("sockwatch top") and ls[-1].startswith("q"))
        assert all(len(ln) <= w for ln in lines)
        assert t.exited() is None
    assert "q:quit" in lines[-1] and table(lines)[1]

    t.keys("q")
    assert t.wait_exit() == "0"
    # the terminal is back as it was: nothing of top's screen is left on it
    assert [ln for ln in t.screen() if ln.strip()] == ["top-exit=0"]


def test_top_ctrl_c_leaves_cleanly(tmux_top):
    t = tmux_top("--interval", "1", width=80, height=24)
    t.wait("the first screen", lambda ls: ls[0].startswith("sockwatch top"))
    t.keys("C-c")
    assert t.wait_exit() == "0"
    assert [ln for ln in t.screen() if ln.strip()] == ["top-exit=0"]


def run_top(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(top_cmd(*args), cwd=ROOT, env=du.daemon_env(COLUMNS="200"),
                          capture_output=True, text=True, timeout=60)


def test_top_once_and_json_show_the_workload(workload):
    proc, port = workload
    pid = proc.pid
    out = run_top("--once", "--interval", "1", "--pid", str(pid))
    assert out.returncode == 0, out.stderr
    assert "\x1b" not in out.stdout
    lines = out.stdout.splitlines()
    row = row_of(lines + [""], pid)
    assert row and row["PROCESS"] == NAME and nonzero(row["TX/s"]) and nonzero(row["RX/s"]), \
        out.stdout
    assert int(row["LSN"]) == 1

    out = run_top("--once", "--interval", "1", "--pid", str(pid), "--view", "connections")
    assert out.returncode == 0, out.stderr
    titles, body = table(out.stdout.splitlines() + [""], "FD")
    locals_ = {dict(zip(titles, r))["LOCAL"] for r in body}
    assert f"127.0.0.1:{port}" in locals_

    out = run_top("--once", "--json", "--interval", "1", "--port", str(port))
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    (mine,) = [p for p in doc["processes"] if p["pid"] == pid]
    assert mine["process"] == NAME and mine["sent_bytes_per_s"] > 0
    assert mine["accepts_per_s"] > 0 and mine["connects_per_s"] > 0
    # ground truth: the kernel's own list of the process's sockets
    inodes = set(du.socket_fds(pid).values())
    listed = {s["ino"] for s in mine["sockets"]
              if s["local_port"] == port and s["state"] == "ESTAB"}
    assert len(listed) >= 3 and listed <= inodes | {0}
    (listener,) = [ln for ln in doc["listeners"] if ln["pid"] == pid]
    assert listener["local_port"] == port and listener["accepts_per_s"] > 0
    # the waits measured in the kernel: accept() of the short connections, and the
    # receive queue of the echoed data (stack probes, when this kernel runs them)
    assert listener["accept_wait_p50_us"] > 0
    if doc["latency"]["enabled"]:
        assert 0 < mine["rcvq_wait_p50_us"] <= mine["rcvq_wait_max_us"]


def test_top_reads_a_daemon(workload, tmp_path, tmux_top):
    proc, port = workload
    d = du.start_daemon(tmp_path)
    try:
        t = tmux_top("--interval", "1", "--url", d.url, width=160, height=24)
        t.wait("the workload read from the daemon", lambda ls: ls[0].startswith(
            f"sockwatch top - daemon {d.url}") and row_of(ls, proc.pid) is not None)
        out = run_top("--once", "--interval", "1", "--url", d.url, "--pid", str(proc.pid))
        assert out.returncode == 0, out.stderr
        lines = out.stdout.splitlines()
        assert lines[0].startswith(f"sockwatch top - daemon {d.url}")
        row = row_of(lines + [""], proc.pid)
        assert row and row["PROCESS"] == NAME and nonzero(row["TX/s"]), out.stdout
        assert nonzero(row["OUT/s"]) and nonzero(row["FL/s"])
        lat = d.get("/api/latency").json()
        layers = {ly["layer"]: ly for ly in lat["layers"]}
        assert layers["handshake_client"]["count"] > 0
        assert layers["handshake_client"]["p50_seconds"] > 0
        assert set(d.get("/api/loss").json()) >= {"ringbuf_full", "decode_errors"}
    finally:
        d.stop()
    # the daemon went away under the live view: the terminal is restored, one line, exit 1
    assert t.wait_exit() == "1"
    (line, status) = [ln for ln in t.screen() if ln.strip()]
    assert line.startswith(f"sockwatch: cannot reach a sockwatch daemon at {d.url}")
    assert status == "top-exit=1"
    # and so does a fresh start
    out = run_top("--once", "--url", d.url)
    assert out.returncode == 1 and out.stdout == ""
    assert re.fullmatch(r"sockwatch: cannot reach a sockwatch daemon at \S+: .*\n", out.stderr)
