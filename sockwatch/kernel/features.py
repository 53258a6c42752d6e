"""What this kernel allows, learned by trying rather than by version numbers.

Each attach type is tried with an empty program from ``probe.bpf.o``: load it
alone, attach it, detach it. The answers decide which variant of each hook the
loader uses, and ``sockwatch probes`` prints them.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
from dataclasses import dataclass, field
from typing import Sequence

from sockwatch.kernel.libbpf import BpfObject, LibbpfError

VMLINUX_BTF = "/sys/kernel/btf/vmlinux"
TRACEFS = "/sys/kernel/tracing"
KPROBE_PMU = "/sys/bus/event_source/devices/kprobe"

# Attach types in the probe object, by the name sockwatch uses for them.
PROBE_PROGRAMS = {
    "fentry": "probe_fentry",
    "kprobe": "probe_kprobe",
    "tp_btf": "probe_tp_btf",
    "raw_tp": "probe_raw_tp",
    "tracepoint": "probe_tracepoint",
    "iter": "probe_iter",
}
TRACEPOINT_FLAVOURS = ("tp_btf", "raw_tp", "tracepoint")
FUNCTION_FLAVOURS = ("fentry", "kprobe")
# Every attach type on its own: what ``sockwatch probes`` reports.
EVERY_ATTACH_TYPE = tuple((flavour,) for flavour in PROBE_PROGRAMS)


@dataclass(frozen=True)
class Probe:
    """The outcome of trying one attach type."""

    ok: bool
    detail: str = ""


@dataclass
class KernelFeatures:
    release: str
    btf: bool
    tracefs: bool
    kprobe_pmu: bool
    probes: dict[str, Probe] = field(default_factory=dict)

    def allows(self, flavour: str) -> bool:
        p = self.probes.get(flavour)
        return bool(p and p.ok)


def tracefs_mounted() -> bool:
    return os.path.isdir(os.path.join(TRACEFS, "events"))


def mount_tracefs() -> bool:
    """Classic tracepoints need tracefs for their ids; mount it if it is not."""
    if tracefs_mounted():
        return True
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.mount(b"nodev", TRACEFS.encode(), b"tracefs", 0, None)
    return tracefs_mounted()


def _try(probe_obj: str, program: str) -> Probe:
    obj = None
    try:
        obj = BpfObject(probe_obj)
        for name in obj.program_names():
            obj.set_autoload(name, name == program)
        obj.load()
        obj.attach(program).destroy()
        return Probe(True)
    except LibbpfError as exc:
        return Probe(False, os.strerror(exc.err) if exc.err else str(exc))
    finally:
        if obj is not None:
            obj.close()


def _probe(probe_obj: str, feats: KernelFeatures, flavour: str) -> Probe:
    if flavour == "kprobe" and not feats.kprobe_pmu:
        return Probe(False, "kprobes are not compiled into this kernel")
    if flavour == "tracepoint" and not feats.tracefs:
        return Probe(False, f"tracefs is not mounted at {TRACEFS}")
    if flavour in ("fentry", "tp_btf", "iter") and not feats.btf:
        return Probe(False, f"no kernel BTF at {VMLINUX_BTF}")
    return _try(probe_obj, PROBE_PROGRAMS[flavour])


def probe_kernel(
    probe_obj: str, groups: Sequence[Sequence[str]] = EVERY_ATTACH_TYPE, mount: bool = False
) -> KernelFeatures:
    """Try the attach types of each group, best first, until one works (classic
    tracepoints only with tracefs); the rest of a group is left untried.

    A group holds alternatives the loader would pick in that order, so what is left
    untried could not have changed its choice. Each try costs a load (a parse of the
    kernel's BTF for most) and an attach; detaching a classic tracepoint waits for
    an RCU grace period (~50 ms here), so the daemon tries only what it may use.
    """
    feats = KernelFeatures(
        release=platform.release(),
        btf=os.path.exists(VMLINUX_BTF),
        tracefs=mount_tracefs() if mount else tracefs_mounted(),
        kprobe_pmu=os.path.isdir(KPROBE_PMU),
    )
    for group in groups:
        for flavour in group:
            feats.probes[flavour] = _probe(probe_obj, feats, flavour)
            if feats.probes[flavour].ok:
                break
    return feats
