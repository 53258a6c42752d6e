"""The daemon runs with exactly the capabilities the systemd unit grants, and no more.

systemd is not PID 1 on the test machines, so the unit cannot be started; it is
emulated instead: the capability set is read from systemd/sockwatch.service (the
test follows the unit), and ``setpriv`` starts ``sockwatch daemon`` as a fresh
non-root uid holding exactly that set as ambient capabilities, with the same
bounding set and no_new_privs. Ground truth is the test's own: a child process
running as *another* unprivileged uid holds a loopback connection, moves a known
number of bytes and makes refused connects; the restricted daemon must report its
pid, fds, bytes and failures as a root daemon would.

If the Python interpreter lives under a directory the daemon's uid cannot search
(here: a pyenv build under /root, mode 0700), the daemon would only reach it
through CAP_DAC_READ_SEARCH, and the negative controls would fail at exec instead of
in sockwatch. Such runs go through a private mount namespace (made by
``unshare``, gone with its last process) where that directory is replaced by a
tmpfs exposing only the interpreter's prefix. Nothing else changes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from tests.kernel import daemon_util as du
from sockwatch.kernel.loader import default_objects_dir

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "systemd" / "sockwatch.service"
DAEMON_UID = 61234  # the DynamicUser stand-in
OTHER_UID = 61235  # the owner of the connections the daemon must attribute
EXEC_START = "/usr/local/bin/sockwatch"

# linux/capability.h, in bit order.
CAP_NAMES = [
    "chown", "dac_override", "dac_read_search", "fowner", "fsetid", "kill", "setgid",
    "setuid", "setpcap", "linux_immutable", "net_bind_service", "net_broadcast",
    "net_admin", "net_raw", "ipc_lock", "ipc_owner", "sys_module", "sys_rawio",
    "sys_chroot", "sys_ptrace", "sys_pacct", "sys_admin", "sys_boot", "sys_nice",
    "sys_resource", "sys_time", "sys_tty_config", "mknod", "lease", "audit_write",
    "audit_control", "setfcap", "mac_override", "mac_admin", "syslog", "wake_alarm",
    "block_suspend", "audit_read", "perfmon", "bpf", "checkpoint_restore",
]
CAP_BIT = {name: bit for bit, name in enumerate(CAP_NAMES)}


def cap_mask(names: set[str]) -> int:
    return sum(1 << CAP_BIT[n] for n in names)


def cap_names(mask: int) -> set[str]:
    return {name for bit, name in enumerate(CAP_NAMES) if mask >> bit & 1}


# -- the unit ---------------------------------------------------------------------------------
def unit_setting(key: str) -> list[str]:
    """Tokens of ``key`` in [Service], accumulated over lines as systemd does."""
    tokens: list[str] = []
    section = None
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if line.startswith("["):
            section = line
        elif section == "[Service]" and line.startswith(key + "="):
            value = line.split("=", 1)[1].split()
            tokens = [] if not value else tokens + value  # an empty assignment resets
    return tokens


def unit_caps(key: str) -> set[str]:
    tokens = unit_setting(key)
    assert tokens, f"{UNIT.name} sets no {key}"
    assert not any(t.startswith("~") for t in tokens), f"{key}: inverted sets not handled"
    names = set()
    for tok in tokens:
        name = tok.lower().removeprefix("cap_")
        assert name in CAP_BIT, f"{key}: unknown capability {tok}"
        names.add(name)
    return names


@pytest.fixture(scope="module")
def service_caps() -> set[str]:
    bounding = unit_caps("CapabilityBoundingSet")
    ambient = unit_caps("AmbientCapabilities")
    # Ambient capabilities outside the bounding set would be dropped by systemd; the
    # emulation below relies on the two being the same, as the unit intends.
    assert ambient == bounding, (ambient, bounding)
    assert unit_setting("NoNewPrivileges") == ["yes"]
    assert unit_setting("DynamicUser") == ["yes"]
    return ambient


# -- running as another user -----------------------------------------------------------------
def _first_unsearchable(path: Path) -> Path | None:
    """The first directory on the way to ``path`` that 'other' may not search."""
    for parent in reversed(path.parents):
        if not os.stat(parent).st_mode & stat.S_IXOTH:
            return parent
    return None


def _readable_by_others(tree: Path) -> bool:
    return _first_unsearchable(tree) is None and bool(os.stat(tree).st_mode & stat.S_IROTH)


EXPOSE = textwrap.dedent("""\
    set -e
    stage=$1; blocked=$2; rel=$3; shift 3
    mount --bind "$blocked/$rel" "$stage"
    mount -t tmpfs -o mode=0755,size=1m sockwatch-test "$blocked"
    mkdir -p "$blocked/$rel"
    mount --move "$stage" "$blocked/$rel"
    exec "$@"
