"""ConnTable: how OPEN / CLOSE / SNAPSHOT records become live and closed rows.

The kernel reuses sock addresses quickly and records arrive from two sources
(ring buffer and iter/tcp) in no guaranteed order, so the ordering rules here
decide whether the table shows ghosts, loses live connections, or attributes a
socket to the wrong process.
"""

from __future__ import annotations

import pytest

from recfactory import NETNS, merge, raw
from sockwatch import records
from sockwatch.records import Attrib, Kind, Result, Role
from sockwatch.tables import ConnTable

SYN_SENT, ESTAB, CLOSE = records.TCP_SYN_SENT, records.TCP_ESTABLISHED, records.TCP_CLOSE
A, B, C, D, E = (0xFFFF888000000000 + i * 0x1000 for i in range(1, 6))


def _live(tbl, key):
    """A live row as views see it (decoded)."""
    return tbl.live[key].connection()


def opened(skaddr=A, t=1_000, **kw):
    """OPEN of a client that entered SYN_SENT at ``t`` and ESTABLISHED just after."""
    kw.setdefault("state_ns", {SYN_SENT: t, ESTAB: t + 10})
    return raw(kind=Kind.OPEN, skaddr=skaddr, ts_ns=t + 10, state=ESTAB,
                 oldstate=SYN_SENT, **kw)


def closed(skaddr=A, t=5_000, **kw):
    kw.setdefault("state_ns", {SYN_SENT: 1_000, ESTAB: 1_010, CLOSE: t})
    kw.setdefault("oldstate", ESTAB)
    return raw(kind=Kind.CLOSE, skaddr=skaddr, ts_ns=t, state=CLOSE, **kw)


def snap(skaddr=A, t=10_000, **kw):
    kw.setdefault("role", Role.UNKNOWN)
    kw.setdefault("attrib", Attrib.NONE)
    kw.setdefault("state_ns", {})
    return raw(kind=Kind.SNAPSHOT, skaddr=skaddr, ts_ns=t, state=ESTAB, **kw)


def test_open_then_close_moves_to_closed_and_counts_result():
    """The normal life: one live row, then one closed row carrying the final counters."""
    tbl = ConnTable()
    tbl.apply(opened(tgid=77, comm=b"curl", fd=5))
    assert list(tbl.live) == [A]
    conn = _live(tbl, A)
    assert (conn.tgid, conn.comm, conn.fd, conn.seen_by) == (77, "curl", 5, "event")
    assert conn.alive_since_ns == 1_000
    assert tbl.counters["opened_client"] == 1

    tbl.apply(closed(result=Result.RESET, bytes_sent=4096, tgid=77, comm=b"curl"))
    assert tbl.live == {}
    [gone] = tbl.recently_closed()
    assert gone.closed_ns == 5_000 and not gone.reconciled
    assert gone.ev.kind is Kind.CLOSE and gone.ev.bytes_sent == 4096
    assert gone.fd == 5  # learned at open; the CLOSE record carried fd -1
    assert tbl.ended == {(Role.CLIENT, Result.RESET): 1}


def test_close_of_unknown_socket_lands_in_closed():
    """A failed connect (or a socket born and dead between two reads) has only a CLOSE."""
    tbl = ConnTable()
    tbl.apply(opened(skaddr=B))
    tbl.apply(closed(skaddr=A, t=3_000, result=Result.REFUSED, oldstate=SYN_SENT,
                     state_ns={SYN_SENT: 2_000, CLOSE: 3_000}, tgid=9, comm=b"nc"))
    assert list(tbl.live) == [B]
    [gone] = tbl.recently_closed()
    assert (gone.key, gone.tgid, gone.comm, gone.seen_by) == (A, 9, "nc", "event")
    assert gone.alive_since_ns == 2_000 and gone.closed_ns == 3_000
    assert tbl.ended[(Role.CLIENT, Result.REFUSED)] == 1


