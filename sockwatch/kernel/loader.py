"""Open the BPF objects, pick the best variant of every hook, attach, expose.

Choice per hook, best first (``--attach`` forces one flavour):

- state transitions: tp_btf, raw_tp, classic tracepoint (essential);
- connect: fentry or kprobe on tcp_connect, else the CLOSE->SYN_SENT transition
  already seen by the state hook (it runs in connect(), in the caller);
- accept: fexit or kretprobe on inet_csk_accept; else, opt-in, the accept
  syscall exit (exact fd, but taxes every syscall on the host); else the first
  send/recv or close() on the accepted socket, in the owning task;
- snapshot: iter/tcp (essential: seed and reconciliation);
- owners: iter/task_file (essential: who holds each socket, at which fd);
- stack latency (optional, ``stack_latency``): the per-packet tracepoints of
  stack.bpf.o, in the same tracepoint flavour. A stack hook that cannot load or
  attach is reported as unavailable and the rest keeps working: the lifecycle
  part never depends on it.

Everything attached is detached again if any essential step fails, so a
failed start leaves nothing behind. Probing, loading and attaching run in a
short-lived child that hands the fds over (forked.py): this process keeps fds
only, never libbpf's transient copy of the kernel's BTF.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

from sockwatch import records
from sockwatch.errors import AttachError, BpfObjectError
from sockwatch.kernel import features as feat
from sockwatch.kernel.forked import InChild
from sockwatch.kernel.libbpf import (
    BpfObject,
    LibbpfError,
    Link,
    count_keys,
    create_iterator,
    program_info,
    read_records,
    read_hash,
    read_percpu_u64_array,
    read_percpu_u64_hash,
    write_u32,
)
from sockwatch.kernel.ringbuf import RingPair, RingReader
from sockwatch.kernel import netns

ATTACH_MODES = ("auto", "tp_btf", "raw_tp", "tracepoint", "fentry", "kprobe")
BUILD_HINT = "build them with: make -C bpf  (then reinstall: pip install .)"

# Program names per tracepoint flavour, for each tracepoint-based hook.
_TP_PROGRAMS = {
    "state": {"tp_btf": "set_state_btf", "raw_tp": "set_state_raw", "tracepoint": "set_state_tp"},
    "send": {"tp_btf": "send_btf", "raw_tp": "send_raw", "tracepoint": "send_tp"},
    "recv": {"tp_btf": "recv_btf", "raw_tp": "recv_raw", "tracepoint": "recv_tp"},
    "destroy": {"tp_btf": "destroy_btf", "raw_tp": "destroy_raw", "tracepoint": "destroy_tp"},
    "sys_exit": {
        "tp_btf": "accept_sys_btf",
        "raw_tp": "accept_sys_raw",
        "tracepoint": "accept_sys_tp",
    },
}
# Second copies of the state and destroy programs that catch the events the
# kernel skips while the first copy runs on the same CPU (see nested_event).
_NESTED_TWINS = {
    "state": {"tp_btf": ("set_state_nested_btf",), "raw_tp": ("set_state_nested_raw",)},
    "destroy": {"tp_btf": ("destroy_nested_btf",), "raw_tp": ("destroy_nested_raw",)},
}
_TWIN_PROGRAMS = frozenset(p for hook in _NESTED_TWINS.values()
                           for twins in hook.values() for p in twins)
_FUNCTION_PROGRAMS = {
    "connect": {"fentry": "connect_fentry", "kprobe": "connect_kprobe"},
    "accept": {"fentry": "accept_fexit", "kprobe": "accept_kretprobe"},
}
SNAPSHOT_PROGRAM = "dump_tcp"
OWNERS_PROGRAM = "dump_owners"  # bpf/owners.bpf.c, linked into lifecycle.bpf.o
MAP_OWNERS_PROGRAM = "map_owners"  # the same walk into the "holders" map
FORGET_OWNERS_PROGRAM = "forget_owners"  # iter/bpf_map_elem that empties "holders"
RELEASE_PROGRAM = "release_opens"  # iter/bpf_map_elem over the "held" map
# iter/bpf_map_elem programs and the map each walks
_MAP_ITERATORS = {RELEASE_PROGRAM: "held", FORGET_OWNERS_PROGRAM: "holders"}

# The per-packet hooks of stack.bpf.o: hook (the kernel event), its role, and its
# program per tracepoint flavour. tcp_sendmsg_locked has no classic variant: its
# classic tracepoint does not carry the sock.
_STACK_HOOKS = {
    "tcp_sendmsg": ("tx tcp starts: the write enters TCP",
                    {"tp_btf": "sendmsg_btf", "raw_tp": "sendmsg_raw"}),
    "net_dev_queue": ("tx tcp ends, tx qdisc starts",
                      {"tp_btf": "dev_queue_btf", "raw_tp": "dev_queue_raw",
                       "tracepoint": "dev_queue_tp"}),
    "net_dev_start_xmit": ("tx qdisc ends, tx driver starts",
                           {"tp_btf": "start_xmit_btf", "raw_tp": "start_xmit_raw",
                            "tracepoint": "start_xmit_tp"}),
    "net_dev_xmit": ("tx driver ends; tx totals, driver errors",
                     {"tp_btf": "xmit_btf", "raw_tp": "xmit_raw", "tracepoint": "xmit_tp"}),
    "netif_receive_skb": ("rx driver starts; rx totals",
                          {"tp_btf": "receive_btf", "raw_tp": "receive_raw",
                           "tracepoint": "receive_tp"}),
    "tcp_probe": ("rx driver ends, rx tcp starts",
                  {"tp_btf": "tcp_rcv_btf", "raw_tp": "tcp_rcv_raw", "tracepoint": "tcp_rcv_tp"}),
    "sk_data_ready": ("rx tcp ends, rx socket starts",
                      {"tp_btf": "data_ready_btf", "raw_tp": "data_ready_raw",
                       "tracepoint": "data_ready_tp"}),
    "sock_recv_length": ("rx socket ends: the application reads",
                         {"tp_btf": "read_btf", "raw_tp": "read_raw", "tracepoint": "read_tp"}),
}
UNAVAILABLE = "unavailable"
# Maps the stack object shares with the lifecycle object (bpf/shared.bpf.h).
_SHARED_MAPS = ("stats", "sock_stack")


# Smallest rescue ring (a power of two, a few pages): it takes only the records
# whose reservation failed in the main ring.
RESCUE_RING_MIN = 16 << 10


def default_objects_dir() -> Path:
    env = os.environ.get("SOCKWATCH_BPF_DIR")
    return Path(env) if env else Path(__file__).resolve().parent.parent / "bpf_objects"


@dataclass(frozen=True)
class LoaderConfig:
    attach_mode: str = "auto"
    precise_accept: bool = False
    socks_max_entries: int = 65536
    # 2 MiB: a burst wakes the reader at a quarter full, and at 15k connections/s
    # the fullest it was found was that quarter plus a few records (test_loss),
    # so three quarters (about 5k records, 120 ms at 10k connections/s) are
    # headroom for a reader held up; sockwatch_ringbuf_peak_bytes shows it.
    ringbuf_bytes: int = 2 << 20
    # Hold each connection's OPEN back until the next drain: under churn most
    # connections close first, and their CLOSE alone stands for both (see "held"
    # in bpf/lifecycle.bpf.c). Off for whoever wants every OPEN as it happens
    # (``sockwatch trace``); Probes.hold_opens() switches it at run time.
    hold_opens: bool = False
    suppress_close: bool = False  # test-only: proves reconciliation repairs missed closes
    stack_latency: bool = True  # False: the per-packet stack programs are not loaded at all
    # True: try every attach type for the report (``sockwatch probes``), not only
    # those the plan may pick
    probe_every_type: bool = False

    @classmethod
    def from_settings(cls, probes: Mapping[str, Any]) -> "LoaderConfig":
        """From the ``[probes]`` section of the daemon's config (sockwatch.config)."""
        return cls(attach_mode=probes["attach"], precise_accept=probes["precise_accept"],
                   socks_max_entries=probes["socks_max_entries"],
                   ringbuf_bytes=probes["ringbuf_bytes"], stack_latency=probes["stack_latency"],
                   hold_opens=True)


