"""The Python mirror of the C records against the compiled object's BTF.

records.SwEvent/SwSock are written by hand from bpf/sockwatch.h. If either
side changes alone, decode() reads every field at the wrong offset and
reports garbage silently. These tests read the BTF of the built object with
``bpftool btf dump file`` (no privileges needed) and compare member by member,
so the header and the mirror cannot drift.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from sockwatch import records
from sockwatch.errors import BpfObjectError
from sockwatch.kernel import features, loader

ROOT = Path(__file__).resolve().parents[2]
OBJECTS = ROOT / "sockwatch" / "bpf_objects"
LIFECYCLE = OBJECTS / "lifecycle.bpf.o"
PROBE = OBJECTS / "probe.bpf.o"
STACK = OBJECTS / "stack.bpf.o"


def _btf_types(obj: Path) -> dict[int, dict]:
    if not obj.exists():
        pytest.skip(f"{obj} is not built: run make -C bpf")
    bpftool = shutil.which("bpftool") or next(
        (p for p in ("/usr/sbin/bpftool", "/sbin/bpftool") if os.access(p, os.X_OK)), None)
    if bpftool is None:
        pytest.skip("bpftool is not installed: cannot read the object's BTF")
    out = subprocess.run(
        [bpftool, "btf", "dump", "file", str(obj), "format", "raw", "-j"],
        check=True, capture_output=True, text=True, timeout=60,
    ).stdout
    return {t["id"]: t for t in json.loads(out)["types"]}


def _size(types: dict[int, dict], type_id: int) -> int:
    """Byte size of a BTF type, through typedefs and qualifiers."""
    t = types[type_id]
    kind = t["kind"]
    if kind in ("TYPEDEF", "CONST", "VOLATILE", "RESTRICT", "TYPE_TAG"):
        return _size(types, t["type_id"])
    if kind == "ARRAY":
        return t["nr_elems"] * _size(types, t["type_id"])
    if kind == "PTR":
        return 8
    return t["size"]  # INT, STRUCT, UNION, ENUM, ENUM64, FLOAT


def _btf_struct(types: dict[int, dict], name: str) -> tuple[int, list[tuple[str, int, int]]]:
    found = [t for t in types.values() if t["kind"] == "STRUCT" and t.get("name") == name]
    assert len(found) == 1, f"struct {name} not (uniquely) in the object's BTF"
    st = found[0]
    members = []
    for m in st["members"]:
        assert "bitfield_size" not in m or not m["bitfield_size"], f"{name}.{m['name']} is a bitfield"
        assert m["bits_offset"] % 8 == 0
        members.append((m["name"], m["bits_offset"] // 8, _size(types, m["type_id"])))
    return st["size"], members


@pytest.fixture(scope="module")
def lifecycle_btf() -> dict[int, dict]:
    return _btf_types(LIFECYCLE)


@pytest.mark.parametrize(
    "c_name, py_struct", [("sw_event", records.SwEvent), ("sw_sock", records.SwSock)]
)
def test_python_mirror_matches_object_btf(lifecycle_btf, c_name, py_struct):
    """Every member: same name, same order, same offset, same size; and the same total size."""
    size, btf_members = _btf_struct(lifecycle_btf, c_name)
    py_members = records.layout(py_struct)
    assert records.layout_mismatches(py_members, btf_members) == []
    assert [m[0] for m in py_members] == [m[0] for m in btf_members], "member order differs"
    assert py_members == btf_members
    assert ctypes.sizeof(py_struct) == size


def test_event_size_is_what_the_object_emits(lifecycle_btf):
    """decode() rejects any record that is not EVENT_SIZE bytes: it must be the C size."""
    size, _ = _btf_struct(lifecycle_btf, "sw_event")
    assert records.EVENT_SIZE == size


@pytest.mark.parametrize("c_name, py_struct, members", [
    ("sw_lost_key", records.LOST_KEY, [("netns", 0, 4), ("kind", 4, 1), ("role", 5, 1)]),
    ("sw_total_key", records.TOTAL_KEY, [("comm", 0, 16), ("port", 16, 2), ("what", 18, 1),
                                         ("result", 19, 1)]),
])
def test_map_keys_match_their_struct_formats(lifecycle_btf, c_name, py_struct, members):
    """The map keys user space unpacks with struct.Struct: same size, same fields."""
    size, btf_members = _btf_struct(lifecycle_btf, c_name)
    assert py_struct.size == size
    assert [m for m in btf_members if not m[0].startswith("__")] == members


def test_loader_layout_check_accepts_the_built_object():
    """The loader's own start-up guard (libbpf BTF, no privileges to open) agrees with bpftool."""
    if not LIFECYCLE.exists():
        pytest.skip(f"{LIFECYCLE} is not built: run make -C bpf")
    try:
        from sockwatch.kernel.libbpf import BpfObject

        obj = BpfObject(str(LIFECYCLE))
    except Exception as exc:  # libbpf.so missing on this host
        pytest.skip(f"cannot open the object with libbpf: {exc}")
    try:
        size, members = obj.struct_layout("sw_event")
        assert size == records.EVENT_SIZE
        assert [(m.name, m.offset, m.size) for m in members] == records.layout(records.SwEvent)
        loader.check_record_layout(obj)  # must not raise
    finally:
        obj.close()


