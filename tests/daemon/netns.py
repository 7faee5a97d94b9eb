"""Network namespaces for daemon tests: pods as netns + a process in a per-pod cgroup.

Everything is created inside namespaces this test made (veths are created in one of them,
never in the root namespace) and removed by ``cleanup()``, which is idempotent.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from sandbox.cgroups import remove_cgroup_tree


def sh(*args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, check=check, timeout=timeout)


@dataclass
class Netns:
    name: str

    def create(self) -> Netns:
        sh("ip", "netns", "add", self.name)
        sh("ip", "-n", self.name, "link", "set", "lo", "up")
        return self

    @property
    def path(self) -> str:
        return f"/run/netns/{self.name}"

    def exec(self, *cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        return sh("ip", "netns", "exec", self.name, *cmd, check=check, timeout=timeout)

    def popen(self, *cmd: str, **kw) -> subprocess.Popen:
        return subprocess.Popen(["ip", "netns", "exec", self.name, *cmd], **kw)

    def delete(self) -> None:
        sh("ip", "netns", "del", self.name, check=False)


def link(a: Netns, b: Netns, a_if: str, b_if: str, a_addr: str, b_addr: str, prefix: int = 24) -> None:
    """A veth pair between two test namespaces (created inside ``a``)."""
    sh("ip", "-n", a.name, "link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", b.name)
    sh("ip", "-n", a.name, "addr", "add", f"{a_addr}/{prefix}", "dev", a_if)
    sh("ip", "-n", b.name, "addr", "add", f"{b_addr}/{prefix}", "dev", b_if)
    sh("ip", "-n", a.name, "link", "set", a_if, "up")
    sh("ip", "-n", b.name, "link", "set", b_if, "up")


@dataclass
class PodProcess:
    """A long-running process in a pod netns and in a cgroup named after the pod UID,
    the way a kubelet lays pods out, so the daemon finds the netns through /proc."""

    netns: Netns
    uid: str
    cgroup_parent: Path
    proc: subprocess.Popen | None = None
    cgroup: Path | None = None

    def start(self) -> PodProcess:
        self.cgroup = self.cgroup_parent / f"kubepods-pod{self.uid.replace('-', '_')}.slice"
        self.cgroup.mkdir(exist_ok=True)
        self.proc = self.netns.popen("sleep", "3600", stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # ip netns exec replaces itself with sleep: same pid; move it into the pod cgroup.
        (self.cgroup / "cgroup.procs").write_text(str(self.proc.pid))
        for _ in range(100):
            if os.readlink(f"/proc/{self.proc.pid}/ns/net") == os.readlink(self.netns.path) or \
                    os.stat(f"/proc/{self.proc.pid}/ns/net").st_ino == os.stat(self.netns.path).st_ino:
                break
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=5)
        if self.cgroup is not None:
            remove_cgroup_tree(self.cgroup)


@dataclass
class Cleanup:
    items: list = field(default_factory=list)

    def add(self, fn) -> None:
        self.items.append(fn)

    def run(self) -> None:
        while self.items:
            fn = self.items.pop()
            try:
                fn()
            except Exception:  # noqa: BLE001 - cleanup continues
                pass
