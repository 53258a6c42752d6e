"""ConnTable never raises on bad input, and counts what it cannot apply.

The ring-buffer reader hands the table only whole records of the right size,
but a table that raised on garbage would kill the event thread and freeze every
view, so the table is fuzzed directly: arbitrary bytes, arbitrary batches, and
real records (recfactory) with bytes flipped, in any order. Whatever happens,
the table stays self-consistent and bounded.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from recfactory import NETNS, merge, raw
from sockwatch import records
from sockwatch.records import Attrib, Kind, Result, Role
from sockwatch.tables import ConnTable

FUZZ = settings(max_examples=300, database=None, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])
SIZE = records.EVENT_SIZE
SEEDS = [
    raw(kind=Kind.OPEN, skaddr=0xFFFF888000001000, ts_ns=1_000),
    raw(kind=Kind.CLOSE, skaddr=0xFFFF888000001000, ts_ns=2_000, state=records.TCP_CLOSE),
    raw(kind=Kind.SNAPSHOT, skaddr=0xFFFF888000002000, ts_ns=3_000, role=Role.UNKNOWN),
    raw(kind=Kind.OPEN, skaddr=0xFFFF888000003000, ts_ns=500, role=Role.LISTENER,
        state=records.TCP_LISTEN),
]


def consistent(tbl: ConnTable, applied: int) -> None:
    """Every record either became or touched a row, or was counted as malformed."""
    assert len(tbl.live) <= tbl.max_live
    assert len(tbl.closed) <= tbl.closed.maxlen
    assert tbl.counters["malformed"] <= applied
    for key, row in tbl.live.items():
        assert len(row.raw) == SIZE
        assert row.key == key
        row.connection()  # views may decode any live row: it must not raise
    for row in tbl.closed:
        assert row.closed_ns >= 0


mutated = st.builds(
    lambda seed, flips: bytes(_flip(seed, flips)),
    st.sampled_from(SEEDS),
    st.lists(st.tuples(st.integers(0, SIZE - 1), st.integers(0, 255)), max_size=24),
)


def _flip(seed: bytes, flips: list[tuple[int, int]]) -> bytearray:
    buf = bytearray(seed)
    for off, val in flips:
        buf[off] = val
    return buf


@FUZZ
@given(st.lists(st.one_of(mutated, st.binary(max_size=2 * SIZE)), max_size=30))
@example([b""])
@example([SEEDS[0][:-1]])
@example([b"\xff" * SIZE])
def test_apply_never_raises(recs):
    """One record at a time, any bytes: applied, or counted as malformed."""
    tbl = ConnTable(closed_capacity=8, max_live=4)
    for rec in recs:
        tbl.apply(rec)
    consistent(tbl, len(recs))
    tbl.begin_walk(10_000)
    tbl.remove_missing(10_000, {row.netns for row in tbl.live.values()})
    consistent(tbl, len(recs))


@FUZZ
@given(st.lists(mutated, max_size=20), st.lists(st.integers(0, 40 * SIZE), max_size=30))
def test_apply_batch_with_any_offsets_never_raises(recs, offsets):
    """A batch blob with offsets that may point past its end or inside a record."""
    blob = b"".join(recs)
    tbl = ConnTable(closed_capacity=8, max_live=4)
    tbl.apply_batch(blob, offsets)
    consistent(tbl, len(offsets))
    past_end = sum(off + SIZE > len(blob) for off in offsets)
    assert tbl.counters["malformed"] >= past_end


@FUZZ
@given(st.lists(mutated, max_size=20))
def test_snapshot_merge_never_raises(rows):
    """Walk rows with garbage in them: merged or counted, and the walk completes."""
    tbl = ConnTable(closed_capacity=8, max_live=4)
    tbl.begin_walk(5_000)
    merge(tbl, *rows)
    tbl.remove_missing(5_000, {0})
    consistent(tbl, len(rows))


def test_truncated_record_is_counted_not_raised():
    tbl = ConnTable()
    tbl.apply(SEEDS[0][:-1])
    tbl.apply_batch(SEEDS[0], [0, 1, SIZE])
    assert tbl.counters["malformed"] == 3
    assert len(tbl.live) == 1


FAULTS = ("snapshot", "malformed role", "malformed attrib", "malformed result", "lost close",
          "lost close before the batch", "close without open time", "open without open time",
          "late close", "late close before the batch")


def _churn(rnd, t0: int, n: int, addresses: list[int], live: dict[int, int],
           fault: str | None, held: set[int] | None = None) -> list[bytes]:
    """``n`` records of sockets opening and closing at a few reused addresses, as the
    kernel sends them under churn: OPEN then CLOSE, and some lone CLOSEs (failed
    connects, untracked sockets). ``fault`` (one of FAULTS) then hits one record
    in 30 (``... before the batch``: one address's first record in 2): a
    SNAPSHOT, a role, attribution or result out of range, an OPEN at a busy
    address (its CLOSE was lost), a CLOSE without open time, port or inode (the
    socket predates us), an OPEN without open time and stamped late, a late
    CLOSE of an earlier socket at a busy address (whose own CLOSE may be lost).
    ``live`` (address -> open time) is the kernel's truth, from batch to batch.
    With ``held`` (the addresses whose OPEN the kernel holds back), most OPENs are
    held: a sweep now and then sends them (stamped with their open time), and a
    held socket's CLOSE goes alone, flagged."""
    out, t, seen = [], t0, set()
    for _ in range(n):
        t += rnd.randrange(1, 50)
        if held and rnd.randrange(20) == 0:  # release_opens: every held OPEN, in turn
            out.extend(raw(kind=Kind.OPEN, skaddr=a, ts_ns=live[a], open_ns=live[a],
                           flags=records.FLAG_OPEN_HELD) for a in sorted(held) if a in live)
            held.clear()
        addr = rnd.choice(addresses)
        if fault is not None and fault.endswith("before the batch"):
            hit = addr not in seen and rnd.randrange(2) == 0
        else:
            hit = fault is not None and rnd.randrange(30) == 0
        seen.add(addr)
        kw = dict(skaddr=addr, ts_ns=t, tgid=rnd.choice((0, 7, 8)), fd=rnd.choice((-1, 3)),
                  comm=rnd.choice((b"cli", b"srv")), attrib=rnd.choice(list(Attrib)),
                  role=rnd.choice((Role.CLIENT, Role.SERVER, Role.SERVER, Role.LISTENER)),
                  result=rnd.choice(list(Result)))
        if hit and fault == "snapshot":
            out.append(raw(kind=Kind.SNAPSHOT, **kw))
            continue
        if hit and fault.startswith("malformed"):
            kw[fault.split()[1]] = 9
        if hit and fault.startswith("late close") and addr in live:
            out.append(raw(kind=Kind.CLOSE, open_ns=live[addr] - 100,
                           **{**kw, "ts_ns": live[addr] - rnd.choice((1, 1, 0))}))
            if rnd.randrange(3):
                del live[addr]
        elif hit and fault == "close without open time" and addr in live:
            live.pop(addr)
            out.append(raw(kind=Kind.CLOSE, open_ns=0, sport=0, ino=0, **kw))
        elif addr not in live and rnd.randrange(8) == 0:
            out.append(raw(kind=Kind.CLOSE, open_ns=rnd.choice((0, t - 5)), **kw))
        elif addr in live and not (hit and fault.startswith("lost close")):
            flags = records.FLAG_OPEN_HELD if held is not None and addr in held else 0
            if held is not None:
                held.discard(addr)
            out.append(raw(kind=Kind.CLOSE, open_ns=live.pop(addr), flags=flags, **kw))
        elif hit and fault == "open without open time":
            live[addr] = t + 60
            out.append(raw(kind=Kind.OPEN, open_ns=0, **{**kw, "ts_ns": t + 60}))
        else:
            live[addr] = t - rnd.randrange(0, 30)
            if held is not None and rnd.randrange(4):
                held.add(addr)  # a new socket takes over the address's held entry
            else:
                if held is not None:
                    held.discard(addr)
                out.append(raw(kind=Kind.OPEN, open_ns=live[addr], **kw))
    return out


def _table_state(tbl: ConnTable) -> tuple:
    """Everything a view or an exporter could read of a table, in order."""
    def rows(it):
        return [(r.key, r.raw, r.ts_ns, r.alive_since_ns, r.netns, r.tgid, r.comm_bytes, r.fd,
                 r.attrib, r.named, r.seen_by, r.closed_ns, r.reconciled) for r in it]
    return (rows(tbl.live.values()), rows(tbl.closed), len(tbl.closed), dict(tbl.counters),
            dict(tbl.ended), dict(tbl._closed_during_walk))


@pytest.mark.parametrize("hold", (False, True), ids=("opens sent", "opens held"))
@pytest.mark.parametrize("fault", (None, *FAULTS))
@settings(max_examples=12, database=None, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(rnd=st.randoms(use_true_random=False), closed_capacity=st.sampled_from((0, 1, 7, 60, 4096)),
       max_live=st.sampled_from((1000, 1000, 5)), walk=st.sampled_from((False, False, True)))
def test_batches_apply_as_records_one_by_one(fault, hold, rnd, closed_capacity, max_live, walk):
    """Whole drained batches (where OPEN/CLOSE pairs and CLOSEs of held OPENs are
    counted without taking a slot and their closed rows built when read) leave
    the table exactly as the same records applied one at a time: rows, their
    order, the closed ring, every counter; across batches (the faulty one
    second, maybe during a walk)."""
    batched = ConnTable(closed_capacity=closed_capacity, max_live=max_live)
    single = ConnTable(closed_capacity=closed_capacity, max_live=max_live)
    addresses = [0xFFFF888000000000 + i * 0x800 for i in range(rnd.randrange(1, 9))]
    live: dict[int, int] = {}
    held: set[int] | None = set() if hold else None
    for t, batch_fault, in_walk in ((1_000, None, False), (100_000, fault, walk),
                                    (200_000, None, False)):
        recs = _churn(rnd, t, rnd.randrange(64, 200), addresses, live, batch_fault, held)
        if in_walk:
            for tbl in (batched, single):
                tbl.begin_walk(t)
        stride = SIZE + 8  # as the ring buffer lays records out: an 8-byte header each
        blob = b"".join(b"\0" * 8 + rec for rec in recs)
        batched.apply_batch(blob, range(8, len(blob), stride))
        for rec in recs:
            single.apply(rec)
        assert _table_state(batched) == _table_state(single)
        if in_walk:
            for tbl in (batched, single):
                tbl.remove_missing(t, {NETNS})


def test_churn_batch_takes_no_slot():
    """The common batch under churn is the one the pre-pass handles whole."""
    import random

    tbl = ConnTable()
    recs = _churn(random.Random(3), 1_000, 400, [0xFFFF888000000000, 0xFFFF888000000800], {},
                  None)
    blob = b"".join(recs)
    found = tbl._pairs(blob, range(0, len(blob), SIZE))
    assert found is not None and len(found[0]) > 100


class _ApplyEveryWalkRow(ConnTable):
    """The reference merge: every walk row applied as a record, none skipped."""

    def merge_snapshot(self, blob, offsets):
        offsets = list(offsets)
        self.apply_batch(blob, offsets)
        for off in offsets:
            if 0 <= off <= len(blob) - SIZE:
                key = records.field_reader("skaddr").unpack_from(blob, off)[0]
                if key in self._index:
                    self._flags[self._index[key]] |= 4  # _SEEN


def _slab_state(tbl: ConnTable) -> dict:
    return {key: (bytes(tbl._slab[slot * SIZE : (slot + 1) * SIZE]), tbl._alive[slot],
                  tbl._flags[slot], tbl._names[tbl._name[slot]])
            for key, slot in tbl._index.items()}


_KEYS = (0xFFFF888000001000, 0xFFFF888000002000)
_row = st.fixed_dictionaries({
    "skaddr": st.sampled_from(_KEYS), "kind": st.sampled_from([Kind.OPEN, Kind.SNAPSHOT]),
    "tgid": st.sampled_from([0, 7, 9]), "fd": st.sampled_from([-1, 3, 4]),
    "attrib": st.sampled_from([records.Attrib.NONE, records.Attrib.CONNECT,
                               records.Attrib.FD_TABLE]),
    "comm": st.sampled_from([b"", b"a", b"b"]), "bytes_sent": st.sampled_from([0, 5]),
    "dt": st.integers(-2, 3)})
_step = st.one_of(
    st.tuples(st.just("record"), _row),
    st.tuples(st.just("walk"), st.lists(_row, max_size=3)),
    st.tuples(st.just("name"), st.sampled_from(_KEYS), st.sampled_from([7, 8]),
              st.sampled_from([3, 5])))


_ATTRIBUTED = {"skaddr": _KEYS[0], "kind": Kind.SNAPSHOT, "tgid": 7, "fd": -1,
               "attrib": records.Attrib.CONNECT, "comm": b"a", "bytes_sent": 0, "dt": 0}


_UNOWNED = dict(_ATTRIBUTED, tgid=0, attrib=records.Attrib.NONE, comm=b"")
_JOINED = dict(_ATTRIBUTED, fd=3, attrib=records.Attrib.FD_TABLE)


@FUZZ
@given(st.lists(_step, max_size=12))
@example([("walk", [_ATTRIBUTED]), ("name", _KEYS[0], 7, 3), ("walk", [_ATTRIBUTED])])
@example([("walk", [_JOINED]), ("walk", [_UNOWNED]), ("walk", [_JOINED])])
def test_walk_rows_skipped_as_unchanged_leave_the_table_as_applying_them_would(steps):
    """merge_snapshot only moves the time of rows whose record did not change: any
    mix of records, owner lookups and walks ends in the state that applying
    every walk row gives, byte for byte."""
    fast, slow, t = ConnTable(), _ApplyEveryWalkRow(), 1_000

    def rec(row):
        nonlocal t
        t += 10 + row["dt"]
        return raw(ts_ns=t, **{k: v for k, v in row.items() if k != "dt"})

    for step in steps:
        if step[0] == "record":
            blob = rec(step[1])
            fast.apply(blob)
            slow.apply(blob)
        elif step[0] == "name":
            for tbl in (fast, slow):
                tbl.claim_owners([(step[1], 1, step[2], step[3], b"")], True, None,
                                 lambda pid, _c: f"p{pid}")
        else:
            rows = [rec(dict(row, kind=Kind.SNAPSHOT)) for row in step[1]]
            for tbl in (fast, slow):
                tbl.begin_walk(t)
                merge(tbl, *rows)
                tbl.remove_missing(t, {NETNS})
        assert _slab_state(fast) == _slab_state(slow)
        for fds in (False, True):  # the column scan picks the rows the per-row test does
            assert sorted(fast.owners_to_find(fds)) == sorted(
                fast.owners_to_find(fds, set(fast._index)))