def test_held_close_stands_for_its_open():
    """A CLOSE whose OPEN the kernel held back counts the open too, and its closed
    row is the whole connection; a row at its address alive before it is an earlier
    socket whose close was missed (retired), while a row the walk found for this
    very socket is simply closed, counted open once."""
    held = dict(flags=records.FLAG_OPEN_HELD, tgid=9, comm=b"curl")
    tbl = ConnTable()
    tbl.apply(closed(skaddr=A, **held))
    assert tbl.live == {} and tbl.counters["opened_client"] == 1
    [gone] = tbl.recently_closed()
    assert (gone.key, gone.tgid, gone.alive_since_ns, gone.closed_ns) == (A, 9, 1_000, 5_000)
    assert tbl.ended[(Role.CLIENT, Result.OK)] == 1

    tbl = ConnTable()
    tbl.apply(opened(skaddr=A, t=100, tgid=10, comm=b"first"))
    tbl.apply(closed(skaddr=A, **held))  # opened at 1_000: not the row's socket
    assert tbl.live == {} and tbl.counters["stale_replaced"] == 1
    assert tbl.counters["opened_client"] == 2
    stale, gone = tbl.recently_closed()
    assert (stale.tgid, stale.reconciled, gone.tgid, gone.reconciled) == (10, True, 9, False)

    tbl = ConnTable()
    tbl.begin_walk(2_000)
    merge(tbl, snap(skaddr=A, t=2_000, state_ns={SYN_SENT: 1_000}, role=Role.CLIENT))
    tbl.remove_missing(2_000, {NETNS})
    tbl.apply(closed(skaddr=A, **held))
    assert tbl.live == {} and "stale_replaced" not in tbl.counters
    assert tbl.counters["opened_client"] == 1
    [gone] = tbl.recently_closed()
    assert gone.seen_by == "snapshot" and gone.closed_ns == 5_000


def test_close_older_than_live_entry_does_not_remove_it():
    """A late CLOSE of an earlier socket at a reused address must not kill the new one."""
    tbl = ConnTable()
    tbl.apply(opened(skaddr=A, t=8_000, tgid=2, comm=b"new"))
    late = closed(skaddr=A, t=6_000, tgid=1, comm=b"old",
                  state_ns={SYN_SENT: 1_000, ESTAB: 1_010, CLOSE: 6_000})
    tbl.apply(late)
    assert A in tbl.live
    live = _live(tbl, A)
    assert (live.tgid, live.comm, live.ev.kind, live.alive_since_ns) == (2, "new", Kind.OPEN, 8_000)
    # the old socket's close is still a real close: it is recorded on its own
    [gone] = tbl.recently_closed()
    assert (gone.tgid, gone.comm, gone.closed_ns) == (1, "old", 6_000)


def test_open_older_than_live_entry_is_ignored():
    """Records from before a row's incarnation must not touch it (counters, owner, state)."""
    tbl = ConnTable()
    tbl.apply(opened(skaddr=A, t=8_000, tgid=2, comm=b"new", bytes_sent=10))
    tbl.apply(opened(skaddr=A, t=1_000, tgid=1, comm=b"old", bytes_sent=999,
                     attrib=Attrib.CONNECT))
    live = _live(tbl, A)
    assert (live.tgid, live.comm, live.ev.bytes_sent) == (2, "new", 10)


def test_snapshot_rows_seed_connections():
    """Sockets that predate sockwatch appear from the iter/tcp walk, marked as such."""
    tbl = ConnTable()
    merge(tbl,
          snap(skaddr=A, t=10_000, tgid=0, comm=b""),
          snap(skaddr=B, t=10_000, tgid=300, comm=b"sshd", attrib=Attrib.LISTENER,
               role=Role.LISTENER))
    assert {k: c.seen_by for k, c in tbl.live.items()} == {A: "snapshot", B: "snapshot"}
    # no state timestamps: alive since the walk that first saw it
    assert _live(tbl, A).alive_since_ns == 10_000
    assert _live(tbl, A).owner_is_guess and _live(tbl, B).owner_is_guess
    # snapshots are not opens
    assert not any(v for k, v in tbl.counters.items() if k.startswith("opened_"))


def test_snapshot_refreshes_counters_of_existing_connection():
    """Periodic walks bring fresh byte counters; the row keeps how it was first learned."""
    tbl = ConnTable()
    tbl.apply(opened(skaddr=A, t=1_000, bytes_sent=10, tgid=5, comm=b"app"))
    merge(tbl, snap(skaddr=A, t=20_000, bytes_sent=123_456, tgid=5, comm=b"app"))
    conn = _live(tbl, A)
    assert conn.ev.bytes_sent == 123_456 and conn.ev.ts_ns == 20_000
    assert conn.seen_by == "event" and conn.alive_since_ns == 1_000
    # an older walk (read before a newer record was applied) must not roll counters back
    merge(tbl, snap(skaddr=A, t=15_000, bytes_sent=50, tgid=5, comm=b"app"))
    assert _live(tbl, A).ev.bytes_sent == 123_456


