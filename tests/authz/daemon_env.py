"""Whole-path authorization environment: sandbox API server + pilot + the real daemon + netns pods.

Policies are applied with ``kubectl apply`` (as a user would), reach the daemon over xDS from
the sandbox pilot, are compiled by the daemon into the kernel, and judged on real SYNs.

    netns <p>-zbr      bridge br0 10.78.0.254 = the node address (INSTANCE_IP)
    default/fortio     10.78.0.10, app=fortio, sa fortio, server on 8080 and 9090   (enrolled)
    default/netutils   10.78.0.2,  sa netutils, client                              (enrolled)
    other/netutils     10.78.0.3,  sa netutils, client                              (enrolled)
    default/plain      10.78.0.20, app=fortio, opted out (dataplane-mode=none), server
Namespaces default and other carry istio.io/dataplane-mode=Kmesh.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sandbox.cgroups import remove_cgroup_tree
from tests.authz.conftest import PROBE, Prober, prober, sh
from tests.support.procs import free_port, start_logged, stop_process, wait_for

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable
NODE_IP = "10.78.0.254"
PODS = {  # name -> (namespace, ip, service account, labels, server?)
    "fortio": ("default", "10.78.0.10", "fortio", {"app": "fortio"}, True),
    "netutils": ("default", "10.78.0.2", "netutils", {"app": "netutils"}, False),
    "other-netutils": ("other", "10.78.0.3", "netutils", {"app": "netutils"}, False),
    "plain": ("default", "10.78.0.20", "plain", {"app": "fortio", "istio.io/dataplane-mode": "none"}, True),
}
FORTIO, PLAIN = PODS["fortio"][1], PODS["plain"][1]


@dataclass
class DaemonEnv:
    prefix: str
    work: Path
    cgroup: Path
    bpffs: Path
    node: str
    kubeconfig: Path
    core: Any = None
    apiserver: subprocess.Popen | None = None
    pilot: subprocess.Popen | None = None
    daemon: subprocess.Popen | None = None
    pilot_ports: tuple[int, int] = (0, 0)
    admin_port: int = 0
    metrics_port: int = 0
    uids: dict[str, str] = field(default_factory=dict)
    procs: list[subprocess.Popen] = field(default_factory=list)
    clients: dict[str, Prober] = field(default_factory=dict)

    # ----- names ----------------------------------------------------------------------------
    def netns(self, pod: str) -> str:
        return f"/run/netns/{self.prefix}-z{pod}"

    def pod_cgroup(self, pod: str) -> Path:
        return self.cgroup / f"kubepods-pod{self.uids[pod].replace('-', '_')}.slice"

    @property
    def admin(self) -> str:
        return f"127.0.0.1:{self.admin_port}"

    def server_log(self, pod: str) -> list[str]:
        p = self.work / f"{pod}.accepted"
        return p.read_text().splitlines() if p.exists() else []

    # ----- daemon ---------------------------------------------------------------------------
    def daemon_cmd(self) -> list[str]:
        return [
            PY,
            "-m",
            "daemon",
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
            "INSTANCE_IP": NODE_IP,
            "SERVICE_ACCOUNT": "kmesh",
            "BCC_KERNEL_SOURCE": os.environ.get("BCC_KERNEL_SOURCE", ""),
        }

    def start_daemon(self) -> None:
        self.daemon, _ = start_logged(
            self.daemon_cmd(),
            self.work / "daemon.log",
            "kmesh-daemon started",
            "daemon",
            self.daemon_env(),
            timeout=180,
        )

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(f"http://{self.admin}{path}", timeout=10) as resp:
            return json.loads(resp.read())

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/status/metric", timeout=10) as r:
            return r.read().decode()

    def kmeshctl_env(self) -> dict[str, str]:
        return {
            **os.environ,
            "KMESH_SANDBOX_DIR": str(self.work / "no-sandbox"),
            "KUBECONFIG": str(self.kubeconfig),
        }

    def kmeshctl_cmd(self, *args: str) -> list[str]:
        return [PY, "-m", "kmeshctl.main", *args, "--admin-addr", self.admin]

    def kmeshctl(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(
            self.kmeshctl_cmd(*args),
            cwd=REPO,
            env=self.kmeshctl_env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def kubectl(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["kubectl", "--kubeconfig", str(self.kubeconfig), *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )

    def apply(self, yaml_text: str) -> None:
        self.kubectl("apply", "-f", "-", stdin=yaml_text)

    def delete(self, ns: str, name: str) -> None:
        self.kubectl("delete", "authorizationpolicy", name, "-n", ns, "--ignore-not-found")

    # ----- traffic --------------------------------------------------------------------------
    def attempt(
        self, client: str, dst: str = FORTIO, port: int = 8080, timeout: float = 2.0, src: str = ""
    ) -> dict[str, Any]:
        return self.clients[client].attempt(dst, port, src, timeout)

    def wait_outcome(
        self, client: str, want: str, dst: str = FORTIO, port: int = 8080, timeout: float = 20.0
    ) -> float:
        """Poll until an attempt gives ``want``; returns the seconds it took."""
        t0 = time.monotonic()
        wait_for(
            lambda: self.attempt(client, dst, port, timeout=1.0)["result"] == want,
            timeout,
            f"{client} -> {dst}:{port} {want}",
        )
        return time.monotonic() - t0


def _mk_pod(e: DaemonEnv, name: str) -> None:
    ns, ip, sa, labels, _ = PODS[name]
    body = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "spec": {
            "nodeName": e.node,
            "serviceAccountName": sa,
            "containers": [{"name": "app", "image": "netutils", "ports": [{"containerPort": 8080}]}],
        },
    }
    pod = e.core.create_namespaced_pod(ns, body)
    e.uids[name] = pod.metadata.uid
    e.core.patch_namespaced_pod_status(
        name,
        ns,
        {
            "status": {
                "phase": "Running",
                "podIP": ip,
                "podIPs": [{"ip": ip}],
                "conditions": [{"type": "Ready", "status": "True"}],
            }
        },
    )


def make_env(run_prefix: str, test_cgroup: Path, work: Path) -> Iterator[DaemonEnv]:
    e = DaemonEnv(
        prefix=run_prefix,
        work=work,
        cgroup=test_cgroup / "azd",
        bpffs=Path(f"/tmp/{run_prefix}-azd-bpffs"),
        node=f"node-{run_prefix}",
        kubeconfig=work / "kubeconfig",
    )
    made: list[str] = []
    mounted = False
    try:
        e.cgroup.mkdir(exist_ok=True)
        e.bpffs.mkdir(exist_ok=True)
        sh("mount", "-t", "bpf", "bpf", str(e.bpffs))
        mounted = True
        e.apiserver, _ = start_logged(
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
            "apiserver ready on",
            "apiserver",
        )
        from kubernetes import client, config

        e.core = client.CoreV1Api(config.new_client_from_config(config_file=str(e.kubeconfig)))
        e.pilot_ports = (free_port(), free_port())
        e.pilot, _ = start_logged(
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
            "ready tls=",
            "pilot",
        )
        for ns in ("default", "other", "istio-system"):
            try:
                e.core.create_namespace({"metadata": {"name": ns}})
            except Exception:  # noqa: BLE001 - default may exist already
                pass
            if ns != "istio-system":
                e.core.patch_namespace(ns, {"metadata": {"labels": {"istio.io/dataplane-mode": "Kmesh"}}})
        br = f"{run_prefix}-zbr"
        for short in ("br", *PODS):
            sh("ip", "netns", "add", f"{run_prefix}-z{short}")
            made.append(f"{run_prefix}-z{short}")
            sh("ip", "-n", f"{run_prefix}-z{short}", "link", "set", "lo", "up")
        sh("ip", "-n", br, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", br, "addr", "add", f"{NODE_IP}/24", "dev", "br0")
        sh("ip", "-n", br, "link", "set", "br0", "up")
        for i, (pod, (_ns, ip, *_rest)) in enumerate(PODS.items()):
            ns_name = f"{run_prefix}-z{pod}"
            sh(
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
            sh("ip", "-n", br, "link", "set", f"v{i}", "master", "br0", "up")
            sh("ip", "-n", ns_name, "addr", "add", f"{ip}/24", "dev", "eth0")
            sh("ip", "-n", ns_name, "link", "set", "eth0", "up")
        for pod in PODS:
            _mk_pod(e, pod)
            e.pod_cgroup(pod).mkdir(exist_ok=True)
            if PODS[pod][4]:
                p = subprocess.Popen(
                    [
                        PY,
                        str(PROBE),
                        "server",
                        "--netns",
                        e.netns(pod),
                        "--cgroup",
                        str(e.pod_cgroup(pod)),
                        "--ports",
                        "8080,9090",
                        "--log",
                        str(work / f"{pod}.accepted"),
                    ],
                    stdout=subprocess.PIPE,
                    text=True,
                )
                e.procs.append(p)
                assert p.stdout is not None and p.stdout.readline().strip() == "ready"
            else:
                c = prober(e.netns(pod), str(e.pod_cgroup(pod)))
                e.clients[pod] = c
                e.procs.append(c.proc)
        e.clients["node"] = prober(e.netns("br"))
        e.procs.append(e.clients["node"].proc)
        for c in ("netutils", "other-netutils"):
            e.wait_outcome(c, "ok", timeout=30)
        e.admin_port, e.metrics_port = free_port(), free_port()
        e.start_daemon()
        # every enrolled pod linked, tables compiled
        wait_for(
            lambda: e.get("/authz").get("linked_pods", 0) >= 3 and e.get("/authz").get("compiles", 0) >= 1,
            60,
            "authz links for the enrolled pods",
        )
        yield e
    finally:
        if e.daemon is not None:
            stop_process(e.daemon, signal.SIGTERM)
        for p in e.procs:
            stop_process(p, signal.SIGKILL)
        if (e.bpffs / "kmesh").exists():
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
                env={**os.environ, **e.daemon_env()},
                capture_output=True,
                timeout=120,
                check=False,
            )
        for p in (e.pilot, e.apiserver):
            stop_process(p)
        for name in reversed(made):
            sh("ip", "netns", "del", name, check=False)
        remove_cgroup_tree(e.cgroup)
        if mounted:
            shutil.rmtree(e.bpffs / "kmesh", ignore_errors=True)
            sh("umount", str(e.bpffs), check=False)
        try:
            e.bpffs.rmdir()
        except OSError:
            pass