""")


class Runner:
    """Builds command lines that run as an unprivileged uid with given capabilities."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.prefix_dir = Path(os.path.realpath(sys.base_prefix))
        self.blocked = _first_unsearchable(self.prefix_dir / "bin")
        self.stage = workdir / "stage"
        self.stage.mkdir()

    def argv(self, uid: int, caps: set[str], cmd: list[str]) -> list[str]:
        caps_arg = ",".join(["-all"] + [f"+{c}" for c in sorted(caps)])
        setpriv = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
                   f"--inh-caps={caps_arg}", f"--ambient-caps={caps_arg}",
                   f"--bounding-set={caps_arg}", "--no-new-privs"]
        if self.blocked is None:
            return setpriv + cmd
        rel = self.prefix_dir.relative_to(self.blocked)
        return ["unshare", "--mount", "--propagation", "private", "sh", "-c", EXPOSE, "sh",
                str(self.stage), str(self.blocked), str(rel), *setpriv, *cmd]


@pytest.fixture
def runner() -> Iterator[Runner]:
    for tool in ("setpriv", "unshare"):
        if not shutil.which(tool):
            pytest.skip(f"needs {tool} (util-linux)")
    venv = Path(sys.prefix)
    for tree in (ROOT / "sockwatch", venv, default_objects_dir()):
        if not _readable_by_others(tree):
            pytest.skip(f"{tree} is not readable by an unprivileged uid; the emulated "
                        "service could not run it")
    workdir = Path(tempfile.mkdtemp(prefix="sockwatch-caps-"))
    os.chmod(workdir, 0o755)  # the daemon's uid reads its config here
    try:
        yield Runner(workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "COV_"))}
    env["PYTHONPATH"] = str(ROOT)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env["HOME"] = "/"
    env.setdefault("SOCKWATCH_BPF_DIR", str(default_objects_dir()))
    return env


CONFIG = """\
[probes]
# other tests and benchmarks may run beside this one: room for their records
ringbuf_bytes = 33554432
[tables]
reconcile_interval_seconds = 1.0
[metrics]
# their process names must not push ours into "other"
top_processes = 10000
"""


class Daemon:
    def __init__(self, proc: subprocess.Popen, port: int, log: Path):
        self.proc, self.port, self.log = proc, port, log
        self.pid = proc.pid

    def get(self, path: str, timeout: float = 10) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}",
                                        timeout=timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def json(self, path: str):
        status, body = self.get(path)
        assert status == 200, (path, status, body[:300])
        return json.loads(body)

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, timeout: float = 15) -> int:
        """SIGTERM and wait; the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"daemon {self.pid} ignored SIGTERM for {timeout}s: {self.stderr()}")


def spawn_daemon(runner: Runner, caps: set[str], port: int) -> tuple[subprocess.Popen, Path]:
    config = runner.workdir / "sockwatch.toml"
    config.write_text(CONFIG)
    os.chmod(config, 0o644)
    log = runner.workdir / f"daemon-{port}.log"
    cmd = [sys.executable, "-m", "sockwatch", "daemon", "--config", str(config),
           "--listen", f"127.0.0.1:{port}"]
    with open(log, "wb") as err:
        proc = subprocess.Popen(runner.argv(DAEMON_UID, caps, cmd), cwd=ROOT, env=base_env(),
                                stdin=subprocess.DEVNULL, stdout=err, stderr=err)
    return proc, log


@contextmanager
def restricted_daemon(runner: Runner, caps: set[str]) -> Iterator[Daemon]:
    port = free_port()
    proc, log = spawn_daemon(runner, caps, port)
    daemon = Daemon(proc, port, log)
    try:
        deadline = time.monotonic() + 20
        while True:
            if proc.poll() is not None:
                pytest.fail(f"daemon exited {proc.returncode} before serving: {daemon.stderr()}")
            try:
                status, body = daemon.get("/metrics", timeout=2)
                if status == 200 and b"sockwatch_build_info" in body:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"daemon never served /metrics: {daemon.stderr()}")
            time.sleep(0.05)
        yield daemon
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def proc_status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def loaded_programs() -> dict[int, dict]:
    out = subprocess.run(["bpftool", "prog", "show", "--json"], check=True,
                         capture_output=True, text=True, timeout=30).stdout
    return {p["id"]: p for p in json.loads(out or "[]")}


def programs_of(pid: int) -> set[int]:
    """Ids of the BPF programs ``pid`` holds: bpftool's "pids" field where bpftool was
    built with skeletons, and always the prog_id of its program and link fds."""
    ids = {i for i, p in loaded_programs().items()
           if any(o.get("pid") == pid for o in p.get("pids", []))}
    return ids | du.prog_ids_held_by(pid)


def assert_programs_gone(ids: set[int], within_s: float = 5.0) -> None:
    """The kernel frees a dead process's programs asynchronously (up to ~1 s here)."""
    deadline = time.monotonic() + within_s
    while True:
        left = ids & set(loaded_programs())
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert not left, f"BPF programs still loaded after the daemon exited: {sorted(left)}"


