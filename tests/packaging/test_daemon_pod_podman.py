"""The kmesh DaemonSet's pod as a real podman container from `make image`'s image, in the sandbox.

The manifest is exercised as written: the container gets its image, args, env and every
volumeMount (hostPath /mnt with the node's cgroup2 at /mnt/kmesh_cgroup2 — here a bind of the
sandbox's child cgroup —, /sys/fs/bpf — here the private bpffs —, the istio token and root cert).
Checks: `kmeshctl sandbox status` says podman, `kubectl logs -l app=kmesh` is the container's log,
the programs sit on the sandbox cgroup (never the machine's root), traffic is balanced, `sandbox
exec POD -n default -- sh -c 'echo ok'` prints ok, a wrong env name in the manifests breaks the
pod, and `sandbox down` leaves no container, cgroup or mount behind.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from daemon.cgroupmount import cgroup2_root
from sandbox import up as sb
from tests.packaging.conftest import podman
from tests.support.kubectl import kubectl_path

REPO = Path(__file__).resolve().parents[2]
KMESHCTL = str(REPO / ".venv" / "bin" / "kmeshctl")
SAMPLES = [REPO / "manifests/samples/fortio/fortio-route.yaml", REPO / "manifests/samples/netutils.yaml"]
# The first test to need the image may build it (fresh machine: ~3-5 min under load).
pytestmark = [pytest.mark.e2e, pytest.mark.kernel, pytest.mark.timeout(1200)]


class Sbx:
    def __init__(self, directory: Path, st: sb.State, image: str) -> None:
        self.dir, self.st, self.image = directory, st, image
        self.env = {
            **os.environ,
            "KUBECONFIG": str(directory / "kubeconfig"),
            "KMESH_SANDBOX_DIR": str(directory),
        }

    def run(self, *cmd: str, timeout: float = 60, env: dict | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(list(cmd), capture_output=True, text=True, env=env or self.env, timeout=timeout)

    def kubectl(self, *args: str) -> subprocess.CompletedProcess:
        r = self.run(kubectl_path(), *args)
        assert r.returncode == 0, f"kubectl {' '.join(args)}: {r.stderr}"
        return r

    def kmeshctl(
        self, *args: str, timeout: float = 90, env: dict | None = None
    ) -> subprocess.CompletedProcess:
        return self.run(KMESHCTL, *args, timeout=timeout, env=env)

    def manifests(self, dest: Path) -> Path:
        """A copy of manifests/ whose daemon listens on free admin/metrics ports: other sandboxes on this
        machine (other test runs, demos) use the defaults 15200/15020 on the same host network."""
        shutil.copytree(REPO / "manifests", dest)
        ds = dest / "kmesh" / "daemonset.yaml"
        text = ds.read_text()
        anchor = "        - --node-wide\n"
        assert anchor in text
        extra = (
            f"        - --admin-addr=127.0.0.1:{sb.free_port()}\n"
            f"        - --metrics-addr=127.0.0.1:{sb.free_port()}\n"
        )
        ds.write_text(text.replace(anchor, anchor + extra))
        return dest

    def install(self, env: dict | None = None) -> subprocess.CompletedProcess:
        # istiod's name (resolved to loopback in hostNetwork pods, matching the serving cert) on the
        # sandbox's free port.
        return self.kmeshctl(
            "install",
            "--cluster-id",
            self.st.cluster_id,
            "--image",
            self.image,
            "--xds",
            f"istiod-{self.st.revision}.istio-system.svc:{self.st.xds_tls_port}",
            env=env,
        )

    def diag(self) -> str:
        """The daemon pod's status and log, podman's containers and the kubelet's log tail."""
        pod = self.kmesh_pod()
        return "\n".join(
            [
                json.dumps(pod.get("status"), indent=1)[-2000:],
                self.run(kubectl_path(), "logs", "-n", "kmesh-system", "-l", "app=kmesh").stdout[-3000:],
                podman("ps", "-a", check=False).stdout,
                (self.dir / "logs" / "kubelet.log").read_text()[-3000:],
            ]
        )

    def kmesh_pod(self) -> dict:
        items = json.loads(
            self.kubectl("get", "pods", "-n", "kmesh-system", "-l", "app=kmesh", "-o", "json").stdout
        )["items"]
        return items[0] if items else {}


def wait(predicate: Callable[[], object], timeout: float, what: str, sbx: Sbx | None = None) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            got = predicate()
        except (AssertionError, KeyError, IndexError, ValueError):
            got = None
        if got:
            return got
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}" + (sbx.diag() if sbx else ""))


def _labelled_containers(prefix: str) -> list[str]:
    return podman(
        "ps", "-a", "-q", "--filter", f"label=io.kmesh.sandbox={prefix}", check=False
    ).stdout.split()


@pytest.fixture(scope="module")
def sbx(daemon_image: str, run_prefix: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sbx]:
    directory = tmp_path_factory.mktemp("podsbx")
    saved = os.environ.get("KMESH_SANDBOX_DAEMON_RUNTIME")
    os.environ["KMESH_SANDBOX_DAEMON_RUNTIME"] = "podman"  # the supervisor and kubelet inherit it
    try:
        st = sb.up(directory, timeout=60, xds_ports=(sb.free_port(), sb.free_port()), prefix=f"{run_prefix}p")
    finally:
        if saved is None:
            os.environ.pop("KMESH_SANDBOX_DAEMON_RUNTIME", None)
        else:
            os.environ["KMESH_SANDBOX_DAEMON_RUNTIME"] = saved
    h = Sbx(directory, st, daemon_image)
    try:
        yield h
    finally:
        sb.down(directory)
        # What down must have removed: podman containers, the cgroup (v2 and runc's v1 copies), mounts.
        leftovers = _labelled_containers(st.prefix)
        cgroups = [p for p in Path("/sys/fs/cgroup").glob(f"*/{Path(st.cgroup_root).name}")]
        mounts = [line for line in Path("/proc/mounts").read_text().splitlines() if str(directory) in line]
        for cid in leftovers:
            podman("rm", "-f", cid, check=False)
        assert not leftovers and not cgroups and not mounts, (leftovers, cgroups, mounts)


