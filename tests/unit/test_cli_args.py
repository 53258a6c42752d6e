"""Command-line errors: exit status 2 for bad arguments, 1 for no privileges, one line each.

Every failure must reach the user as exactly one ``sockwatch: ...`` line on
stderr and a status a script can test, never a traceback. All of these run
in-process and stop before anything touches libbpf: the commands themselves
are replaced by stubs that fail the test if reached.
"""

from __future__ import annotations

import pytest

from sockwatch import cli
from sockwatch.errors import NotPrivilegedError


@pytest.fixture(autouse=True)
def no_real_commands(monkeypatch):
    """Whatever happens, no test here may load BPF: reaching a command is recorded instead."""
    calls = []

    def stub(name):
        def run(args):
            calls.append((name, args))
            return 0
        return run

    for name in list(cli.COMMANDS):
        monkeypatch.setitem(cli.COMMANDS, name, stub(name))
    return calls


@pytest.fixture
def privileged(monkeypatch):
    monkeypatch.setattr(cli.os, "geteuid", lambda: 0)


@pytest.fixture
def unprivileged(monkeypatch):
    monkeypatch.setattr(cli.os, "geteuid", lambda: 1000)
    monkeypatch.setattr(cli, "_effective_caps", lambda: 0)


def _one_error_line(capsys, prefix="sockwatch:") -> str:
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert len(lines) == 1, f"expected one stderr line, got: {err!r}"
    assert lines[0].startswith(prefix)
    assert "Traceback" not in err and out == ""
    return lines[0]


BAD_ARGS = [
    (["table", "--port", "0"], "--port"),
    (["table", "--port", "70000"], "--port"),
    (["trace", "--port", "-5"], "--port"),
    (["table", "--port", "http"], "--port"),
    (["table", "--pid", "abc"], "--pid"),
    (["table", "--pid", "0"], "--pid"),
    (["table", "--state", "bogus"], "--state"),
    (["table", "--attach", "nonsense"], "--attach"),
    (["probes", "--attach", "nonsense"], "--attach"),
    (["trace", "--count", "0"], "--count"),
    (["trace", "--count", "many"], "--count"),
    (["trace", "--duration", "-1"], "--duration"),
    (["trace", "--duration", "0"], "--duration"),
    (["trace", "--duration", "nan"], "--duration"),
    (["table", "--watch", "-3"], "--watch"),
    (["table", "--comm"], "--comm"),
    (["table", "--bogus-flag"], "--bogus-flag"),
    (["probes", "--pid", "1"], "--pid"),  # probes takes no filters
    (["latency", "--interface", ""], "--interface"),
    (["latency", "--interface", "has space"], "--interface"),
    (["latency", "--interface", "a/b"], "--interface"),
    (["latency", "--interface", "sixteen-chars-xx"], "--interface"),  # IFNAMSIZ is 16 with NUL
    (["latency", "--interface", "eth0@netns"], "--interface"),
    (["latency", "--interval", "0"], "--interval"),
    (["latency", "--interval", "soon"], "--interval"),
    (["latency", "--url"], "--url"),
    (["latency", "--state", "listen"], "--state"),  # latency takes no row filters
    (["table", "--latency", "yes"], "yes"),
    ([], "required"),
    (["bogus"], "bogus"),
]


@pytest.mark.parametrize("argv, mention", BAD_ARGS, ids=[" ".join(a) or "<none>" for a, _ in BAD_ARGS])
def test_bad_arguments_exit_2_with_one_line(argv, mention, capsys, privileged, no_real_commands):
    """Bad arguments: status 2, one line naming the offending option, nothing run."""
    assert cli.main(argv) == 2
    line = _one_error_line(capsys)
    assert mention in line
    assert no_real_commands == []


@pytest.mark.parametrize("argv", [["table", "--port", "0"], []])
def test_usage_errors_win_over_missing_privileges(argv, capsys, unprivileged):
    """An unprivileged user who mistyped gets the usage error (2), not a privilege error."""
    assert cli.main(argv) == 2
    assert "CAP_BPF" not in _one_error_line(capsys)


