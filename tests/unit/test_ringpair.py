"""RingPair merges the rescue ring's records back into time order."""

import struct

from sockwatch.kernel.ringbuf import HEADER, RingPair


class _Drained:
    """A ring that hands over one prepared batch (stands in for an mmap'd ring):
    records of ``stride`` bytes, each after its 8-byte header, as the kernel lays
    them out; offsets point past the headers."""

    def __init__(self, stamps: list[int], stride: int = 24):
        self.blob = b"".join((struct.pack("<I", stride - HEADER).ljust(HEADER, b"\0")
                              + struct.pack("<Q", t)).ljust(stride, b"x") for t in stamps)
        self.offsets = list(range(HEADER, len(self.blob), stride))
        self.stride = stride
        self.fd = -1

    def drain(self):
        blob, offsets, self.blob, self.offsets = self.blob, self.offsets, b"", []
        return blob, offsets, 0


def _stamps(blob: bytes, offsets) -> list[int]:
    return [struct.unpack_from("<Q", blob, off)[0] for off in offsets]


def test_rescued_records_are_merged_in_time_order():
    pair = RingPair.__new__(RingPair)
    pair.main, pair.rescue = _Drained([10, 20, 40]), _Drained([15, 30])
    blob, offsets, bad = pair.drain()
    assert _stamps(blob, offsets) == [10, 15, 20, 30, 40]
    assert offsets == range(HEADER, 5 * 24, 24)  # evenly spaced again, whole records
    assert blob[HEADER + 8 : 24] == b"x" * 8
    assert bad == 0


def test_without_rescued_records_the_main_batch_is_returned_as_is():
    pair = RingPair.__new__(RingPair)
    main = _Drained([3, 1, 2])  # never reordered: the main ring is already in commit order
    pair.main, pair.rescue = main, _Drained([])
    blob, offsets, _ = pair.drain()
    assert _stamps(blob, offsets) == [3, 1, 2]
