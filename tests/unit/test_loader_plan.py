"""Choosing a variant per hook from probed kernel features (loader.plan_attachments).

On the development machines fentry is refused and kprobes are missing, so the
fallback plan is the one that runs: it must be complete (state, connect,
accept and snapshot all covered), and a forced mode that cannot work must
say so in one line instead of half-attaching.
"""

from __future__ import annotations

import pytest

from sockwatch.errors import AttachError
from sockwatch.kernel import features
from sockwatch.kernel.features import KernelFeatures, Probe
from sockwatch.kernel.loader import (LoaderConfig, _verifier_excerpt, _without, plan_attachments,
                                     probe_groups)

EPERM = Probe(False, "Operation not permitted")
NO_KPROBES = Probe(False, "kprobes are not compiled into this kernel")
NO_TRACEFS = Probe(False, "tracefs is not mounted at /sys/kernel/tracing")
OK = Probe(True)


def feats(**probes: Probe) -> KernelFeatures:
    """Defaults: the development machines (fentry EPERM, no kprobes, no tracefs)."""
    base = {"fentry": EPERM, "kprobe": NO_KPROBES, "tp_btf": OK, "raw_tp": OK,
            "tracepoint": NO_TRACEFS, "iter": OK}
    base.update(probes)
    return KernelFeatures(release="6.18.0", btf=True, tracefs=False, kprobe_pmu=False,
                          probes=base)


def hooks(plan) -> dict[str, tuple[str, tuple[str, ...]]]:
    return {h.hook: (h.mode, h.programs) for h in plan.hooks}


def test_fallback_plan_on_development_kernel():
    """fentry refused, kprobe missing: tp_btf state hook, connect from the state hook,
    accept from first use, iter snapshot."""
    plan = plan_attachments(feats(), LoaderConfig())
    assert plan.tracepoint_flavour == "tp_btf" and plan.function_flavour is None
    assert hooks(plan) == {
        "state": ("tp_btf", ("set_state_btf", "set_state_nested_btf")),
        "destroy": ("tp_btf", ("destroy_btf", "destroy_nested_btf")),
        "connect": ("state", ()),
        "accept": ("first-use/tp_btf", ("send_btf", "recv_btf")),
        "snapshot": ("iter", ("dump_tcp",)),
        "owners": ("iter", ("dump_owners", "map_owners", "forget_owners")),
        "release": ("iter", ("release_opens",)),
        **STACK_BTF,
    }
    assert [h.hook for h in plan.hooks][:7] == ["state", "destroy", "connect", "accept", "snapshot",
                                                "owners", "release"]
    assert plan.programs == {"set_state_btf", "set_state_nested_btf", "destroy_btf", "destroy_nested_btf", "send_btf", "recv_btf", "dump_tcp", "dump_owners", "map_owners", "forget_owners", "release_opens"} | {
        p for _, progs in STACK_BTF.values() for p in progs}
    # no syscall hook unless asked for: it taxes every syscall on the host
    assert not any("accept_sys" in p for p in plan.programs)


# The per-packet stack hooks (stack.bpf.o) on the development kernel.
STACK_BTF = {
    "tcp_sendmsg": ("tp_btf", ("sendmsg_btf",)),
    "net_dev_queue": ("tp_btf", ("dev_queue_btf",)),
    "net_dev_start_xmit": ("tp_btf", ("start_xmit_btf",)),
    "net_dev_xmit": ("tp_btf", ("xmit_btf",)),
    "netif_receive_skb": ("tp_btf", ("receive_btf",)),
    "tcp_probe": ("tp_btf", ("tcp_rcv_btf",)),
    "sk_data_ready": ("tp_btf", ("data_ready_btf",)),
    "sock_recv_length": ("tp_btf", ("read_btf",)),
}


def test_stack_latency_off_plans_no_stack_hook():
    """--no-stack-latency: the per-packet programs are not even loaded."""
    plan = plan_attachments(feats(), LoaderConfig(stack_latency=False))
    assert not any(h.stack for h in plan.hooks)
    assert [h.hook for h in plan.hooks] == ["state", "destroy", "connect", "accept", "snapshot",
                                            "owners", "release"]


