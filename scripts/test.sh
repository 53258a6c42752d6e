#!/usr/bin/env bash
# Runs the whole test suite as root on a fresh machine: installs everything
# (scripts/install.sh --test), then unit tests and kernel tests in one pytest
# run, and checks that no BPF program outlives the run.
set -euo pipefail
HERE=$(cd "$(dirname "$0")/.." && pwd)
cd "$HERE"

"$HERE/scripts/install.sh" --test

# Ids of loaded BPF programs (none loaded is an empty list, not a failure).
progs() { bpftool prog list 2>/dev/null | { grep -E '^[0-9]+:' || true; } | cut -d: -f1 | sort; }
before=$(progs)
status=0
"${PREFIX:-/opt/sockwatch}/venv/bin/python" -m pytest -ra "$@" tests || status=$?
after=$(progs)
leaked=$(comm -13 <(echo "$before") <(echo "$after"))
if [ -n "$leaked" ]; then
    echo "test.sh: BPF programs left attached after the run: $leaked" >&2
    status=1
fi
exit $status