def test_every_planned_program_exists_in_the_objects(lifecycle_btf):
    """The loader names programs by string; a renamed C function must fail here, not at start."""
    funcs = {t["name"] for t in lifecycle_btf.values() if t["kind"] == "FUNC"}
    named = {loader.SNAPSHOT_PROGRAM}
    named |= {p for by_flavour in loader._TP_PROGRAMS.values() for p in by_flavour.values()}
    named |= {p for by_flavour in loader._FUNCTION_PROGRAMS.values() for p in by_flavour.values()}
    assert named - funcs == set()
    stack_funcs = {t["name"] for t in _btf_types(STACK).values() if t["kind"] == "FUNC"}
    stack_named = {p for _, by_flavour in loader._STACK_HOOKS.values() for p in by_flavour.values()}
    assert stack_named - stack_funcs == set()
    probe_funcs = {t["name"] for t in _btf_types(PROBE).values() if t["kind"] == "FUNC"}
    assert set(features.PROBE_PROGRAMS.values()) - probe_funcs == set()


@pytest.mark.parametrize(
    "c_name, py_struct",
    [("sw_hist_key", records.HIST_KEY), ("sw_iface_key", records.IFACE_KEY),
     ("sw_iface", records.IFACE)],
)
def test_stack_map_keys_and_values_match_object_btf(c_name, py_struct):
    """Probes.stack_histograms()/interface_totals() unpack these with struct formats:
    each member's offset and size must be where the format reads it."""
    size, members = _btf_struct(_btf_types(STACK), c_name)
    assert py_struct.size == size
    fmt = py_struct.format.lstrip("<")
    # expand the format into (offset, size) per scalar, skipping pad bytes
    fields, pos = [], 0
    for count, code in re.findall(r"(\d*)([A-Za-z])", fmt):
        for _ in range(int(count or 1)):
            width = struct.calcsize(code)
            if code != "x":
                fields.append((pos, width))
            pos += width
    assert [(o, s) for name, o, s in members if not name.startswith("__pad")] == fields


# -- layout_mismatches itself: the guard must actually fire ------------------------


class _MovedField(ctypes.Structure):
    """sw_sock with tid and tgid swapped: same size, same names, different offsets."""

    _fields_ = [
        (n, t) if n not in ("tgid", "tid") else ({"tgid": "tid", "tid": "tgid"}[n], t)
        for n, t in records.SwSock._fields_
    ]


def test_layout_mismatches_reports_a_moved_field():
    """Swapping two same-size fields keeps the size; only a per-member check catches it."""
    assert ctypes.sizeof(_MovedField) == ctypes.sizeof(records.SwSock)
    problems = records.layout_mismatches(records.layout(records.SwSock), records.layout(_MovedField))
    assert len(problems) == 2
    assert any(p.startswith("tgid:") for p in problems)
    assert any(p.startswith("tid:") for p in problems)


def test_layout_mismatches_reports_size_and_missing_members():
    """A widened member and a member only one side has are both reported by name."""
    expected = records.layout(records.SwEvent)
    actual = [(n, o, s * 2 if n == "srtt_us" else s) for n, o, s in expected if n != "netns"]
    actual.append(("new_field", 300, 4))
    problems = records.layout_mismatches(expected, actual)
    names = sorted(p.split(":", 1)[0] for p in problems)
    assert names == ["netns", "new_field", "srtt_us"]
    assert records.layout_mismatches(expected, list(expected)) == []


class _FakeObject:
    """Stands in for a BpfObject whose BTF has a different sw_event (a stale build)."""

    path = "/nonexistent/lifecycle.bpf.o"

    def __init__(self, size, members):
        self._size, self._members = size, members

    def struct_layout(self, name):
        from sockwatch.kernel.libbpf import StructMember

        assert name == "sw_event"
        return self._size, [StructMember(*m) for m in self._members]


def test_check_record_layout_refuses_a_stale_object():
    """A stale object must stop the loader with a rebuild hint instead of decoding garbage."""
    moved = [(n, o + 8 if n == "ts_ns" else o, s) for n, o, s in records.layout(records.SwEvent)]
    with pytest.raises(BpfObjectError, match=r"stale \(ts_ns: .*make -C bpf"):
        loader.check_record_layout(_FakeObject(records.EVENT_SIZE, moved))
    bigger = records.EVENT_SIZE + 8
    with pytest.raises(BpfObjectError, match=f"size: python {records.EVENT_SIZE} vs object {bigger}"):
        loader.check_record_layout(_FakeObject(bigger, records.layout(records.SwEvent)))
    loader.check_record_layout(_FakeObject(records.EVENT_SIZE, records.layout(records.SwEvent)))