def test_remove_missing_removes_only_rows_the_snapshot_should_have_seen():
    """Reconciliation repairs missed CLOSEs but must not remove rows it could not see."""
    tbl = ConnTable()
    tbl.apply(opened(skaddr=A, t=1_000))                       # seen by the walk
    tbl.apply(opened(skaddr=B, t=2_000, tgid=42, comm=b"gone"))  # missed close
    tbl.apply(opened(skaddr=C, t=2_000, netns=NETNS + 1))      # another namespace
    tbl.apply(opened(skaddr=D, t=60_000))                      # opened after the walk began
    merge(tbl, snap(skaddr=A, t=50_000))
    removed = tbl.remove_missing(50_000, {NETNS})
    assert removed == 1
    assert set(tbl.live) == {A, C, D}
    [gone] = tbl.recently_closed()
    assert (gone.key, gone.tgid, gone.comm) == (B, 42, "gone")
    assert gone.reconciled and gone.closed_ns == 50_000
    assert tbl.counters["reconciled_removed"] == 1
    # a second pass that walked both namespaces now removes C as well
    tbl.begin_walk(70_000)
    merge(tbl, snap(skaddr=A, t=70_000), snap(skaddr=D, t=70_000))
    assert tbl.remove_missing(70_000, {NETNS, NETNS + 1}) == 1
    assert set(tbl.live) == {A, D}
    assert tbl.counters["reconciled_removed"] == 2


def test_reconciled_row_is_not_a_close_result():
    """A row dropped by reconciliation has no known TCP result: it is not counted in ended."""
    tbl = ConnTable()
    tbl.apply(opened(skaddr=B, t=2_000))
    tbl.remove_missing(50_000, {NETNS})
    assert sum(tbl.ended.values()) == 0


@pytest.mark.parametrize("task", [Attrib.CONNECT, Attrib.ACCEPT, Attrib.FIRST_IO,
                                  Attrib.CLOSE, Attrib.LISTEN])
def test_task_attribution_replaces_guessed_owner(task):
    """The listener's owner is only a guess for an accepted socket; the task that used it wins."""
    tbl = ConnTable()
    tbl.apply(opened(skaddr=A, role=Role.SERVER, attrib=Attrib.LISTENER, tgid=100,
                     comm=b"master"))
    assert _live(tbl, A).owner_is_guess
    tbl.apply(opened(skaddr=A, t=2_000, role=Role.SERVER, attrib=task, tgid=200,
                     comm=b"worker", fd=9))
    conn = _live(tbl, A)
    assert (conn.tgid, conn.comm, conn.fd) == (200, "worker", 9)
    assert not conn.owner_is_guess


def test_guess_never_replaces_resolved_owner():
    """Once a task touched the socket, later guesses (LISTENER/NONE) keep their hands off."""
    tbl = ConnTable()
    tbl.apply(opened(skaddr=A, role=Role.SERVER, attrib=Attrib.FIRST_IO, tgid=200,
                     comm=b"worker"))
    # the same socket (same first-state times), later: only its ts_ns moves on
    tbl.apply(raw(kind=Kind.OPEN, skaddr=A, ts_ns=2_000, state=ESTAB, role=Role.SERVER,
                    attrib=Attrib.LISTENER, tgid=100, comm=b"master",
                    state_ns={SYN_SENT: 1_000, ESTAB: 1_010}))
    merge(tbl, snap(skaddr=A, t=9_000, attrib=Attrib.NONE, tgid=100, comm=b"master"))
    conn = _live(tbl, A)
    assert (conn.tgid, conn.comm) == (200, "worker")


def test_guess_fills_an_unknown_owner():
    """A guess is better than nothing when no owner is known yet."""
    tbl = ConnTable()
    merge(tbl, snap(skaddr=A, t=1_000, tgid=0, comm=b""))
    merge(tbl, snap(skaddr=A, t=2_000, tgid=100, comm=b"master", attrib=Attrib.LISTENER))
    assert (_live(tbl, A).tgid, _live(tbl, A).comm) == (100, "master")


