"""Data-plane test fixtures: a private bpffs, a child cgroup, a netns topology with servers.

Topology (all inside network namespaces this session creates, no route off the machine):

    <p>-br  : bridge br0
    <p>-c1  : managed client     10.244.0.1   fd00:244::1
    <p>-s1..s3 : servers :8080   10.244.0.2-4 fd00:244::2-4
    <p>-c2  : unmanaged client   10.244.0.5   fd00:244::5

Programs attach to <test_cgroup>/dataplane; clients join that cgroup, servers do not.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from daemon.dataplane import bpfsys
from daemon.dataplane.model import Backend, Endpoint, LbMode, Projection, Service, ServicePort

HERE = Path(__file__).resolve().parent
PY = sys.executable
PODS = {"c1": 1, "s1": 2, "s2": 3, "s3": 4, "c2": 5}
SERVERS = ("s1", "s2", "s3")
VIP4 = "10.96.0.10"
VIP6 = "fd00:96::10"

pytestmark = pytest.mark.kernel


def _sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, text=True)


def _sh_quiet(*args: str) -> None:
    subprocess.run(args, check=False, capture_output=True, text=True)


def ip4(pod: str) -> str:
    return f"10.244.0.{PODS[pod]}"


def ip6(pod: str) -> str:
    return f"fd00:244::{PODS[pod]}"


def uid(pod: str) -> str:
    return f"Kubernetes//Pod/default/{pod}"


def packed(ip: str) -> bytes:
    return ipaddress.ip_address(ip).packed


def backends() -> dict[str, Backend]:
    return {uid(p): Backend(uid(p), p, "default", packed(ip4(p)), packed(ip6(p))) for p in PODS}


def service(name: str, vips: tuple[str, ...], endpoints: list[Endpoint], port: int = 80,
            lb: LbMode = LbMode.RANDOM) -> Service:
    return Service(name, tuple(packed(v) for v in vips), (ServicePort(port, tuple(endpoints)),), lb)


def ep(pod: str, weight: int = 1, priority: int = 0, port: int = 8080) -> Endpoint:
    return Endpoint(uid(pod), port, weight, priority)


def base_projection() -> Projection:
    web = service("default/web", (VIP4, VIP6), [ep("s1"), ep("s2"), ep("s3")])
    return Projection({web.name: web}, backends())


def projection_json(proj: Projection) -> str:
    def ip(b: bytes | None) -> str | None:
        return str(ipaddress.ip_address(b)) if b else None

    return json.dumps({
        "backends": [{"uid": b.uid, "name": b.name, "namespace": b.namespace, "ipv4": ip(b.ipv4),
                      "ipv6": ip(b.ipv6)} for b in proj.backends.values()],
        "services": [{"name": s.name, "vips": [ip(v) for v in s.vips], "lb_mode": int(s.lb_mode),
                      "ports": [{"port": p.port, "endpoints": [
                          {"backend_uid": e.backend_uid, "target_port": e.target_port, "weight": e.weight,
                           "priority": e.priority} for e in p.endpoints]} for p in s.ports]}
                     for s in proj.services.values()],
    })


@dataclass
class Topology:
    prefix: str
    cgroup: Path
    procs: list[subprocess.Popen] = field(default_factory=list)

    def ns(self, pod: str) -> str:
        return f"{self.prefix}-{pod}"

    def ns_path(self, pod: str) -> str:
        return f"/run/netns/{self.ns(pod)}"

    def client(self, pod: str, target: str, n: int = 1, rate: float = 0.0, timeout: float = 2.0,
               in_cgroup: bool = True, cgroup: Path | None = None) -> dict:
        out = subprocess.run(self.client_cmd(pod, target, n, rate, timeout, in_cgroup, cgroup),
                             capture_output=True, text=True, timeout=120, check=True)
        return json.loads(out.stdout)

    def client_cmd(self, pod: str, target: str, n: int = 1, rate: float = 0.0, timeout: float = 2.0,
                   in_cgroup: bool = True, cgroup: Path | None = None) -> list[str]:
        cg = str(cgroup or self.cgroup) if in_cgroup else ""
        return [PY, str(HERE / "dp_client.py"), "--netns", self.ns_path(pod), "--cgroup", cg,
                "--target", target, "-n", str(n), "--rate", str(rate), "--timeout", str(timeout)]


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)


@pytest.fixture(scope="session")
def pin_root(run_prefix: str) -> Iterator[Path]:
    """A directory on a bpf filesystem for this session's pins.

    /sys/fs/bpf when it is a mounted bpffs; otherwise a private bpffs mounted at /tmp/<prefix>-bpffs
    (a fresh bpffs instance: nothing shared with the machine), unmounted at the end.
    """
    sysfs = Path("/sys/fs/bpf")
    mounted: Path | None = None
    if sysfs.is_dir() and bpfsys.is_bpffs(str(sysfs)):
        root = sysfs / f"{run_prefix}-dp"
    else:
        mounted = Path(f"/tmp/{run_prefix}-bpffs")
        mounted.mkdir(exist_ok=True)
        _sh("mount", "-t", "bpf", "bpf", str(mounted))
        root = mounted / "dp"
    root.mkdir(parents=True, exist_ok=True)
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)
        if mounted is not None:
            _sh_quiet("umount", str(mounted))
            try:
                mounted.rmdir()
            except OSError:
                pass


def _rm_cgroup(path: Path) -> None:
    if not path.exists():
        return
    for _ in range(50):
        pids = [int(p) for p in (path / "cgroup.procs").read_text().split()]
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)
    try:
        path.rmdir()
    except OSError:
        pass


@pytest.fixture(scope="session")
def make_cgroup(test_cgroup: Path) -> Iterator:
    """Factory for child cgroups of the session's test cgroup (removed at the end)."""
    made: list[Path] = []

    def make(name: str) -> Path:
        p = test_cgroup / name
        p.mkdir(exist_ok=True)
        made.append(p)
        return p

    yield make
    for p in reversed(made):
        _rm_cgroup(p)