@dataclass(frozen=True)
class HookChoice:
    """How one logical hook is attached: its mode and the programs behind it."""

    hook: str
    mode: str
    programs: tuple[str, ...]
    note: str = ""

    @property
    def stack(self) -> bool:
        return self.hook in _STACK_HOOKS


@dataclass
class Plan:
    tracepoint_flavour: str
    function_flavour: str | None
    hooks: list[HookChoice] = field(default_factory=list)

    @property
    def programs(self) -> set[str]:
        return {p for h in self.hooks for p in h.programs}


def _pick_tracepoint_flavour(feats: feat.KernelFeatures, mode: str) -> str:
    if mode in feat.TRACEPOINT_FLAVOURS:
        if not feats.allows(mode):
            why = feats.probes.get(mode, feat.Probe(False, "not probed")).detail
            raise AttachError(f"attach mode {mode} is not available on this kernel: {why}")
        return mode
    for flavour in feat.TRACEPOINT_FLAVOURS:
        if feats.allows(flavour):
            return flavour
    details = "; ".join(
        f"{f}: {feats.probes[f].detail}" for f in feat.TRACEPOINT_FLAVOURS if f in feats.probes
    )
    raise AttachError(f"no tracepoint attach type works on this kernel ({details})")


def _pick_function_flavour(feats: feat.KernelFeatures, mode: str) -> str | None:
    if mode in feat.FUNCTION_FLAVOURS:
        if not feats.allows(mode):
            why = feats.probes.get(mode, feat.Probe(False, "not probed")).detail
            raise AttachError(f"attach mode {mode} is not available on this kernel: {why}")
        return mode
    if mode != "auto":  # a forced tracepoint flavour: use tracepoints only
        return None
    return next((f for f in feat.FUNCTION_FLAVOURS if feats.allows(f)), None)


