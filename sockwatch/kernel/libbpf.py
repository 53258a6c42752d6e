"""A small typed binding to libbpf (libbpf.so.1) through ctypes.

This is the only module that knows libbpf exists. It wraps just what the
loader needs: open an object, choose programs, size maps, set read-only
settings, load, attach, read maps and iterators. (The ring buffer is read
over mmap by ringbuf.py: a ctypes callback per record costs microseconds.) Errors come
back as :class:`LibbpfError` carrying libbpf's own log lines, so a verifier
rejection names the program and shows the relevant part of the log.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import mmap
import os
import threading
from dataclasses import dataclass
from typing import Iterator

from sockwatch.errors import SockwatchError

_c = ctypes
_vp = _c.c_void_p

BTF_KIND_STRUCT = 4
BTF_KIND_DATASEC = 15


class LibbpfError(SockwatchError):
    """A libbpf call failed; ``log`` holds what libbpf printed meanwhile."""

    def __init__(self, message: str, err: int = 0, log: list[str] | None = None):
        super().__init__(message)
        self.err = err
        self.log = log or []


class _BtfType(_c.Structure):
    _fields_ = [("name_off", _c.c_uint32), ("info", _c.c_uint32), ("size", _c.c_uint32)]


class _BtfMember(_c.Structure):
    _fields_ = [("name_off", _c.c_uint32), ("type", _c.c_uint32), ("offset", _c.c_uint32)]


class _BtfVarSecinfo(_c.Structure):
    _fields_ = [("type", _c.c_uint32), ("offset", _c.c_uint32), ("size", _c.c_uint32)]


class BpfProgInfo(_c.Structure):
    """struct bpf_prog_info (uapi, append-only) up to the fields sockwatch reads."""

    _fields_ = [
        ("type", _c.c_uint32), ("id", _c.c_uint32), ("tag", _c.c_uint8 * 8),
        ("jited_prog_len", _c.c_uint32), ("xlated_prog_len", _c.c_uint32),
        ("jited_prog_insns", _c.c_uint64), ("xlated_prog_insns", _c.c_uint64),
        ("load_time", _c.c_uint64), ("created_by_uid", _c.c_uint32),
        ("nr_map_ids", _c.c_uint32), ("map_ids", _c.c_uint64), ("name", _c.c_char * 16),
        ("ifindex", _c.c_uint32), ("gpl_compatible", _c.c_uint32, 1),
        ("netns_dev", _c.c_uint64), ("netns_ino", _c.c_uint64),
        ("nr_jited_ksyms", _c.c_uint32), ("nr_jited_func_lens", _c.c_uint32),
        ("jited_ksyms", _c.c_uint64), ("jited_func_lens", _c.c_uint64),
        ("btf_id", _c.c_uint32), ("func_info_rec_size", _c.c_uint32),
        ("func_info", _c.c_uint64), ("nr_func_info", _c.c_uint32),
        ("nr_line_info", _c.c_uint32), ("line_info", _c.c_uint64),
        ("jited_line_info", _c.c_uint64), ("nr_jited_line_info", _c.c_uint32),
        ("line_info_rec_size", _c.c_uint32), ("jited_line_info_rec_size", _c.c_uint32),
        ("nr_prog_tags", _c.c_uint32), ("prog_tags", _c.c_uint64),
        ("run_time_ns", _c.c_uint64), ("run_cnt", _c.c_uint64),
        ("recursion_misses", _c.c_uint64),
    ]


class _IterLinkInfo(_c.Structure):
    """union bpf_iter_link_info, as its map member (the union is 16 bytes)."""

    _fields_ = [("map_fd", _c.c_uint32), ("_rest", _c.c_uint32 * 3)]


class _IterAttachOpts(_c.Structure):
    """struct bpf_iter_attach_opts."""

    _fields_ = [("sz", _c.c_size_t), ("link_info", _vp), ("link_info_len", _c.c_uint32)]


_PRINT_FN = _c.CFUNCTYPE(_c.c_int, _c.c_int, _c.c_char_p, _vp)

_PROTOTYPES: dict[str, tuple[object, list[object]]] = {
    "bpf_object__open_file": (_vp, [_c.c_char_p, _vp]),
    "bpf_object__load": (_c.c_int, [_vp]),
    "bpf_object__close": (None, [_vp]),
    "bpf_object__btf": (_vp, [_vp]),
    "bpf_object__find_program_by_name": (_vp, [_vp, _c.c_char_p]),
    "bpf_object__next_program": (_vp, [_vp, _vp]),
    "bpf_object__find_map_by_name": (_vp, [_vp, _c.c_char_p]),
    "bpf_program__name": (_c.c_char_p, [_vp]),
    "bpf_program__set_autoload": (_c.c_int, [_vp, _c.c_bool]),
    "bpf_program__attach": (_vp, [_vp]),
    "bpf_program__attach_iter": (_vp, [_vp, _vp]),
    "bpf_map__fd": (_c.c_int, [_vp]),
    "bpf_map__reuse_fd": (_c.c_int, [_vp, _c.c_int]),
    "bpf_map__set_max_entries": (_c.c_int, [_vp, _c.c_uint32]),
    "bpf_map__max_entries": (_c.c_uint32, [_vp]),
    "bpf_map__value_size": (_c.c_uint32, [_vp]),
    "bpf_map__initial_value": (_vp, [_vp, _c.POINTER(_c.c_size_t)]),
    "bpf_link__destroy": (_c.c_int, [_vp]),
    "bpf_link__fd": (_c.c_int, [_vp]),
    "bpf_iter_create": (_c.c_int, [_c.c_int]),
    "bpf_map_lookup_elem": (_c.c_int, [_c.c_int, _vp, _vp]),
    "bpf_map_update_elem": (_c.c_int, [_c.c_int, _vp, _vp, _c.c_uint64]),
    "libbpf_get_error": (_c.c_long, [_vp]),
    "libbpf_num_possible_cpus": (_c.c_int, []),
    "libbpf_set_print": (_vp, [_PRINT_FN]),
    "btf__find_by_name_kind": (_c.c_int32, [_vp, _c.c_char_p, _c.c_uint32]),
    "btf__type_by_id": (_c.POINTER(_BtfType), [_vp, _c.c_uint32]),
    "btf__name_by_offset": (_c.c_char_p, [_vp, _c.c_uint32]),
    "btf__resolve_size": (_c.c_int64, [_vp, _c.c_uint32]),
    "bpf_map_get_next_key": (_c.c_int, [_c.c_int, _vp, _vp]),
    "bpf_program__fd": (_c.c_int, [_vp]),
    "bpf_obj_get_info_by_fd": (_c.c_int, [_c.c_int, _vp, _c.POINTER(_c.c_uint32)]),
}


_LOG_BUFFER_BYTES = 1 << 20
_LOG_KEEP_RESIDENT = 64 << 10


class _Lib:
    """libbpf.so.1 with prototypes declared, and its log routed to a buffer."""

    def __init__(self) -> None:
        path = ctypes.util.find_library("bpf") or "libbpf.so.1"
        try:
            self.so = _c.CDLL(path, use_errno=True)
        except OSError as exc:
            raise SockwatchError(
                f"cannot load libbpf ({exc}); install it with: apt-get install libbpf1"
            ) from exc
        for name, (restype, argtypes) in _PROTOTYPES.items():
            fn = getattr(self.so, name)
            fn.restype = restype
            fn.argtypes = argtypes
        libc = _c.CDLL(ctypes.util.find_library("c"), use_errno=True)
        self._vsnprintf = libc.vsnprintf
        self._vsnprintf.argtypes = [_c.c_char_p, _c.c_size_t, _c.c_char_p, _vp]
        self._lock = threading.Lock()
        self._log: list[str] = []
        # One large buffer: a va_list can be read only once, and verifier logs are
        # long. Anonymous memory, so only the pages a message reaches are resident
        # (a zeroed ctypes buffer kept 1 MB of RSS for the daemon's lifetime).
        self._map = mmap.mmap(-1, _LOG_BUFFER_BYTES, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self._buf = (_c.c_char * _LOG_BUFFER_BYTES).from_buffer(self._map)
        self._print_cb = _PRINT_FN(self._on_print)  # kept alive for libbpf
        self.so.libbpf_set_print(self._print_cb)

    def _on_print(self, level: int, fmt: bytes, va_list: int) -> int:
        # x86_64 passes va_list as a pointer to its tag, so vsnprintf can take it as is.
        with self._lock:
            n = self._vsnprintf(self._buf, _LOG_BUFFER_BYTES, fmt, va_list)
            self._log.append(self._buf.value.decode(errors="replace").rstrip("\n"))
            if n > _LOG_KEEP_RESIDENT:  # a verifier log: give its pages back
                self._map.madvise(mmap.MADV_DONTNEED)
        return 0

    def take_log(self) -> list[str]:
        """Everything libbpf printed since the last call (verifier logs included)."""
        with self._lock:
            lines, self._log = self._log, []
        return [ln for chunk in lines for ln in chunk.splitlines()]


_lib: _Lib | None = None


def lib() -> _Lib:
    """The process-wide libbpf handle, loaded on first use."""
    global _lib
    if _lib is None:
        _lib = _Lib()
    return _lib


def num_possible_cpus() -> int:
    return lib().so.libbpf_num_possible_cpus()


def _ptr_error(ptr: int | None) -> int:
    """libbpf 1.x returns NULL and sets errno; older builds encode it in the pointer."""
    if not ptr:
        return _c.get_errno() or errno.EINVAL
    return -lib().so.libbpf_get_error(ptr)


@dataclass(frozen=True)
class StructMember:
    name: str
    offset: int  # bytes
    size: int  # bytes


class Link:
    """An attached program; destroy() detaches it."""

    def __init__(self, ptr: int, program: str):
        self._ptr: int | None = ptr
        self.program = program

    @property
    def fd(self) -> int:
        assert self._ptr is not None
        return lib().so.bpf_link__fd(self._ptr)

    def destroy(self) -> None:
        if self._ptr is not None:
            lib().so.bpf_link__destroy(self._ptr)
            self._ptr = None


class BpfObject:
    """One opened ELF object: choose, size and configure, then load and attach."""

    def __init__(self, path: str):
        self.path = path
        L = lib()
        L.take_log()
        ptr = L.so.bpf_object__open_file(path.encode(), None)
        err = _ptr_error(ptr) if not ptr else 0
        if not ptr or err:
            raise LibbpfError(
                f"cannot open BPF object {path}: {os.strerror(err)}", err, L.take_log()
            )
        self._ptr: int | None = ptr

    # -- before load -------------------------------------------------------
    def program_names(self) -> list[str]:
        names, prog = [], None
        while True:
            prog = lib().so.bpf_object__next_program(self._ptr, prog)
            if not prog:
                return names
            names.append(lib().so.bpf_program__name(prog).decode())

    def _program(self, name: str) -> int:
        prog = lib().so.bpf_object__find_program_by_name(self._ptr, name.encode())
        if not prog:
            raise LibbpfError(f"{self.path} has no program {name!r}")
        return prog

    def _map(self, name: str) -> int:
        m = lib().so.bpf_object__find_map_by_name(self._ptr, name.encode())
        if not m:
            raise LibbpfError(f"{self.path} has no map {name!r}")
        return m

    def set_autoload(self, program: str, on: bool) -> None:
        lib().so.bpf_program__set_autoload(self._program(program), on)

    def reuse_map(self, map_name: str, fd: int) -> None:
        """Use an existing map (another object's) instead of creating this one."""
        rc = lib().so.bpf_map__reuse_fd(self._map(map_name), fd)
        if rc:
            raise LibbpfError(f"cannot share map {map_name}: {os.strerror(-rc)}", -rc)

    def set_max_entries(self, map_name: str, entries: int) -> None:
        if lib().so.bpf_map__set_max_entries(self._map(map_name), entries):
            raise LibbpfError(f"cannot size map {map_name} to {entries}")

    def set_rodata(self, var: str, value: bytes) -> None:
        """Write a ``const volatile`` setting into .rodata before load."""
        offset, size = self.variable(".rodata", var)
        if len(value) != size:
            raise LibbpfError(f"{var} is {size} bytes in the object, got {len(value)}")
        sz = _c.c_size_t()
        base = lib().so.bpf_map__initial_value(self._map(".rodata"), _c.byref(sz))
        if not base:
            raise LibbpfError("the object has no .rodata to configure")
        _c.memmove(base + offset, value, size)

    # -- BTF ---------------------------------------------------------------
    def _btf(self) -> int:
        btf = lib().so.bpf_object__btf(self._ptr)
        if not btf:
            raise LibbpfError(f"{self.path} carries no BTF; rebuild it with clang -g")
        return btf

    def _type(self, name: str, kind: int) -> tuple[int, _BtfType]:
        btf = self._btf()
        tid = lib().so.btf__find_by_name_kind(btf, name.encode(), kind)
        if tid < 0:
            raise LibbpfError(f"{self.path} has no BTF type {name!r}")
        return btf, lib().so.btf__type_by_id(btf, tid).contents

    def variable(self, section: str, var: str) -> tuple[int, int]:
        """(offset, size) of global ``var`` in ``section`` (.rodata, .bss)."""
        btf, sec = self._type(section, BTF_KIND_DATASEC)
        infos = _c.cast(_c.addressof(sec) + _c.sizeof(_BtfType), _c.POINTER(_BtfVarSecinfo))
        for i in range(sec.info & 0xFFFF):
            vtype = lib().so.btf__type_by_id(btf, infos[i].type).contents
            if lib().so.btf__name_by_offset(btf, vtype.name_off).decode() == var:
                return infos[i].offset, infos[i].size
        raise LibbpfError(f"{self.path} has no setting {var!r} in {section}")

    def struct_layout(self, name: str) -> tuple[int, list[StructMember]]:
        """Size and members of ``struct name`` as the object's BTF records them."""
        btf, st = self._type(name, BTF_KIND_STRUCT)
        members = _c.cast(_c.addressof(st) + _c.sizeof(_BtfType), _c.POINTER(_BtfMember))
        out = []
        for i in range(st.info & 0xFFFF):
            m = members[i]
            out.append(
                StructMember(
                    lib().so.btf__name_by_offset(btf, m.name_off).decode(),
                    (m.offset & 0xFFFFFF) // 8,
                    lib().so.btf__resolve_size(btf, m.type),
                )
            )
        return st.size, out

    # -- load and after ----------------------------------------------------
    def load(self) -> None:
        L = lib()
        L.take_log()
        rc = L.so.bpf_object__load(self._ptr)
        if rc:
            raise LibbpfError(
                f"the kernel refused {os.path.basename(self.path)}: {os.strerror(-rc)}",
                -rc,
                L.take_log(),
            )

    def attach(self, program: str) -> Link:
        L = lib()
        L.take_log()
        ptr = L.so.bpf_program__attach(self._program(program))
        err = _ptr_error(ptr)
        if not ptr or err:
            raise LibbpfError(
                f"cannot attach {program}: {os.strerror(err)}", err, L.take_log()
            )
        return Link(ptr, program)

    def attach_map_iter(self, program: str, map_name: str) -> Link:
        """Attach an iter/bpf_map_elem program to this object's map ``map_name``
        (the generic attach has no map to give it)."""
        L = lib()
        L.take_log()
        info = _IterLinkInfo(map_fd=self.map_fd(map_name))
        opts = _IterAttachOpts(_c.sizeof(_IterAttachOpts), _c.addressof(info), _c.sizeof(info))
        ptr = L.so.bpf_program__attach_iter(self._program(program), _c.byref(opts))
        err = _ptr_error(ptr)
        if not ptr or err:
            raise LibbpfError(
                f"cannot attach {program} to map {map_name}: {os.strerror(err)}", err,
                L.take_log()
            )
        return Link(ptr, program)

    def program_fd(self, program: str) -> int:
        """The loaded program's fd (owned by the object: dup it to keep it)."""
        return lib().so.bpf_program__fd(self._program(program))

    def map_fd(self, name: str) -> int:
        return lib().so.bpf_map__fd(self._map(name))

    def map_max_entries(self, name: str) -> int:
        return lib().so.bpf_map__max_entries(self._map(name))

    def close(self) -> None:
        if self._ptr is not None:
            lib().so.bpf_object__close(self._ptr)
            self._ptr = None


def read_hash(map_fd: int, key_size: int, value_size: int) -> dict[bytes, bytes]:
    """Every (key, value) of a hash map, as raw bytes (small maps: one syscall per key)."""
    so = lib().so
    key, nxt = _c.create_string_buffer(key_size), _c.create_string_buffer(key_size)
    value = _c.create_string_buffer(value_size)
    out: dict[bytes, bytes] = {}
    prev = None
    while so.bpf_map_get_next_key(map_fd, prev, nxt) == 0:
        _c.memmove(key, nxt, key_size)
        if so.bpf_map_lookup_elem(map_fd, key, value) == 0:  # ENOENT: deleted meanwhile
            out[key.raw] = value.raw
        prev = key
    return out


def read_percpu_u64_hash(map_fd: int, key_size: int, n_u64: int) -> dict[bytes, list[int]]:
    """Every key of a BPF_MAP_TYPE_PERCPU_HASH whose value is ``n_u64`` __u64, each
    slot summed over all CPUs."""
    ncpu = num_possible_cpus()
    out = {}
    for key, raw in read_hash(map_fd, key_size, 8 * n_u64 * ncpu).items():
        flat = memoryview(raw).cast("Q")
        out[key] = [sum(flat[c * n_u64 + i] for c in range(ncpu)) for i in range(n_u64)]
    return out


def count_keys(map_fd: int, key_size: int) -> int:
    """How many entries a hash map holds (keys only: one syscall per entry)."""
    so = lib().so
    bufs = (_c.create_string_buffer(key_size), _c.create_string_buffer(key_size))
    n, prev = 0, None
    while so.bpf_map_get_next_key(map_fd, prev, bufs[n % 2]) == 0:
        prev = bufs[n % 2]
        n += 1
    return n


def read_percpu_u64_array(map_fd: int, entries: int) -> list[int]:
    """Sum each slot of a BPF_MAP_TYPE_PERCPU_ARRAY of __u64 over all CPUs."""
    ncpu = num_possible_cpus()
    values = (_c.c_uint64 * ncpu)()
    key = _c.c_uint32()
    out = []
    for i in range(entries):
        key.value = i
        if lib().so.bpf_map_lookup_elem(map_fd, _c.byref(key), values):
            out.append(0)
        else:
            out.append(sum(values))
    return out


def write_u32(map_fd: int, key: int, value: int) -> None:
    """Set one __u32 value of an array map (a global of .bss, a setting)."""
    k, v = _c.c_uint32(key), _c.c_uint32(value)
    rc = lib().so.bpf_map_update_elem(map_fd, _c.byref(k), _c.byref(v), 0)
    if rc:
        raise LibbpfError(f"cannot write map {map_fd}: {os.strerror(-rc)}", -rc)


def program_info(prog_fd: int) -> BpfProgInfo:
    """The kernel's bpf_prog_info of a loaded program (zeroes if unavailable)."""
    info = BpfProgInfo()
    size = _c.c_uint32(_c.sizeof(info))
    if lib().so.bpf_obj_get_info_by_fd(prog_fd, _c.byref(info), _c.byref(size)):
        return BpfProgInfo()
    return info


def create_iterator(link_fd: int, program: str) -> int:
    """A readable fd for one pass of the BPF iterator attached by ``link_fd``; it
    walks the caller's netns."""
    fd = lib().so.bpf_iter_create(link_fd)
    if fd < 0:
        raise LibbpfError(f"cannot start iterator {program}: {os.strerror(-fd)}", -fd)
    return fd


def read_records(fd: int, size: int, per_chunk: int) -> Iterator[bytes]:
    """Read an iterator fd to the end in chunks of up to ``per_chunk`` whole records
    of ``size`` bytes (a torn tail comes last, alone), then close it. A reader of
    chunks holds one at a time: a walk of 300k sockets is not 100 MB at once."""
    tail = b""
    try:
        while True:
            data = os.read(fd, size * per_chunk)
            if not data:
                if tail:
                    yield tail
                return
            data = tail + data if tail else data
            whole = len(data) - len(data) % size
            tail = data[whole:]
            if whole:
                yield data[:whole] if tail else data
    finally:
        os.close(fd)