@pytest.mark.parametrize(
    "argv, extra",
    [(["table"], "--state"), (["trace"], "--count"), (["probes"], "--attach")],
)
def test_subcommand_help_exits_0_with_examples(argv, extra, capsys, no_real_commands):
    with pytest.raises(SystemExit) as info:
        cli.main(argv + ["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out
    assert f"sockwatch {argv[0]}" in out.split("examples:", 1)[1]
    assert extra in out
    assert no_real_commands == []


def test_top_level_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert all(cmd in out for cmd in ("table", "trace", "probes"))


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"sockwatch {cli.__version__}"


@pytest.mark.parametrize("argv", [["table"], ["trace", "--count", "3"], ["probes", "--json"]])
def test_without_privileges_returns_1_with_one_line(argv, capsys, unprivileged,
                                                    no_real_commands):
    """No root and no capabilities: status 1 and a line saying what is needed, before any BPF."""
    assert cli.main(argv) == 1
    line = _one_error_line(capsys)
    assert "CAP_BPF" in line and "CAP_PERFMON" in line and "root" in line
    assert no_real_commands == []


def test_valid_arguments_reach_the_command(capsys, privileged, no_real_commands):
    """The parsed namespace handed to the command carries the normalized values."""
    assert cli.main(["table", "--state", "established", "--port", "443", "--pid", "7",
                     "--pid", "8", "--attach", "raw_tp", "--json"]) == 0
    [(name, args)] = no_real_commands
    assert name == "table"
    assert (args.state, args.port, args.pid, args.attach, args.json) == (
        "ESTAB", 443, [7, 8], "raw_tp", True)
    flt = cli._filter(args)
    assert flt.pids == frozenset({7, 8}) and flt.state == "ESTAB" and flt.port == 443
    assert cli._loader_config(args).attach_mode == "raw_tp"
    assert capsys.readouterr().err == ""


def test_command_error_is_one_line_with_its_exit_code(capsys, privileged, monkeypatch):
    """A SockwatchError raised by a command becomes one stderr line and its exit code."""
    def boom(args):
        raise NotPrivilegedError("nope")
    monkeypatch.setitem(cli.COMMANDS, "table", boom)
    assert cli.main(["table"]) == 1
    assert _one_error_line(capsys) == "sockwatch: nope"


# -- require_bpf_privileges itself ---------------------------------------------------------

BIT = lambda *caps: sum(1 << c for c in caps)  # noqa: E731


@pytest.mark.parametrize(
    "euid, caps, allowed",
    [
        (0, 0, True),  # root: capabilities not even read
        (1000, BIT(cli.CAP_SYS_ADMIN), True),
        (1000, BIT(cli.CAP_BPF, cli.CAP_PERFMON), True),
        (1000, BIT(cli.CAP_BPF), False),
        (1000, BIT(cli.CAP_PERFMON), False),
        (1000, BIT(0, 1, 2, 12, 13), False),  # chown, dac_override, ..., net_admin, net_raw
        (1000, 0, False),
    ],
)
def test_require_bpf_privileges(monkeypatch, euid, caps, allowed):
    monkeypatch.setattr(cli.os, "geteuid", lambda: euid)

    def read_caps():
        assert euid != 0, "root must not need /proc/self/status"
        return caps

    monkeypatch.setattr(cli, "_effective_caps", read_caps)
    if allowed:
        cli.require_bpf_privileges()
    else:
        with pytest.raises(NotPrivilegedError, match="CAP_BPF and CAP_PERFMON"):
            cli.require_bpf_privileges()


def test_effective_caps_parses_capeff(monkeypatch, tmp_path):
    """CapEff is hex in /proc/self/status; a wrong base would grant or deny at random."""
    status = tmp_path / "status"
    status.write_text("Name:\tx\nCapInh:\t0000000000000000\nCapPrm:\t000000c000000000\n"
                      "CapEff:\t000000c000200000\nCapBnd:\t000001ffffffffff\n")
    real_open = open
    monkeypatch.setattr("builtins.open", lambda path, *a, **k: real_open(
        status if path == "/proc/self/status" else path, *a, **k))
    caps = cli._effective_caps()
    assert caps == BIT(cli.CAP_BPF, cli.CAP_PERFMON, cli.CAP_SYS_ADMIN)
