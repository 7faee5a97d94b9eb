# The kmesh daemon image (the default of `kmeshctl install --image`):
#   docker build -t ghcr.io/kmesh-py/kmesh-daemon:$(python3 -c 'import tomllib;print(tomllib.load(open("pyproject.toml","rb"))["project"]["version"])') .
# Debian bookworm's python3 with bcc (python3-bpfcc) from the system, clang for bcc's
# compilation at daemon start, and Debian's kernel headers merged into one tree as
# scripts/setup.sh does; the daemon prefers the host's /lib/modules/$(uname -r)/build
# (the DaemonSet mounts /lib/modules) and falls back to this tree.
FROM debian:bookworm-slim

ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      python3 python3-venv python3-bpfcc libbpfcc clang linux-headers-amd64 \
      bpftool iproute2 kmod ca-certificates \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/kmesh
COPY pyproject.toml README.md ./
COPY kmeshctl ./kmeshctl
COPY daemon ./daemon
COPY bpf ./bpf
COPY manifests ./manifests
COPY sandbox ./sandbox

# Merged kernel-header tree for bcc (Debian splits headers into -common and -amd64).
RUN common=$(ls -d /usr/src/linux-headers-*-common | sort -V | tail -1) \
 && arch=$(ls -d /usr/src/linux-headers-*-amd64 | sort -V | tail -1) \
 && mkdir -p .build/kernel-src \
 && cp -rs "$common/." .build/kernel-src/ \
 && cp -rsf "$arch/." .build/kernel-src/ \
 && touch .build/kernel-src/.complete

# A venv on top of the system python so `import bcc` (python3-bpfcc) keeps working.
# Installed in place (-e): the daemon reads bpf/*.c from the source tree at start.
RUN python3 -m venv --system-site-packages /opt/kmesh/.venv \
 && /opt/kmesh/.venv/bin/pip install --no-cache-dir -q -e /opt/kmesh
ENV PATH=/opt/kmesh/.venv/bin:$PATH \
    PYTHONUNBUFFERED=1

# Flags and environment come from the DaemonSet (kmeshctl install).
ENTRYPOINT ["kmesh-daemon"]