def probe_groups(cfg: LoaderConfig) -> tuple[tuple[str, ...], ...]:
    """The attach types plan_attachments may pick for ``cfg``, as groups of
    alternatives in its order of preference (see features.probe_kernel)."""
    if cfg.probe_every_type:
        return feat.EVERY_ATTACH_TYPE
    mode = cfg.attach_mode
    tracepoint = (mode,) if mode in feat.TRACEPOINT_FLAVOURS else feat.TRACEPOINT_FLAVOURS
    function = ((mode,) if mode in feat.FUNCTION_FLAVOURS
                else feat.FUNCTION_FLAVOURS if mode == "auto" else ())
    return tuple(g for g in (("iter",), tracepoint, function) if g)


def plan_attachments(feats: feat.KernelFeatures, cfg: LoaderConfig) -> Plan:
    """Decide every hook's variant from what the kernel allows and the config."""
    if cfg.attach_mode not in ATTACH_MODES:
        raise AttachError(f"unknown attach mode {cfg.attach_mode!r}")
    if not feats.allows("iter"):
        raise AttachError(
            f"the iter/tcp snapshot cannot load: {feats.probes.get('iter', feat.Probe(False)).detail}"
        )
    tp = _pick_tracepoint_flavour(feats, cfg.attach_mode)
    fn = _pick_function_flavour(feats, cfg.attach_mode)
    plan = Plan(tracepoint_flavour=tp, function_flavour=fn)
    plan.hooks.append(HookChoice("state", tp, (_TP_PROGRAMS["state"][tp],
                                               *_NESTED_TWINS["state"].get(tp, ()))))
    plan.hooks.append(HookChoice("destroy", tp, (_TP_PROGRAMS["destroy"][tp],
                                                 *_NESTED_TWINS["destroy"].get(tp, ())),
                                 "closes whose transition was missed, announced late"))
    if fn:
        plan.hooks.append(HookChoice("connect", fn, (_FUNCTION_PROGRAMS["connect"][fn],)))
        plan.hooks.append(HookChoice("accept", fn, (_FUNCTION_PROGRAMS["accept"][fn],)))
    else:
        plan.hooks.append(
            HookChoice("connect", "state", (), "CLOSE->SYN_SENT, in the connecting task")
        )
        if cfg.precise_accept:
            plan.hooks.append(
                HookChoice(
                    "accept",
                    f"syscall/{tp}",
                    (_TP_PROGRAMS["sys_exit"][tp],),
                    "accept syscall exit: exact fd; taxes every syscall",
                )
            )
        else:
            plan.hooks.append(
                HookChoice(
                    "accept",
                    f"first-use/{tp}",
                    (_TP_PROGRAMS["send"][tp], _TP_PROGRAMS["recv"][tp]),
                    "first send/recv or close() by the owning task",
                )
            )
    plan.hooks.append(HookChoice("snapshot", "iter", (SNAPSHOT_PROGRAM,), "iter/tcp"))
    plan.hooks.append(HookChoice("owners", "iter",
                                 (OWNERS_PROGRAM, MAP_OWNERS_PROGRAM, FORGET_OWNERS_PROGRAM),
                                 "iter/task_file: the process and fd holding each socket"))
    plan.hooks.append(HookChoice("release", "iter", (RELEASE_PROGRAM,),
                                 "iter/bpf_map_elem: sends the OPENs held back"))
    if cfg.stack_latency:
        for hook, (role, by_flavour) in _STACK_HOOKS.items():
            if tp in by_flavour:
                plan.hooks.append(HookChoice(hook, tp, (by_flavour[tp],), f"stack: {role}"))
            else:
                plan.hooks.append(HookChoice(hook, UNAVAILABLE, (),
                                             f"stack: {role}; no {tp} variant"))
    return plan


