"""Kernel-level authorization environment: the real authz programs on real veths in netns.

Layout (unique names, removed at the end, also on failure):

    /tmp/<p>-az-bpffs         private bpffs; the loader child compiles every program and pins
                              the maps (one generation directory) there
    netns <p>-azbr            bridge br0, 10.77.0.254 (plays the node address)
    netns <p>-azsrv           eth0 10.77.0.10 + 10.77.0.11 (one workload, two addresses), server
                              on 8080 and 9090, the authz program linked to eth0 ingress
    netns <p>-azsrv2          eth0 10.77.0.20, same server, *not* linked (an unenrolled pod)
    netns <p>-azcli           eth0 10.77.0.2 ... 10.77.0.7: the sources (bound per attempt)

Identities (the workloads owning the source addresses) are what the tests hand the compiler,
just as the daemon derives them from xDS workloads.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.support.procs import stop_process

HERE = Path(__file__).resolve().parent
PROBE = HERE / "podprobe.py"
PY = sys.executable
SRV_IPS = ("10.77.0.10", "10.77.0.11")
SRV2_IP = "10.77.0.20"
NODE_IP = "10.77.0.254"
PORTS = (8080, 9090)
SRV_IP6, CLI_IP6 = "fd00:77::10", "fd00:77::4"  # IPv6: the server workload and other/netutils
# source address -> (namespace, service account) of the workload owning it; .6 owns nothing
SOURCES = {
    "10.77.0.2": ("default", "netutils"),
    "10.77.0.3": ("default", "fortio"),
    "10.77.0.4": ("other", "netutils"),
    "10.77.0.5": ("other", "curl"),
    "10.77.0.6": None,
    "10.77.0.7": ("prod", "sa1"),
}


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, check=check, timeout=60)


@dataclass
class Prober:
    """A persistent client process in one netns (no process start per attempt)."""

    proc: subprocess.Popen

    def attempt(self, dst: str, port: int, src: str = "", timeout: float = 2.0) -> dict[str, Any]:
        return self.send({"src": src, "dst": dst, "port": port, "timeout": timeout})

    def send(self, req: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())


@dataclass
class KernelEnv:
    prefix: str
    bpffs: Path
    gen_dir: Path
    work: Path
    programs: Any = None
    writer: Any = None
    links: Any = None
    cli: Prober | None = None
    node: Prober | None = None
    procs: list[subprocess.Popen] = field(default_factory=list)

    def netns(self, short: str) -> str:
        return f"/run/netns/{self.prefix}-az{short}"

    @property
    def server_log(self) -> Path:
        return self.work / "srv.log"

    def workloads(self) -> list[Any]:
        import ipaddress

        from daemon.authz.compiler import Identity, WorkloadInfo

        out = [
            WorkloadInfo(
                uid=f"Kubernetes//Pod/{ns}/{sa}-{ip.rsplit('.', 1)[1]}",
                name=f"{sa}-{ip.rsplit('.', 1)[1]}",
                namespace=ns,
                addresses=(ipaddress.ip_address(ip).packed,)
                + ((ipaddress.ip_address(CLI_IP6).packed,) if ip == "10.77.0.4" else ()),
                identity=Identity("cluster.local", ns, sa),
                node="other-node",
            )
            for ip, who in SOURCES.items()
            if who
            for ns, sa in [who]
        ]
        out.append(
            WorkloadInfo(
                uid="Kubernetes//Pod/default/fortio-0",
                name="fortio-0",
                namespace="default",
                addresses=tuple(ipaddress.ip_address(a).packed for a in (*SRV_IPS, SRV_IP6)),
                identity=Identity("cluster.local", "default", "fortio"),
                node="n1",
                policies=(),
            )
        )
        out.append(
            WorkloadInfo(
                uid="Kubernetes//Pod/default/plain-0",
                name="plain-0",
                namespace="default",
                addresses=(ipaddress.ip_address(SRV2_IP).packed,),
                identity=Identity("cluster.local", "default", "plain"),
                node="n1",
            )
        )
        return out

    def apply(self, policies: dict[str, Any], workloads: list[Any] | None = None) -> Any:
        """Compile and write ``policies`` ("ns/name" -> Authorization) like the daemon does."""
        import ipaddress

        from daemon.authz.compiler import compile_tables

        compiled = compile_tables(
            policies,
            self.workloads() if workloads is None else workloads,
            self.writer.inactive_epoch(),
            node="n1",
            node_addresses=[ipaddress.ip_address(NODE_IP).packed],
        )
        self.writer.apply(compiled)
        return compiled

    def accepted(self) -> list[str]:
        return self.server_log.read_text().splitlines() if self.server_log.exists() else []


def prober(netns: str, cgroup: str = "") -> Prober:
    proc = subprocess.Popen(
        [PY, str(PROBE), "client", "--netns", netns, "--cgroup", cgroup],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    return Prober(proc)


@pytest.fixture(scope="package")
def kenv(run_prefix: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[KernelEnv]:
    if os.geteuid() != 0:
        pytest.skip("needs root (netns, BPF)")
    from daemon.authz.attach import Links
    from daemon.authz.writer import MapWriter
    from daemon.dataplane.loader import load_in_child
    from daemon.dataplane.netns import netns_cookie
    from daemon.dataplane.types import Capacity

    work = tmp_path_factory.mktemp("azk")
    bpffs = Path(f"/tmp/{run_prefix}-az-bpffs")
    e = KernelEnv(prefix=run_prefix, bpffs=bpffs, gen_dir=bpffs / "kmesh" / "v-test", work=work)
    made: list[str] = []
    mounted = False
    try:
        bpffs.mkdir(exist_ok=True)
        sh("mount", "-t", "bpf", "bpf", str(bpffs))
        mounted = True
        for short in ("br", "srv", "srv2", "cli"):
            name = f"{run_prefix}-az{short}"
            sh("ip", "netns", "add", name)
            made.append(name)
            sh("ip", "-n", name, "link", "set", "lo", "up")
        br = f"{run_prefix}-azbr"
        sh("ip", "-n", br, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", br, "addr", "add", f"{NODE_IP}/24", "dev", "br0")
        sh("ip", "-n", br, "link", "set", "br0", "up")
        addrs = {"srv": SRV_IPS, "srv2": (SRV2_IP,), "cli": tuple(SOURCES)}
        for i, (short, ips) in enumerate(addrs.items()):
            ns = f"{run_prefix}-az{short}"
            sh("ip", "-n", br, "link", "add", f"v{i}", "type", "veth", "peer", "name", "eth0", "netns", ns)
            sh("ip", "-n", br, "link", "set", f"v{i}", "master", "br0", "up")
            for ip in ips:
                sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", "eth0")
            v6 = {"srv": SRV_IP6, "cli": CLI_IP6}.get(short)
            if v6:
                sh("ip", "-n", ns, "addr", "add", f"{v6}/64", "dev", "eth0", "nodad")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
        for short in ("srv", "srv2"):
            p = subprocess.Popen(
                [
                    PY,
                    str(PROBE),
                    "server",
                    "--netns",
                    e.netns(short),
                    "--ports",
                    ",".join(map(str, PORTS)),
                    "--log",
                    str(e.server_log if short == "srv" else work / "srv2.log"),
                ],
                stdout=subprocess.PIPE,
                text=True,
            )
            e.procs.append(p)
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        e.programs = load_in_child(e.gen_dir, Capacity())
        e.writer = MapWriter(e.gen_dir)
        e.links = Links(bpffs / "kmesh")
        e.links.attach(e.netns("srv"), netns_cookie(e.netns("srv")), e.programs.prog_fds["authz"])
        e.cli = prober(e.netns("cli"))
        e.node = prober(e.netns("br"))
        e.procs += [e.cli.proc, e.node.proc]
        # dad: wait until every address answers (no policy yet)
        for src in SOURCES:
            for _ in range(50):
                if e.cli.attempt(SRV_IPS[0], 8080, src)["result"] == "ok":
                    break
        yield e
    finally:
        for p in e.procs:
            stop_process(p)
        if e.writer is not None:
            e.writer.close()
        if e.programs is not None:
            e.programs.cleanup()
        for name in reversed(made):
            sh("ip", "netns", "del", name, check=False)
        if mounted:
            shutil.rmtree(bpffs / "kmesh", ignore_errors=True)
            sh("umount", str(bpffs), check=False)
        try:
            bpffs.rmdir()
        except OSError:
            pass
