"""A throw-away three-namespace topology and cgroups for the HTTP benchmark.

Why its own module: the benchmark must never put traffic on the root namespace, so every
address lives in namespaces created here (a bridge namespace, a client namespace, a server
namespace), joined by veth pairs created directly inside them; no namespace has a route off
the machine. The cgroups are a unique benchmark cgroup with two children: ``mesh`` (where our
data-plane programs are attached), ``plain`` (no programs: the floor, and the client behind the
proxy), ``proxy`` and ``server``; each one's ``cpu.stat`` tells what its processes cost.
Everything is removed in ``close()``, which is idempotent and also runs on failure.
"""

from __future__ import annotations

import contextlib
import ctypes
import http.client
import json
import os
import shutil
import struct
import subprocess
import sys
import threading
import urllib.parse
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from sandbox.cgroups import cgroup2_root, own_cgroup, remove_cgroup_tree

OWNER_DIR = Path(os.environ.get("KMESH_BENCH_RUN_DIR", "/run/kmesh-bench"))

SUBNET_PREFIX = "10.250.0."
CLIENT_IP = SUBNET_PREFIX + "2"
POD_IP = SUBNET_PREFIX + "3"
PREFIX_LEN = 24


def _ip(*args: str) -> None:
    """Run one `ip` command; raise with its stderr on failure."""
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)
    if proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {proc.stderr.strip()}")


# Per-namespace sysctls (never the root namespace's). With a new connection per request the
# closing side keeps a TIME_WAIT per connection; with the default port range and no reuse the
# client exhausts its ~28k ephemeral ports within seconds and connect() then spends
# milliseconds searching for a free port, which would measure the port allocator, not the path.
NETNS_SYSCTLS = {
    "net.ipv4.tcp_tw_reuse": "1",
    "net.ipv4.ip_local_port_range": "1024 65000",
}


def _tune_netns(ns: str) -> None:
    """Write NETNS_SYSCTLS from inside `ns` (/proc/sys/net is per namespace; no procps needed)."""
    for key, value in NETNS_SYSCTLS.items():
        path = "/proc/sys/" + key.replace(".", "/")
        proc = subprocess.run(["ip", "netns", "exec", ns, "sh", "-c", 'printf "%s\\n" "$1" > "$2"', "sh",
                               value, path], capture_output=True, text=True, timeout=20)
        if proc.returncode != 0:
            raise RuntimeError(f"sysctl {key} in netns {ns}: {proc.stderr.strip()}")


@dataclass
class Topology:
    """client netns -- bridge netns -- server netns, plus the benchmark cgroups."""

    prefix: str
    cgroup_parent: Path = field(default_factory=cgroup2_root)  # wherever this host mounts cgroup v2
    ns_bridge: str = ""
    ns_client: str = ""
    ns_server: str = ""
    cgroup: Path = field(default_factory=Path)
    _created_ns: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.ns_bridge = f"{self.prefix}-br"
        self.ns_client = f"{self.prefix}-cli"
        self.ns_server = f"{self.prefix}-srv"
        self.cgroup = self.cgroup_parent / f"kmesh-bench-{self.prefix}"

    @property
    def mesh_cgroup(self) -> Path:
        return self.cgroup / "mesh"

    @property
    def plain_cgroup(self) -> Path:
        return self.cgroup / "plain"

    @property
    def proxy_cgroup(self) -> Path:
        return self.cgroup / "proxy"

    @property
    def server_cgroup(self) -> Path:
        return self.cgroup / "server"

    def netns_path(self, name: str) -> Path:
        return Path("/run/netns") / name

    def open(self) -> Topology:
        parent, root = self.cgroup_parent.resolve(), cgroup2_root().resolve()
        if parent != root and root not in parent.parents:
            raise ValueError(f"{self.cgroup_parent} is not inside the cgroup v2 hierarchy {root}")
        # Programs go to <parent>/kmesh-bench-<prefix>/mesh: never the cgroup v2 root itself.
        try:
            self._write_owner()
            self.cgroup.mkdir()
            for child in (self.mesh_cgroup, self.plain_cgroup, self.proxy_cgroup, self.server_cgroup):
                child.mkdir()
            for ns in (self.ns_bridge, self.ns_client, self.ns_server):
                _ip("netns", "add", ns)
                self._created_ns.append(ns)
                _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", self.ns_bridge, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.ns_bridge, "link", "set", "br0", "up")
            for side, ns, addr in (("cli", self.ns_client, CLIENT_IP), ("srv", self.ns_server, POD_IP)):
                _ip("-n", self.ns_bridge, "link", "add", f"v{side}", "type", "veth",
                    "peer", "name", "eth0", "netns", ns)
                _ip("-n", self.ns_bridge, "link", "set", f"v{side}", "master", "br0", "up")
                _ip("-n", ns, "addr", "add", f"{addr}/{PREFIX_LEN}", "dev", "eth0")
                _ip("-n", ns, "link", "set", "eth0", "up")
                _tune_netns(ns)
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Remove namespaces, cgroups (killing our processes left in them) and mounts registered
        with add_mount(). Idempotent."""
        remove_cgroup_tree(self.cgroup)
        for ns in (self.ns_client, self.ns_server, self.ns_bridge):
            if (Path("/run/netns") / ns).exists():
                subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)
        self._created_ns.clear()
        for mnt in self._owner().get("mounts", []):
            if _is_mountpoint(mnt):
                subprocess.run(["umount", mnt], capture_output=True, timeout=20)
        self._owner_file().unlink(missing_ok=True)

    # An owner record per run, so that a run killed with SIGKILL (no finally) is cleaned up by
    # the next one: see reap_stale().
    def _owner_file(self) -> Path:
        return OWNER_DIR / f"{self.prefix}.json"

    def _owner(self) -> dict:
        try:
            return json.loads(self._owner_file().read_text())
        except (OSError, ValueError):
            return {}

    def _write_owner(self, mounts: list[str] | None = None, dirs: list[str] | None = None) -> None:
        OWNER_DIR.mkdir(parents=True, exist_ok=True)
        record = {"pid": os.getpid(), "start": _proc_start(os.getpid()), "prefix": self.prefix,
                  "cgroup_parent": str(self.cgroup_parent), "mounts": mounts or [], "dirs": dirs or []}
        tmp = self._owner_file().with_suffix(".tmp")
        tmp.write_text(json.dumps(record))
        tmp.replace(self._owner_file())

    def add_mount(self, path: Path) -> None:
        """Remember a mount made for this run, so close() (or a later reap_stale()) unmounts it."""
        owner = self._owner()
        self._write_owner([*owner.get("mounts", []), str(path)], owner.get("dirs", []))

    def add_scratch_dir(self, path: Path) -> None:
        """Remember this run's scratch directory (its owner removes it; reap_stale() does if killed)."""
        owner = self._owner()
        self._write_owner(owner.get("mounts", []), [*owner.get("dirs", []), str(path)])

    def __enter__(self) -> Topology:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()