@pytest.fixture(scope="session")
def topology(run_prefix: str, make_cgroup) -> Iterator[Topology]:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    topo = Topology(run_prefix, make_cgroup("dataplane"))
    br = topo.ns("br")
    names = [br] + [topo.ns(p) for p in PODS]
    try:
        for n in names:
            _sh("ip", "netns", "add", n)
            _sh("ip", "-n", n, "link", "set", "lo", "up")
        _sh("ip", "-n", br, "link", "add", "br0", "type", "bridge")
        _sh("ip", "-n", br, "link", "set", "br0", "up")
        for pod, i in PODS.items():
            ns = topo.ns(pod)
            _sh("ip", "-n", br, "link", "add", f"v{i}", "type", "veth", "peer", "name", "eth0", "netns", ns)
            _sh("ip", "-n", br, "link", "set", f"v{i}", "master", "br0", "up")
            _sh("ip", "-n", ns, "addr", "add", f"{ip4(pod)}/24", "dev", "eth0")
            _sh("ip", "-n", ns, "-6", "addr", "add", f"{ip6(pod)}/64", "dev", "eth0", "nodad")
            _sh("ip", "-n", ns, "link", "set", "eth0", "up")
        for pod in SERVERS:
            cmd = [PY, str(HERE / "dp_server.py"), "--netns", topo.ns_path(pod), "--name", pod]
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
            topo.procs.append(proc)
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        # bridge learning / neighbour resolution settle: one direct connection per server
        for pod in SERVERS:
            r = topo.client("c2", f"{ip4(pod)}:8080", in_cgroup=False)
            assert r["ok"] == 1, r
        yield topo
    finally:
        for proc in topo.procs:
            _kill(proc)
        for n in reversed(names):
            _sh_quiet("ip", "netns", "del", n)


@pytest.fixture(scope="session")
def dataplane(topology: Topology, pin_root: Path) -> Iterator:
    from daemon.dataplane import Dataplane, control_connect

    dp = Dataplane.open(topology.cgroup, pin_root / "main")
    try:
        dp.sync(base_projection())
        control_connect(topology.ns_path("c1"), True, cgroup=topology.cgroup)
        yield dp
    finally:
        dp.uninstall()


@pytest.fixture()
def dp(dataplane, topology: Topology) -> Iterator:
    """The session data plane reset to the base projection, c1 enrolled and c2 not."""
    from daemon.dataplane import control_connect

    dataplane.sync(base_projection())
    control_connect(topology.ns_path("c1"), True, cgroup=topology.cgroup)
    control_connect(topology.ns_path("c2"), False, cgroup=topology.cgroup)
    yield dataplane
