"""``sockwatch daemon``: probes, tables and the HTTP server, run as a service.

Threads: the main thread handles signals (SIGTERM/SIGINT stop, SIGHUP
reloads the config); the ``events`` thread drains the ring buffer and
reconciles; the ``http`` thread serves. The event thread never touches metric
objects and the HTTP handlers never write tables. On any exit path every
probe is detached before the process ends.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

from sockwatch import config as configuration
from sockwatch.errors import SockwatchError
from sockwatch.exporters.api import EventLog, build_routes
from sockwatch.exporters.http import BasicAuth, HttpServer
from sockwatch.exporters.metrics import SockwatchCollector, build_registry
from sockwatch.kernel.loader import Loading
from sockwatch.monitor import Monitor

log = logging.getLogger("sockwatch")

# Settings that only a restart can change (they shape what is loaded or bound).
RESTART_ONLY = {"listen": {"address"}, "probes": None, "web": {"tls_server_config"}}

_SYSLOG_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4,
                    logging.ERROR: 3, logging.CRITICAL: 2}


class _JournalFormatter(logging.Formatter):
    """``<priority>message``: journald reads the level from the prefix and adds the time."""

    def format(self, record: logging.LogRecord) -> str:
        return f"<{_SYSLOG_PRIORITY.get(record.levelno, 6)}>{super().format(record)}"


def setup_logging(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if os.environ.get("JOURNAL_STREAM"):
        handler.setFormatter(_JournalFormatter("%(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def _auth(cfg: configuration.Config) -> BasicAuth | None:
    users = cfg["web"]["basic_auth_users"]
    return BasicAuth(users) if users else None


class Daemon:
    def __init__(self, cfg: configuration.Config, config_path: Path | None, loading: Loading):
        """``loading``: the probes being loaded for ``cfg`` (started before this
        module was imported, see cli.cmd_daemon)."""
        self.cfg = cfg
        self.config_path = config_path
        self._loading = loading
        t = cfg["tables"]
        m = cfg["metrics"]
        self.monitor = Monitor(loading.cfg, closed_capacity=t["closed_capacity"],
                               max_live=t["max_connections"])
        self.collector = SockwatchCollector(self.monitor, m["per_connection"],
                                            m["per_connection_limit"], m["top_processes"],
                                            m["top_ports"], m["top_interfaces"])
        self.registry = build_registry(self.collector)
        self.events = EventLog()
        self.healthy = threading.Event()
        self.stop = threading.Event()
        self.reload = threading.Event()
        self.server: HttpServer | None = None
        self._failed: BaseException | None = None

    def _event_loop(self) -> None:
        try:
            self.healthy.set()
            self.monitor.run(self.stop, on_batch=self.events.append,
                             poll_interval=lambda: self.cfg["tables"]["poll_interval_seconds"],
                             reconcile_interval=lambda: self.cfg["tables"]["reconcile_interval_seconds"])
        except BaseException as exc:  # surfaced by run(): the service must restart
            self._failed = exc
            log.exception("event loop failed")
        finally:
            self.healthy.clear()
            self.stop.set()

    def _reload(self) -> None:
        try:
            new = configuration.load(self.config_path)
        except SockwatchError as exc:
            log.error("config reload failed, keeping the running config: %s", exc)
            return
        for section, keys in RESTART_ONLY.items():
            changed = {k for k in new[section] if new[section][k] != self.cfg[section][k]}
            if keys is not None:
                changed &= keys
            for key in sorted(changed):
                log.warning("config %s.%s changed: takes effect after a restart", section, key)
        self.cfg = new
        self.collector.per_connection = new["metrics"]["per_connection"]
        self.collector.per_connection_limit = new["metrics"]["per_connection_limit"]
        if self.server:
            self.server.set_auth(_auth(new))
            self.server.max_requests = new["listen"]["max_requests"]
            self.server.timeout = new["listen"]["request_timeout_seconds"]
        log.info("config reloaded from %s", new.source)

    def run(self) -> int:
        started = time.monotonic()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop.set())
        signal.signal(signal.SIGHUP, lambda *_: self.reload.set())
        try:
            self.monitor.start(self._loading)
            host, port = self.cfg.listen_host_port
            tls = self.cfg["web"]["tls_server_config"]
            listen = self.cfg["listen"]
            try:
                self.server = HttpServer(
                    host, port, build_routes(self.monitor, self.registry, self.events, self.healthy),
                    max_requests=listen["max_requests"], timeout=listen["request_timeout_seconds"],
                    tls=(tls["cert_file"], tls["key_file"]) if tls else None, auth=_auth(self.cfg))
                self.server.start()
            except OSError as exc:
                raise SockwatchError(f"cannot listen on {listen['address']}: {exc.strerror}") from exc
            events = threading.Thread(target=self._event_loop, name="events", daemon=True)
            events.start()
            scheme = "https" if tls else "http"
            modes = ", ".join(f"{h.hook}={h.mode}" for h in self.monitor.probes.plan.hooks)
            took = self.monitor.start_times
            assert took is not None
            log.info("serving %s://%s:%d/metrics; probes %s; ready in %.0f ms (waited %.0f ms "
                     "for the probes; owners %.0f ms; walk %.0f ms, sockets read %d)", scheme, host,
                     self.server.port, modes, (time.monotonic() - started) * 1000,
                     took.probes_s * 1000, took.walk.owners_s * 1000, took.walk.walk_s * 1000,
                     took.walk.sockets)
            while not self.stop.wait(0.2):
                if self.reload.is_set():
                    self.reload.clear()
                    self._reload()
            events.join(timeout=5)
            log.info("stopping: probes detached")
        finally:
            self.stop.set()
            if self.server:
                self.server.stop()
            self.monitor.close()
        return 1 if self._failed else 0
