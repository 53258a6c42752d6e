"""Row filters shared by ``table``, ``trace`` and ``top`` (--pid, --comm, --port; --state is table-only)."""

from __future__ import annotations

from dataclasses import dataclass

from sockwatch.records import ConnEvent, state_name


@dataclass(frozen=True)
class Filter:
    pids: frozenset[int] = frozenset()
    comm: str | None = None  # substring, case-insensitive
    port: int | None = None  # local or remote
    state: str | None = None  # ss spelling, e.g. ESTAB

    def matches(self, ev: ConnEvent, pid: int, comm: str) -> bool:
        """``pid``/``comm`` are passed in: tables may know a better owner than the record."""
        if self.pids and pid not in self.pids:
            return False
        if self.comm and self.comm.lower() not in comm.lower():
            return False
        if self.port is not None and self.port not in (ev.sport, ev.dport):
            return False
        if self.state and state_name(ev.state) != self.state:
            return False
        return True

    def row_matches(self, pid: int, comm: str, state: int, sport: int, dport: int) -> bool:
        """The same test on a table row's cheap fields, before anything is decoded."""
        if self.pids and pid not in self.pids:
            return False
        if self.comm and self.comm.lower() not in comm.lower():
            return False
        if self.port is not None and self.port not in (sport, dport):
            return False
        return not self.state or state_name(state) == self.state

    def dict_matches(self, row: dict) -> bool:
        """The same test (state aside) on a row or event dict from the JSON API."""
        if self.pids and row["pid"] not in self.pids:
            return False
        if self.comm and self.comm.lower() not in (row["process"] or "").lower():
            return False
        return self.port is None or self.port in (row["local_port"], row["remote_port"])