def test_owner_joined_by_the_start_walk_is_sure_and_stays_through_later_walks():
    """The start-up walk joins the fd tables into its rows (Attrib.FD_TABLE). That
    owner is no guess: nobody looks it up again, a later guess leaves it, and
    later walks, which name no owner for the socket, keep it with its name."""
    tbl = ConnTable()
    merge(tbl, snap(skaddr=A, t=1_000, tgid=300, fd=7, comm=b"nginx", attrib=Attrib.FD_TABLE))
    conn = _live(tbl, A)
    assert (conn.tgid, conn.fd, conn.comm, conn.owner_is_guess) == (300, 7, "nginx", False)
    assert list(tbl.owners_to_find(fds=True)) == []
    merge(tbl, snap(skaddr=A, t=2_000, tgid=0, fd=-1, comm=b""))
    merge(tbl, snap(skaddr=A, t=3_000, tgid=0, fd=-1, comm=b"", bytes_sent=99))
    merge(tbl, snap(skaddr=A, t=4_000, tgid=100, comm=b"master", attrib=Attrib.LISTENER,
                    bytes_sent=99))
    conn = _live(tbl, A)
    assert (conn.tgid, conn.fd, conn.comm, conn.ev.attrib) == (300, 7, "nginx", Attrib.FD_TABLE)
    assert (conn.ev.ts_ns, conn.ev.bytes_sent) == (4_000, 99)


def test_closed_ring_is_bounded():
    """Recently closed rows are a ring: memory stays bounded under connection churn."""
    tbl = ConnTable(closed_capacity=3)
    for i in range(7):
        tbl.apply(closed(skaddr=A + i, t=5_000 + i))
    assert len(tbl.closed) == 3
    assert [c.closed_ns for c in tbl.recently_closed()] == [5_004, 5_005, 5_006]
    assert sum(tbl.ended.values()) == 7  # counting is not bounded by the ring


def test_max_live_caps_table_and_counts_table_full():
    """Beyond max_live new rows are dropped and counted, never silently."""
    tbl = ConnTable(max_live=2)
    tbl.apply(opened(skaddr=A))
    tbl.apply(opened(skaddr=B))
    tbl.apply(opened(skaddr=C))
    merge(tbl, snap(skaddr=D))
    assert set(tbl.live) == {A, B}
    assert tbl.counters["table_full"] == 2
    # updates of rows already in the table are still applied
    tbl.apply(raw(kind=Kind.OPEN, skaddr=A, ts_ns=1_500, state=ESTAB, bytes_sent=77,
                    state_ns={SYN_SENT: 1_000, ESTAB: 1_010}))
    assert _live(tbl, A).ev.bytes_sent == 77 and tbl.counters["table_full"] == 2
    # a close of a dropped socket is still recorded (it carries everything)
    tbl.apply(closed(skaddr=C))
    assert [c.key for c in tbl.closed] == [C]


def test_snapshot_copies_are_independent():
    """Views keep snapshot() rows while the table moves on; mutating a copy must not leak back."""
    tbl = ConnTable()
    tbl.apply(opened(skaddr=A, tgid=5, fd=3))
    rows = tbl.snapshot()
    rows[0].fd, rows[0].tgid = 99, 1
    assert (_live(tbl, A).fd, _live(tbl, A).tgid) == (3, 5)


def test_new_incarnation_at_reused_address_replaces_stale_row():
    """If the CLOSE of socket 1 was lost (ring buffer full), socket 2 at the same address
    must not inherit socket 1's fd and age."""
    tbl = ConnTable()
    tbl.apply(opened(skaddr=A, t=1_000, tgid=10, comm=b"first", fd=5))
    # ... CLOSE of the first socket lost; the kernel reuses the address ...
    tbl.apply(opened(skaddr=A, t=90_000, tgid=20, comm=b"second", fd=-1))
    conn = _live(tbl, A)
    assert conn.tgid == 20
    assert conn.fd == -1
    assert conn.alive_since_ns == 90_000


def test_walk_row_read_before_a_close_does_not_resurrect_it():
    """Reconciliation merges rows while closes keep arriving: a row the walk read
    just before its socket closed must not bring the closed connection back."""
    tbl = ConnTable()
    tbl.apply(opened(skaddr=A, t=1_000))
    tbl.begin_walk(4_000)
    row_read_at = 4_500  # the walk visited the socket ...
    tbl.apply(closed(skaddr=A, t=4_600))  # ... then it closed, before the merge
    merge(tbl, snap(skaddr=A, t=row_read_at, state_ns={SYN_SENT: 1_000}))
    assert A not in tbl.live
    tbl.remove_missing(4_000, {NETNS})
    assert A not in tbl.live and tbl.counters["reconciled_removed"] == 0
    # outside a walk the memory is gone: a later socket at the address is welcome
    merge(tbl, snap(skaddr=A, t=9_000, state_ns={SYN_SENT: 8_000}))
    assert A in tbl.live