def test_stack_hooks_follow_the_tracepoint_flavour():
    """The stack hooks use the lifecycle's flavour; one without that variant is reported
    unavailable, never silently dropped."""
    raw = hooks(plan_attachments(feats(tp_btf=EPERM), LoaderConfig()))
    assert raw["net_dev_queue"] == ("raw_tp", ("dev_queue_raw",))
    assert raw["tcp_sendmsg"] == ("raw_tp", ("sendmsg_raw",))
    classic = plan_attachments(feats(tp_btf=EPERM, raw_tp=EPERM, tracepoint=OK), LoaderConfig())
    by_hook = {h.hook: h for h in classic.hooks}
    assert by_hook["sk_data_ready"].programs == ("data_ready_tp",)
    assert by_hook["tcp_sendmsg"].mode == "unavailable" and by_hook["tcp_sendmsg"].programs == ()
    assert "no tracepoint variant" in by_hook["tcp_sendmsg"].note


def test_a_failed_stack_program_makes_only_its_hook_unavailable():
    plan = plan_attachments(feats(), LoaderConfig())
    _without(plan, {"xmit_btf": "cannot attach xmit_btf: No such file or directory"})
    by_hook = {h.hook: h for h in plan.hooks}
    assert by_hook["net_dev_xmit"].mode == "unavailable"
    assert by_hook["net_dev_xmit"].note.endswith("cannot attach xmit_btf: No such file or directory")
    assert by_hook["net_dev_xmit"].note.startswith("stack: tx driver ends")
    assert by_hook["net_dev_start_xmit"].mode == "tp_btf"
    _without(plan, {"set_state_btf": "refused"})  # lifecycle hooks are never marked
    assert by_hook["state"] == {h.hook: h for h in plan.hooks}["state"]


def test_precise_accept_uses_syscall_exit():
    plan = plan_attachments(feats(), LoaderConfig(precise_accept=True))
    assert hooks(plan)["accept"] == ("syscall/tp_btf", ("accept_sys_btf",))
    assert "send_btf" not in plan.programs and "recv_btf" not in plan.programs


def test_only_raw_tp_available_uses_raw_tp_everywhere():
    plan = plan_attachments(feats(tp_btf=Probe(False, "no kernel BTF")), LoaderConfig())
    assert plan.tracepoint_flavour == "raw_tp"
    assert hooks(plan)["state"] == ("raw_tp", ("set_state_raw", "set_state_nested_raw"))
    assert hooks(plan)["accept"] == ("first-use/raw_tp", ("send_raw", "recv_raw"))
    precise = plan_attachments(feats(tp_btf=EPERM), LoaderConfig(precise_accept=True))
    assert hooks(precise)["accept"] == ("syscall/raw_tp", ("accept_sys_raw",))


def test_classic_tracepoint_is_last_resort():
    plan = plan_attachments(feats(tp_btf=EPERM, raw_tp=EPERM, tracepoint=OK), LoaderConfig())
    assert hooks(plan)["state"] == ("tracepoint", ("set_state_tp",))
    assert hooks(plan)["accept"] == ("first-use/tracepoint", ("send_tp", "recv_tp"))


def test_forced_tracepoint_flavour_is_used_even_if_a_better_one_exists():
    """--attach raw_tp checks that raw_tp works: it must not quietly pick tp_btf or fentry."""
    plan = plan_attachments(feats(fentry=OK), LoaderConfig(attach_mode="raw_tp"))
    assert plan.function_flavour is None
    assert hooks(plan)["state"] == ("raw_tp", ("set_state_raw", "set_state_nested_raw"))
    assert hooks(plan)["connect"] == ("state", ())


@pytest.mark.parametrize("mode", ["tracepoint", "fentry", "kprobe", "tp_btf"])
def test_forcing_unavailable_mode_raises_attach_error_naming_it(mode):
    f = feats(tp_btf=Probe(False, "no kernel BTF at /sys/kernel/btf/vmlinux"))
    with pytest.raises(AttachError) as info:
        plan_attachments(f, LoaderConfig(attach_mode=mode))
    msg = str(info.value)
    assert mode in msg and f.probes[mode].detail in msg
    assert "\n" not in msg