def _is_mountpoint(path: str) -> bool:
    try:
        return any(line.split()[1] == path for line in Path("/proc/self/mounts").read_text().splitlines())
    except OSError:
        return False


def _proc_start(pid: int) -> str:
    """Start time of a live process (field 22 of /proc/<pid>/stat), "" when it is gone or a
    zombie: tells a live owner from a dead one whose pid was reused."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return ""
    return "" if fields[0] in ("Z", "X") else fields[19]


def reap_stale() -> list[str]:
    """Clean up after benchmark runs whose process is gone (killed without cleanup); returns
    their prefixes. Runs still alive (another benchmark at the same time) are left alone."""
    reaped: list[str] = []
    for record_file in sorted(OWNER_DIR.glob("*.json")) if OWNER_DIR.is_dir() else []:
        try:
            record = json.loads(record_file.read_text())
        except (OSError, ValueError):
            continue
        pid, start = int(record.get("pid", 0)), str(record.get("start", ""))
        if pid > 0 and _proc_start(pid) == start and start:
            continue  # its owner still runs
        Topology(record["prefix"], Path(record["cgroup_parent"])).close()
        for leftover in record.get("dirs", []):
            shutil.rmtree(leftover, ignore_errors=True)
        reaped.append(record["prefix"])
    return reaped


def enter_cgroup(cgroup: Path) -> None:
    """preexec_fn: move the child into `cgroup` before it execs."""
    (cgroup / "cgroup.procs").write_text(str(os.getpid()))


def netns_argv(argv: Sequence[str], netns: str, cpus: str | None = None) -> list[str]:
    """The command line running `argv` inside `netns`, pinned to `cpus` when given."""
    cmd = ["ip", "netns", "exec", netns]
    if cpus:
        cmd += ["taskset", "-c", cpus]
    return cmd + list(argv)


def spawn(argv: Sequence[str], netns: str, cgroup: Path, cpus: str | None = None,
          log: Path | None = None) -> subprocess.Popen[bytes]:
    """Start a long-running process inside `netns` and `cgroup` (stdout/stderr to `log`)."""
    out = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115 - owned by the child
    try:
        return subprocess.Popen(netns_argv(argv, netns, cpus), stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, preexec_fn=lambda: enter_cgroup(cgroup))
    finally:
        if log:
            out.close()  # type: ignore[union-attr]


def run(argv: Sequence[str], netns: str, cgroup: Path, cpus: str | None = None,
        timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run a command to completion inside `netns` and `cgroup`, capturing its output."""
    return subprocess.run(netns_argv(argv, netns, cpus), capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, preexec_fn=lambda: enter_cgroup(cgroup))


def stop(proc: subprocess.Popen[bytes] | None, timeout: float = 5) -> None:
    """Terminate one process we started, by pid, escalating to SIGKILL."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout)


def cpu_usage_us(cgroup: Path) -> int:
    """usage_usec from the cgroup's cpu.stat (present in cgroup v2 without any controller)."""
    for line in (cgroup / "cpu.stat").read_text().splitlines():
        key, _, value = line.partition(" ")
        if key == "usage_usec":
            return int(value)
    return 0