def test_daemon_pod_runs_in_podman(sbx: Sbx, tmp_path: Path) -> None:
    for f in SAMPLES:
        sbx.kubectl("apply", "--server-side", "-f", str(f))
    r = sbx.install(env={**sbx.env, "KMESH_MANIFESTS_DIR": str(sbx.manifests(tmp_path / "manifests"))})
    assert r.returncode == 0, r.stderr + r.stdout
    assert sbx.kmeshctl("enable", "ns", "default").returncode == 0
    wait(
        lambda: sbx.kmesh_pod()["status"]["containerStatuses"][0]["ready"],
        120,
        "the kmesh pod ready",
        sbx=sbx,
    )

    status = sbx.kmeshctl("sandbox", "status").stdout
    assert f"daemon       podman container from {sbx.image}" in status, status
    containers = wait(
        lambda: (c := _labelled_containers(sbx.st.prefix)) and len(c) == 1 and c,
        30,
        "one podman container with the sandbox's label",
        sbx=sbx,
    )
    logs = wait(
        lambda: (
            "kmesh-daemon started"
            in (out := sbx.kubectl("logs", "-n", "kmesh-system", "-l", "app=kmesh").stdout)
            and out
        ),
        60,
        "the daemon's start in kubectl logs",
        sbx=sbx,
    )
    assert "level=" in str(logs)
    # Attached at the sandbox's cgroup (the manifest's /mnt/kmesh_cgroup2 there), not the machine root.
    shown = sbx.run("bpftool", "cgroup", "show", sbx.st.cgroup_root).stdout
    assert "connect4" in shown and "sockops" in shown, shown
    root = sbx.run("bpftool", "cgroup", "show", str(cgroup2_root())).stdout
    assert "connect4" not in root
    # The daemon container's process lives inside the sandbox cgroup tree.
    pid = podman("inspect", "--format", "{{.State.Pid}}", containers[0]).stdout.strip()
    own = next(x[3:] for x in Path(f"/proc/{pid}/cgroup").read_text().splitlines() if x.startswith("0::"))
    assert own.startswith(f"/{Path(sbx.st.cgroup_root).name}/pod"), own

    def ready(d: str) -> bool:
        return (
            json.loads(sbx.kubectl("get", "deploy", d, "-o", "json").stdout)["status"].get("readyReplicas")
            == 1
        )

    wait(lambda: all(ready(d) for d in ("fortio-v1", "fortio-v2", "netutils")), 90, "samples ready", sbx=sbx)
    ok = sbx.kmeshctl("sandbox", "exec", "netutils", "-n", "default", "--", "sh", "-c", "echo ok")
    assert ok.returncode == 0 and ok.stdout == "ok\n", ok.stderr
    ip = sbx.kubectl("get", "svc", "fortio", "-o", "jsonpath={.spec.clusterIP}").stdout

    def answered() -> bool:
        r = sbx.kmeshctl(
            "sandbox",
            "exec",
            "netutils",
            "-n",
            "default",
            "--",
            "curl",
            "-s",
            "-m",
            "3",
            "-I",
            f"http://{ip}/",
        )
        return any(line.startswith("Server:") for line in r.stdout.splitlines())

    wait(
        answered,
        60,
        "a response from fortio through the ClusterIP (redirected by the podman daemon)",
        sbx=sbx,
    )


def test_a_wrong_env_name_in_the_manifests_breaks_the_pod(sbx: Sbx, tmp_path: Path) -> None:
    """KMESH_CGROUP_ROOT misspelt in manifests/: the container gets exactly that, and fails."""
    broken = sbx.manifests(tmp_path / "manifests")
    ds = broken / "kmesh" / "daemonset.yaml"
    ds.write_text(ds.read_text().replace("name: KMESH_CGROUP_ROOT", "name: KMESH_CGROUP_RO0T"))
    old = sbx.kmesh_pod()["metadata"]["uid"]
    sbx.kubectl("delete", "daemonset", "-n", "kmesh-system", "kmesh")  # a fresh object, not a merge
    r = sbx.install(env={**sbx.env, "KMESH_MANIFESTS_DIR": str(broken)})
    assert r.returncode == 0, r.stderr
    env = sbx.kubectl("get", "ds", "-n", "kmesh-system", "kmesh", "-o", "json").stdout
    assert "KMESH_CGROUP_RO0T" in env and "KMESH_CGROUP_ROOT" not in env
    wait(lambda: sbx.kmesh_pod()["metadata"]["uid"] != old, 60, "the DaemonSet's new pod", sbx=sbx)

    def crashed() -> bool:
        st = sbx.kmesh_pod()["status"]["containerStatuses"][0]
        return st["restartCount"] >= 1 or "terminated" in (st.get("lastState") or {})

    wait(crashed, 90, "the daemon container to fail", sbx=sbx)
    logs = sbx.kubectl("logs", "-n", "kmesh-system", "-l", "app=kmesh").stdout
    assert "--cgroup-root is required" in logs, logs[-2000:]