def test_unknown_mode_raises_attach_error():
    with pytest.raises(AttachError, match="nonsense"):
        plan_attachments(feats(), LoaderConfig(attach_mode="nonsense"))


def test_no_iter_raises_attach_error():
    """Without iter/tcp there is no seed and no reconciliation: refuse to start."""
    with pytest.raises(AttachError, match="iter/tcp.*Invalid argument"):
        plan_attachments(feats(iter=Probe(False, "Invalid argument")), LoaderConfig())
    with pytest.raises(AttachError, match="iter"):
        f = feats()
        del f.probes["iter"]
        plan_attachments(f, LoaderConfig())


def test_no_tracepoint_flavour_raises_with_every_reason():
    f = feats(tp_btf=Probe(False, "no BTF"), raw_tp=EPERM)
    with pytest.raises(AttachError) as info:
        plan_attachments(f, LoaderConfig())
    msg = str(info.value)
    assert "tp_btf: no BTF" in msg and "raw_tp: Operation not permitted" in msg
    assert "tracepoint: tracefs is not mounted" in msg


def test_fentry_allowed_uses_function_programs():
    plan = plan_attachments(feats(fentry=OK), LoaderConfig())
    assert plan.function_flavour == "fentry"
    assert hooks(plan) == {
        "state": ("tp_btf", ("set_state_btf", "set_state_nested_btf")),
        "destroy": ("tp_btf", ("destroy_btf", "destroy_nested_btf")),
        "connect": ("fentry", ("connect_fentry",)),
        "accept": ("fentry", ("accept_fexit",)),
        "snapshot": ("iter", ("dump_tcp",)),
        "owners": ("iter", ("dump_owners", "map_owners", "forget_owners")),
        "release": ("iter", ("release_opens",)),
        **STACK_BTF,
    }
    # precise_accept is moot when accept is hooked at the function: no syscall tax
    assert "accept_sys_btf" not in plan_attachments(
        feats(fentry=OK), LoaderConfig(precise_accept=True)).programs


def test_kprobe_when_fentry_refused():
    plan = plan_attachments(feats(kprobe=OK), LoaderConfig())
    assert hooks(plan)["connect"] == ("kprobe", ("connect_kprobe",))
    assert hooks(plan)["accept"] == ("kprobe", ("accept_kretprobe",))


def test_forced_fentry_keeps_best_tracepoint_for_state():
    plan = plan_attachments(feats(fentry=OK, tp_btf=EPERM), LoaderConfig(attach_mode="fentry"))
    assert plan.tracepoint_flavour == "raw_tp" and plan.function_flavour == "fentry"


def test_forcing_unprobed_function_mode_raises_attach_error():
    f = feats()
    del f.probes["kprobe"]
    with pytest.raises(AttachError, match="kprobe"):
        plan_attachments(f, LoaderConfig(attach_mode="kprobe"))


# -- which attach types are tried --------------------------------------------------------
KERNELS = {
    "development": {},
    "no tp_btf": {"tp_btf": EPERM},
    "tracepoints only": {"tp_btf": EPERM, "raw_tp": EPERM, "tracepoint": OK},
    "fentry": {"fentry": OK},
    "kprobes": {"kprobe": OK},
    "nothing": {"tp_btf": EPERM, "raw_tp": EPERM},
    "no iter": {"iter": EPERM},
}


def _probe_lazily(monkeypatch, truth: KernelFeatures, cfg: LoaderConfig
                  ) -> tuple[KernelFeatures, list[str]]:
    """probe_kernel as the loader calls it, with each try answered from ``truth``."""
    tried: list[str] = []

    def fake_probe(_obj: str, _feats: KernelFeatures, flavour: str) -> Probe:
        tried.append(flavour)
        return truth.probes[flavour]

    monkeypatch.setattr(features, "_probe", fake_probe)
    return features.probe_kernel("probe.bpf.o", probe_groups(cfg)), tried


def _plan_or_error(f: KernelFeatures, cfg: LoaderConfig) -> object:
    try:
        return hooks(plan_attachments(f, cfg))
    except AttachError as exc:
        return str(exc)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("mode", ["auto", "tp_btf", "raw_tp", "tracepoint", "fentry", "kprobe"])
