"""Held OPENs (the daemon's mode): a connection that closes before the next drain
reaches user space as one CLOSE per end, which stands for its OPEN too; one that
outlives a drain is announced by the sweep (release_opens) ahead of its CLOSE.
Real probes, real loopback sockets; counts checked against what the test made."""

from __future__ import annotations

import os
import socket
from typing import Iterator

import pytest

from sockwatch.kernel.loader import LoaderConfig
from sockwatch.monitor import Monitor
from sockwatch.records import TCP_ESTABLISHED, ConnEvent, Kind, Role
from sockwatch.views import fields

N = 50
PAYLOAD = b"x" * 100


@pytest.fixture
def holding() -> Iterator[Monitor]:
    mon = Monitor(LoaderConfig(hold_opens=True))
    mon.start()
    try:
        yield mon
    finally:
        mon.close()


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    srv = socket.create_server(("127.0.0.1", 0), backlog=N)
    try:
        yield srv
    finally:
        srv.close()


def exchange(srv: socket.socket) -> tuple[socket.socket, socket.socket]:
    """A connection to ``srv`` that has carried PAYLOAD each way."""
    cli = socket.create_connection(srv.getsockname())
    acc, _ = srv.accept()
    cli.sendall(PAYLOAD)
    acc.recv(len(PAYLOAD), socket.MSG_WAITALL)
    acc.sendall(PAYLOAD)
    cli.recv(len(PAYLOAD), socket.MSG_WAITALL)
    return cli, acc


def ours(events: list[ConnEvent], port: int) -> list[ConnEvent]:
    """The client and server records of connections to ``port`` (not the listener's)."""
    return [e for e in events if e.role in (Role.CLIENT, Role.SERVER)
            and port in (e.sport, e.dport)]


def opened(mon: Monitor) -> tuple[int, int]:
    return mon.table.counters["opened_client"], mon.table.counters["opened_server"]


def test_short_connections_send_one_close_per_end(holding, listener):
    port = listener.getsockname()[1]
    holding.poll()
    before = opened(holding)
    for _ in range(N):
        cli, acc = exchange(listener)
        cli.close()
        acc.close()
    events = ours(holding.poll(), port)
    assert [e for e in events if e.kind == Kind.OPEN] == []
    closes = [e for e in events if e.kind == Kind.CLOSE]
    assert {r: sum(e.role == r for e in closes) for r in (Role.CLIENT, Role.SERVER)} == {
        Role.CLIENT: N, Role.SERVER: N}
    assert all(e.open_held and e.tgid == os.getpid() for e in closes)
    assert all(e.payload_sent == e.payload_received == len(PAYLOAD) for e in closes)
    # The table counts each CLOSE as the OPEN it stands for too, and keeps its row.
    assert opened(holding) == (before[0] + N, before[1] + N)
    rows = [r for r in holding.table.closed if port in (r.connection().ev.sport,
                                                        r.connection().ev.dport)]
    assert len(rows) == 2 * N and all(r.tgid == os.getpid() for r in rows)
    # Views see the connect and accept lines those CLOSEs stand for, before each.
    lines = fields.event_dicts(events)
    names = [d["event"] for d in lines]
    assert names.count("connect") == names.count("accept") == N
    assert all(names[i + 1] == "close" and lines[i]["ts_ns"] <= lines[i + 1]["ts_ns"]
               for i, name in enumerate(names) if name in ("connect", "accept"))


def test_a_connection_that_outlives_a_drain_is_announced_by_the_sweep(holding, listener):
    port = listener.getsockname()[1]
    holding.poll()
    before = opened(holding)
    cli, acc = exchange(listener)
    try:
        announced = ours(holding.poll(), port)  # the drain runs the sweep first
        assert sorted((e.kind, e.role) for e in announced) == [
            (Kind.OPEN, Role.CLIENT), (Kind.OPEN, Role.SERVER)]
        for e in announced:  # stamped when established, as if sent then
            assert e.ts_ns == e.state_ns[TCP_ESTABLISHED] and e.tgid == os.getpid()
        conns = {c.ev.role: c for c in holding.connections()
                 if port in (c.ev.sport, c.ev.dport)}
        assert conns[Role.CLIENT].fd == cli.fileno() and conns[Role.SERVER].fd == acc.fileno()
    finally:
        cli.close()
        acc.close()
    closes = ours(holding.poll(), port)
    assert sorted(e.role for e in closes) == [Role.CLIENT, Role.SERVER]
    assert not any(e.open_held for e in closes)
    assert opened(holding) == (before[0] + 1, before[1] + 1)
    assert not [k for k, r in holding.table.live.items()
                if port in (r.connection().ev.sport, r.connection().ev.dport)
                and r.connection().ev.role != Role.LISTENER]


def test_every_open_is_sent_while_someone_streams_events(holding, listener):
    """send_every_open() (what /api/events asks for) switches the kernel at the next
    drain, and back once its time is up."""
    port = listener.getsockname()[1]

    def one_connection() -> list[tuple[Kind, bool]]:
        cli, acc = exchange(listener)
        cli.close()
        acc.close()
        return sorted((e.kind, e.open_held) for e in ours(holding.poll(), port)
                      if e.role == Role.CLIENT)

    holding.send_every_open(60)
    holding.poll()
    assert one_connection() == [(Kind.OPEN, False), (Kind.CLOSE, False)]
    holding.send_every_open(0)
    holding.poll()
    assert one_connection() == [(Kind.CLOSE, True)]


def test_opens_the_ring_cannot_take_stay_held_until_a_later_drain(listener):
    """A sweep into a full ring sends what fits; the rest stay held (nothing is
    lost, nothing is counted lost) and go at the following drains, each before
    its socket's CLOSE."""
    mon = Monitor(LoaderConfig(hold_opens=True, ringbuf_bytes=4096))
    mon.start()
    pairs = []
    try:
        port = listener.getsockname()[1]
        mon.poll()
        lost = mon.loss().ringbuf_full
        for _ in range(40):  # 80 OPENs held; one drain's ring holds 13 records
            pairs.append(exchange(listener))
        first = [e for e in ours(mon.poll(), port) if e.kind == Kind.OPEN]
        assert 0 < len(first) < 2 * 40
        opens = first
        for _ in range(20):
            if len(opens) == 2 * 40:
                break
            opens += [e for e in ours(mon.poll(), port) if e.kind == Kind.OPEN]
        assert sorted(e.sport for e in opens if e.role == Role.CLIENT) == sorted(
            cli.getsockname()[1] for cli, _ in pairs)
        assert len({e.skaddr for e in opens}) == 2 * 40
        closes = []
        while pairs:  # a few at a time: this ring holds 13 records
            for cli, acc in pairs[:5]:
                cli.close()
                acc.close()
            del pairs[:5]
            closes += [e for e in ours(mon.poll(), port) if e.kind == Kind.CLOSE]
        assert len(closes) == 2 * 40 and not any(e.open_held for e in closes)
        assert mon.loss().ringbuf_full == lost
    finally:
        for cli, acc in pairs:
            cli.close()
            acc.close()
        mon.close()
