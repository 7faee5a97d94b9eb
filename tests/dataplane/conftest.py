"""Data-plane test fixtures: a private bpffs, a child cgroup, a netns topology with servers.

Topology (all inside network namespaces this session creates, no route off the machine):

    <p>-br  : bridge br0
    <p>-c1  : managed client     10.244.0.1   fd00:244::1
    <p>-s1..s3 : servers :8080   10.244.0.2-4 fd00:244::2-4
    <p>-c2  : unmanaged client   10.244.0.5   fd00:244::5

Programs attach to <test_cgroup>/dataplane; clients join that cgroup, servers do not.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from dp_topo import PODS, PY, SERVERS, base_projection, ip4, ip6, sh, sh_quiet

from daemon.dataplane import bpfsys
from sandbox.cgroups import remove_cgroup_tree
from tests.support import NETCLIENT, NETSERVER


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
        return [PY, str(NETCLIENT), "--netns", self.ns_path(pod), "--cgroup", cg,
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
    if os.geteuid() != 0:
        pytest.skip("needs root (bpffs, BPF programs, network namespaces)")
    sysfs = Path("/sys/fs/bpf")
    mounted: Path | None = None
    if sysfs.is_dir() and bpfsys.is_bpffs(str(sysfs)):
        root = sysfs / f"{run_prefix}-dp"
    else:
        mounted = Path(f"/tmp/{run_prefix}-bpffs")
        mounted.mkdir(exist_ok=True)
        sh("mount", "-t", "bpf", "bpf", str(mounted))
        root = mounted / "dp"
    root.mkdir(parents=True, exist_ok=True)
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)
        if mounted is not None:
            sh_quiet("umount", str(mounted))
            try:
                mounted.rmdir()
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
        remove_cgroup_tree(p)


@pytest.fixture(scope="session")
def topology(run_prefix: str, make_cgroup) -> Iterator[Topology]:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    topo = Topology(run_prefix, make_cgroup("dataplane"))
    br = topo.ns("br")
    names = [br] + [topo.ns(p) for p in PODS]
    try:
        for n in names:
            sh("ip", "netns", "add", n)
            sh("ip", "-n", n, "link", "set", "lo", "up")
        sh("ip", "-n", br, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", br, "link", "set", "br0", "up")
        for pod, i in PODS.items():
            ns = topo.ns(pod)
            sh("ip", "-n", br, "link", "add", f"v{i}", "type", "veth", "peer", "name", "eth0", "netns", ns)
            sh("ip", "-n", br, "link", "set", f"v{i}", "master", "br0", "up")
            sh("ip", "-n", ns, "addr", "add", f"{ip4(pod)}/24", "dev", "eth0")
            sh("ip", "-n", ns, "-6", "addr", "add", f"{ip6(pod)}/64", "dev", "eth0", "nodad")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
        for pod in SERVERS:
            cmd = [PY, str(NETSERVER), "--netns", topo.ns_path(pod), "--name", pod]
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
            sh_quiet("ip", "netns", "del", n)


@pytest.fixture(scope="session")
def dataplane(topology: Topology, pin_root: Path) -> Iterator:
    from daemon.dataplane import Dataplane, control_connect

    dp = Dataplane.open(topology.cgroup, pin_root / "main")
    try:
        dp.set_trace(True)  # these tests read the ring buffer themselves: they are the consumer
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


@pytest.fixture(scope="session")
def wp_netns(topology: Topology) -> Iterator[str]:
    """The waypoint pod of the waypoint tests (wp_env): a netns on the topology bridge at
    10.244.0.9 / fd00:244::9, never enrolled. Tests start their own waypoint processes in it."""
    from wp_env import WP_IP4, WP_IP6, add_pod

    ns = topology.ns("wpod")  # not "wp": tests/waypoint uses <prefix>-wp
    try:
        add_pod(topology.ns("br"), ns, 9, WP_IP4, WP_IP6)
        yield ns
    finally:
        sh_quiet("ip", "netns", "del", ns)