def _state(tbl):
    """Everything a view could read of a table."""
    def row(r):
        return (r.raw, r.ts_ns, r.alive_since_ns, r.tgid, r.comm_bytes, r.fd, r.attrib,
                r.named, r.seen_by, r.closed_ns, r.reconciled)
    return ({k: row(r) for k, r in tbl.live.items()}, [row(r) for r in tbl.closed],
            dict(tbl.counters), dict(tbl.ended))


@pytest.mark.parametrize("seed", range(20))
def test_batch_fast_path_matches_one_by_one(seed):
    """apply_batch applies the common OPEN and CLOSE inline; whatever the mix of
    kinds, owners, reused addresses and out-of-order times, the table must end
    exactly as applying each record on its own would leave it."""
    import random

    rnd = random.Random(seed)
    recs = []
    for _ in range(200):
        t = rnd.randrange(1_000, 50_000)
        kw = dict(skaddr=rnd.choice((A, B, C)), tgid=rnd.choice((0, 7, 8)),
                  fd=rnd.choice((-1, 3, 4)), comm=rnd.choice((b"a", b"b")),
                  attrib=rnd.choice(list(Attrib)), role=rnd.choice(list(Role)),
                  open_ns=rnd.choice((0, t - 500, t)))
        kind = rnd.choice((Kind.OPEN, Kind.CLOSE, Kind.SNAPSHOT))
        if kind == Kind.OPEN:
            recs.append(opened(t=t, **kw))
        elif kind == Kind.CLOSE:
            recs.append(closed(t=t, result=rnd.choice(list(Result)), **kw))
        else:
            recs.append(snap(t=t, **kw))
    batch, single = ConnTable(max_live=2), ConnTable(max_live=2)
    blob = b"".join(recs)
    batch.apply_batch(blob, range(0, len(blob), records.EVENT_SIZE))
    for rec in recs:
        single.apply(rec)
    assert _state(batch) == _state(single)


def test_slab_grows_and_gives_back_memory_after_a_burst():
    """Rows live in a slab of fixed slots: it grows with the table, and once a
    burst of sockets has gone a walk compacts it, keeping every surviving row
    (owner, name, age) intact, so memory returns to what the table holds."""
    tbl = ConnTable()
    start = tbl.capacity
    keys = [A + i * 8 for i in range(5000)]
    for i, key in enumerate(keys):
        tbl.apply(opened(skaddr=key, t=1_000 + i, tgid=i + 1, comm=b"burst", fd=i,
                         attrib=Attrib.NONE if i == 100 else Attrib.CONNECT))
    assert len(tbl) == 5000 and tbl.capacity >= 5000 > start
    survivors = keys[::100]
    tbl.claim_owners([(survivors[1], 1, 4242, 9, b"")], False, None, lambda *_: "named-by-proc")
    before = {k: _live(tbl, k) for k in survivors}
    for i, key in enumerate(keys):
        if key not in before:
            tbl.apply(closed(skaddr=key, t=100_000 + i))
    tbl.begin_walk(200_000)
    merge(tbl, *[snap(skaddr=k, t=200_000) for k in survivors])
    assert tbl.remove_missing(200_000, {NETNS}) == 0
    assert tbl.capacity < 1500 and set(tbl.live) == set(survivors)
    for key, was in before.items():
        now = _live(tbl, key)
        assert (now.tgid, now.comm, now.fd, now.alive_since_ns) == \
            (was.tgid, was.comm, was.fd, was.alive_since_ns)
        assert now.ev.ts_ns == 200_000  # the walk's counters were applied
    # freed slots are reused: a new burst of the same size fits where the old one was
    for i, key in enumerate(keys[:50]):
        tbl.apply(opened(skaddr=key + 4, t=300_000 + i))
    assert len(tbl) == 100 and tbl.capacity < 1500


