"""The node's container runtime: pod network namespaces, pod cgroups, container processes.

Layout on the machine (everything named with the sandbox's unique prefix P):

- network: a netns ``P-br`` holding bridge ``br0`` with the pod CIDR's gateway address and no other
  interface or route, so nothing can leave the machine; each pod gets a netns ``P-<pod uid>`` with
  ``eth0`` (a veth whose peer ``v<uid...>`` is enslaved to ``br0`` inside ``P-br``), an address
  from the CIDR, loopback up and a default route to the gateway. No veth ever lives in the root
  network namespace. hostNetwork pods get no netns.
- cgroups: ``<cgroup root>/pod<uid>/<container id>`` on cgroup v2, as a kubelet names them, so
  ``/proc/<pid>/cgroup`` of every container process names its pod UID. The root must be a child
  directory of the cgroup v2 mount, never the mount itself.
- files: ``<state dir>/pods/<uid>/`` with volumes, the pod's hosts file, container logs, launch
  specs and an empty directory per container that becomes its root (see launch.py).

Container processes are started through ``python -m sandbox.kubelet.launch`` (see its docstring).
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from daemon.cgroupmount import cgroup2_mounts
from sandbox.cgroups import remove_cgroup_tree

NETNS_DIR = Path("/run/netns")
REPO = Path(__file__).resolve().parents[2]
LAUNCH_TIMEOUT = 15.0


class RuntimeError_(Exception):
    """A node-level operation failed; the message says what and why."""


def _ip(args: list[str], netns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    cmd = ["ip"] + (["-n", netns] if netns else []) + args
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise RuntimeError_(f"{' '.join(cmd)}: {proc.stderr.strip()}")
    return proc


def cgroup2_mount_of(path: Path) -> Path:
    """The cgroup v2 mount point that contains `path` (raises if none)."""
    best: Path | None = None
    for mnt, _ in cgroup2_mounts():
        if (path == mnt or mnt in path.parents) and (best is None or len(mnt.parts) > len(best.parts)):
            best = mnt
    if best is None:
        raise RuntimeError_(f"{path} is not on a cgroup v2 mount")
    return best


def check_cgroup_root(path: Path) -> Path:
    """Refuse the cgroup v2 root itself: BPF programs get attached at the sandbox's root."""
    path = Path(os.path.abspath(path))
    mnt = cgroup2_mount_of(path)
    if path == mnt:
        raise RuntimeError_(f"refusing to use the cgroup v2 root {path}: give a child directory of it")
    return path


@dataclass
class Mount:
    source: str
    target: str
    read_only: bool = False


@dataclass
class ContainerSpec:
    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    workdir: str = "/"
    mounts: list[Mount] = field(default_factory=list)


@dataclass
class PodSandbox:
    uid: str
    namespace: str
    name: str
    dir: Path
    cgroup: Path
    hosts_file: Path
    host_network: bool
    netns: str | None = None  # name under /run/netns
    ip: str | None = None

    @property
    def netns_path(self) -> str | None:
        return str(NETNS_DIR / self.netns) if self.netns else None


@dataclass
class Container:
    """One start of a container: the process and where its output goes."""

    name: str
    container_id: str
    process: subprocess.Popen
    log_path: Path
    cgroup: Path
    started_at: float

    @property
    def pid(self) -> int:
        return self.process.pid


