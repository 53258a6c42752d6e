"""Configuration: a TOML file plus flags that override it, validated before anything loads.

The schema below is the single source of truth: every key, its type, its
default and its allowed range. An unknown key, a wrong type or a value out of
range is a UsageError naming the key (exit 2), raised before any BPF program
is touched. The ``[web]`` table has the shape of the Prometheus exporter
toolkit's web config (tls_server_config, basic_auth_users with bcrypt hashes).
"""

from __future__ import annotations

import ipaddress
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sockwatch.errors import UsageError

DEFAULT_PATH = Path("/etc/sockwatch/sockwatch.toml")
ATTACH_MODES = ("auto", "tp_btf", "raw_tp", "tracepoint", "fentry", "kprobe")


@dataclass(frozen=True)
class Key:
    """One setting: type, default, and the range or choices it must fall in."""

    type: type | tuple[type, ...]
    default: Any
    low: float | None = None
    high: float | None = None
    choices: tuple[str, ...] | None = None
    doc: str = ""


SCHEMA: dict[str, dict[str, Key]] = {
    "listen": {
        "address": Key(str, "127.0.0.1:9873", doc="host:port for /metrics and the API"),
        "max_requests": Key(int, 32, 1, 4096, doc="concurrent requests; more get 503"),
        "request_timeout_seconds": Key((int, float), 5.0, 0.1, 300, doc="per-request I/O deadline"),
    },
    "probes": {
        "attach": Key(str, "auto", choices=ATTACH_MODES, doc="force one attach flavour"),
        "precise_accept": Key(bool, False, doc="hook the accept syscall exit (taxes all syscalls)"),
        "stack_latency": Key(bool, True, doc="per-packet probes for per-interface stack latency "
                             "(false: connection-level histograms only)"),
        "socks_max_entries": Key(int, 65536, 1024, 16 << 20, doc="kernel per-socket map size"),
        "ringbuf_bytes": Key(int, 2 << 20, 4096, 1 << 30,
                             doc="ring buffer size, a power of two; all of it counts in"
                             " the daemon's RSS"),
    },
    "tables": {
        "closed_capacity": Key(int, 4096, 0, 1 << 20, doc="recently closed connections kept"),
        "max_connections": Key(int, 262144, 1, 16 << 20, doc="live connections tracked"),
        "poll_interval_seconds": Key((int, float), 0.1, 0.01, 10, doc="ring buffer read period"),
        "reconcile_interval_seconds": Key((int, float), 5.0, 0.5, 3600,
                                          doc="kernel walk period; longer while one walk's CPU"
                                          " time is over 5 % of it"),
    },
    "metrics": {
        "top_processes": Key(int, 20, 1, 10000, doc="process label values kept; rest -> other"),
        "top_ports": Key(int, 20, 1, 10000, doc="listening port label values kept"),
        "top_interfaces": Key(int, 64, 1, 10000, doc="interface label values kept"),
        "per_connection": Key(bool, False, doc="export one series set per connection"),
        "per_connection_limit": Key(int, 1000, 1, 100000, doc="cap on per-connection series"),
    },
    "web": {
        "tls_server_config": Key(dict, {}, doc="cert_file, key_file"),
        "basic_auth_users": Key(dict, {}, doc="user = bcrypt hash"),
    },
}


@dataclass(frozen=True)
class Config:
    """Validated settings, grouped as in the file: ``cfg.section[key]``."""

    values: dict[str, dict[str, Any]] = field(default_factory=dict)
    source: str = "defaults"

    def __getitem__(self, section: str) -> dict[str, Any]:
        return self.values[section]

    @property
    def listen_host_port(self) -> tuple[str, int]:
        host, _, port = self["listen"]["address"].rpartition(":")
        return host.strip("[]"), int(port)


def _check(section: str, name: str, value: Any, where: str) -> Any:
    key = SCHEMA[section][name]
    label = f"{where}: {section}.{name}"
    expected = key.type if isinstance(key.type, tuple) else (key.type,)
    # bool is an int in Python; a setting that wants a number must not take true/false
    if isinstance(value, bool) and bool not in expected or not isinstance(value, expected):
        names = " or ".join(t.__name__ for t in expected)
        raise UsageError(f"{label} must be {names}, not {type(value).__name__} ({value!r})")
    if key.choices is not None and value not in key.choices:
        raise UsageError(f"{label} must be one of {', '.join(key.choices)}, not {value!r}")
    if key.low is not None and value < key.low or key.high is not None and value > key.high:
        raise UsageError(f"{label} must be between {key.low:g} and {key.high:g}, not {value!r}")
    return value


