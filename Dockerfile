# The kmesh daemon image (the default of `kmeshctl install --image`: ghcr.io/kmesh-py/kmesh-daemon:<version>).
#
# `make image` builds it with podman from a locally debootstrapped base (BASE=localhost/kmesh-base:...)
# and a build context holding the kmesh-py wheel and its dependencies as wheels (see scripts/image.sh).
# Elsewhere: `pip wheel -w deps . && mkdir app native && mv deps/kmesh_py-*.whl app/ && rm deps/kubernetes_validate-*
# && docker build --build-arg BASE=debian:bookworm-slim .`
#
# Contents: Debian bookworm's python3 with bcc (python3-bpfcc), clang for bcc's compilation at daemon
# start, and Debian's kernel headers merged into one tree (/opt/kmesh/kernel-src) for nodes without
# /lib/modules/$(uname -r)/build (the DaemonSet mounts /lib/modules; the daemon prefers the node's own
# headers). BPF is compiled at start, not at build time: bcc cannot write an object file, its compiled
# instructions carry the fds of the maps it created, and map sizes are chosen when the daemon starts.
ARG BASE=debian:bookworm-slim
FROM ${BASE}

ARG DEBIAN_FRONTEND=noninteractive
# Kernel headers are unpacked (dpkg -x), not installed: installing linux-headers-amd64 pulls gcc and
# kbuild (~150 MB) that bcc never runs.
RUN apt-get update -q \
 && apt-get install -y -q --no-install-recommends \
      python3 python3-venv python3-bpfcc libbpfcc clang bpftool iproute2 kmod ca-certificates \
 && hdr=$(apt-cache depends linux-headers-amd64 | awk '/Depends: linux-headers-/ {print $2; exit}') \
 && cd /tmp && apt-get download -q "$hdr" "${hdr%-amd64}-common" \
 && mkdir -p /tmp/kh /opt/kmesh/kernel-src && for d in /tmp/linux-headers-*.deb; do dpkg -x "$d" /tmp/kh; done \
 && cp -a /tmp/kh/usr/src/. /usr/src/ && rm -rf /tmp/kh /tmp/*.deb \
 && cp -rs "/usr/src/${hdr%-amd64}-common/." /opt/kmesh/kernel-src/ \
 && cp -rsf "/usr/src/$hdr/." /opt/kmesh/kernel-src/ \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/cache/apt/archives/*.deb \
      /usr/share/doc/* /usr/share/man/* /usr/share/locale/*

# A venv on top of the system python so `import bcc` (python3-bpfcc) keeps working; installed from
# wheels in the build context only (no index): the image build needs no registry. Two layers: the
# dependencies (deps/, rarely change, cached) and kmesh-py itself (app/, rebuilt on every change).
# kubernetes-validate (kmeshctl's install checks, ~110 MB of schemas) is left out: the daemon never
# uses it.
COPY deps /tmp/deps
RUN python3 -m venv --system-site-packages /opt/kmesh/venv \
 && /opt/kmesh/venv/bin/pip install -q --no-cache-dir --no-index --no-deps /tmp/deps/*.whl \
 && rm -rf /tmp/deps \
 && /opt/kmesh/venv/bin/python -m compileall -q /opt/kmesh/venv/lib
COPY app /tmp/app
RUN /opt/kmesh/venv/bin/pip install -q --no-cache-dir --no-index --no-deps /tmp/app/*.whl \
 && /opt/kmesh/venv/bin/pip uninstall -q -y pip \
 && rm -rf /tmp/app \
 && /opt/kmesh/venv/bin/python -m compileall -q /opt/kmesh/venv/lib
# The xDS decoder's C helper built by scripts/image.sh (may be empty: the Python decoder is used),
# where daemon/xds/native.py looks for it (<site-packages>/.build/native).
COPY native /opt/kmesh/venv/lib/python3.11/site-packages/.build/native
ENV PATH=/opt/kmesh/venv/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    KMESH_KERNEL_HEADERS=/opt/kmesh/kernel-src \
    PYTHONUNBUFFERED=1

# Flags and environment come from the DaemonSet (kmeshctl install).
ENTRYPOINT ["kmesh-daemon"]
