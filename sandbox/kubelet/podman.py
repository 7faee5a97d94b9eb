"""The kmesh DaemonSet's pod as a real podman container from the image `make image` built.

Why: the process runtime (runtime.py) runs the machine's own ``kmesh-daemon`` with flags and env
the image catalog adjusts, so a wrong mount path or env name in manifests/ would go unnoticed.
Here the container gets exactly what the manifest says: image, command/args, env, securityContext
privileged, host network, and every volumeMount at its mountPath (hostPath volumes, the projected
istio token, the istio-ca-root-cert ConfigMap). Two things are the sandbox's, as a kubelet's
would be: the Pod's /etc/hosts (Service names, the istiod alias) and ``KUBECONFIG`` with the
sandbox kubeconfig mounted read-only (a real kubelet injects ``KUBERNETES_SERVICE_HOST`` instead;
the sandbox API server speaks plain HTTP, which in-cluster config cannot).

Safety: the node's "host paths" are aliases inside the sandbox state dir: ``/sys/fs/bpf`` is the
sandbox's private bpffs, and ``/mnt`` is a directory whose ``kmesh_cgroup2`` is a bind mount of
the sandbox's child cgroup, so the manifest's ``KMESH_CGROUP_ROOT=/mnt/kmesh_cgroup2`` finds a
cgroup2 there and attaches to the sandbox cgroup, never the machine's root. The container runs
with ``--cgroup-parent`` under the sandbox cgroup root (its process is inside the subtree the
programs attach to) and a private cgroup namespace (a cgroup2 mount made inside it shows the
container's own cgroup). Podman settings come from containers.conf next to this file
(CONTAINERS_CONF): runc, explicit ulimits, host network. Containers carry the label
``io.kmesh.sandbox=<prefix>`` so ``remove_containers`` finds them after a crash.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from sandbox.kubelet.runtime import Container, Mount, PodSandbox, RuntimeError_, cgroup2_mount_of

CONTAINERS_CONF = Path(__file__).with_name("containers.conf")
LABEL = "io.kmesh.sandbox"
KUBECONFIG_IN_CONTAINER = "/var/run/kmesh-sandbox/kubeconfig"
START_TIMEOUT = 30.0


def podman_env() -> dict[str, str]:
    return {**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)}


def podman(*args: str, timeout: float = 60.0, check: bool = True) -> subprocess.CompletedProcess:
    cmd = ["podman", *args]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=podman_env(), timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise RuntimeError_(f"{' '.join(cmd[:3])}: {e}") from None
    if check and proc.returncode != 0:
        raise RuntimeError_(f"{' '.join(cmd[:3])}: {proc.stderr.strip()}")
    return proc


def available() -> bool:
    return shutil.which("podman") is not None


def image_exists(image: str) -> bool:
    """True when podman's local storage has ``image`` (never pulls)."""
    if not available() or not image:
        return False
    try:
        return podman("image", "exists", image, timeout=20, check=False).returncode == 0
    except RuntimeError_:
        return False


def image_id(image: str) -> str:
    try:
        out = podman("image", "inspect", "--format", "{{.Id}}", image, timeout=20, check=False)
    except RuntimeError_:
        return ""
    return out.stdout.strip()[:12]


def remove_containers(prefix: str) -> list[str]:
    """Remove every container of the sandbox with this prefix (idempotent; fine without podman)."""
    if not available() or not prefix:
        return []
    try:
        ids = podman("ps", "-a", "-q", "--filter", f"label={LABEL}={prefix}", timeout=30, check=False)
    except RuntimeError_:
        return []
    removed = []
    for cid in ids.stdout.split():
        podman("rm", "-f", "-t", "2", cid, timeout=60, check=False)
        removed.append(f"podman container {cid[:12]}")
    return removed


def remove_v1_cgroups(cgroup_root: Path) -> None:
    """runc on a hybrid host also makes the --cgroup-parent path in every v1 hierarchy: remove it."""
    try:
        rel = Path(cgroup_root).relative_to(cgroup2_mount_of(Path(cgroup_root)))
    except (ValueError, RuntimeError_):
        return
    if not rel.parts:
        return
    base = Path("/sys/fs/cgroup")
    for hier in base.iterdir() if base.is_dir() else ():
        d = hier / rel
        if hier.name == "unified" or not d.is_dir():
            continue
        for sub in sorted((p for p in d.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)) + [d]:
            try:
                sub.rmdir()
            except OSError:
                pass


def remove_default_parent_cgroups(base: Path = Path("/sys/fs/cgroup")) -> None:
    """Empty ``libpod_parent`` cgroups that podman builds and ``run`` without --cgroup-parent leave
    in every hierarchy (v1 and v2). Only empty ones go: rmdir fails on a cgroup in use."""
    for d in [base / "libpod_parent", *(h / "libpod_parent" for h in base.iterdir() if h.is_dir())]:
        if not d.is_dir():
            continue
        for sub in sorted((p for p in d.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)) + [d]:
            try:
                sub.rmdir()
            except OSError:
                pass


