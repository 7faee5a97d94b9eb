"""Daemon integration environment: sandbox API server + pilot + the real daemon + netns pods.

Layout (everything created here, removed at the end, also on failure):

    <p>-kmd bpffs   private bpf filesystem at /tmp/<p>-kmd-bpffs (pins)
    <test_cgroup>/kmd                 the daemon's --cgroup-root (programs attach here)
    <test_cgroup>/kmd/kubepods-pod<uid>.slice   one per pod, as a kubelet names them
    netns <p>-dbr   bridge br0;  netns <p>-d<pod>: eth0 10.66.0.N/24 on the bridge

Pods are objects in the sandbox API (nodeName = the daemon's NODE_NAME, status patched with
the netns address) plus a process in that netns and cgroup, so the daemon finds them the way
it does on a node: pod UID in /proc/<pid>/cgroup -> /proc/<pid>/ns/net.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from sandbox.cgroups import remove_cgroup_tree
from tests.support import NETCLIENT, NETSERVER
from tests.support.procs import free_port, start_logged, stop_process
from tests.support.procs import wait_for as wait_for  # re-exported: the daemon tests import it from here

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable
POD_IPS = {"cli": 1, "optout": 2, "be1": 3, "be2": 4}


def _sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, check=check, timeout=60)


@dataclass
class Proc:
    """A child process with its stderr in a log file; waits for a readiness line."""

    name: str
    cmd: list[str]
    log: Path
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen | None = None

    def start(self, ready: str, timeout: float = 60.0) -> str:
        self.log.write_text("")
        self.proc, line = start_logged(self.cmd, self.log, ready, self.name, self.env, timeout)
        return line

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        stop_process(self.proc, sig)
        rc = self.proc.returncode if self.proc is not None else None
        self.proc = None
        return rc


@dataclass
class Env:
    prefix: str
    work: Path
    kubeconfig: Path
    cgroup: Path
    bpffs: Path
    node: str
    namespace: str
    api: Any = None
    core: Any = None
    apiserver: Proc | None = None
    pilot: Proc | None = None
    daemon: Proc | None = None
    pilot_ports: tuple[int, int] = (0, 0)
    admin_port: int = 0
    metrics_port: int = 0
    uids: dict[str, str] = field(default_factory=dict)
    pod_procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    vip: str = ""

    # ----- names ------------------------------------------------------------------------
    def netns(self, pod: str) -> str:
        return f"{self.prefix}-d{pod}"

    def netns_path(self, pod: str) -> str:
        return f"/run/netns/{self.netns(pod)}"

    def pod_cgroup(self, pod: str) -> Path:
        return self.cgroup / f"kubepods-pod{self.uids[pod].replace('-', '_')}.slice"

    @property
    def pin_dir(self) -> Path:
        return self.bpffs / "kmesh"

    @property
    def admin(self) -> str:
        return f"127.0.0.1:{self.admin_port}"

    # ----- daemon -----------------------------------------------------------------------
    def daemon_cmd(self) -> list[str]:
        return [
            PY,
            "-m",
            "daemon",
            "--mode=dual-engine",
            "--enable-bypass=false",
            "--enable-bpf-log=true",
            "--cgroup-root",
            str(self.cgroup),
            "--bpf-fs",
            str(self.bpffs),
            "--pin-prefix",
            "kmesh",
            "--proc-root",
            "/proc",
            "--admin-addr",
            self.admin,
            "--metrics-addr",
            f"127.0.0.1:{self.metrics_port}",
            "--plaintext",
            "--kubeconfig",
            str(self.kubeconfig),
        ]

    def daemon_env(self) -> dict[str, str]:
        return {
            "XDS_ADDRESS": f"127.0.0.1:{self.pilot_ports[1]}",
            "CLUSTER_ID": "Kubernetes",
            "NODE_NAME": self.node,
            "POD_NAME": f"kmesh-{self.prefix}",
            "POD_NAMESPACE": "kmesh-system",
            "INSTANCE_IP": "127.0.0.1",
            "SERVICE_ACCOUNT": "kmesh",
            "BCC_KERNEL_SOURCE": os.environ.get("BCC_KERNEL_SOURCE", ""),
        }

    def start_daemon(self) -> None:
        self.daemon = Proc("daemon", self.daemon_cmd(), self.work / "daemon.log", self.daemon_env())
        self.daemon.start("kmesh-daemon started", timeout=120)

    def daemon_log(self) -> str:
        return (self.work / "daemon.log").read_text()

    def get(self, path: str, timeout: float = 10) -> Any:
        with urllib.request.urlopen(f"http://{self.admin}{path}", timeout=timeout) as resp:
            return json.loads(resp.read())

    def status(self) -> dict:
        return self.get("/status")

    def enrolled(self) -> set[str]:
        return {p["name"] for p in self.status()["enrollment"]["pods"]}

    # ----- pods ---------------------------------------------------------------------------
    def annotation(self, pod: str) -> str | None:
        p = self.core.read_namespaced_pod(pod, self.namespace)
        return (p.metadata.annotations or {}).get("kmesh.net/redirection")

    def label_namespace(self, value: str | None) -> None:
        self.core.patch_namespace(
            self.namespace, {"metadata": {"labels": {"istio.io/dataplane-mode": value}}}
        )

    def connect(
        self,
        pod: str,
        target: str,
        n: int = 1,
        interval: float = 0.0,
        timeout: float = 2.0,
        max_seconds: float = 60.0,
    ) -> dict:
        out = subprocess.run(
            self.client_cmd(pod, target, n, interval, timeout, max_seconds),
            capture_output=True,
            text=True,
            timeout=max_seconds + 30,
            check=True,
        )
        return json.loads(out.stdout)

    def client_cmd(
        self,
        pod: str,
        target: str,
        n: int = 1,
        interval: float = 0.0,
        timeout: float = 2.0,
        max_seconds: float = 60.0,
    ) -> list[str]:
        return [
            PY,
            str(NETCLIENT),
            "--netns",
            self.netns_path(pod),
            "--cgroup",
            str(self.pod_cgroup(pod)),
            "--target",
            target,
            "-n",
            str(n),
            "--interval",
            str(interval),
            "--timeout",
            str(timeout),
            "--max-seconds",
            str(max_seconds),
        ]

    def kmeshctl(self, *args: str, check: bool = False, timeout: float = 60) -> subprocess.CompletedProcess:
        env = {
            **os.environ,
            "KMESH_SANDBOX_DIR": str(self.work / "no-sandbox"),
            "KUBECONFIG": str(self.kubeconfig),
        }
        return subprocess.run(
            [PY, "-m", "kmeshctl.main", *args, "--admin-addr", self.admin],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=check,
        )


def _mk_pod(env: Env, name: str, labels: dict[str, str]) -> None:
    body = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": env.namespace, "labels": labels},
        "spec": {
            "nodeName": env.node,
            "containers": [{"name": "app", "image": "netutils", "ports": [{"containerPort": 8080}]}],
        },
    }
    pod = env.core.create_namespaced_pod(env.namespace, body)
    env.uids[name] = pod.metadata.uid
    ip = f"10.66.0.{POD_IPS[name]}"
    env.core.patch_namespaced_pod_status(
        name,
        env.namespace,
        {
            "status": {
                "phase": "Running",
                "podIP": ip,
                "podIPs": [{"ip": ip}],
                "conditions": [{"type": "Ready", "status": "True"}],
            }
        },
    )


@pytest.fixture(scope="module")
def env(run_prefix: str, test_cgroup: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    """The whole integration environment, shared by the daemon integration tests of a module."""
    if os.geteuid() != 0:
        pytest.skip("needs root (netns, cgroups, BPF)")
    work = tmp_path_factory.mktemp("kmd")
    e = Env(
        prefix=run_prefix,
        work=work,
        kubeconfig=work / "kubeconfig",
        cgroup=test_cgroup / "kmd",
        bpffs=Path(f"/tmp/{run_prefix}-kmd-bpffs"),
        node=f"node-{run_prefix}",
        namespace=f"{run_prefix}-app",
    )
    netns_made: list[str] = []
    mounted = False
    try:
        e.cgroup.mkdir(exist_ok=True)
        e.bpffs.mkdir(exist_ok=True)
        _sh("mount", "-t", "bpf", "bpf", str(e.bpffs))
        mounted = True
        # --- control plane stand-ins ---------------------------------------------------------
        e.apiserver = Proc(
            "apiserver",
            [
                PY,
                "-m",
                "sandbox.apiserver",
                "--port",
                "0",
                "--kubeconfig",
                str(e.kubeconfig),
                "--state-dir",
                str(work / "api"),
            ],
            work / "apiserver.log",
        )
        e.apiserver.start("apiserver ready on", timeout=60)
        from kubernetes import client, config

        e.api = config.new_client_from_config(config_file=str(e.kubeconfig))
        e.core = client.CoreV1Api(e.api)
        e.pilot_ports = (free_port(), free_port())
        e.pilot = Proc(
            "pilot",
            [
                PY,
                "-m",
                "sandbox.pilot",
                "--kubeconfig",
                str(e.kubeconfig),
                "--cluster-id",
                "Kubernetes",
                "--revision",
                "1-22-6",
                "--tls-port",
                str(e.pilot_ports[0]),
                "--plaintext-port",
                str(e.pilot_ports[1]),
                "--state-dir",
                str(work / "pilot"),
            ],
            work / "pilot.log",
        )
        e.pilot.start("ready tls=", timeout=60)
        # --- pods: API objects + netns + a process in a uid-named cgroup ------------------------
        e.core.create_namespace({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": e.namespace}})
        for ns_name in [e.netns("br"), *(e.netns(p) for p in POD_IPS)]:
            _sh("ip", "netns", "add", ns_name)
            netns_made.append(ns_name)
            _sh("ip", "-n", ns_name, "link", "set", "lo", "up")
        br = e.netns("br")
        _sh("ip", "-n", br, "link", "add", "br0", "type", "bridge")
        _sh("ip", "-n", br, "link", "set", "br0", "up")
        for pod, i in POD_IPS.items():
            ns_name = e.netns(pod)
            _sh(
                "ip",
                "-n",
                br,
                "link",
                "add",
                f"v{i}",
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                ns_name,
            )
            _sh("ip", "-n", br, "link", "set", f"v{i}", "master", "br0", "up")
            _sh("ip", "-n", ns_name, "addr", "add", f"10.66.0.{i}/24", "dev", "eth0")
            _sh("ip", "-n", ns_name, "link", "set", "eth0", "up")
        _mk_pod(e, "cli", {"app": "cli"})
        _mk_pod(e, "optout", {"app": "optout", "istio.io/dataplane-mode": "none"})
        _mk_pod(e, "be1", {"app": "echo"})
        _mk_pod(e, "be2", {"app": "echo"})
        for pod in POD_IPS:
            e.pod_cgroup(pod).mkdir(exist_ok=True)
            if pod.startswith("be"):
                cmd = [
                    PY,
                    str(NETSERVER),
                    "--ipv4-only",
                    "--netns",
                    e.netns_path(pod),
                    "--cgroup",
                    str(e.pod_cgroup(pod)),
                    "--name",
                    pod,
                ]
                proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
                e.pod_procs[pod] = proc
                assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
            else:
                helper = (
                    "import os,sys,ctypes,time;open(sys.argv[1]+'/cgroup.procs','w').write(str(os.getpid()));"
                    "fd=os.open(sys.argv[2],os.O_RDONLY);ctypes.CDLL(None).setns(fd,0x40000000);"
                    "print('ready',flush=True);time.sleep(3600)"
                )
                proc = subprocess.Popen(
                    [PY, "-c", helper, str(e.pod_cgroup(pod)), e.netns_path(pod)],
                    stdout=subprocess.PIPE,
                    text=True,
                )
                e.pod_procs[pod] = proc
                assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        svc = e.core.create_namespaced_service(
            e.namespace,
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": "echo"},
                "spec": {
                    "selector": {"app": "echo"},
                    "ports": [{"name": "tcp", "port": 80, "targetPort": 8080}],
                },
            },
        )
        e.vip = svc.spec.cluster_ip
        # Direct reachability (no translation) before the daemon runs.
        r = e.connect("cli", "10.66.0.3:8080")
        assert r["ok"] == 1, r
        # --- the daemon ------------------------------------------------------------------------
        e.admin_port, e.metrics_port = free_port(), free_port()
        e.start_daemon()
        yield e
    finally:
        if e.daemon is not None and e.daemon.proc is not None:
            e.daemon.stop(signal.SIGTERM)  # no DaemonSet in this API: the daemon uninstalls itself
        for proc in e.pod_procs.values():
            stop_process(proc, signal.SIGKILL)
        if e.pin_dir.exists():
            env_vars = {**os.environ, **e.daemon_env()}
            subprocess.run(
                [
                    PY,
                    "-m",
                    "daemon",
                    "uninstall",
                    "--cgroup-root",
                    str(e.cgroup),
                    "--bpf-fs",
                    str(e.bpffs),
                    "--pin-prefix",
                    "kmesh",
                ],
                cwd=REPO,
                env=env_vars,
                capture_output=True,
                timeout=120,
                check=False,
            )
        for p in (e.pilot, e.apiserver):
            if p is not None:
                p.stop()
        for ns_name in reversed(netns_made):
            _sh("ip", "netns", "del", ns_name, check=False)
        remove_cgroup_tree(e.cgroup)
        if mounted:
            shutil.rmtree(e.pin_dir, ignore_errors=True)
            _sh("umount", str(e.bpffs), check=False)
        try:
            e.bpffs.rmdir()
        except OSError:
            pass

