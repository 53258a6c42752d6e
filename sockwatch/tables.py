"""The live state: every TCP socket, who owns it, and the recently closed ones.

Records are the only input: OPEN and CLOSE from the ring buffer, SNAPSHOT rows
from iter/tcp at start and at each reconciliation. Nothing here touches the
kernel or /proc, so the rules below are unit-tested with plain records.

The table keeps each live socket's latest record in one slab of fixed-size
slots, with the owner as we know it written into the record itself, and reads
only the hot fields at a record's head (``records.HOT``) to apply it: under a
connection flood that is the whole per-record cost, and at 100k live sockets a
Python object per row would cost twice the memory of the records. Views get
``Row`` copies (``live[key]``, ``row()``) or scan fields straight from the slab
(``scan()``); closed rows are ``Row`` objects in a bounded ring.

Ordering rules (records from before a row's incarnation must not touch it,
since the kernel reuses sock addresses quickly):
- a connection is alive from ``alive_since_ns``: its first state timestamp, or
  the snapshot that first saw it when it predates sockwatch;
- a CLOSE older than that belongs to an earlier socket at the same address, and
  a record of a socket opened after it means that row's close was missed;
- a reconciliation removes only rows alive before the snapshot began that the
  snapshot did not see, in the namespaces it walked.
"""

from __future__ import annotations

import array
import collections
import mmap
import struct
from bisect import bisect_left
from collections.abc import Mapping
from dataclasses import dataclass
from itertools import chain, compress, repeat
from operator import eq, ge, itemgetter, not_
from typing import Callable, Iterable, Iterator

from sockwatch import records
from sockwatch.errors import SockwatchError
from sockwatch.records import Attrib, ConnEvent, Kind, Result, Role

# Attributions that name the socket's holder: made by a task touching the socket,
# or read from the fd tables by the start-up walk; others are guesses.
SURE_ATTRIBUTIONS = frozenset(
    {Attrib.CONNECT, Attrib.LISTEN, Attrib.ACCEPT, Attrib.FIRST_IO, Attrib.CLOSE, Attrib.FD_TABLE}
)
_OPEN, _CLOSE, _SNAPSHOT = Kind.OPEN, Kind.CLOSE, Kind.SNAPSHOT
_KINDS = frozenset(Kind)
_N_ROLES, _N_RESULTS, _N_ATTRIBS = len(Role), len(Result), len(Attrib)
_COMM = slice(records.COMM_OFFSET, records.COMM_OFFSET + records.COMM_LEN)
_SIZE = records.EVENT_SIZE
_hot = records.HOT.unpack_from
# What a row keeps of its owner inside its stored record: the latest record's
# time, and the owner's pid, fd and attribution (and the socket's role between).
_stored = records.field_reader("ts_ns", "sock.tgid", "sock.fd", "sock.role",
                               "sock.attrib").unpack_from
_OWNER = struct.Struct("<Ii")  # sock.tgid, sock.fd: adjacent in the record
_OWNER_OFFSET = records.SwEvent.sock.offset + records.SwSock.tgid.offset
_ATTRIB_OFFSET = records.SwEvent.sock.offset + records.SwSock.attrib.offset
_KEY = records.field_reader("skaddr").unpack_from
# The spans of a record around its owner (pid, fd, attribution and name), for
# merge_snapshot: [_A, _B) after the sock address, [_C, _D) from the attribution
# to the name, [_E, end) after the name. The role, between fd and attribution,
# is compared as a field.
_A, _B = 16, _OWNER_OFFSET
_C = _ATTRIB_OFFSET + 1
_D = records.COMM_OFFSET
_E = _D + records.COMM_LEN
_WALKED = records.field_reader("ts_ns", "skaddr", "sock.tgid", "sock.fd", "sock.role",
                               "sock.attrib").unpack_from
_comm = struct.Struct(f"{records.COMM_OFFSET}x{records.COMM_LEN}s").unpack_from
_NETNS = records.field_reader("netns").unpack_from
_NETNS_OFFSET = records.SwEvent.netns.offset
_SELECT = records.field_reader("state", "sock.tgid", "sport", "dport").unpack_from
_owner = records.field_reader("sock.tgid", "sock.fd", "sock.attrib").unpack_from
_INO_AT = records.SwEvent.sock.offset + records.SwSock.ino.offset
# 1 for a guessed attribution (not in SURE_ATTRIBUTIONS: the fd tables must say who holds it)
_GUESSED = bytes(int(i not in SURE_ATTRIBUTIONS) for i in range(256))
_MIN_SLOTS = 1024
# Row flags
_NAMED = 1  # the owner was read from the kernel's fd tables (Monitor.resolve_owners)
_BY_SNAPSHOT = 2  # first seen by a kernel walk, not by an event
_SEEN = 4  # seen by the kernel walk under way
_CLEAR_SEEN = bytes(i & ~_SEEN for i in range(256))
_UNNAMED = bytes(0 if i & _NAMED else 1 for i in range(256))
_OPENED = tuple(f"opened_{r.name.lower()}" for r in Role)  # indexed by role, no enum per record
# Where the batch pre-pass (ConnTable._pairs) reads its columns in each record.
_TS_AT = records.SwEvent.ts_ns.offset
_KEY_AT = records.SwEvent.skaddr.offset
_KIND_AT = records.SwEvent.kind.offset
_RESULT_AT = records.SwEvent.result.offset
_OPEN_NS_AT = records.SwEvent.sock.offset + records.SwSock.open_ns.offset
_ROLE_AT = records.SwEvent.sock.offset + records.SwSock.role.offset
_FLAGS_AT = records.SwEvent.sock.offset + records.SwSock.flags.offset
_HELD = records.FLAG_OPEN_HELD
_IS_HELD = bytes(int(bool(i & _HELD)) for i in range(256))
_PAIRED_MIN = 64  # records in a batch below which the pre-pass costs more than it saves
_ALIVE = records.field_reader("ts_ns", "sock.open_ns").unpack_from
# A record's kind << 2 | the kind of the previous record at its address (0: none),
# as bytes.translate tables that keep 1 where the code is one of these:
_PAIR_CLOSE = bytes(int(i == 9) for i in range(256))  # CLOSE after its OPEN
_LONE_CLOSE = bytes(int(i in (8, 10)) for i in range(256))  # CLOSE first or after a CLOSE
_REOPEN = 5  # OPEN after an OPEN: the first one's close was missed
_IS_OPEN = bytes(int(i == _OPEN) for i in range(256))
_IS_CLOSE = bytes(int(i == _CLOSE) for i in range(256))
_IS_ZERO = bytes(int(i == 0) for i in range(256))
_CLOSE_BIT = 32  # in the per-record counting code: (kind - 1) << 5 | role << 3 | result