class CgroupMount:
    """``<dir>/mnt/kmesh_cgroup2``: a bind mount of the sandbox cgroup root, the node's /mnt alias."""

    def __init__(self, state_dir: Path, cgroup_root: Path) -> None:
        self.mnt = Path(state_dir) / "hostpath" / "mnt"
        self.target = self.mnt / "kmesh_cgroup2"
        self.cgroup_root = Path(cgroup_root)

    def setup(self) -> None:
        self.target.mkdir(parents=True, exist_ok=True)
        if not os.path.ismount(self.target):
            r = subprocess.run(["mount", "--bind", str(self.cgroup_root), str(self.target)],
                               capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError_(f"cannot bind the sandbox cgroup at {self.target}: {r.stderr.strip()}")

    def teardown(self) -> None:
        unmount_cgroup_alias(self.target)


def unmount_cgroup_alias(target: Path) -> bool:
    if os.path.ismount(target):
        subprocess.run(["umount", "-l", str(target)], capture_output=True)
        return True
    return False


@dataclass
class PodmanContainer(Container):
    """A podman container; ``process`` is the attached ``podman run`` (its output is the log)."""

    name_in_podman: str = ""
    init_pid: int = 0

    @property
    def pid(self) -> int:  # the container's init, for `kmeshctl sandbox exec`
        return self.init_pid or self.process.pid


def run_args(name: str, prefix: str, image: str, spec: dict, env: dict[str, str], mounts: list[Mount],
             sandbox: PodSandbox, cgroup_parent: str, kubeconfig: str) -> list[str]:
    """``podman run`` arguments for one container of the manifest (see the module docstring)."""
    args = ["run", "--rm", "--name", name, "--label", f"{LABEL}={prefix}", "--pull=never",
            "--network", "host", "--runtime", "runc", "--cgroupns", "private",
            "--ulimit", "nofile=20000:20000", "--ulimit", "nproc=32768:32768",
            "--cgroup-parent", cgroup_parent, "--sig-proxy=true"]
    if (spec.get("securityContext") or {}).get("privileged"):
        args.append("--privileged")
    if spec.get("workingDir"):
        args += ["--workdir", spec["workingDir"]]
    for k, v in env.items():
        args += ["--env", f"{k}={v}"]
    args += ["--env", f"KUBECONFIG={KUBECONFIG_IN_CONTAINER}"]
    for m in mounts:
        args += ["--volume", f"{m.source}:{m.target}:{'ro' if m.read_only else 'rw'}"]
    args += ["--volume", f"{sandbox.hosts_file}:/etc/hosts:rw",
             "--volume", f"{kubeconfig}:{KUBECONFIG_IN_CONTAINER}:ro"]
    command = list(spec.get("command") or [])
    if command:
        args += ["--entrypoint", json.dumps(command)]
    return args + [image, *(spec.get("args") or [])]


class PodmanRuntime:
    """Starts and stops podman containers for pods of one sandbox node."""

    def __init__(self, prefix: str, cgroup_root: Path, kubeconfig: str) -> None:
        self.prefix = prefix
        self.cgroup_root = Path(cgroup_root)
        self.kubeconfig = kubeconfig

    def start(self, sandbox: PodSandbox, spec: dict, env: dict[str, str],
              mounts: list[Mount]) -> PodmanContainer:
        cname = spec["name"]
        name = f"{self.prefix}-{sandbox.name}-{cname}"[:120]
        podman("rm", "-f", name, timeout=30, check=False)  # a previous start's leftover
        parent = "/" + str(sandbox.cgroup.relative_to(cgroup2_mount_of(sandbox.cgroup)))
        argv = ["podman", *run_args(name, self.prefix, spec.get("image", ""), spec, env, mounts, sandbox,
                                    parent, self.kubeconfig)]
        log_path = sandbox.dir / "logs" / f"{cname}.log"
        with open(log_path, "ab") as log:
            process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True, close_fds=True, env=podman_env(), cwd="/")
        started = time.time()
        init_pid, cgroup = 0, sandbox.cgroup
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline and process.poll() is None:
            out = podman("inspect", "--format", "{{.State.Pid}}", name, timeout=20, check=False)
            pid = int(out.stdout.strip() or 0) if out.returncode == 0 and out.stdout.strip().isdigit() else 0
            if pid > 0:
                init_pid = pid
                cgroup = _unified_cgroup(pid, cgroup2_mount_of(sandbox.cgroup)) or sandbox.cgroup
                break
            time.sleep(0.2)
        cid = podman("inspect", "--format", "{{.Id}}", name, timeout=20, check=False).stdout.strip()
        return PodmanContainer(name=cname, container_id=cid or name, process=process, log_path=log_path,
                               cgroup=cgroup, started_at=started, name_in_podman=name, init_pid=init_pid)

    def stop(self, container: PodmanContainer, grace: float) -> int | None:
        """``podman stop`` (SIGTERM, then SIGKILL after grace); the attached run then exits."""
        if container.process.poll() is None:
            podman("stop", "-t", str(max(1, int(grace))), container.name_in_podman, timeout=grace + 30,
                   check=False)
        podman("rm", "-f", container.name_in_podman, timeout=30, check=False)
        try:
            return container.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            container.process.kill()
            return container.process.wait(timeout=5)


def _unified_cgroup(pid: int, mount: Path) -> Path | None:
    try:
        for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
            if line.startswith("0::"):
                return mount / line[3:].lstrip("/")
    except OSError:
        return None
    return None
