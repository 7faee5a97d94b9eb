#!/usr/bin/env bash
# `make image`: build the kmesh daemon image from ./Dockerfile with podman, offline from registries.
#
# - The base image is made here: `debootstrap --variant=minbase bookworm` from the Debian mirror
#   this machine's apt already uses, imported with `podman import`. Nothing is ever pulled.
# - Every podman call gets sandbox/kubelet/containers.conf (CONTAINERS_CONF): runtime runc
#   (crun refuses hybrid cgroups), explicit ulimits (root lacks CAP_SYS_RESOURCE here), host
#   network (podman never creates a bridge or touches iptables). /etc is not edited.
# - Caches by content hash under .build/image/: base-<hash>.tar (the rootfs; its hash covers suite,
#   mirror and package list) and daemon-<hash>.id (the image; its hash covers the base, the
#   Dockerfile and every file that goes into the wheel). A second run with nothing changed only
#   hashes files.
# Prints the image reference on stdout (progress on stderr).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
OUT="$ROOT/.build/image"
mkdir -p "$OUT"
export CONTAINERS_CONF="$ROOT/sandbox/kubelet/containers.conf"
log() { echo "image: $*" >&2; }

need=()
for p in podman runc debootstrap; do command -v "$p" >/dev/null 2>&1 || need+=("$p"); done
if ((${#need[@]})); then
    log "installing ${need[*]} (apt)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q podman runc debootstrap >&2 \
        || { apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q podman runc debootstrap >&2; }
fi

# --- base image -----------------------------------------------------------------------------
SUITE=bookworm
MIRROR=$(apt-get indextargets --format '$(REPO_URI)' 'Created-By: Packages' 2>/dev/null \
         | grep -v -e security -e updates | head -1)
MIRROR=${MIRROR:-http://deb.debian.org/debian/}
base_hash=$(printf '%s\n' "$SUITE" "$MIRROR" minbase v1 | sha256sum | cut -c1-16)
BASE_TAR="$OUT/base-$base_hash.tar"
BASE_REF="localhost/kmesh-base:$base_hash"
if ! podman image exists "$BASE_REF"; then
    if [ ! -s "$BASE_TAR" ]; then
        t0=$(date +%s)
        tmp=$(mktemp -d "$OUT/rootfs.XXXXXX")
        trap 'rm -rf "$tmp"' EXIT
        log "debootstrap --variant=minbase $SUITE from $MIRROR"
        debootstrap --variant=minbase "$SUITE" "$tmp" "$MIRROR" >"$OUT/debootstrap.log" 2>&1 \
            || { tail -20 "$OUT/debootstrap.log" >&2; exit 1; }
        rm -rf "$tmp"/var/lib/apt/lists/* "$tmp"/var/cache/apt/*.bin "$tmp"/var/cache/apt/archives/*.deb
        tar -C "$tmp" -cf "$BASE_TAR.part" . && mv "$BASE_TAR.part" "$BASE_TAR"
        rm -rf "$tmp"; trap - EXIT
        log "base rootfs $(du -h "$BASE_TAR" | cut -f1) in $(( $(date +%s) - t0 )) s"
    fi
    podman import "$BASE_TAR" "$BASE_REF" >/dev/null
fi

# --- daemon image -----------------------------------------------------------------------------
VERSION=$(sed -n 's/^__version__ = "\(.*\)"/\1/p' daemon/version.py)
SOURCES=(Dockerfile pyproject.toml setup.py README.md daemon kmeshctl sandbox manifests bpf)
[ -d waypoint ] && SOURCES+=(waypoint)
src_hash=$( { echo "$base_hash"; find "${SOURCES[@]}" -type f ! -path '*/__pycache__/*' ! -name '*.pyc' \
             -print0 | sort -z | xargs -0 sha256sum; } | sha256sum | cut -c1-16)
REF="localhost/kmesh-daemon:$src_hash"
STAMP="$OUT/daemon-$src_hash.id"
if podman image exists "$REF"; then
    # Same content hash: podman's store already holds this exact build (e.g. a fresh clone of
    # the same commit on this machine).
    [ -s "$STAMP" ] || podman image inspect --format '{{.Id}}' "$REF" >"$STAMP"
    log "up to date ($REF)"
else
    t0=$(date +%s)
    ctx=$(mktemp -d "$OUT/ctx.XXXXXX")
    trap 'rm -rf "$ctx"' EXIT
    # The wheel (app/) and every dependency (deps/) as wheels (pip's cache makes this quick on a
    # set-up machine); the image build then installs with --no-index.
    PY=${PYTHON:-$ROOT/.venv/bin/python}
    [ -x "$PY" ] || PY=python3
    "$PY" -m pip wheel -q --no-build-isolation -w "$ctx/deps" "$ROOT" >"$OUT/wheels.log" 2>&1 \
        || { grep -v "is ignored" "$OUT/wheels.log" | tail -20 >&2; exit 1; }
    rm -rf "$ROOT/build"
    mkdir "$ctx/app" && mv "$ctx"/deps/kmesh_py-*.whl "$ctx/app/"
    rm -f "$ctx"/deps/kubernetes_validate-*.whl
    # The xDS decoder's C helper, compiled here (the image has clang but no Python headers;
    # this host's python3.11 is Debian bookworm's, the image's ABI). None built: the image's
    # daemon uses the Python decoder, with the same results.
    mkdir "$ctx/native"
    "$PY" -c 'import sys; from pathlib import Path; from daemon.xds import native; native.build(Path(sys.argv[1]))' \
        "$ctx/native" >/dev/null 2>&1 || log "warning: xDS decoder helper not built; the image decodes in Python"
    cp Dockerfile "$ctx/"
    log "podman build ($REF)"
    podman build --network host --pull=never --build-arg "BASE=$BASE_REF" -t "$REF" \
        -t "ghcr.io/kmesh-py/kmesh-daemon:$VERSION" -f "$ctx/Dockerfile" "$ctx" >"$OUT/build.log" 2>&1 \
        || { tail -30 "$OUT/build.log" >&2; exit 1; }
    rm -rf "$ctx"; trap - EXIT
    podman image inspect --format '{{.Id}}' "$REF" >"$STAMP"
    size=$(podman image inspect --format '{{.Size}}' "$REF")
    log "built $REF in $(( $(date +%s) - t0 )) s, $(( size / 1000000 )) MB"
fi
# Older builds go (an image a running container uses stays); so does the dangling layer cache.
for old in $(podman images --format '{{.Repository}}:{{.Tag}}' localhost/kmesh-daemon | grep -vx "$REF"); do
    podman rmi "$old" >/dev/null 2>&1 || true
done
rm -f $(ls "$OUT"/daemon-*.id 2>/dev/null | grep -v "daemon-$src_hash.id") 2>/dev/null || true
# The name the install manifests use follows the last build.
podman tag "$REF" "ghcr.io/kmesh-py/kmesh-daemon:$VERSION"
echo "$REF" >"$OUT/current"
# podman build's RUN steps leave empty libpod_parent cgroups (every hierarchy): remove them.
for d in /sys/fs/cgroup/libpod_parent /sys/fs/cgroup/*/libpod_parent; do
    [ -d "$d" ] && find "$d" -depth -type d -exec rmdir {} + 2>/dev/null || true
done
echo "$REF"
