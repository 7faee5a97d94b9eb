"""nginx as the benchmark's HTTP backend (preferred over Envoy when present).

Why nginx: measured in the benchmark topology (wrk -c4, pinned), nginx ``return 200`` costs
about 40 µs of server CPU per new-connection request and 12 µs per keep-alive request, against
about 90-120 and 33-44 µs for Envoy's direct_response; its p50 also stays flat when the machine
is busy. A cheaper backend leaves more of the measured time to the client path under test.

Where it comes from: Debian's ``nginx`` package, unpacked without installing
(``apt-get download nginx && dpkg -x nginx_*.deb .build/nginx``), so no service is started and
nothing under /etc changes; a system nginx on PATH is used too. Single process
(``master_process off``), one worker loop, counters from ``stub_status`` on a loopback port.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from benchmarks import proc

REPO = Path(__file__).resolve().parent.parent
STATUS_PORT = 9901
UNPACKED = REPO / ".build" / "nginx" / "usr" / "sbin" / "nginx"


def find_nginx() -> Path | None:
    """$KMESH_BENCH_NGINX, the unpacked .build/nginx, or nginx on PATH / in /usr/sbin."""
    candidates = [os.environ.get("KMESH_BENCH_NGINX", ""), str(UNPACKED), shutil.which("nginx") or "",
                  "/usr/sbin/nginx"]
    for c in candidates:
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            return Path(c)
    return None


def nginx_version(binary: Path) -> str:
    out = subprocess.run([str(binary), "-v"], capture_output=True, text=True, timeout=30)
    m = re.search(r"nginx/(\S+)", out.stderr + out.stdout)
    return m.group(1) if m else "unknown"


def config(port: int, workdir: Path, status_port: int = STATUS_PORT) -> str:
    tmp = workdir / "nginx-tmp"
    tmp.mkdir(exist_ok=True)
    kinds = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    temp_paths = " ".join(f"{kind}_temp_path {tmp};" for kind in kinds)
    return f"""daemon off;
master_process off;
worker_processes 1;
pid {workdir}/nginx.pid;
error_log {workdir}/nginx-error.log error;
events {{ worker_connections 16384; }}
http {{
    access_log off;
    {temp_paths}
    keepalive_requests 10000000;
    server {{ listen {port} backlog=4096; location / {{ return 200 "ok\\n"; }} }}
    server {{
        listen 127.0.0.1:{status_port};
        location = /ready {{ return 200 "LIVE"; }}
        location = /status {{ stub_status; }}
    }}
}}
"""


@dataclass
class NginxProcess(proc.ServerProcess):
    """One nginx started inside a namespace and cgroup; stop() kills it by pid."""

    label: ClassVar[str] = "nginx"
    admin_label: ClassVar[str] = "nginx status"

    @property
    def status_port(self) -> int:
        """The loopback stub_status/ready port (nginx's name for the admin port)."""
        return self.admin_port

    def totals(self) -> tuple[int, int]:
        """(connections accepted, requests served) so far, from stub_status."""
        text = self.admin_get("/status")
        m = re.search(r"^\s*(\d+)\s+(\d+)\s+(\d+)\s*$", text, re.M)
        if not m:
            raise RuntimeError(f"unexpected stub_status output: {text[:200]!r}")
        return int(m.group(1)), int(m.group(3))


def start(binary: Path, port: int, workdir: Path, ns: str, cgroup: Path,
          cpus: str | None = None) -> NginxProcess:
    conf = workdir / "nginx.conf"
    conf.write_text(config(port, workdir))
    log = workdir / "nginx.log"
    argv = [str(binary), "-c", str(conf), "-p", str(workdir), "-e", str(workdir / "nginx-error.log")]
    return proc.start_ready(NginxProcess, argv, ns, cgroup, STATUS_PORT, log, cpus=cpus)