def _without(plan: Plan, programs: dict[str, str]) -> None:
    """Mark the stack hooks of failed ``programs`` (name -> why) unavailable."""
    for i, h in enumerate(plan.hooks):
        failed = [p for p in h.programs if p in programs]
        if h.stack and failed:
            plan.hooks[i] = HookChoice(h.hook, UNAVAILABLE, (),
                                       f"{h.note.split(';')[0]}; {programs[failed[0]]}")


def _verifier_excerpt(log: list[str], tail: int = 25) -> str:
    """The end of the failing program's verifier log: where the verdict is."""
    end = max((i for i, ln in enumerate(log) if "END PROG LOAD LOG" in ln), default=len(log))
    begin = max((i for i, ln in enumerate(log[:end]) if "BEGIN PROG LOAD LOG" in ln), default=-1)
    body = log[max(begin + 1, end - tail) : end]
    culprit = [ln for ln in log if "failed to load" in ln and "prog '" in ln]
    return "\n".join(culprit[:1] + body)


def load_object(obj: BpfObject) -> None:
    """Load an opened object. A rejection names the program the verifier refused in
    its first line and shows the end of that program's verifier log, where the
    verdict is: enough to fix it without re-running under bpftool."""
    try:
        obj.load()
    except LibbpfError as exc:
        failed = re.search(r"prog '([^']+)': failed to load", "\n".join(exc.log))
        head = (f"the kernel's verifier rejected program {failed.group(1)!r} of "
                f"{os.path.basename(obj.path)} ({os.strerror(exc.err)})" if failed else str(exc))
        raise AttachError(f"{head}\n{_verifier_excerpt(exc.log)}") from exc


@dataclass(frozen=True)
class Attached:
    """One attached program, held by fd: the link keeps it attached, the program
    fd answers bpf_prog_info (run counts, recursion misses)."""

    program: str
    link_fd: int
    prog_fd: int
    stack: bool


# The maps user space reads, by object; each object's other maps live as long as
# its programs do.
_LIFECYCLE_MAPS = ("events", "events_rescue", "stats", "transitions", "totals", "hists",
                   "lost", "socks", ".bss")
_STACK_MAPS = ("stack_hists", "ifaces")


@dataclass(frozen=True)
class Handover:
    """All user space keeps of a load, as fds: what the loading child sends over.

    The kernel objects behind the fds stay loaded and attached exactly as long as
    some process holds the fds, so once handed over they belong to the receiver.
    """

    plan: Plan
    features: feat.KernelFeatures
    maps: dict[str, tuple[int, int]]  # name -> (fd, max_entries)
    attached: tuple[Attached, ...]

    def fds(self) -> list[int]:
        """Every fd, links first: closed in this order, programs detach before anything."""
        return ([a.link_fd for a in self.attached] + [a.prog_fd for a in self.attached]
                + [fd for fd, _ in self.maps.values()])

    def renumbered(self, fds: dict[int, int]) -> "Handover":
        """The same handover with every fd replaced by ``fds[fd]`` (the receiver's copy)."""
        return Handover(
            self.plan, self.features,
            {name: (fds[fd], size) for name, (fd, size) in self.maps.items()},
            tuple(Attached(a.program, fds[a.link_fd], fds[a.prog_fd], a.stack)
                  for a in self.attached))


