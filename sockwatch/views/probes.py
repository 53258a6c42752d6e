"""``sockwatch probes``: what the kernel allows and which variant each hook uses."""

from __future__ import annotations

import json
from typing import TextIO

from sockwatch.kernel.features import KernelFeatures
from sockwatch.kernel.loader import Plan


def as_dict(feats: KernelFeatures, plan: Plan | None, error: str | None,
            stack_enabled: bool | None) -> dict:
    """``stack_enabled`` None: nothing attached, so unknown."""
    return {
        "kernel": feats.release,
        "btf": feats.btf,
        "tracefs_mounted": feats.tracefs,
        "kprobe_pmu": feats.kprobe_pmu,
        "attach_types": {k: {"ok": p.ok, "detail": p.detail} for k, p in feats.probes.items()},
        "stack_latency": stack_enabled,
        "hooks": [
            {"hook": h.hook, "mode": h.mode, "programs": list(h.programs), "note": h.note}
            for h in (plan.hooks if plan else [])
        ],
        "error": error,
    }


def render(feats: KernelFeatures, plan: Plan | None, error: str | None,
           stack_enabled: bool | None, out: TextIO, as_json: bool) -> None:
    if as_json:
        json.dump(as_dict(feats, plan, error, stack_enabled), out, indent=1)
        out.write("\n")
        return
    out.write(f"kernel       {feats.release}\n")
    out.write(f"kernel BTF   {'yes' if feats.btf else 'no'}\n")
    out.write(f"tracefs      {'mounted' if feats.tracefs else 'not mounted'}\n")
    out.write("attach types\n")
    for name, p in feats.probes.items():
        out.write(f"  {name:<11} {'ok' if p.ok else 'no'}{'  (' + p.detail + ')' if p.detail else ''}\n")
    if stack_enabled is not None:
        out.write(f"stack probes {'on (per-packet latency)' if stack_enabled else 'off'}\n")
    if plan:
        out.write("hooks\n")
        width = max([9] + [len(h.hook) for h in plan.hooks])
        for h in plan.hooks:
            progs = ", ".join(h.programs) or "-"
            note = f"  {h.note}" if h.note else ""
            out.write(f"  {h.hook:<{width}} {h.mode:<18} {progs}{note}\n")
    if error:
        out.write(f"error        {error}\n")