def test_trying_only_what_the_plan_may_use_never_changes_the_plan(monkeypatch, kernel, mode):
    """The daemon tries attach types lazily (each try is a load and an attach; a
    classic tracepoint's detach alone takes ~50 ms): whatever the kernel allows, the
    plan, or the error, is the one every attach type tried would give."""
    truth = feats(**KERNELS[kernel])
    cfg = LoaderConfig(attach_mode=mode)
    lazy, _tried = _probe_lazily(monkeypatch, truth, cfg)
    assert _plan_or_error(lazy, cfg) == _plan_or_error(truth, cfg)


def test_on_the_development_kernel_the_daemon_skips_raw_tp_and_tracepoint(monkeypatch):
    _lazy, tried = _probe_lazily(monkeypatch, feats(), LoaderConfig())
    assert tried == ["iter", "tp_btf", "fentry", "kprobe"]
    _lazy, tried = _probe_lazily(monkeypatch, feats(), LoaderConfig(attach_mode="raw_tp"))
    assert tried == ["iter", "raw_tp"]  # a forced tracepoint flavour: no function hooks


def test_the_probes_report_tries_every_attach_type(monkeypatch):
    cfg = LoaderConfig(probe_every_type=True)
    lazy, tried = _probe_lazily(monkeypatch, feats(), cfg)
    assert sorted(tried) == sorted(features.PROBE_PROGRAMS)
    assert lazy.probes == feats().probes


# -- verifier log excerpt ---------------------------------------------------------------


def _verifier_log(n_insns: int) -> list[str]:
    return (
        ["libbpf: loading object 'lifecycle_bpf' from buffer",
         "libbpf: prog 'set_state_btf': BPF program load failed: Permission denied",
         "libbpf: prog 'set_state_btf': -- BEGIN PROG LOAD LOG --"]
        + [f"{i}: (b7) r{i % 10} = {i}" for i in range(n_insns)]
        + ["R1 invalid mem access 'scalar'",
           "processed 42 insns (limit 1000000) max_states_per_insn 0",
           "-- END PROG LOAD LOG --",
           "libbpf: prog 'set_state_btf': failed to load: -13",
           "libbpf: failed to load object 'lifecycle_bpf'"]
    )


def test_verifier_excerpt_keeps_culprit_and_tail():
    """The verdict is at the end of a long log; the failing program's name is on its own line."""
    log = _verifier_log(200)
    lines = _verifier_excerpt(log).splitlines()
    assert lines[0] == "libbpf: prog 'set_state_btf': failed to load: -13"
    assert lines[-2:] == ["R1 invalid mem access 'scalar'",
                          "processed 42 insns (limit 1000000) max_states_per_insn 0"]
    assert len(lines) == 1 + 25
    assert "0: (b7) r0 = 0" not in lines  # the head of a long log is dropped
    assert not any("END PROG LOAD LOG" in ln or "BEGIN PROG LOAD LOG" in ln for ln in lines)


def test_verifier_excerpt_short_log_starts_after_begin_marker():
    log = _verifier_log(3)
    lines = _verifier_excerpt(log).splitlines()
    assert lines == ["libbpf: prog 'set_state_btf': failed to load: -13",
                     "0: (b7) r0 = 0", "1: (b7) r1 = 1", "2: (b7) r2 = 2",
                     "R1 invalid mem access 'scalar'",
                     "processed 42 insns (limit 1000000) max_states_per_insn 0"]


def test_verifier_excerpt_tail_is_configurable():
    lines = _verifier_excerpt(_verifier_log(50), tail=3).splitlines()
    assert lines[1:] == ["49: (b7) r9 = 49", "R1 invalid mem access 'scalar'",
                         "processed 42 insns (limit 1000000) max_states_per_insn 0"]


def test_verifier_excerpt_without_markers_keeps_the_tail():
    log = [f"libbpf: line {i}" for i in range(100)]
    assert _verifier_excerpt(log).splitlines() == log[-25:]


def test_verifier_excerpt_without_markers_keeps_short_log_whole():
    log = ["libbpf: map 'events': failed to create: Operation not permitted"]
    assert _verifier_excerpt(log) == log[0]