def _run_iterator(link: Attached) -> int:
    """One pass of the iterator attached by ``link``, read to its end; returns the
    bytes it wrote (the programs run for their effect on maps write little)."""
    return sum(map(len, read_records(create_iterator(link.link_fd, link.program), 1, 1 << 16)))


class Probes:
    """The attached lifecycle (and, optionally, stack) programs and the maps user
    space reads, all held by fd (see Handover)."""

    def __init__(self, handover: Handover):
        self._handover: Handover | None = handover
        self.plan = handover.plan
        self.features = handover.features
        self._attached = handover.attached
        self.stack_enabled = any(a.stack for a in handover.attached)
        maps = handover.maps
        links = {a.program: a for a in self._attached}
        self._snapshot_link = links[SNAPSHOT_PROGRAM]
        self._owners_link = links[OWNERS_PROGRAM]
        self._map_owners_link = links[MAP_OWNERS_PROGRAM]
        self._forget_owners_link = links[FORGET_OWNERS_PROGRAM]
        self._release_link = links[RELEASE_PROGRAM]
        self._bss_fd = maps[".bss"][0]
        self.ring = RingPair(*(RingReader(*maps[name], records.EVENT_SIZE)
                               for name in ("events", "events_rescue")))
        self._stats_fd = maps["stats"][0]
        self._transitions_fd = maps["transitions"][0]
        self._totals_fd = maps["totals"][0]
        self._hists_fd = maps["hists"][0]
        self._lost_fd = maps["lost"][0]
        self._socks_fd, self.socks_capacity = maps["socks"]
        if self.stack_enabled:
            self._stack_hists_fd = maps["stack_hists"][0]
            self._ifaces_fd = maps["ifaces"][0]

    def snapshot_chunks(self, netns_path: str | None = None,
                        per_chunk: int = 2048) -> Iterator[bytes]:
        """Run iter/tcp: one raw record per live TCP socket of a network namespace
        (ours, or the one at ``netns_path``), in chunks of whole records. The walk
        starts now (an OSError here if the namespace is gone); it is read as the
        chunks are consumed, so consume them at once."""
        link = self._snapshot_link
        fd = (create_iterator(link.link_fd, link.program) if netns_path is None
              else netns.call_in(netns_path, lambda: create_iterator(link.link_fd, link.program)))
        return read_records(fd, records.EVENT_SIZE, per_chunk)

    def owner_chunks(self, per_chunk: int = 4096) -> Iterator[bytes]:
        """Run iter/task_file: one raw struct sw_owner (records.OWNER) per fd of every
        process that holds a TCP socket, any namespace, in chunks of whole records
        (a torn tail is dropped). Read as the chunks are consumed: consume them at once."""
        link, size = self._owners_link, records.OWNER.size
        for chunk in read_records(create_iterator(link.link_fd, link.program), size, per_chunk):
            yield chunk[: len(chunk) - len(chunk) % size]

    def map_owners(self) -> int:
        """Run iter/task_file into the "holders" map: until forget_owners(), each
        walk (snapshot_chunks) writes into the rows no task attributed the process
        and fd holding the socket (Attrib.FD_TABLE), so nobody reads the holders.
        Returns how many holders the full map could not take (0: the join is whole,
        and a row it leaves unowned has no holder)."""
        return _run_iterator(self._map_owners_link) // records.OWNER.size

    def forget_owners(self) -> None:
        """Empty the "holders" map: its entries cost kernel memory and go stale
        (about 0.1 s for 200k)."""
        _run_iterator(self._forget_owners_link)

    def hold_opens(self, on: bool) -> None:
        """Hold OPENs back until the next release_held() (on), or send them at once."""
        write_u32(self._bss_fd, 0, on)

    def release_held(self) -> None:
        """Run iter/bpf_map_elem over "held": the OPEN of every socket still held goes
        into the ring buffer now, ahead of any CLOSE of it. Drains call this first."""
        _run_iterator(self._release_link)

    def stats(self) -> dict[records.Stat, int]:
        values = read_percpu_u64_array(self._stats_fd, records.STAT_COUNT)
        return {records.Stat(i): v for i, v in enumerate(values)}

    def transitions(self) -> dict[tuple[int, int], int]:
        """Non-zero state transition counts keyed (old, new)."""
        n = records.TCP_STATES
        values = read_percpu_u64_array(self._transitions_fd, n * n)
        return {(i // n, i % n): v for i, v in enumerate(values) if v}

    def skipped_runs(self) -> int:
        """Runs the kernel skipped because the program was already running on the CPU,
        over every lifecycle program but the nesting twins (their skips are events
        the first copies handled). Less the twin's catches (Stat.NESTED_RUNS),
        these are the events lost to nesting. Kernels before 5.12 count none."""
        return sum(program_info(a.prog_fd).recursion_misses for a in self._attached
                   if not a.stack and a.program not in _TWIN_PROGRAMS)

    def program_runs(self) -> dict[str, tuple[int, int]]:
        """Per attached program: (runs, runs the kernel skipped as recursion). Runs are
        counted only while kernel.bpf_stats_enabled is 1 (bench/missed_closes.py)."""
        infos = {a.program: program_info(a.prog_fd) for a in self._attached}
        return {name: (i.run_cnt, i.recursion_misses) for name, i in infos.items()}

    def totals(self) -> dict[records.TotalKey, int]:
        """The kernel's running totals (connects, accepts, bytes) by task name."""
        raw = read_hash(self._totals_fd, records.TOTAL_KEY.size, 8)
        return {records.decode_total_key(k): int.from_bytes(v, "little") for k, v in raw.items()}

    def socks_fill(self) -> tuple[int, int]:
        """(entries in the socks LRU map, entries it evicted so far). The map evicts
        silently; we count what we add and remove, so evicted = added - removed -
        present. Exact on a quiet map; under churn it errs low (added is read
        before the count, removed after), by at most what changed meanwhile."""
        added = self.stats()[records.Stat.SOCKS_ADDED]
        present = count_keys(self._socks_fd, 8)
        removed = self.stats()[records.Stat.SOCKS_REMOVED]
        return present, max(0, added - removed - present)

    def lost_records(self) -> dict[tuple[int, records.Kind, records.Role], int]:
        """Records the ring buffer refused, by (netns inode, kind, role): the
        breakdown of Stat.RINGBUF_FULL that lets one namespace's loss be told apart."""
        raw = read_hash(self._lost_fd, records.LOST_KEY.size, 8)
        out = {}
        for k, v in raw.items():
            netns, kind, role = records.LOST_KEY.unpack(k)
            out[(netns, records.Kind(kind), records.Role(role))] = int.from_bytes(v, "little")
        return out

    def histograms(self) -> list[list[int]]:
        """Slot counts of each kernel histogram (enum sw_hist), sum in the last slot."""
        stride = records.HIST_STRIDE
        flat = read_percpu_u64_array(self._hists_fd, records.HIST_COUNT * stride)
        return [flat[i * stride : (i + 1) * stride] for i in range(records.HIST_COUNT)]

    def stack_histograms(self) -> dict[tuple[str, str, int, int], list[int]]:
        """Per-layer latency histograms keyed (direction, layer, netns inode, ifindex),
        each in the kernel layout (HIST_STRIDE slots, sum in ns last), summed over
        CPUs; only those that counted something. Empty when the stack probes are off."""
        if not self.stack_enabled:
            return {}
        out = {}
        raw = read_percpu_u64_hash(self._stack_hists_fd, records.HIST_KEY.size, records.HIST_STRIDE)
        for key, hist in raw.items():
            netns, ifindex, direction, layer = records.HIST_KEY.unpack(key)
            if any(hist[: records.HIST_SLOTS]):
                out[(records.DIRECTIONS[direction], records.LAYERS[layer], netns, ifindex)] = hist
        return out

    def stack_program_stats(self) -> dict[str, tuple[int, int]]:
        """(run_time_ns, run_cnt) of each attached stack program: what the per-packet
        hooks cost, for the benchmark. Counted only while the kernel's BPF stats are on
        (sysctl kernel.bpf_stats_enabled=1), which itself costs time."""
        stats = {a.program: program_info(a.prog_fd) for a in self._attached if a.stack}
        return {name: (info.run_time_ns, info.run_cnt) for name, info in stats.items()}

    def interface_totals(self) -> dict[tuple[int, int], tuple[int, int, int, int, int]]:
        """(netns inode, ifindex) -> (rx_packets, rx_bytes, tx_packets, tx_bytes,
        driver_errors) since the stack probes started. Empty when they are off."""
        if not self.stack_enabled:
            return {}
        raw = read_percpu_u64_hash(self._ifaces_fd, records.IFACE_KEY.size,
                                   records.IFACE.size // 8)
        return {records.IFACE_KEY.unpack(k): tuple(v) for k, v in raw.items()}  # type: ignore[misc]

    def close(self) -> None:
        """Detach everything; safe to call twice."""
        if self._handover is None:
            return
        self.ring.close()
        _close_all(self._handover)
        self._handover = None


def _objects(objects_dir: Path) -> tuple[str, str, str]:
    names = ("lifecycle.bpf.o", "probe.bpf.o", "stack.bpf.o")
    paths = tuple(str(objects_dir / name) for name in names)
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        raise BpfObjectError(f"BPF objects missing ({', '.join(missing)}): {BUILD_HINT}")
    return paths  # type: ignore[return-value]


_FAILED_PROGRAM = re.compile(r"prog '(\w+)': (?:failed|.*fail)")


def _load_stack(path: str, lifecycle: BpfObject, plan: Plan) -> tuple[BpfObject, list[Link]] | None:
    """Load and attach the stack object's planned programs, sharing the lifecycle
    object's maps. A program the kernel refuses or cannot attach makes its hook
    unavailable (in ``plan``); the others stay. None when nothing attached."""
    for _ in range(len(_STACK_HOOKS) + 1):
        wanted = {p for h in plan.hooks if h.stack for p in h.programs}
        if not wanted:
            return None
        obj = None
        try:
            obj = BpfObject(path)
            for name in obj.program_names():
                obj.set_autoload(name, name in wanted)
            for name in _SHARED_MAPS:
                obj.reuse_map(name, lifecycle.map_fd(name))
            obj.load()
        except LibbpfError as exc:
            if obj is not None:
                obj.close()
            failed = {m.group(1) for ln in exc.log if (m := _FAILED_PROGRAM.search(ln))}
            failed &= wanted
            _without(plan, {p: f"refused: {exc}" for p in (failed or wanted)})
            continue
        links, refused = [], {}
        for program in sorted(wanted):
            try:
                links.append(obj.attach(program))
            except LibbpfError as exc:
                refused[program] = str(exc)
        _without(plan, refused)
        if links:
            return obj, links
        obj.close()
        return None
    return None


def check_record_layout(obj: BpfObject) -> None:
    """Refuse an object whose struct sw_event differs from records.SwEvent."""
    size, members = obj.struct_layout("sw_event")
    actual = [(m.name, m.offset, m.size) for m in members]
    problems = records.layout_mismatches(records.layout(records.SwEvent), actual)
    if size != records.EVENT_SIZE:
        problems.insert(0, f"size: python {records.EVENT_SIZE} vs object {size}")
    if problems:
        raise BpfObjectError(
            f"BPF object {obj.path} is stale ({problems[0]}): {BUILD_HINT}"
        )


def _attached(obj: BpfObject, links: list[Link], stack: bool) -> list[Attached]:
    return [Attached(ln.program, ln.fd, obj.program_fd(ln.program), stack) for ln in links]


def _load_here(cfg: LoaderConfig, paths: tuple[str, str, str]) -> tuple[Handover, list[int]]:
    """Probe the kernel, load the lifecycle object with the chosen variants, attach;
    in this process. Returns the handover and its fds; on success nothing is closed
    or detached (the process that ran this is meant to exit and leave them to the
    receiver of the fds)."""
    lifecycle_path, probe_path, stack_path = paths
    needs_tracefs = cfg.attach_mode == "tracepoint"
    feats = feat.probe_kernel(probe_path, probe_groups(cfg), mount=needs_tracefs)
    plan = plan_attachments(feats, cfg)

    try:
        obj = BpfObject(lifecycle_path)
    except LibbpfError as exc:
        raise BpfObjectError(f"{exc}: {BUILD_HINT}") from exc
    links: list[Link] = []
    try:
        check_record_layout(obj)
        chosen = {p for h in plan.hooks if not h.stack for p in h.programs}
        for name in obj.program_names():
            obj.set_autoload(name, name in chosen)
        obj.set_max_entries("socks", cfg.socks_max_entries)
        obj.set_max_entries("holders", cfg.socks_max_entries)
        obj.set_max_entries("events", cfg.ringbuf_bytes)
        obj.set_max_entries("events_rescue", max(cfg.ringbuf_bytes // 16, RESCUE_RING_MIN))
        obj.set_max_entries("sock_stack", cfg.socks_max_entries if cfg.stack_latency else 1)
        obj.set_rodata("suppress_close", b"\x01" if cfg.suppress_close else b"\x00")
        obj.set_rodata("stack_samples", b"\x01" if cfg.stack_latency else b"\x00")
        # wake the reader early once a quarter of the ring is in use
        obj.set_rodata("wakeup_bytes", (cfg.ringbuf_bytes // 4).to_bytes(8, "little"))
        load_object(obj)
        if obj.variable(".bss", "hold_opens") != (0, 4):
            raise BpfObjectError(f"{lifecycle_path}: unexpected .bss layout; {BUILD_HINT}")
        write_u32(obj.map_fd(".bss"), 0, cfg.hold_opens)
        for hook in plan.hooks:
            for program in hook.programs if not hook.stack else ():
                try:
                    links.append(obj.attach_map_iter(program, _MAP_ITERATORS[program])
                                 if program in _MAP_ITERATORS else obj.attach(program))
                except LibbpfError as exc:
                    raise AttachError(f"hook {hook.hook} ({hook.mode}): {exc}") from exc
        stack = _load_stack(stack_path, obj, plan) if cfg.stack_latency else None
        maps = {name: (obj.map_fd(name), obj.map_max_entries(name)) for name in _LIFECYCLE_MAPS}
        attached = _attached(obj, links, stack=False)
        if stack is not None:
            maps.update((name, (stack[0].map_fd(name), stack[0].map_max_entries(name)))
                        for name in _STACK_MAPS)
            attached += _attached(*stack, stack=True)
        handover = Handover(plan, feats, maps, tuple(attached))
        return handover, handover.fds()
    except BaseException:
        for link in links:
            link.destroy()
        obj.close()
        raise


def _close_all(handover: Handover) -> None:
    """Close every fd of a handover: that detaches and unloads it all."""
    for fd in handover.fds():
        os.close(fd)


class Loading:
    """A load under way in a short-lived child (see forked.py), which hands the
    fds over: libbpf's parse of the kernel's BTF, the largest allocation of a
    start, never lands in this process. Meanwhile this process is free: the
    daemon imports its exporter while the verifier checks the programs."""

    def __init__(self, cfg: LoaderConfig, objects_dir: Path | None = None):
        self.cfg = cfg
        paths = _objects(objects_dir or default_objects_dir())
        self._child = InChild(lambda: _load_here(cfg, paths))

    def probes(self) -> Probes:
        """Wait for the child: the attached probes, or its error raised here."""
        handover, fds = self._child.result()
        handover = handover.renumbered(fds)
        try:
            return Probes(handover)
        except BaseException:
            _close_all(handover)
            raise

    def cancel(self) -> None:
        """Give the load up; nothing it attached stays. A no-op once ``probes`` ran."""
        self._child.cancel()


def load(cfg: LoaderConfig, objects_dir: Path | None = None) -> Probes:
    """Probe the kernel, load the lifecycle object with the chosen variants, attach."""
    return Loading(cfg, objects_dir).probes()
