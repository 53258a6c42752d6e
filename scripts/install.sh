#!/usr/bin/env bash
# Installs everything sockwatch needs on a fresh Debian/Ubuntu machine, as root:
# system packages (clang, libbpf, bpftool, iproute2), the compiled CO-RE BPF
# objects, and the Python package in its own virtualenv under $PREFIX, with
# `sockwatch` linked into /usr/local/bin. With --test, test tools as well.
set -euo pipefail

PREFIX=${PREFIX:-/opt/sockwatch}
HERE=$(cd "$(dirname "$0")/.." && pwd)
WITH_TESTS=0
[ "${1:-}" = "--test" ] && WITH_TESTS=1

if [ "$(id -u)" -ne 0 ]; then
    echo "install.sh: run as root (it installs system packages and loads BPF)" >&2
    exit 1
fi

PACKAGES=(clang llvm make libbpf1 libbpf-dev bpftool iproute2 python3 python3-venv python3-pip)
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
[ -x "$PREFIX/venv/bin/python" ] || python3 -m venv "$PREFIX/venv"
"$PREFIX/venv/bin/pip" install -q --upgrade pip >/dev/null
if [ $WITH_TESTS -eq 1 ]; then
    "$PREFIX/venv/bin/pip" install -q "$HERE[test]"
else
    "$PREFIX/venv/bin/pip" install -q "$HERE"
fi
ln -sf "$PREFIX/venv/bin/sockwatch" /usr/local/bin/sockwatch
echo "== installed: $(sockwatch --version)"
