"""ConnTable never raises on bad input, and counts what it cannot apply.

The ring-buffer reader hands the table only whole records of the right size,
but a table that raised on garbage would kill the event thread and freeze every
view, so the table is fuzzed directly: arbitrary bytes, arbitrary batches, and
real records (recfactory) with bytes flipped, in any order. Whatever happens,
the table stays self-consistent and bounded.
"""

from __future__ import annotations

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from recfactory import NETNS as NETNS_OF_SEEDS, merge, raw
from sockwatch import records
from sockwatch.records import Kind, Role
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


def _table_state(tbl: ConnTable) -> dict:
    return {key: (bytes(tbl._slab[slot * SIZE : (slot + 1) * SIZE]), tbl._alive[slot],
                  tbl._flags[slot], tbl._names[tbl._name[slot]])
            for key, slot in tbl._index.items()}


_KEYS = (0xFFFF888000001000, 0xFFFF888000002000)
_row = st.fixed_dictionaries({
    "skaddr": st.sampled_from(_KEYS), "kind": st.sampled_from([Kind.OPEN, Kind.SNAPSHOT]),
    "tgid": st.sampled_from([0, 7, 9]), "fd": st.sampled_from([-1, 3, 4]),
    "attrib": st.sampled_from([records.Attrib.NONE, records.Attrib.CONNECT]),
    "comm": st.sampled_from([b"", b"a", b"b"]), "bytes_sent": st.sampled_from([0, 5]),
    "dt": st.integers(-2, 3)})
_step = st.one_of(
    st.tuples(st.just("record"), _row),
    st.tuples(st.just("walk"), st.lists(_row, max_size=3)),
    st.tuples(st.just("name"), st.sampled_from(_KEYS), st.sampled_from([7, 8]),
              st.sampled_from([3, 5])))


_ATTRIBUTED = {"skaddr": _KEYS[0], "kind": Kind.SNAPSHOT, "tgid": 7, "fd": -1,
               "attrib": records.Attrib.CONNECT, "comm": b"a", "bytes_sent": 0, "dt": 0}


@FUZZ
@given(st.lists(_step, max_size=12))
@example([("walk", [_ATTRIBUTED]), ("name", _KEYS[0], 7, 3), ("walk", [_ATTRIBUTED])])
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
                tbl.remove_missing(t, {NETNS_OF_SEEDS})
        assert _table_state(fast) == _table_state(slow)