class PodNetwork:
    """The bridge netns and the per-pod netns/veth/address plumbing (no route off the machine)."""

    def __init__(self, prefix: str, cidr: str = "10.244.0.0/24") -> None:
        self.prefix = prefix
        self.cidr = ipaddress.ip_network(cidr)
        hosts = list(self.cidr.hosts())
        self.gateway = str(hosts[0])
        self._pool = [str(h) for h in hosts[1:]]
        self._used: set[str] = set()
        self._next = 0
        self._lock = threading.Lock()
        self.bridge_netns = f"{prefix}-br"

    def setup(self) -> None:
        if not (NETNS_DIR / self.bridge_netns).exists():
            _ip(["netns", "add", self.bridge_netns])
        ns = self.bridge_netns
        _ip(["link", "set", "lo", "up"], ns)
        if _ip(["link", "show", "br0"], ns, check=False).returncode != 0:
            _ip(["link", "add", "br0", "type", "bridge"], ns)
            _ip(["addr", "add", f"{self.gateway}/{self.cidr.prefixlen}", "dev", "br0"], ns)
        _ip(["link", "set", "br0", "up"], ns)

    def _allocate(self) -> str:
        # Round robin (like host-local IPAM): a recreated pod gets a new address.
        with self._lock:
            for i in range(len(self._pool)):
                candidate = self._pool[(self._next + i) % len(self._pool)]
                if candidate not in self._used:
                    self._used.add(candidate)
                    self._next = (self._next + i + 1) % len(self._pool)
                    return candidate
        raise RuntimeError_(f"pod CIDR {self.cidr} is exhausted")

    def release(self, ip: str | None) -> None:
        with self._lock:
            self._used.discard(ip or "")

    def add_pod(self, uid: str) -> tuple[str, str]:
        """Create the pod's netns and plumbing; returns (netns name, pod IP)."""
        netns = f"{self.prefix}-{uid}"
        veth = "v" + uid.replace("-", "")[:13]
        ip = self._allocate()
        try:
            _ip(["netns", "add", netns])
            _ip(["link", "set", "lo", "up"], netns)
            peer = ["peer", "name", "eth0", "netns", netns]
            _ip(["link", "add", veth, "type", "veth", *peer], self.bridge_netns)
            _ip(["link", "set", veth, "master", "br0", "up"], self.bridge_netns)
            _ip(["addr", "add", f"{ip}/{self.cidr.prefixlen}", "dev", "eth0"], netns)
            _ip(["link", "set", "eth0", "up"], netns)
            _ip(["route", "add", "default", "via", self.gateway], netns)
        except RuntimeError_:
            self.remove_pod(netns, ip)
            raise
        return netns, ip

    def remove_pod(self, netns: str | None, ip: str | None) -> None:
        if netns and (NETNS_DIR / netns).exists():
            _ip(["netns", "del", netns], check=False)  # its eth0 and the veth peer go with it
        self.release(ip)

    def teardown(self) -> None:
        remove_netns_with_prefix(self.prefix)


def remove_netns_with_prefix(prefix: str) -> list[str]:
    removed = []
    if NETNS_DIR.exists():
        for entry in sorted(NETNS_DIR.iterdir()):
            if entry.name == f"{prefix}-br" or entry.name.startswith(f"{prefix}-"):
                _ip(["netns", "del", entry.name], check=False)
                removed.append(entry.name)
    return removed


def render_hosts(pod_ip: str | None, hostname: str, namespace: str,
                 services: Iterable[tuple[str, str, str]], loopback_services: Iterable[str] = ()) -> str:
    """An /etc/hosts for a pod: itself, then Service names -> ClusterIP.

    `services` are (name, namespace, clusterIP); `loopback_services` are "name.namespace" keys that
    resolve to 127.0.0.1 instead (hostNetwork pods reach the sandbox control plane there).
    """
    lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
    if pod_ip:
        lines.append(f"{pod_ip}\t{hostname}")
    loop = set(loopback_services)
    for name, ns, cluster_ip in sorted(services, key=lambda s: (s[1], s[0])):
        ip = "127.0.0.1" if f"{name}.{ns}" in loop else cluster_ip
        if not ip or ip == "None":
            continue
        names = [f"{name}.{ns}", f"{name}.{ns}.svc", f"{name}.{ns}.svc.cluster.local"]
        if ns == namespace:
            names.insert(0, name)
        lines.append(f"{ip}\t{' '.join(names)}")
    return "\n".join(lines) + "\n"