_CLONE_NEWNET = 0x40000000

# Child used when the request must come from a given cgroup (e.g. where our connect programs are
# attached): `ip netns exec` puts it in the namespace, preexec_fn in the cgroup.
_HTTP_CHILD = """
import http.client, sys, urllib.parse
u = urllib.parse.urlsplit(sys.argv[1])
try:
    c = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=float(sys.argv[2]))
    c.request("GET", u.path or "/", headers={"Connection": "close"})
    r = c.getresponse()
    sys.stdout.write(f"{r.status}\\n" + r.read().decode(errors="replace"))
except Exception as e:
    sys.stdout.write(f"0\\n{type(e).__name__}: {e}")
"""


def _get(url: str, timeout: float) -> tuple[int, str]:
    u = urllib.parse.urlsplit(url)
    try:
        conn = http.client.HTTPConnection(u.hostname or "127.0.0.1", u.port or 80, timeout=timeout)
        try:
            conn.request("GET", (u.path or "/") + (f"?{u.query}" if u.query else ""),
                         headers={"Connection": "close"})
            resp = conn.getresponse()
            return resp.status, resp.read().decode(errors="replace")
        finally:
            conn.close()
    except (OSError, http.client.HTTPException) as exc:
        return 0, f"{type(exc).__name__}: {exc}"


def http_get(ns: str, url: str, timeout: float = 2.0, cgroup: Path | None = None) -> tuple[int, str]:
    """(status, body) of one GET made inside `ns`; status 0 and the error text when it failed.

    Without `cgroup` the request is made in-process from a thread that setns()es into the
    namespace (network namespaces are per thread); with `cgroup` it comes from a short-lived
    child process placed in that cgroup, so cgroup-attached BPF programs see its connect().
    No curl needed, and no proxy environment variables are honoured.
    """
    if cgroup is not None:
        res = run([sys.executable, "-c", _HTTP_CHILD, url, str(timeout)], ns, cgroup, timeout=timeout + 20)
        status, _, body = res.stdout.partition("\n")
        return (int(status) if status.isdigit() else 0), body or res.stderr.strip()
    box: dict[str, tuple[int, str]] = {}

    def work() -> None:
        fd = os.open(Path("/run/netns") / ns, os.O_RDONLY)
        try:
            if ctypes.CDLL(None, use_errno=True).setns(fd, _CLONE_NEWNET) != 0:
                box["r"] = (0, f"setns {ns}: {os.strerror(ctypes.get_errno())}")
                return
        finally:
            os.close(fd)
        box["r"] = _get(url, timeout)

    thread = threading.Thread(target=work, name=f"netns-{ns}", daemon=True)
    thread.start()
    thread.join(timeout + 5)
    return box.get("r", (0, "timed out"))


@contextlib.contextmanager
def in_cgroup(cgroup: Path) -> Iterator[None]:
    """Temporarily move this process into `cgroup` (for control connects made in-process)."""
    original = own_cgroup()
    (cgroup / "cgroup.procs").write_text(str(os.getpid()))
    try:
        yield
    finally:
        (original / "cgroup.procs").write_text(str(os.getpid()))


# Cgroup attach types (enum bpf_attach_type) whose programs run on a TCP client's path.
_SOCKET_PATH_ATTACH_TYPES = {
    "ingress": 0, "egress": 1, "sock_create": 2, "sock_ops": 3, "inet4_bind": 8, "inet4_connect": 10,
    "inet4_post_bind": 12, "getsockopt": 21, "setsockopt": 22, "inet4_getpeername": 29,
    "inet4_getsockname": 31, "sock_release": 34,
}
MESH_ATTACH_TYPES = ("sock_ops", "inet4_connect", "inet4_getpeername")  # what our data plane uses
_BPF_PROG_QUERY = 16
_BPF_F_QUERY_EFFECTIVE = 1


def effective_programs(cgroup: Path) -> dict[str, int]:
    """Programs in effect for sockets of `cgroup` (attached there or inherited), per attach type
    on a TCP client's path; types with none are left out. Why: a "no programs" baseline must be
    checked, not assumed (an ancestor's attachment would apply to it too)."""
    syscall = ctypes.CDLL(None, use_errno=True).syscall
    syscall.restype = ctypes.c_long
    nr_bpf = {"x86_64": 321, "aarch64": 280}.get(os.uname().machine, 321)
    fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
    out: dict[str, int] = {}
    try:
        for name, attach_type in _SOCKET_PATH_ATTACH_TYPES.items():
            attr = ctypes.create_string_buffer(40)  # target_fd, type, query_flags, attach_flags, ids, cnt
            struct.pack_into("=IIIIQI", attr, 0, fd, attach_type, _BPF_F_QUERY_EFFECTIVE, 0, 0, 0)
            if syscall(ctypes.c_long(nr_bpf), ctypes.c_int(_BPF_PROG_QUERY), attr, ctypes.c_uint(40)) < 0:
                continue  # type not supported by this kernel
            count = struct.unpack_from("=I", attr, 24)[0]
            if count:
                out[name] = count
    finally:
        os.close(fd)
    return out
