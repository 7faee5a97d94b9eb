"""The node runtime alone: pod netns on a private bridge, pod cgroups, private mounts, processes."""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from sandbox.kubelet.runtime import (
    NETNS_DIR,
    ContainerSpec,
    Mount,
    Runtime,
    cleanup_node,
    render_hosts,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (netns, cgroups, mounts)")
REPO = Path(__file__).resolve().parents[2]
ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin"}


def enter(container, *cmd: str, host: bool = False, timeout: float = 20) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sandbox.kubelet.launch", "enter", str(container.pid), str(container.cgroup),
         "host" if host else "net", "--", *cmd],
        capture_output=True, text=True, timeout=timeout, cwd=REPO,
    )


def wait_for(pred, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


SERVER = (
    "import socket\n"
    "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
    "s.bind(('0.0.0.0', 9000)); s.listen()\n"
    "while True:\n"
    "    c, a = s.accept(); c.sendall(('hello ' + a[0]).encode()); c.close()\n"
)


def test_tcp_between_two_pods_only_inside_netns(runtime: Runtime) -> None:
    a = runtime.create_sandbox(str(uuid.uuid4()), "default", "server")
    b = runtime.create_sandbox(str(uuid.uuid4()), "default", "client")
    net = ipaddress.ip_network("10.244.0.0/24")
    assert a.ip != b.ip and ipaddress.ip_address(a.ip) in net and ipaddress.ip_address(b.ip) in net
    srv = runtime.start_container(a, ContainerSpec("srv", [sys.executable, "-c", SERVER], env=ENV))
    cli = runtime.start_container(b, ContainerSpec("idle", ["sleep", "infinity"], env=ENV))
    try:
        probe = f"import socket;s=socket.create_connection(('{a.ip}', 9000), 3);print(s.recv(100).decode())"
        out = ""
        for _ in range(50):
            r = enter(cli, sys.executable, "-c", probe)
            out = r.stdout.strip()
            if r.returncode == 0:
                break
            time.sleep(0.1)
        assert out == f"hello {b.ip}"
        # No route off the machine: the bridge netns has only br0's subnet, and nothing of ours is
        # in the root netns.
        routes = subprocess.run(["ip", "-n", runtime.network.bridge_netns, "route"], capture_output=True,
                                text=True, check=True).stdout
        assert "default" not in routes and routes.strip().startswith("10.244.0.0/24")
        root_links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
        assert a.uid.replace("-", "")[:13] not in root_links and "br0" not in root_links
    finally:
        for c in (srv, cli):
            runtime.stop_container(c)
        runtime.remove_sandbox(a)
        runtime.remove_sandbox(b)
    assert not (NETNS_DIR / a.netns).exists() and not a.cgroup.exists() and not a.dir.exists()


def test_cgroup_names_pod_uid_and_stop_kills_children(runtime: Runtime) -> None:
    uid = str(uuid.uuid4())
    pod = runtime.create_sandbox(uid, "default", "forker")
    script = "sleep 1000 & sleep 1000 & wait"
    c = runtime.start_container(pod, ContainerSpec("main", ["sh", "-c", script], env=ENV))
    try:
        wait_for(lambda: len((c.cgroup / "cgroup.procs").read_text().split()) == 3)
        assert f"/pod{uid}/{c.container_id}" in Path(f"/proc/{c.pid}/cgroup").read_text()
        pids = [int(p) for p in (c.cgroup / "cgroup.procs").read_text().split()]
    finally:
        runtime.stop_container(c, grace=0.5)
    assert not c.cgroup.exists()
    gone = [not Path(f"/proc/{p}").exists() or "zombie" in Path(f"/proc/{p}/status").read_text()
            for p in pids]
    assert all(gone)
    runtime.remove_sandbox(pod)


def test_private_mounts_volumes_and_hosts(runtime: Runtime, tmp_path: Path) -> None:
    host_hosts = Path("/etc/hosts").read_text()
    pod = runtime.create_sandbox(str(uuid.uuid4()), "demo", "mounts")
    vol = pod.dir / "volumes" / "token"
    vol.mkdir()
    (vol / "istio-token").write_text("tok")
    host_dir = tmp_path / "hostpath"
    host_dir.mkdir()
    runtime.write_hosts(pod, render_hosts(pod.ip, "mounts", "demo", [("fortio", "demo", "10.96.0.10"),
                                                                      ("other", "x", "10.96.0.11")]))
    c = runtime.start_container(pod, ContainerSpec("main", ["sleep", "infinity"], env=ENV, mounts=[
        Mount(str(vol), "/var/run/secrets/tokens", read_only=True),
        Mount(str(host_dir), "/host/data"),
    ]))
    try:
        r = enter(c, "sh", "-c", "cat /var/run/secrets/tokens/istio-token; echo; echo hi > /host/data/f; "
                  "getent hosts fortio fortio.demo.svc.cluster.local other.x; hostname; "
                  "touch /var/run/secrets/tokens/x 2>/dev/null && echo writable || echo readonly")
        assert r.returncode == 0, r.stderr
        lines = r.stdout.splitlines()
        assert lines[0] == "tok"
        assert lines[1].startswith("10.96.0.10") and lines[2].startswith("10.96.0.10")
        assert lines[3].startswith("10.96.0.11")
        assert lines[4] == "mounts" and lines[5] == "readonly"
        assert (host_dir / "f").read_text() == "hi\n"
        # Nothing appeared on the machine: no /run/secrets, no /host, /etc/hosts untouched.
        assert not Path("/run/secrets").exists() and not Path("/host").exists()
        assert Path("/etc/hosts").read_text() == host_hosts
        # Hosts file updates reach running containers (bind by inode, rewritten in place).
        runtime.write_hosts(pod, render_hosts(pod.ip, "mounts", "demo", [("fortio", "demo", "10.96.0.12")]))
        assert enter(c, "getent", "hosts", "fortio").stdout.startswith("10.96.0.12")
    finally:
        runtime.stop_container(c)
        runtime.remove_sandbox(pod)


def test_host_network_pod_stays_in_root_netns(runtime: Runtime) -> None:
    pod = runtime.create_sandbox(str(uuid.uuid4()), "kmesh-system", "daemon", host_network=True)
    assert pod.ip is None and pod.netns is None
    c = runtime.start_container(pod, ContainerSpec("main", ["sleep", "infinity"], env=ENV))
    try:
        wait_for(lambda: Path(f"/proc/{c.pid}/cgroup").read_text().rstrip().endswith(c.container_id))
        assert os.readlink(f"/proc/{c.pid}/ns/net") == os.readlink("/proc/self/ns/net")
        assert os.readlink(f"/proc/{c.pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt")
        assert enter(c, "true", host=True).returncode == 0
    finally:
        runtime.stop_container(c)
        runtime.remove_sandbox(pod)


def test_exec_failure_is_reported_in_log(runtime: Runtime) -> None:
    pod = runtime.create_sandbox(str(uuid.uuid4()), "default", "broken")
    c = runtime.start_container(pod, ContainerSpec("main", ["/no/such/program"], env=ENV))
    try:
        assert c.process.wait(timeout=10) == 127
        assert "exec /no/such/program" in c.log_path.read_text()
    finally:
        runtime.stop_container(c)
        runtime.remove_sandbox(pod)


def test_cleanup_node_leaves_nothing(run_prefix: str, test_cgroup: Path, tmp_path: Path) -> None:
    prefix = f"{run_prefix}c"
    rt = Runtime(tmp_path / "state", test_cgroup / f"{run_prefix}-cleanup", prefix)
    rt.setup()
    pods = [rt.create_sandbox(str(uuid.uuid4()), "default", f"p{i}") for i in range(2)]
    procs = [rt.start_container(p, ContainerSpec("main", ["sleep", "infinity"], env=ENV)) for p in pods]
    # Simulate a crashed kubelet: no stop_container, only the crash-safe cleanup.
    cleanup_node(prefix, rt.cgroup_root, rt.pods_dir)
    for p in procs:
        p.process.wait(timeout=5)
    assert not any(n.name.startswith(prefix + "-") for n in NETNS_DIR.iterdir())
    assert not rt.cgroup_root.exists() and not rt.pods_dir.exists()
    cleanup_node(prefix, rt.cgroup_root, rt.pods_dir)  # idempotent


def test_refuses_cgroup_v2_root(tmp_path: Path) -> None:
    from sandbox.cgroups import cgroup2_root
    from sandbox.kubelet.runtime import RuntimeError_

    with pytest.raises(RuntimeError_, match="refusing"):
        Runtime(tmp_path, cgroup2_root(), "x")
