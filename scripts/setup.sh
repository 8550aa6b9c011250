#!/usr/bin/env bash
# Install what Coral needs on a Debian machine (as root), idempotently:
# Debian packages, the Python venv in .venv, and the built BPF objects.
# Fast when everything is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
    clang llvm libbpf-dev bpftool make gcc pkg-config
    python3 python3-venv python3-dev
    apache2 apache2-utils wrk curl
    iproute2 iptables ethtool arping iputils-ping tcpdump procps psmisc util-linux
    libnetfilter-queue-dev
)

if [ "$(id -u)" -ne 0 ]; then
    echo "setup: run as root (network namespaces, tc and bpffs need it)" >&2
    exit 1
fi

missing=()
for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "setup: installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

stamp=.venv/.coral-deps
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -x .venv/bin/python ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "setup: creating the Python environment in .venv"
    log=$(mktemp)
    if ! { python3 -m venv .venv && .venv/bin/pip install -q -e '.[dev]'; } >"$log" 2>&1; then
        cat "$log" >&2
        rm -f "$log"
        exit 1
    fi
    rm -f "$log"
    echo "$want" > "$stamp"
fi

if [ -f bpf/Makefile ]; then
    make -s -C bpf
fi