def root_probes() -> dict:
    proc = subprocess.run([sys.executable, "-m", "sockwatch", "probes", "--json"], cwd=ROOT,
                          env=base_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def plan_of(report: dict) -> list[tuple]:
    return [(h["hook"], h["mode"], tuple(h["programs"])) for h in report["hooks"]]


# -- 1. the unit itself ------------------------------------------------------------------------
def test_unit_verifies():
    if not os.path.exists(EXEC_START):
        pytest.skip(f"{EXEC_START} is missing (scripts/install.sh installs it); "
                    "systemd-analyze verify checks that ExecStart exists")
    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze is not installed")
    proc = subprocess.run(["systemd-analyze", "verify", str(UNIT)], capture_output=True,
                          text=True, timeout=60)
    complaints = [line for line in (proc.stdout + proc.stderr).splitlines()
                  if UNIT.name in line]
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert complaints == [], complaints


def test_unit_security_exposure_is_ok():
    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze is not installed")
    proc = subprocess.run(["systemd-analyze", "security", "--offline=true", "--no-pager",
                           str(UNIT)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    m = re.search(r"Overall exposure level for sockwatch\.service:\s*([0-9.]+)\s+(\w+)",
                  proc.stdout)
    assert m, proc.stdout[-500:]
    exposure, verdict = float(m.group(1)), m.group(2)
    print(f"systemd-analyze security: exposure {exposure} {verdict}")
    assert exposure <= 4.0, f"exposure {exposure} {verdict}: worse than OK\n{proc.stdout}"
    assert verdict in ("OK", "SAFE", "PERFECT"), verdict


PROTECT_HOME = textwrap.dedent("""\
    set -e
    for d in /home /root /run/user; do
        [ -d "$d" ] && mount -t tmpfs -o mode=000,size=4k sockwatch-protecthome "$d"
    done
    exec "$@"
""")


def test_exec_start_runs_under_protect_home(service_caps):
    """The unit hides /home, /root and /run/user (ProtectHome=yes): the installed
    ExecStart, its interpreter and its libraries must live elsewhere, or the service
    fails at exec (status 203/EXEC) before sockwatch runs. Emulated with a private
    mount namespace where those directories are empty and mode 000, as systemd does."""
    if unit_setting("ProtectHome") not in (["yes"], ["true"], ["read-only"], ["tmpfs"]):
        pytest.skip("the unit does not protect /home")
    if not os.path.exists(EXEC_START):
        pytest.skip(f"{EXEC_START} is missing (scripts/install.sh installs it)")
    exec_start = unit_setting("ExecStart")
    assert exec_start[0] == EXEC_START, exec_start
    caps_arg = ",".join(["-all"] + [f"+{c}" for c in sorted(service_caps)])
    proc = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", PROTECT_HOME, "sh",
         "setpriv", f"--reuid={DAEMON_UID}", f"--regid={DAEMON_UID}", "--clear-groups",
         f"--inh-caps={caps_arg}", f"--ambient-caps={caps_arg}", f"--bounding-set={caps_arg}",
         "--no-new-privs", EXEC_START, "--version"],
        cwd="/", capture_output=True, text=True, timeout=60, env={"PATH": os.defpath})
    chain = [EXEC_START]
    path = os.path.realpath(EXEC_START)
    with open(path, "rb") as f:
        head = f.readline()
    if head.startswith(b"#!"):
        interp = head[2:].split()[0].decode()
        chain += [f"#! {interp}", os.path.realpath(interp)]
    assert proc.returncode == 0 and proc.stdout.startswith("sockwatch "), (
        f"with ProtectHome=yes the service cannot start: exit {proc.returncode}, "
        f"{proc.stderr.strip()!r}; exec chain {' -> '.join(chain)}")


# -- 2. the capabilities the daemon actually holds -------------------------------------------
def test_daemon_holds_exactly_the_unit_capabilities(runner, service_caps):
    want = cap_mask(service_caps)
    expected_plan = plan_of(root_probes())
    with restricted_daemon(runner, service_caps) as d:
        st = proc_status(d.pid)
        held = {k: int(st[k], 16) for k in ("CapEff", "CapPrm", "CapBnd", "CapAmb", "CapInh")}
        print(f"daemon pid {d.pid} uid {st['Uid']}: "
              + ", ".join(f"{k}={v:#x}" for k, v in held.items())
              + f" = {sorted(cap_names(held['CapEff']))}")
        for key in ("CapEff", "CapPrm", "CapBnd", "CapAmb"):
            assert held[key] == want, (
                f"{key} {held[key]:#x} = {sorted(cap_names(held[key]))}, "
                f"unit grants {want:#x} = {sorted(service_caps)}")
        uids = [int(u) for u in st["Uid"].split()]
        gids = [int(g) for g in st["Gid"].split()]
        assert uids == [DAEMON_UID] * 4 and 0 not in uids, st["Uid"]
        assert gids == [DAEMON_UID] * 4, st["Gid"]
        assert st["Groups"].strip() == "", st["Groups"]
        assert st["NoNewPrivs"].strip() == "1"

        # Every hook attaches as it would for root.
        report = d.json("/api/probes")
        assert report["error"] is None
        assert plan_of(report) == expected_plan, (plan_of(report), expected_plan)
        modes = {h: m for h, m, _ in plan_of(report)}
        assert modes["state"] in ("tp_btf", "raw_tp", "tracepoint"), modes
        assert modes["snapshot"] == "iter", modes
        print("attach plan (restricted = root):", modes)

        ids = programs_of(d.pid)
        assert ids, "the daemon holds no BPF program"
        print(f"daemon {d.pid} holds BPF programs {sorted(ids)}")
        status = d.stop()
        assert status == 0, d.stderr()
    assert "Traceback" not in d.stderr(), d.stderr()
    assert_programs_gone(ids)


# -- 3. what it sees with those capabilities -------------------------------------------------
CHILD = textwrap.dedent("""\
    import ctypes, json, os, socket, sys
    name, n_up, n_down, n_refused = sys.argv[1], *map(int, sys.argv[2:5])
    ctypes.CDLL(None).prctl(15, name.encode(), 0, 0, 0)   # PR_SET_NAME: a label of our own
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]
    cli = socket.create_connection(("127.0.0.1", port))
    acc, _ = srv.accept()

    def recv_exactly(s, n):
        got = 0
        while got < n:
            chunk = s.recv(min(65536, n - got))
            assert chunk
            got += len(chunk)

    cli.sendall(b"u" * n_up); recv_exactly(acc, n_up)
    acc.sendall(b"d" * n_down); recv_exactly(cli, n_down)
    # A port held by a socket that never listens: every SYN to it gets a RST.
    closed = socket.socket(); closed.bind(("127.0.0.1", 0))
    refused = 0
    for _ in range(n_refused):
        s = socket.socket()
        try:
            s.connect(closed.getsockname())
        except ConnectionRefusedError:
            refused += 1
        s.close()
    print(json.dumps({"pid": os.getpid(), "uid": os.getuid(), "port": port,
                      "client_port": cli.getsockname()[1], "client_fd": cli.fileno(),
                      "server_fd": acc.fileno(), "listener_fd": srv.fileno(),
                      "refused": refused}), flush=True)
    sys.stdin.readline()
""")


@contextmanager
def other_user_child(runner: Runner, name: str, up: int, down: int,
                     refused: int) -> Iterator[dict]:
    cmd = [sys.executable, "-c", CHILD, name, str(up), str(down), str(refused)]
    proc = subprocess.Popen(runner.argv(OTHER_UID, set(), cmd), cwd="/", env=base_env(),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        if not line:
            proc.wait(10)
            pytest.fail(f"child failed (exit {proc.returncode}): {proc.stderr.read()}")
        info = json.loads(line)
        assert info["pid"] == proc.pid and info["uid"] == OTHER_UID
        yield info
    finally:
        try:
            proc.communicate(input="\n", timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()


def wait_for(what: str, check, timeout: float = 20, interval: float = 0.2):
    """Poll ``check()`` until it returns a true value; fail with its last answer."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        ok, last = check()
        if ok:
            return last
        time.sleep(interval)
    pytest.fail(f"{what}: still {last!r} after {timeout}s")


def metric_value(text: str, name: str, **labels: str) -> float | None:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    m = re.search(rf"^{name}\{{{re.escape(want)}\}} (\S+)$", text, re.M)
    return float(m.group(1)) if m else None


def test_restricted_daemon_attributes_another_users_connections(runner, service_caps):
    up, down, refused = 123457, 65537, 2
    comm = f"swcap{os.getpid() % 100000}"
    with restricted_daemon(runner, service_caps) as d:
        with other_user_child(runner, comm, up, down, refused) as child:
            assert child["refused"] == refused
            pid = child["pid"]
            expected = {
                "client": {"fd": child["client_fd"], "bytes_sent": up, "bytes_received": down},
                "server": {"fd": child["server_fd"], "bytes_sent": down, "bytes_received": up},
                "listener": {"fd": child["listener_fd"]},
            }

            def rows():
                got = d.json(f"/api/connections?port={child['port']}")
                mine = {r["role"]: {k: r[k] for k in expected[r["role"]]} | {"pid": r["pid"],
                        "uid": r["uid"], "process": r["process"]}
                        for r in got if r["role"] in expected
                        and (r["role"] != "client" or r["local_port"] == child["client_port"])}
                want = {role: v | {"pid": pid, "uid": OTHER_UID, "process": comm}
                        for role, v in expected.items()}
                return mine == want, mine

            seen = wait_for("the other user's connection in /api/connections", rows)
            print(f"child pid {pid} uid {OTHER_UID}: {seen}")

            def refused_metric():
                text = d.get("/metrics")[1].decode()
                got = (metric_value(text, "sockwatch_connects_total", process=comm,
                                    result="refused"),
                       metric_value(text, "sockwatch_connects_total", process=comm,
                                    result="ok"))
                return got == (float(refused), 1.0), got

            got = wait_for("refused connects in /metrics", refused_metric)
            print(f'sockwatch_connects_total{{process="{comm}"}} refused, ok = {got}')
        ids = programs_of(d.pid)
        assert ids, "the daemon holds no BPF program"
        print(f"daemon {d.pid} holds BPF programs {sorted(ids)}")
        status = d.stop()
        assert status == 0, d.stderr()
    assert "Traceback" not in d.stderr(), d.stderr()
    assert_programs_gone(ids)


# -- 4. the negative control -----------------------------------------------------------------
def test_without_perfmon_the_daemon_fails_in_one_line(runner, service_caps):
    assert "perfmon" in service_caps and "bpf" in service_caps
    proc, log = spawn_daemon(runner, {"bpf"}, free_port())
    try:
        status = proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = log.read_text(errors="replace")
    print(f"exit {status}: {err.strip()}")
    assert status == 1, err
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("sockwatch:"), err
    assert "CAP_PERFMON" in lines[0] and f"uid {DAEMON_UID}" in lines[0], err