class Runtime:
    """Creates and destroys pod sandboxes and container processes for one node."""

    def __init__(self, state_dir: Path, cgroup_root: Path, prefix: str, cidr: str = "10.244.0.0/24") -> None:
        self.state_dir = Path(state_dir)
        self.cgroup_root = check_cgroup_root(Path(cgroup_root))
        self.prefix = prefix
        self.network = PodNetwork(prefix, cidr)
        self.pods_dir = self.state_dir / "pods"

    def setup(self) -> None:
        self.pods_dir.mkdir(parents=True, exist_ok=True)
        self.cgroup_root.mkdir(exist_ok=True)
        self.network.setup()

    def create_sandbox(self, uid: str, namespace: str, name: str, host_network: bool = False) -> PodSandbox:
        pod_dir = self.pods_dir / uid
        (pod_dir / "logs").mkdir(parents=True, exist_ok=True)
        (pod_dir / "volumes").mkdir(exist_ok=True)
        cgroup = self.cgroup_root / f"pod{uid}"
        cgroup.mkdir(exist_ok=True)
        sandbox = PodSandbox(uid=uid, namespace=namespace, name=name, dir=pod_dir, cgroup=cgroup,
                             hosts_file=pod_dir / "hosts", host_network=host_network)
        if not host_network:
            try:
                sandbox.netns, sandbox.ip = self.network.add_pod(uid)
            except RuntimeError_:
                remove_cgroup_tree(cgroup)
                raise
        sandbox.hosts_file.write_text(render_hosts(sandbox.ip, name, namespace, []))
        if not host_network:
            # Names resolve from /etc/hosts; a DNS query fails at once (nothing listens on the pod's
            # loopback) instead of waiting for the machine's resolver, which a pod cannot reach.
            search = f"{namespace}.svc.cluster.local svc.cluster.local cluster.local"
            (pod_dir / "resolv.conf").write_text(f"search {search}\nnameserver 127.0.0.1\noptions ndots:5\n")
        self._write_info(sandbox)
        return sandbox

    def _write_info(self, sandbox: PodSandbox, containers: dict[str, dict] | None = None) -> None:
        info = {
            "uid": sandbox.uid, "namespace": sandbox.namespace, "name": sandbox.name,
            "netns": sandbox.netns_path, "ip": sandbox.ip, "cgroup": str(sandbox.cgroup),
            "hostNetwork": sandbox.host_network, "containers": containers or {},
        }
        tmp = sandbox.dir / "pod.json.tmp"
        tmp.write_text(json.dumps(info, indent=1))
        tmp.replace(sandbox.dir / "pod.json")

    def record_containers(self, sandbox: PodSandbox, containers: dict[str, Container]) -> None:
        """Publish pid and cgroup of running containers (read by `kmeshctl sandbox exec`)."""
        self._write_info(sandbox, {n: {"pid": c.pid, "cgroup": str(c.cgroup)} for n, c in containers.items()})

    def write_hosts(self, sandbox: PodSandbox, content: str) -> None:
        # Rewrite in place: the file is bind-mounted by inode into running containers.
        if sandbox.hosts_file.exists() and sandbox.hosts_file.read_text() == content:
            return
        with open(sandbox.hosts_file, "r+" if sandbox.hosts_file.exists() else "w") as f:
            f.seek(0)
            f.write(content)
            f.truncate()

    def start_container(self, sandbox: PodSandbox, spec: ContainerSpec) -> Container:
        container_id = secrets.token_hex(32)
        cgroup = sandbox.cgroup / container_id
        cgroup.mkdir()
        rootfs = sandbox.dir / "rootfs" / spec.name
        rootfs.mkdir(parents=True, exist_ok=True)
        mounts = [{"source": m.source, "target": m.target, "read_only": m.read_only} for m in spec.mounts]
        mounts.append({"source": str(sandbox.hosts_file), "target": "/etc/hosts", "read_only": False})
        if (sandbox.dir / "resolv.conf").exists():
            mounts.append({"source": str(sandbox.dir / "resolv.conf"), "target": "/etc/resolv.conf",
                           "read_only": True})
        launch = {
            "cgroup": str(cgroup), "netns": sandbox.netns_path,
            "hostname": None if sandbox.host_network else sandbox.name[:63],
            "rootfs": str(rootfs), "mounts": mounts, "workdir": spec.workdir or "/",
            "argv": spec.argv, "env": spec.env,
        }
        spec_path = sandbox.dir / f"{spec.name}.launch.json"
        # One log per container, appended across restarts: the API server serves it for `kubectl logs`
        # (it has no --previous), so a crash-looping container's last words stay visible.
        log_path = sandbox.dir / "logs" / f"{spec.name}.log"
        # The launcher writes "ok" on this pipe once the container's namespaces and mounts are in
        # place, right before exec: only then is the container running (and enterable by exec).
        ready_r, ready_w = os.pipe()
        launch["ready_fd"] = ready_w
        spec_path.write_text(json.dumps(launch, indent=1))
        try:
            with open(log_path, "ab") as log:
                process = subprocess.Popen(
                    [sys.executable, "-m", "sandbox.kubelet.launch", "run", str(spec_path)],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    start_new_session=True, close_fds=True, pass_fds=(ready_w,), cwd="/",
                    env={"PYTHONPATH": str(REPO), "PATH": os.environ.get("PATH", "/usr/bin:/bin")},
                )
        finally:
            os.close(ready_w)
        try:
            readable, _, _ = select.select([ready_r], [], [], LAUNCH_TIMEOUT)
            if readable:
                os.read(ready_r, 2)  # b"ok", or b"" when the launcher failed (its log says why)
        finally:
            os.close(ready_r)
        return Container(name=spec.name, container_id=container_id, process=process,
                         log_path=log_path, cgroup=cgroup, started_at=time.time())

    def stop_container(self, container: Container, grace: float = 2.0) -> int | None:
        """SIGTERM, wait up to `grace`, then kill everything left in the container's cgroup."""
        proc = container.process
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        remove_cgroup_tree(container.cgroup)
        try:
            return proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            return None

    def remove_sandbox(self, sandbox: PodSandbox) -> None:
        remove_cgroup_tree(sandbox.cgroup)
        self.network.remove_pod(sandbox.netns, sandbox.ip)
        shutil.rmtree(sandbox.dir, ignore_errors=True)

    def teardown(self) -> None:
        """Remove everything this runtime's prefix and cgroup root own (idempotent)."""
        cleanup_node(self.prefix, self.cgroup_root, self.pods_dir)


def cleanup_node(prefix: str, cgroup_root: Path | None, pods_dir: Path | None) -> list[str]:
    """Remove a node's leftovers even after a crash: processes, cgroups, netns (and veths), files."""
    from sandbox.kubelet import podman  # podman containers first: they live in the cgroup tree below

    done: list[str] = podman.remove_containers(prefix)
    if pods_dir is not None and podman.unmount_cgroup_alias(Path(pods_dir).parent / "hostpath" / "mnt"
                                                            / "kmesh_cgroup2"):
        done.append("cgroup alias mount")
    if cgroup_root is not None:
        podman.remove_v1_cgroups(Path(cgroup_root))
    if cgroup_root is not None and Path(cgroup_root).exists():
        root = check_cgroup_root(Path(cgroup_root))
        remove_cgroup_tree(root)
        done.append(f"cgroup {root}")
    done += [f"netns {n}" for n in remove_netns_with_prefix(prefix)]
    if pods_dir is not None and Path(pods_dir).exists():
        shutil.rmtree(pods_dir, ignore_errors=True)
        done.append(f"dir {pods_dir}")
    return done