def test_walk_chunk_of_new_sockets_fills_free_slots_in_one_go():
    """A walk chunk of sockets the table does not hold is inserted whole: into one
    run of slots when the slab has one, else slot by slot into the holes closes
    left. Either way each row holds its own record, its age and the walk's mark,
    and the rows already there are untouched."""
    tbl = ConnTable()
    keys = [A + i * 8 for i in range(6)]
    for i, key in enumerate(keys):
        tbl.apply(opened(skaddr=key, t=1_000 + i, tgid=i + 1))
    for key in keys[1::2]:
        tbl.apply(closed(skaddr=key, t=2_000))
    size = records.EVENT_SIZE
    kept = {k: tbl._slab[tbl._index[k] * size : (tbl._index[k] + 1) * size] for k in keys[::2]}
    holes = [snap(skaddr=B + i * 8, t=3_000 + i, open_ns=2_500) for i in range(3)]
    fresh = [snap(skaddr=C + i * 8, t=3_100 + i) for i in range(2000)]
    tbl.begin_walk(3_000)
    merge(tbl, *holes)  # the three slots the closes freed
    assert sorted(tbl._index[B + i * 8] for i in range(3)) == [1, 3, 5]
    merge(tbl, *fresh)  # more than the free slots: the slab grows, one run
    for key, was in kept.items():
        assert tbl._slab[tbl._index[key] * size : (tbl._index[key] + 1) * size] == was
    merge(tbl, *[snap(skaddr=k, t=3_500) for k in keys[::2]])
    assert tbl.remove_missing(3_000, {NETNS}) == 0
    assert len(tbl) == 3 + 3 + 2000
    for rec in holes + fresh:
        key = records.field_reader("skaddr").unpack_from(rec)[0]
        slot = tbl._index[key]
        assert bytes(tbl._slab[slot * size : (slot + 1) * size]) == rec
        conn = _live(tbl, key)
        assert conn.seen_by == "snapshot" and conn.alive_since_ns == (2_500 if key < C else
                                                                      conn.ev.ts_ns)


def test_scan_select_and_owner_needs_read_the_slab_as_rows_do():
    """Bulk readers (scrapes, filters, owner lookups) read the slab in place; they
    must see what a Row copy shows: the owner's pid, the /proc name when there is one."""
    tbl = ConnTable()
    tbl.apply(opened(skaddr=A, tgid=10, comm=b"curl", fd=3, sport=40000, dport=8443))
    tbl.apply(opened(skaddr=B, tgid=0, comm=b"", fd=-1, attrib=Attrib.NONE, sport=80))
    tbl.claim_owners([(B, 1, 20, 7, b"nginx")], False, None, lambda *_: "nginx: worker")
    tbl.apply(opened(skaddr=C, tgid=30, comm=b"x", fd=-1, attrib=Attrib.NONE, sport=1))
    scanned = list(tbl.scan(records.field_reader("sock.tgid", "sport").unpack_from))
    assert scanned == [((10, 40000), b"curl" + bytes(12)), ((20, 80), "nginx: worker"),
                       ((30, 1), b"x" + bytes(15))]
    assert tbl.select(lambda pid, name, state, sport, dport: name == "nginx: worker") == [B]
    assert tbl.select(lambda pid, name, state, sport, dport: dport == 8443) == [A]
    # B was named by /proc: no longer a guess; C is a guess without an fd
    assert [need[:2] for need in tbl.owners_to_find(fds=False)] == [(C, 30)]
    assert [need[0] for need in tbl.owners_to_find(fds=True, keys={A, C})] == [C]


def test_names_of_gone_processes_are_forgotten():
    """/proc names are interned per table; names no live row uses are pruned
    after a walk, so a host that runs many differently named programs does not
    grow the table's memory forever."""
    tbl = ConnTable()
    for i in range(3000):
        tbl.apply(opened(skaddr=A + i * 8, t=1_000 + i, tgid=0, attrib=Attrib.NONE))
        tbl.claim_owners([(A + i * 8, 1, 100 + i, 3, b"")], False, None,
                         lambda pid, _c: f"prog-{pid - 100}")
        if i:
            tbl.apply(closed(skaddr=A + (i - 1) * 8, t=50_000 + i))
    tbl.begin_walk(100_000)
    merge(tbl, snap(skaddr=A + 2999 * 8, t=100_000))
    tbl.remove_missing(100_000, {NETNS})
    assert len(tbl._names) < 10
    assert _live(tbl, A + 2999 * 8).comm == "prog-2999"


def test_namespaces_lists_every_live_rows_namespace():
    """Read across the slab at C speed: every live row's namespace is in it (a freed
    slot may add an old one; reconcile then scans the rows to be sure)."""
    tbl = ConnTable()
    assert tbl.namespaces() <= {0}
    tbl.apply(opened(skaddr=A))
    tbl.apply(opened(skaddr=B, netns=NETNS + 1))
    assert {NETNS, NETNS + 1} <= tbl.namespaces() <= {0, NETNS, NETNS + 1}
    tbl._grow(4096)  # a resize after the read: the slab's views were all released
