#!/usr/bin/env bash
# Installs everything sockwatch needs on a fresh Debian/Ubuntu machine, as root:
# system packages (clang, libbpf, bpftool, iproute2), the compiled CO-RE BPF
# objects, and the Python package in its own virtualenv under $PREFIX, with
# `sockwatch` linked into /usr/local/bin, the systemd unit and an example config
# in /etc/sockwatch. With --test, test tools as well. With --run, it then starts
# the daemon: through systemd where systemd runs, in the foreground elsewhere.
set -euo pipefail

PREFIX=${PREFIX:-/opt/sockwatch}
HERE=$(cd "$(dirname "$0")/.." && pwd)
WITH_TESTS=0
RUN=0
for arg in "$@"; do
    case "$arg" in
        --test) WITH_TESTS=1 ;;
        --run) RUN=1 ;;
        *) echo "install.sh: unknown option $arg (use --test or --run)" >&2; exit 2 ;;
    esac
done

if [ "$(id -u)" -ne 0 ]; then
    echo "install.sh: run as root (it installs system packages and loads BPF)" >&2
    exit 1
fi

PACKAGES=(clang llvm make libbpf1 libbpf-dev bpftool iproute2 python3 python3-venv python3-pip)
# What the kernel tests drive besides sockwatch (Prometheus they install themselves,
# with its service kept from starting).
# tmux is the real terminal the `sockwatch top` tests drive.
[ $WITH_TESTS -eq 1 ] && PACKAGES+=(strace openssl util-linux tmux)
missing=()
for p in "${PACKAGES[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "== installing system packages: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

echo "== building BPF objects"
make -C "$HERE/bpf" -s

echo "== installing the Python package into $PREFIX/venv"
# The distribution's interpreter, never one under /root or /home (pyenv and the
# like): the unit's ProtectHome= hides those, and the service could not start.
SYSTEM_PYTHON=/usr/bin/python3
if [ -x "$PREFIX/venv/bin/python" ] && \
   [ "$(readlink -f "$PREFIX/venv/bin/python")" != "$(readlink -f "$SYSTEM_PYTHON")" ]; then
    echo "== $PREFIX/venv was built from another interpreter: rebuilding it"
    rm -rf "$PREFIX/venv"
fi
[ -x "$PREFIX/venv/bin/python" ] || "$SYSTEM_PYTHON" -m venv "$PREFIX/venv"
"$PREFIX/venv/bin/pip" install -q --upgrade pip >/dev/null
if [ $WITH_TESTS -eq 1 ]; then
    "$PREFIX/venv/bin/pip" install -q "$HERE[test]"
else
    "$PREFIX/venv/bin/pip" install -q "$HERE"
fi
ln -sf "$PREFIX/venv/bin/sockwatch" /usr/local/bin/sockwatch

echo "== installing the systemd unit and /etc/sockwatch/sockwatch.toml"
install -d -m 0755 /etc/sockwatch
[ -f /etc/sockwatch/sockwatch.toml ] || install -m 0644 "$HERE/systemd/sockwatch.toml" /etc/sockwatch/
install -D -m 0644 "$HERE/systemd/sockwatch.service" /etc/systemd/system/sockwatch.service
echo "== installed: $(sockwatch --version)"

if [ $RUN -eq 1 ]; then
    if [ -d /run/systemd/system ]; then
        systemctl daemon-reload
        systemctl enable --now sockwatch.service
        systemctl --no-pager status sockwatch.service | head -5
        echo "== metrics: curl http://127.0.0.1:9873/metrics ; live table: sockwatch table"
    else
        echo "== systemd is not running here: starting the daemon in the foreground (Ctrl-C stops it)"
        exec sockwatch daemon --config /etc/sockwatch/sockwatch.toml
    fi
fi