def _columns(blob: bytes, offsets: Iterable[int]
             ) -> tuple[Callable[[int], bytes], Callable[[int], memoryview]] | None:
    """Readers of one field across the records of a batch laid out evenly (as the
    ring buffer drains it, as a walk reads it): ``u8(at)`` gives the byte at
    ``at`` of every record as bytes, ``u64(at)`` the u64 there as a memoryview,
    both strided copies made at C speed. None when ``offsets`` is not an even
    layout of whole records inside ``blob``."""
    n = len(offsets) if isinstance(offsets, range) else 0
    if not n or not isinstance(blob, bytes):
        return None
    base, step = offsets.start, offsets.step
    span = (n - 1) * step
    if base < 0 or step < _SIZE or step % 8 or base + span + _SIZE > len(blob):
        return None
    view = memoryview(blob)

    def u64(at: int) -> memoryview:
        return view[base + at : base + at + span + 8].cast("Q")[:: step // 8]

    def u8(at: int) -> bytes:
        return blob[base + at : base + at + span + 1 : step]

    return u8, u64


def _well_formed(u8: Callable[[int], bytes], kinds: bytes) -> bool:
    """Every record of a batch (read by ``_columns``) is of one of ``kinds``, with
    a role, attribution and result this table knows (checked by deleting the known
    values: C speed, where max() steps through the bytes one by one)."""
    return not (u8(_KIND_AT).translate(None, kinds)
                or u8(_ROLE_AT).translate(None, bytes(range(_N_ROLES)))
                or u8(_ATTRIB_OFFSET).translate(None, bytes(range(_N_ATTRIBS)))
                or u8(_RESULT_AT).translate(None, bytes(range(_N_RESULTS))))


@dataclass(slots=True)
class Connection:
    """One socket as views see it: the kernel's latest record plus its owner."""

    ev: ConnEvent  # latest record: tuple, state, counters
    tgid: int
    comm: str
    fd: int
    alive_since_ns: int
    seen_by: str  # "event" or "snapshot": how sockwatch first learned of it
    closed_ns: int = 0
    reconciled: bool = False  # removed by reconciliation, not by a CLOSE record

    @property
    def key(self) -> int:
        return self.ev.skaddr

    @property
    def process(self) -> str:
        """The name used as the ``process`` label: never empty."""
        return self.comm or "unknown"

    @property
    def owner_is_guess(self) -> bool:
        """No task touched it while we watched, nor did the start-up walk find its
        holder: the fd tables must say who holds it."""
        return self.tgid == 0 or self.ev.attrib not in SURE_ATTRIBUTIONS


class Row:
    """A socket in the table: its latest raw record and what we learned of its owner."""

    __slots__ = ("raw", "ts_ns", "alive_since_ns", "netns", "tgid", "comm", "fd", "attrib",
                 "named", "seen_by", "closed_ns", "reconciled")

    def __init__(self, raw: bytes, ts_ns: int, alive_since_ns: int, netns: int, tgid: int,
                 fd: int, attrib: int, seen_by: str):
        self.raw = raw
        self.ts_ns = ts_ns
        self.alive_since_ns = alive_since_ns
        self.netns = netns
        self.tgid = tgid
        self.comm: bytes | str | None = None  # None: the raw record's; str once resolved
        self.fd = fd
        self.attrib = attrib  # of the record the owner came from
        self.named = False  # the owner was read from the fd tables: not a guess
        self.seen_by = seen_by
        self.closed_ns = 0
        self.reconciled = False

    @property
    def key(self) -> int:
        return _hot(self.raw)[1]

    @property
    def comm_bytes(self) -> bytes | str:
        return self.raw[_COMM] if self.comm is None else self.comm

    @property
    def comm_name(self) -> str:
        comm = self.comm_bytes
        return comm if isinstance(comm, str) else records.decode_comm(comm)

    def connection(self) -> Connection:
        ev = records.decode(self.raw)
        return Connection(ev, self.tgid, self.comm_name, self.fd, self.alive_since_ns, self.seen_by,
                          self.closed_ns, self.reconciled)


def _reserve(slots: int) -> mmap.mmap:
    """A slab for ``slots`` records: private anonymous memory, zero until written.
    Only the pages of slots in use are resident, so reserving room for the most
    the table may hold costs nothing until it does; a bytearray had to be
    reallocated (briefly twice the size) to grow, and its free slots were
    resident from the start."""
    try:
        return mmap.mmap(-1, slots * _SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except OSError as exc:
        raise SockwatchError(f"cannot reserve memory for {slots} connections "
                             f"({slots * _SIZE >> 20} MiB: {exc.strerror}); "
                             "lower tables.max_connections") from None


def _takes_owner(tgid: int, attrib: int, ours: int) -> bool:
    """Whether a record's owner (pid ``tgid``, attribution ``attrib``) replaces the
    row's (pid ``ours``): one a task made or the fd tables named does, a guess only
    when we know no owner, and a record that names none never does."""
    return bool(tgid) and (attrib in SURE_ATTRIBUTIONS or ours == 0)


def _closed_row(stored: bytes | mmap.mmap, so: int, alive: int, flags: int, name: str | None,
                raw: bytes, ts: int, netns: int, tgid: int, fd: int, attrib: int) -> Row:
    """The closed row of a socket from its CLOSE record and the record we stored for
    it (at ``so`` in ``stored``; its resolved ``name``, if any): the record's owner if
    a task made it (or we knew none), else ours with its name; a known fd stays."""
    s_tgid, s_fd, s_attrib = _owner(stored, so)
    takes = _takes_owner(tgid, attrib, s_tgid)
    row = Row(raw, ts, alive, netns, tgid if takes else s_tgid, fd if fd >= 0 else s_fd,
              attrib if takes else s_attrib, "snapshot" if flags & _BY_SNAPSHOT else "event")
    if not takes:
        row.comm = name if name is not None else _comm(stored, so)[0]
    row.named = bool(flags & _NAMED)
    row.closed_ns = ts
    return row


class _Pairs:
    """Closed rows of connections that opened and closed within one batch, kept as
    positions of their OPEN and CLOSE records in the batch (from ``start`` on)."""

    __slots__ = ("blob", "offsets", "closes", "opens", "start")

    def __init__(self, blob: bytes, offsets: range, closes: list[int] | range,
                 opens: list[int] | range):
        self.blob, self.offsets, self.closes, self.opens = blob, offsets, closes, opens
        self.start = 0

    def __len__(self) -> int:
        return len(self.closes) - self.start

    def rows(self) -> Iterator[Row]:
        """The rows, as the slab path would have built them (the OPEN in the slot)."""
        blob, offsets, start = self.blob, self.offsets, self.start
        for c, o in zip(self.closes[start:], self.opens[start:]):
            c_off, o_off = offsets[c], offsets[o]
            raw = blob[c_off : c_off + _SIZE]
            ts, _key, _k, _r, _s, _o, netns, _open, tgid, fd, _role, attrib = _hot(raw)
            o_ts, open_ns = _ALIVE(blob, o_off)
            yield _closed_row(blob, o_off, open_ns or o_ts, 0, None, raw, ts, netns, tgid, fd,
                              attrib)


class ClosedRing:
    """The most recently closed rows, oldest first, at most ``maxlen`` of them.

    Under churn nearly every CLOSE lands here and is pushed out unread within a
    second, so rows of connections that came and went within one batch are kept
    as that batch's records and built only when read (``add_pairs``); other
    rows are appended built.
    """

    def __init__(self, maxlen: int):
        self.maxlen = maxlen
        self._parts: collections.deque[Row | _Pairs] = collections.deque()
        self._len = 0

    def append(self, row: Row) -> None:
        parts = self._parts
        parts.append(row)
        if self._len < self.maxlen:
            self._len += 1
        elif type(parts[0]) is Row:  # full: the oldest row goes (this one, if maxlen is 0)
            parts.popleft()
        else:
            self._len += 1
            self._trim()

    def add_pairs(self, blob: bytes, offsets: range, closes: list[int] | range,
                  opens: list[int] | range) -> None:
        """Rows of the CLOSE records at ``offsets[closes[i]]``, each of whose socket
        was opened by the OPEN at ``offsets[opens[i]]`` in the same ``blob``."""
        self._parts.append(_Pairs(blob, offsets, closes, opens))
        self._len += len(closes)
        self._trim()

    def _trim(self) -> None:
        parts = self._parts
        while self._len > self.maxlen:
            part = parts[0]
            size = len(part) if isinstance(part, _Pairs) else 1
            drop = min(size, self._len - self.maxlen)
            if drop == size:
                parts.popleft()
            else:
                part.start += drop
            self._len -= drop

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[Row]:
        for part in list(self._parts):
            if isinstance(part, _Pairs):
                yield from part.rows()
            else:
                yield part


class LiveRows(Mapping):
    """The live rows as a read-only mapping of key to ``Row`` copies, made on access:
    for tests and narrow lookups; bulk readers use ``ConnTable.scan``."""

    def __init__(self, table: "ConnTable"):
        self._table = table

    def __getitem__(self, key: int) -> Row:
        return self._table._row(self._table._index[key])

    def __contains__(self, key: object) -> bool:
        return key in self._table._index

    def __iter__(self) -> Iterator[int]:
        return iter(list(self._table._index))

    def __len__(self) -> int:
        return len(self._table._index)


class ConnTable:
    """``process -> fd -> socket -> 5-tuple``, applied from raw records.

    Live rows live in slots of ``_slab`` (one record each, the owner written
    into it), found by socket address through ``_index``; per-slot extras sit in
    parallel arrays. The slab is address space reserved for ``max_live`` records
    (see ``_reserve``): a slot's pages become resident when it is first written,
    and the slab is never copied to grow. Freed slots are reused, lowest first;
    the slots in use grow by a quarter and are compacted after a walk once three
    quarters of them are free, so memory follows the number of live sockets
    both ways.
    """

    def __init__(self, closed_capacity: int = 4096, max_live: int = 262144):
        self._index: dict[int, int] = {}  # socket address -> slot
        self._reserved = max(max_live, _MIN_SLOTS)  # slots the slab has room for
        self._slab = _reserve(self._reserved)
        self._alive = array.array("Q")  # alive_since_ns
        self._flags = bytearray()  # _NAMED | _BY_SNAPSHOT | _SEEN
        self._name = array.array("I")  # index into _names of the resolved name; 0: none
        self._free: list[int] = []  # free slots, lowest last
        self._names: list[str] = [""]
        self._name_ids: dict[str, int] = {}
        self._grow(_MIN_SLOTS)
        self.live = LiveRows(self)
        self.closed = ClosedRing(closed_capacity)
        self.max_live = max_live
        self.counters: collections.Counter[str] = collections.Counter()
        # While a kernel walk is under way: close time of every socket that closed,
        # so a row the walk read before the close cannot bring it back.
        self._walk_since: int | None = None
        self._closed_during_walk: dict[int, int] = {}
        # (role, result) numbers of every connection that ended; see ended_by_name()
        self.ended: collections.Counter[tuple[int, int]] = collections.Counter()

    # -- slots -----------------------------------------------------------------
    @property
    def capacity(self) -> int:
        """Slots allocated (live rows plus free ones)."""
        return len(self._alive)

    def _grow(self, n: int) -> None:
        old = self.capacity
        n = min(n, self._reserved - old)
        self._alive.extend(array.array("Q", bytes(8 * n)))
        self._flags.extend(bytes(n))
        self._name.extend(array.array("I", bytes(4 * n)))
        self._free[:0] = range(old + n - 1, old - 1, -1)

    def _insert(self, key: int, blob: bytes, off: int, alive_since: int, flags: int) -> None:
        if not self._free:
            self._grow(self.capacity // 4)
        slot = self._free.pop()
        self._index[key] = slot
        o = slot * _SIZE
        self._slab[o : o + _SIZE] = blob[off : off + _SIZE]
        self._alive[slot] = alive_since
        self._flags[slot] = flags
        self._name[slot] = 0

    def _drop(self, key: int, slot: int) -> None:
        del self._index[key]
        self._free.append(slot)

    def _row(self, slot: int) -> Row:
        """A copy of a live row, as the closed ring and views hold it."""
        o = slot * _SIZE
        raw = bytes(self._slab[o : o + _SIZE])
        ts, _key, _k, _r, _s, _o, netns, _open, tgid, fd, _role, attrib = _hot(raw)
        flags = self._flags[slot]
        row = Row(raw, ts, self._alive[slot], netns, tgid, fd, attrib,
                  "snapshot" if flags & _BY_SNAPSHOT else "event")
        if self._name[slot]:
            row.comm = self._names[self._name[slot]]
        row.named = bool(flags & _NAMED)
        return row

    def _set_owner(self, o: int, tgid: int, fd: int, attrib: int) -> None:
        _OWNER.pack_into(self._slab, o + _OWNER_OFFSET, tgid, fd)
        self._slab[o + _ATTRIB_OFFSET] = attrib

    def _compact(self) -> None:
        """Move the live rows to the lowest slots and give the rest back, once
        three quarters of the slab are free (a burst of sockets has gone)."""
        n, cap = len(self._index), self.capacity
        if cap <= _MIN_SLOTS or n * 4 > cap or self._walk_since is not None:
            return
        size = max(_MIN_SLOTS, n + n // 4)
        slab, alive = _reserve(self._reserved), array.array("Q", bytes(8 * size))
        flags, name = bytearray(size), array.array("I", bytes(4 * size))
        old = memoryview(self._slab)
        # A new dict: one never shrinks its table on deletes, and after 200k
        # sockets have gone the old table alone would keep about 10 MB.
        index: dict[int, int] = {}
        for new, (key, slot) in enumerate(self._index.items()):
            slab[new * _SIZE : (new + 1) * _SIZE] = old[slot * _SIZE : (slot + 1) * _SIZE]
            alive[new], flags[new], name[new] = self._alive[slot], self._flags[slot], self._name[slot]
            index[key] = new
        old.release()
        self._index = index
        self._slab, self._alive, self._flags, self._name = slab, alive, flags, name
        self._free = list(range(size - 1, n - 1, -1))

    def _name_id(self, name: str) -> int:
        nid = self._name_ids.get(name)
        if nid is None:
            nid = self._name_ids[name] = len(self._names)
            self._names.append(name)
        return nid

    def _prune_names(self) -> None:
        """Forget resolved names no live row uses any more (names of exited processes)."""
        if len(self._names) <= 1024 + len(self._index):
            return
        used = {self._name[slot] for slot in self._index.values()} - {0}
        keep = [""] + [self._names[i] for i in sorted(used)]
        remap = {old: new for new, old in enumerate(sorted(used), 1)}
        for slot in self._index.values():
            self._name[slot] = remap.get(self._name[slot], 0)
        self._names, self._name_ids = keep, {name: i for i, name in enumerate(keep) if i}

    # -- records ---------------------------------------------------------------
    def apply_batch(self, blob: bytes, offsets: Iterable[int]) -> None:
        """Apply records found at ``offsets`` in ``blob`` (the ring buffer's hot path:
        hot fields are read in place, and bytes are copied only for what is kept).

        Under churn most sockets open and close within one batch: such an OPEN and
        its CLOSE leave only counts and a closed row, so ``_pairs`` finds them for
        the whole batch at once and they never take a slot; the closed ring builds
        their rows if anyone reads them. Every other record is applied in order.
        """
        found = self._pairs(blob, offsets)
        if found is None:
            self._apply_each(blob, offsets)
        else:
            self._apply_paired(blob, offsets, *found)

    def _apply_each(self, blob: bytes, offsets: Iterable[int]) -> None:
        """Apply records one by one. A new socket's OPEN, the commonest record with
        its CLOSE, is applied inline: calls are most of the cost in Python."""
        index, counters, free, slab = self._index, self.counters, self._free, self._slab
        closed, ended = self.closed, self.ended
        alive_a, flags_a, name_a = self._alive, self._flags, self._name
        room = self.max_live - len(index)
        quiet = self._walk_since is None  # closes during a walk must be remembered
        last = len(blob) - _SIZE
        for off in offsets:
            if not 0 <= off <= last:
                counters["malformed"] += 1  # a torn or misaddressed record
                continue
            h = _hot(blob, off)
            ts, skaddr, kind, result, _st, _old, netns, open_ns, tgid, fd, role, attrib = h
            slot = index.get(skaddr)
            if role >= _N_ROLES or attrib >= _N_ATTRIBS or result >= _N_RESULTS or kind not in _KINDS:
                counters["malformed"] += 1  # never from our kernel side; counted, not fatal
            elif kind == _OPEN and slot is None and room > 0:
                if not free:
                    self._grow(self.capacity // 4)
                    slab, alive_a, flags_a, name_a = self._slab, self._alive, self._flags, self._name
                slot = free.pop()
                index[skaddr] = slot
                room -= 1
                o = slot * _SIZE
                slab[o : o + _SIZE] = blob[off : off + _SIZE]
                alive_a[slot] = open_ns or ts
                flags_a[slot] = 0
                name_a[slot] = 0
                counters[_OPENED[role]] += 1
            elif (kind == _CLOSE and slot is not None and open_ns and quiet and ts >= alive_a[slot]
                  and not blob[off + _FLAGS_AT] & _HELD):
                # _close, for the close of a socket we saw open
                del index[skaddr]
                free.append(slot)
                room += 1
                closed.append(self._closing_row(slot, blob[off : off + _SIZE], ts, netns, tgid, fd,
                                                attrib))
                ended[(role, result)] += 1
            else:
                if kind == _CLOSE:
                    self._close(blob, off, h)
                else:
                    self._upsert(blob, off, h)
                room = self.max_live - len(index)
                slab, alive_a, flags_a, name_a = self._slab, self._alive, self._flags, self._name

    def _pairs(self, blob: bytes, offsets: Iterable[int]
               ) -> tuple[list[int], list[int], list[int], bytes, list[int]] | None:
        """For a batch as the ring buffer drains it (evenly spaced records): the
        positions of each CLOSE that comes right after its socket's OPEN, or whose
        OPEN the kernel held back (the CLOSE is then its own OPEN), of those OPENs,
        and of every other record, a counting code per record, and the number of
        held OPENs by role; None when the batch must be applied one record at a time.

        Applied one by one, such an OPEN takes a free slot and its CLOSE gives it
        back through the inline paths; that is certain, for every pair at once, when:
        - no walk is under way (its closes are remembered) and the table has room
          for every record (no OPEN can be refused);
        - every record is a valid OPEN or CLOSE, and no OPEN follows an OPEN at its
          address: then each address is free whenever one of its OPENs comes,
          provided a socket live before the batch starts with a CLOSE that ends it;
        - both records of each pair carry an open time, the CLOSE's not older;
        - a held CLOSE follows no OPEN at its address, and its address has no live
          row unless a CLOSE before it in the batch ended that row.
        Columns are read through strided views and compared with builtins, so the
        cost per record is a few C-level steps, not a Python iteration.
        """
        n = len(offsets) if isinstance(offsets, range) else 0
        columns = _columns(blob, offsets)
        if (columns is None or n < _PAIRED_MIN or self._walk_since is not None
                or self.max_live - len(self._index) < n
                or not _well_formed(columns[0], bytes((_OPEN, _CLOSE)))):
            return None
        u8, u64 = columns
        kinds, roles, results = u8(_KIND_AT), u8(_ROLE_AT), u8(_RESULT_AT)
        keys = u64(_KEY_AT).tolist()
        ones = ((1 << 8 * n) - 1) // 255
        # A CLOSE whose OPEN the kernel held back is a pair by itself (its own OPEN).
        held = (int.from_bytes(u8(_FLAGS_AT).translate(_IS_HELD), "little")
                & int.from_bytes(kinds.translate(_IS_CLOSE), "little"))
        if held:
            # OPENs are held (the daemon's way): pairs are CLOSEs by themselves. The
            # few OPENs the sweep released, and the other records at their addresses
            # or at a live row's, may need one-by-one treatment (_sort_out_at).
            is_held = bytearray(held.to_bytes(n, "little"))
            special = set(compress(keys, kinds.translate(_IS_OPEN))) | (self._index.keys() & keys)
            if special:
                self._sort_out_at(special, is_held, keys, kinds, u64)
            closes = opens = list(compress(range(n), is_held))
            rest = list(compress(range(n), is_held.translate(_IS_ZERO)))
            opened = list(compress(u64(_OPEN_NS_AT).tolist(), is_held))
            if not closes or not (min(opened) and all(
                    map(ge, compress(u64(_TS_AT).tolist(), is_held), opened))):
                return None
        else:
            found = self._pair_up(keys, kinds, u64)
            if found is None:
                return None
            closes, opens, rest = found
        counting = ((int.from_bytes(kinds, "little") - ones) << 5
                    | int.from_bytes(roles, "little") << 3
                    | int.from_bytes(results, "little")).to_bytes(n, "little")
        held_roles = bytes(map(roles.__getitem__, closes)) if held else b""
        return closes, opens, rest, counting, list(map(held_roles.count, range(_N_ROLES)))

    def _sort_out_at(self, special: set[int], is_held: bytearray, keys: list[int],
                     kinds: bytes, u64: Callable[[int], memoryview]) -> None:
        """Clear ``is_held`` for the held CLOSEs at ``special`` addresses that one by
        one would not find free. Walks the records at those addresses in order as
        the one-by-one path would apply them: an OPEN at a free address takes it, a
        CLOSE at or after the row's alive time frees it; anything else (an OPEN over
        a row, a held CLOSE at a row, an older CLOSE) leaves the address to the
        one-by-one path from there on."""
        ts, open_ns, index, alive_since = u64(_TS_AT), u64(_OPEN_NS_AT), self._index, self._alive
        unknown = -1
        row: dict[int, int | None] = {}  # address -> its row's alive time; None: free
        for i in compress(range(len(keys)), map(special.__contains__, keys)):
            key = keys[i]
            if key in row:
                alive = row[key]
            else:
                slot = index.get(key)
                alive = None if slot is None else alive_since[slot]
            if alive == unknown:
                is_held[i] = 0
            elif kinds[i] == _OPEN:
                row[key] = unknown if alive is not None else open_ns[i] or ts[i]
            elif is_held[i]:
                if alive is not None:
                    is_held[i] = 0
                    row[key] = unknown
                else:
                    row[key] = None
            elif alive is not None:
                row[key] = None if ts[i] >= alive else unknown

    def _pair_up(self, keys: list[int], kinds: bytes, u64: Callable[[int], memoryview]
                 ) -> tuple[list[int], list[int], list[int]] | None:
        """``_pairs`` for a batch of OPENs sent at once: each CLOSE right after its
        socket's OPEN makes a pair with it, matched by address."""
        n = len(keys)
        # Position of the previous record at the same address (n: none), in one pass:
        # zip looks each record up before storing its own position. ``last`` ends
        # holding each address's last position.
        last: dict[int, int] = {}
        prev = list(map(itemgetter(0), zip(map(last.get, keys, repeat(n)),
                                            map(last.__setitem__, keys, range(n)))))
        before = bytes(map((kinds + b"\0").__getitem__, prev))
        code = (int.from_bytes(kinds, "little") << 2 | int.from_bytes(before, "little")
                ).to_bytes(n, "little")
        if _REOPEN in code:
            return None
        closes = list(compress(range(n), code.translate(_PAIR_CLOSE)))
        if not closes:
            return None
        opens = list(map(prev.__getitem__, closes))
        ts, open_ns = u64(_TS_AT).tolist(), u64(_OPEN_NS_AT).tolist()
        alive = list(map(open_ns.__getitem__, opens))
        if not (min(alive) and min(map(open_ns.__getitem__, closes))
                and all(map(ge, map(ts.__getitem__, closes), alive))):
            return None
        lone = list(compress(range(n), code.translate(_LONE_CLOSE)))
        live = last.keys() & self._index.keys()
        if live:  # each must start with a CLOSE that ends the row
            ended = 0
            for i in lone:
                slot = self._index.get(keys[i]) if before[i] == 0 else None
                if slot is not None:
                    if ts[i] < self._alive[slot]:
                        return None
                    ended += 1
            if ended != len(live):
                return None
        ends = list(last.values())
        return closes, opens, sorted(lone + list(compress(ends, bytes(map(kinds.__getitem__, ends))
                                                          .translate(_IS_OPEN))))

    def _apply_paired(self, blob: bytes, offsets: range, closes: list[int], opens: list[int],
                      rest: list[int], counting: bytes, held_opens: list[int]) -> None:
        """Count the pairs ``_pairs`` found (and the OPENs that held CLOSEs stand for,
        by role), hand the closed ring those it can hold, and apply the other records
        one by one, in batch order with the pairs."""
        for role, k in enumerate(held_opens):
            if k:
                self.counters[_OPENED[role]] += k
        counts = {c: counting.count(c) for c in set(counting)}
        for i in rest:
            counts[counting[i]] -= 1
        for c, k in counts.items():
            if k:
                role = c >> 3 & 3
                if c & _CLOSE_BIT:
                    self.ended[(role, c & 7)] += k
                else:
                    self.counters[_OPENED[role]] += k
        ring = self.closed
        first = max(0, len(closes) - ring.maxlen)  # only the last ones can stay in the ring
        keep, keep_opens = closes[first:], opens[first:]
        held, held_offsets, held_closes, held_opens = blob, offsets, keep, keep_opens
        if keep and 4 * len(keep) * offsets.step < len(blob):
            # The ring would pin a blob mostly of other records: copy out its pairs.
            starts = list(chain.from_iterable(zip(map(offsets.__getitem__, keep_opens),
                                                  map(offsets.__getitem__, keep))))
            held = b"".join(map(blob.__getitem__,
                                map(slice, starts, map(_SIZE.__add__, starts))))
            held_offsets = range(0, len(held), _SIZE)
            held_opens, held_closes = range(0, len(starts), 2), range(1, len(starts), 2)
        done, run = 0, []
        for i in rest:
            k = bisect_left(keep, i, done)
            if k > done:  # pairs closed before this record: into the ring first
                if run:
                    self._apply_each(blob, run)
                    run = []
                ring.add_pairs(held, held_offsets, held_closes[done:k], held_opens[done:k])
                done = k
            run.append(offsets[i])
        if run:
            self._apply_each(blob, run)
        if done < len(keep):
            ring.add_pairs(held, held_offsets, held_closes[done:], held_opens[done:])

    def apply(self, raw: bytes) -> None:
        """Apply one record (exactly ``records.EVENT_SIZE`` bytes)."""
        self.apply_batch(raw, (0,) if len(raw) == _SIZE else (-1,))

    def _upsert(self, blob: bytes, off: int, h: tuple) -> None:
        ts, skaddr, kind, _res, _st, _old, netns, open_ns, tgid, fd, role, attrib = h
        slot = self._index.get(skaddr)
        if slot is None:
            if kind == _SNAPSHOT and self._closed_during_walk.get(skaddr, -1) >= ts:
                return  # read by the walk just before it closed: not alive any more
            if len(self._index) >= self.max_live:
                self.counters["table_full"] += 1
                return
            self._insert(skaddr, blob, off, open_ns or ts,
                         _BY_SNAPSHOT if kind == _SNAPSHOT else 0)
        else:
            alive = self._alive[slot]
            if ts < alive:
                return  # a record from an earlier socket at this address
            if open_ns > alive:
                # A later socket at the same address: the old one closed unseen.
                self._retire(skaddr, slot, open_ns, "stale_replaced")
                self._upsert(blob, off, h)
                return
            self._update(slot, blob, off, ts, tgid, fd, attrib)
        if kind == _OPEN:
            self.counters[_OPENED[role]] += 1

    def _update(self, slot: int, blob: bytes, off: int, ts: int, tgid: int, fd: int,
                attrib: int) -> None:
        """A newer record brings counters and state; its owner replaces ours only if
        a task made it (a guess never replaces what a task or the fd tables told us), and
        a known fd never goes back to unknown."""
        slab, o = self._slab, slot * _SIZE
        s_ts, s_tgid, s_fd, _s_role, s_attrib = _stored(slab, o)
        takes = _takes_owner(tgid, attrib, s_tgid)
        c = o + records.COMM_OFFSET
        if ts >= s_ts:
            comm = slab[c : c + records.COMM_LEN]
            slab[o : o + _SIZE] = blob[off : off + _SIZE]
            if not takes:  # keep our owner: pid, attribution and name
                tgid, attrib = s_tgid, s_attrib
                slab[c : c + records.COMM_LEN] = comm
        elif takes:
            src = off + records.COMM_OFFSET
            slab[c : c + records.COMM_LEN] = blob[src : src + records.COMM_LEN]
        else:
            tgid, attrib = s_tgid, s_attrib
        if takes:
            self._name[slot] = 0
        self._set_owner(o, tgid, fd if fd >= 0 else s_fd, attrib)

    def _closing_row(self, slot: int, raw: bytes, ts: int, netns: int, tgid: int, fd: int,
                     attrib: int) -> Row:
        """The closed row of a live slot, from its CLOSE record (see ``_closed_row``)."""
        nid = self._name[slot]
        return _closed_row(self._slab, slot * _SIZE, self._alive[slot], self._flags[slot],
                           self._names[nid] if nid else None, raw, ts, netns, tgid, fd, attrib)

    def _close(self, blob: bytes, off: int, h: tuple) -> None:
        ts, skaddr, _kind, result, _st, _old, netns, open_ns, tgid, fd, role, attrib = h
        raw = bytes(blob[off : off + _SIZE])
        slot = self._index.get(skaddr)
        if blob[off + _FLAGS_AT] & _HELD:
            # Its OPEN was held back: this record announces the socket too. A row
            # at its address alive before it is an earlier socket, closed unseen.
            self.counters[_OPENED[role]] += 1
            if slot is not None and open_ns > self._alive[slot]:
                self._retire(skaddr, slot, open_ns, "stale_replaced")
                slot = None
        if slot is not None and ts >= self._alive[slot]:
            o = slot * _SIZE
            if not open_ns and records.needs_tuple_from(raw):
                # An untracked close (the socket predates us) comes after the kernel
                # released the port and detached the file: keep what the row knew.
                raw = records.with_tuple_of(raw, self._slab[o : o + _SIZE])
            row = self._closing_row(slot, raw, ts, netns, tgid, fd, attrib)
            self._drop(skaddr, slot)
        else:
            # Never seen open: a failed connect, or a socket that lived and died
            # between two reads. The CLOSE record carries everything.
            row = Row(raw, ts, open_ns or ts, netns, tgid, fd, attrib, "event")
        row.closed_ns = ts
        self.closed.append(row)
        self.ended[(role, result)] += 1
        if self._walk_since is not None:
            self._closed_during_walk[skaddr] = ts

    # -- reconciliation ----------------------------------------------------------
    def begin_walk(self, now_ns: int) -> None:
        """A kernel walk starts: remember closes until remove_missing() ends it."""
        self._walk_since = now_ns
        self._closed_during_walk.clear()
        self._flags = bytearray(self._flags.translate(_CLEAR_SEEN))

    def merge_snapshot(self, blob: bytes, offsets: Iterable[int]) -> None:
        """Apply iter/tcp rows found at ``offsets`` in ``blob`` (fresh counters, sockets
        that predate us), in order, and mark their rows seen by this walk.

        Most rows of most walks are idle sockets whose record has not changed but
        for its time: for those, _update would rewrite the slot with the same
        bytes. They are recognised by comparing the record with the slot at C
        speed (see _unchanged), and only their time moves on. The rows of a first
        walk are new: inserted straight away. Runs of other rows are applied as
        records.
        """
        if self._insert_new(blob, offsets):
            return
        flags, slab, unchanged, pending = self._flags, self._slab, self._unchanged, []
        insert = self._insert_walked
        for off in offsets:
            slot = unchanged(blob, off)
            if slot is None and not pending and insert(blob, off):
                continue
            if slot is not None and pending:  # the rows before it come first
                self._apply_walked(blob, pending)
                pending = []
                slot = unchanged(blob, off)
            if slot is None:
                pending.append(off)
            else:
                o = slot * _SIZE
                slab[o : o + 8] = blob[off : off + 8]  # ts_ns
                flags[slot] |= _SEEN
        if pending:
            self._apply_walked(blob, pending)

    def _insert_new(self, blob: bytes, offsets: Iterable[int]) -> bool:
        """Insert a whole chunk of walked rows at once when none of its sockets is in
        the table, as the first walk finds them (200k rows: 0.36 s one by one,
        0.16 s so); False, with nothing done, for any chunk _insert_walked might
        treat otherwise (a known or repeated socket, a socket that closed during
        the walk, a malformed row, no room, records not laid out evenly). The rows
        take free slots as _insert would; in a fresh or grown slab those are one
        run, filled by one copy."""
        n = len(offsets) if isinstance(offsets, range) else 0
        columns = _columns(blob, offsets)
        if (columns is None or len(self._index) + n > self.max_live
                or not _well_formed(columns[0], bytes((_SNAPSHOT,)))):
            return False
        u64 = columns[1]
        keys, stamps, opened = (u64(at).tolist() for at in (_KEY_AT, _TS_AT, _OPEN_NS_AT))
        if (len(set(keys)) != n or not self._index.keys().isdisjoint(keys)
                or not self._closed_during_walk.keys().isdisjoint(keys)):
            return False
        free = self._free
        if len(free) < n:
            self._grow(max(n - len(free), self.capacity // 4))
        slots = free[: -n - 1 : -1]  # as _insert would take them, one by one
        del free[-n:]
        alive = array.array("Q", [o or t for o, t in zip(opened, stamps)])
        first, base = slots[0], offsets.start
        if offsets.step == _SIZE and slots == list(range(first, first + n)):
            # one run of slots (a fresh or grown slab) for records back to back
            self._slab[first * _SIZE : (first + n) * _SIZE] = blob[base : base + n * _SIZE]
            self._alive[first : first + n] = alive
            self._flags[first : first + n] = bytes((_BY_SNAPSHOT | _SEEN,)) * n
            self._name[first : first + n] = array.array("I", bytes(4 * n))
        else:
            slab, alive_a, flags, name = self._slab, self._alive, self._flags, self._name
            for i, (slot, off) in enumerate(zip(slots, offsets)):
                slab[slot * _SIZE : (slot + 1) * _SIZE] = blob[off : off + _SIZE]
                alive_a[slot], flags[slot], name[slot] = alive[i], _BY_SNAPSHOT | _SEEN, 0
        self._index.update(zip(keys, slots))
        return True

    def _unchanged(self, blob: bytes, off: int) -> int | None:
        """The slot of the walked record at ``off`` if applying it would change
        nothing but the row's time; None if it must be applied. The owner (pid,
        fd, attribution and name) is compared as _update would merge it: a walk
        that names no owner leaves ours, however we learned it (an event, the fd
        tables, a name kept beside the slab); one that names the same owner, or
        only guesses beside ours, changes nothing either. All else must be the
        same bytes."""
        if not 0 <= off <= len(blob) - _SIZE:
            return None
        ts, key, tgid, fd, role, attrib = _WALKED(blob, off)
        slot = self._index.get(key)
        if slot is None:
            return None
        slab, o = self._slab, slot * _SIZE
        s_ts, s_tgid, s_fd, s_role, s_attrib = _stored(slab, o)
        if not (ts >= s_ts and role == s_role and (fd < 0 or fd == s_fd)
                and slab[o + _A : o + _B] == blob[off + _A : off + _B]
                and slab[o + _C : o + _D] == blob[off + _C : off + _D]
                and slab[o + _E : o + _SIZE] == blob[off + _E : off + _SIZE]):
            return None
        if not tgid:
            return slot
        if attrib != s_attrib or slab[o + _D : o + _E] != blob[off + _D : off + _E]:
            return None
        if not _takes_owner(tgid, attrib, s_tgid) or (tgid == s_tgid and not self._name[slot]):
            return slot
        return None

    def _insert_walked(self, blob: bytes, off: int) -> bool:
        """Insert the walked record at ``off`` as _upsert would, when it is a
        well-formed snapshot of a socket the table does not hold; False (nothing
        done) for anything else, which is then applied as a record."""
        if not 0 <= off <= len(blob) - _SIZE:
            return False
        ts, key, kind, result, _st, _old, _ns, open_ns, _tgid, _fd, role, attrib = _hot(blob, off)
        if (kind != _SNAPSHOT or key in self._index or len(self._index) >= self.max_live
                or role >= _N_ROLES or attrib >= _N_ATTRIBS or result >= _N_RESULTS
                or self._closed_during_walk.get(key, -1) >= ts):
            return False
        self._insert(key, blob, off, open_ns or ts, _BY_SNAPSHOT | _SEEN)
        return True

    def _apply_walked(self, blob: bytes, offsets: list[int]) -> None:
        self.apply_batch(blob, offsets)
        index, flags, last = self._index, self._flags, len(blob) - _SIZE
        for off in offsets:
            if 0 <= off <= last:
                slot = index.get(_KEY(blob, off)[0])
                if slot is not None:
                    flags[slot] |= _SEEN

    def remove_missing(self, snapshot_ns: int, walked: set[int]) -> int:
        """Drop rows the walk should have seen but did not; returns how many.

        Only namespaces in ``walked`` were looked at; rows elsewhere stay. Ends
        the walk, and gives back slab space a burst of sockets no longer needs.
        """
        slab, flags, alive = self._slab, self._flags, self._alive
        gone = [(key, slot) for key, slot in self._index.items()
                if not flags[slot] & _SEEN and alive[slot] < snapshot_ns
                and _NETNS(slab, slot * _SIZE)[0] in walked]
        for key, slot in gone:
            self._retire(key, slot, snapshot_ns, "reconciled_removed")
        self._walk_since = None
        self._closed_during_walk.clear()
        self._compact()
        self._prune_names()
        return len(gone)

    def _retire(self, key: int, slot: int, when_ns: int, counter: str) -> None:
        """Move a row whose close was never seen to the closed ring, and count it."""
        row = self._row(slot)
        self._drop(key, slot)
        row.closed_ns = when_ns
        row.reconciled = True
        self.closed.append(row)
        self.counters[counter] += 1

    # -- reading -------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._index)

    def row(self, key: int) -> Row | None:
        """A copy of the live row of ``key``, if there is one."""
        slot = self._index.get(key)
        return None if slot is None else self._row(slot)

    def scan(self, unpack: Callable[[bytes, int], tuple]) -> Iterator[tuple[tuple, bytes | str]]:
        """(``unpack(slab, offset)``, owner's name) of every live row, straight from
        the slab: the fields a scrape needs, without a copy per row. The owner's
        pid, fd and attribution are in the record; the name is raw comm bytes, or
        the resolved name. Hold the lock the table is guarded by meanwhile.
        Built from maps over the slots, lazily: a scrape of 200k rows spent half
        its time in the generator this was, and lists of 200k new integers or
        names would stay behind in the heap as fragments."""
        slab, slots = self._slab, list(self._index.values())
        names = map(self._names.__getitem__, map(self._name.__getitem__, slots))
        comms = map(itemgetter(0), map(_comm, repeat(slab), map(_SIZE.__mul__, slots)))
        owners = (name or comm for name, comm in zip(names, comms))  # "": not resolved
        return zip(map(unpack, repeat(slab), map(_SIZE.__mul__, slots)), owners)

    def _column(self, fmt: str, offset: int) -> memoryview:
        """The field of format ``fmt`` at ``offset`` in every slot in use (freed ones
        too), indexed by slot: a strided view of the slab, read at C speed. Hold
        the table's lock while using it (a compaction replaces the slab)."""
        size = struct.calcsize(fmt)
        assert offset % size == 0 and _SIZE % size == 0, (fmt, offset)
        words = memoryview(self._slab)[: self.capacity * _SIZE].cast(fmt)
        return words[offset // size :: _SIZE // size]

    def namespaces(self) -> set[int]:
        """The network namespace inodes of the live rows, and maybe of some freed
        slots (0 for slots never used): read at C speed across the whole slab, so
        asking whether any row lives outside our namespace costs no row scan."""
        return set(self._column("I", _NETNS_OFFSET))

    def select(self, where: Callable[[int, str, int, int, int], bool]) -> list[int]:
        """Keys of the live rows for which ``where(pid, name, state, sport, dport)``."""
        return [key for key, ((state, tgid, sport, dport), comm)
                in zip(self._index, self.scan(_SELECT))
                if where(tgid, comm if isinstance(comm, str) else records.decode_comm(comm),
                         state, sport, dport)]

    def owners_to_find(self, fds: bool, keys: set[int] | None = None
                       ) -> Iterator[tuple[int, int, int, int]]:
        """(key, pid, inode, alive since) of the rows, of all or of those in ``keys``,
        whose owner is a guess, or (with ``fds``) whose fd is unknown; consumed
        under the table's lock. A named row needs neither, and on a settled table
        nearly all are. For all rows the test runs down the slab's columns at C
        speed: a first walk leaves 200k rows to name, a settled one none."""
        index = self._index
        if keys is not None:
            slots = [index[k] for k in keys if k in index]
            slots = [slot for slot in slots if self._needs_owner(slot, fds)]
        else:
            slots = self._slots_needing_owner(fds)
        found = list(map(self._column("Q", _KEY_AT).__getitem__, slots))
        if keys is None:  # freed slots keep their last record: count those the index names
            live = list(map(eq, map(index.get, found), slots))
            slots, found = list(compress(slots, live)), list(compress(found, live))
        pids = list(map(self._column("I", _OWNER_OFFSET).__getitem__, slots))
        inodes = list(map(self._column("Q", _INO_AT).__getitem__, slots))
        return zip(found, pids, inodes, map(self._alive.__getitem__, slots))

    def _slots_needing_owner(self, fds: bool) -> list[int]:
        """The slots, freed ones included, whose record _needs_owner would pick,
        found column by column: flags and attribution through translate tables,
        pid and fd through strided views, combined as one big integer per test."""
        test = int.from_bytes(bytes(map(not_, self._column("I", _OWNER_OFFSET))), "little")
        test |= int.from_bytes(self._column("B", _ATTRIB_OFFSET).tobytes().translate(_GUESSED),
                               "little")
        if fds:
            fd_col = self._column("i", _OWNER_OFFSET + 4)
            test |= int.from_bytes(bytes(map((0).__gt__, fd_col)), "little")
        test &= int.from_bytes(self._flags.translate(_UNNAMED), "little")
        cap = self.capacity
        return list(compress(range(cap), test.to_bytes(cap, "little")))

    def _needs_owner(self, slot: int, fds: bool) -> bool:
        if self._flags[slot] & _NAMED:
            return False
        tgid, fd, attrib = _owner(self._slab, slot * _SIZE)
        return tgid == 0 or attrib not in SURE_ATTRIBUTIONS or (fds and fd < 0)

    def snapshot(self) -> list[Connection]:
        """Decoded copies of the live rows: views may keep them while the table moves on."""
        return [self._row(slot).connection() for slot in self._index.values()]

    def recently_closed(self) -> list[Connection]:
        return [row.connection() for row in self.closed]

    def ended_by_name(self) -> dict[tuple[Role, Result], int]:
        return {(Role(r), Result(x)): n for (r, x), n in self.ended.items()}

    def claim_owners(self, holders: Iterable[tuple[int, int, int, int, bytes]], fds: bool,
                     keys: set[int] | None, name_of: Callable[[int, bytes], str],
                     elsewhere: dict[int, tuple] | None = None) -> int:
        """Give each row that needs it (see owners_to_find) its holder among
        ``holders``, (key, inode, pid, fd, comm) rows of the kernel's fd tables
        (records.OWNER) in pid order, and the name ``name_of(pid, comm)``; an fd
        never changes while the socket lives. A row the kernel attributed to a
        process is claimed only by that process: other holders are kept in
        ``elsewhere``, for a last call (without it) to settle once the walk is
        over. Returns how many rows were named."""
        index, slab, flags, name_ids = self._index, self._slab, self._flags, self._name
        needs, pack, ids, named = self._needs_owner, _OWNER.pack_into, {}, 0
        for holder in holders:
            key, _ino, tgid, fd, comm = holder
            if keys is not None and key not in keys:
                continue
            slot = index.get(key)
            if slot is None or not needs(slot, fds):
                continue
            o = slot * _SIZE
            if elsewhere is not None:
                attributed = _OWNER.unpack_from(slab, o + _OWNER_OFFSET)[0]
                if attributed and attributed != tgid:
                    elsewhere.setdefault(key, holder)
                    continue
            nid = ids.get((tgid, comm))
            if nid is None:
                nid = ids[(tgid, comm)] = self._name_id(name_of(tgid, comm))
            pack(slab, o + _OWNER_OFFSET, tgid, fd)
            name_ids[slot] = nid
            flags[slot] |= _NAMED
            named += 1
        return named