def _check_address(address: str, where: str) -> None:
    host, sep, port = address.rpartition(":")
    label = f"{where}: listen.address"
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"{label} must be host:port with a port 1-65535, not {address!r}")
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        raise UsageError(f"{label} must name an IP address, not {host!r}") from None


def _check_web(web: dict[str, Any], where: str) -> None:
    tls = web["tls_server_config"]
    unknown = set(tls) - {"cert_file", "key_file"}
    if unknown:
        raise UsageError(f"{where}: unknown key web.tls_server_config.{sorted(unknown)[0]}")
    if tls and not ({"cert_file", "key_file"} <= set(tls)):
        raise UsageError(f"{where}: web.tls_server_config needs both cert_file and key_file")
    for k, v in tls.items():
        if not isinstance(v, str) or not Path(v).is_file():
            raise UsageError(f"{where}: web.tls_server_config.{k} is not a readable file: {v!r}")
    for user, hashed in web["basic_auth_users"].items():
        if not isinstance(hashed, str) or not hashed.startswith(("$2a$", "$2b$", "$2y$")):
            raise UsageError(f"{where}: web.basic_auth_users.{user} must be a bcrypt hash")


def build(data: dict[str, Any], where: str = "config") -> Config:
    """Validate a parsed document (file contents merged with flags) into a Config."""
    values: dict[str, dict[str, Any]] = {}
    for section, body in data.items():
        if section not in SCHEMA:
            raise UsageError(f"{where}: unknown section [{section}]")
        if not isinstance(body, dict):
            raise UsageError(f"{where}: {section} must be a table")
        for name in body:
            if name not in SCHEMA[section]:
                raise UsageError(f"{where}: unknown key {section}.{name}")
    for section, keys in SCHEMA.items():
        body = data.get(section, {})
        values[section] = {
            name: _check(section, name, body[name], where) if name in body else key.default
            for name, key in keys.items()
        }
    _check_address(values["listen"]["address"], where)
    ring = values["probes"]["ringbuf_bytes"]
    if ring & (ring - 1):
        raise UsageError(f"{where}: probes.ringbuf_bytes must be a power of two, not {ring}")
    _check_web(values["web"], where)
    return Config(values, where)


def load(path: Path | None, overrides: dict[str, dict[str, Any]] | None = None,
         required: bool = False) -> Config:
    """Read ``path`` (the default path may be absent unless ``required``), apply overrides."""
    data: dict[str, Any] = {}
    where = str(path or DEFAULT_PATH)
    target = path or DEFAULT_PATH
    try:
        with open(target, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        if required or path is not None:
            raise UsageError(f"{where}: no such config file") from None
        where = "defaults"
    except PermissionError:
        raise UsageError(f"{where}: cannot read the config file (permission denied)") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{where}: not valid TOML: {exc}") from None
    for section, body in (overrides or {}).items():
        data.setdefault(section, {})
        if isinstance(data[section], dict):
            data[section].update(body)
    return build(data, where)


def to_toml_example() -> str:
    """The documented example config: every key with its default and meaning."""
    lines = ["# sockwatch configuration; every key is optional and shown with its default."]
    for section, keys in SCHEMA.items():
        lines.append(f"\n[{section}]")
        for name, key in keys.items():
            if isinstance(key.default, dict):
                continue
            lines.append(f"# {key.doc}")
            lines.append(f"{name} = {_toml_value(key.default)}")
    lines.append("\n# [web.tls_server_config]\n# cert_file = \"/etc/sockwatch/cert.pem\"")
    lines.append("# key_file = \"/etc/sockwatch/key.pem\"")
    lines.append("# [web.basic_auth_users]\n# prometheus = \"$2b$12$...\"  # bcrypt hash")
    return "\n".join(lines) + "\n"


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return f'"{v}"'
    return repr(v)

