"""Bring the whole sandbox up and down: API server, control plane (pilot) and the node (kubelet).

``up`` starts a detached supervisor (``python -m sandbox.up supervise DIR``) that runs the three as
child processes, restarts any that dies (1 s, 2 s, ... 30 s back-off) and stops them in order
(kubelet, pilot, API server) on SIGTERM. Everything is recorded in ``DIR/state.json`` before it is
created (prefix, cgroup root, pins, private bpffs, pids), so ``down`` can remove it all even after
a crash, and running ``down`` twice is harmless.

Layout of the state dir (``$KMESH_SANDBOX_DIR``, default ``~/.kmesh/sandbox``)::

    kubeconfig            for kubectl / kmeshctl (also used by the pods' kmesh-daemon)
    state.json            prefix, cgroup root, ports, pids, cluster id
    logs/*.log            supervisor, apiserver, pilot, kubelet
    apiserver/ pilot/     their state (token signing key, CA)
    kubelet/pods/<uid>/   pod volumes, hosts files, container logs
    bpffs/                a private bpf filesystem, only if /sys/fs/bpf is not one

Safety: the cgroup root is a new child ``kmesh-sandbox-<prefix>`` of the cgroup v2 mount (the
daemon attaches its programs there, never at the machine's root); pods live in network namespaces
on a bridge with no route off the machine.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CLUSTER_ID = "sandbox-cluster"
REVISION = "1-22-6"
XDS_TLS_PORT = 15012
XDS_PLAINTEXT_PORT = 15010
COMPONENTS = ("apiserver", "pilot", "kubelet")


class SandboxError(Exception):
    """One line for the user: what failed and what to do."""


def sandbox_dir(path: str | Path | None = None) -> Path:
    return Path(path or os.environ.get("KMESH_SANDBOX_DIR") or "~/.kmesh/sandbox").expanduser().absolute()


@dataclass
class State:
    dir: str
    prefix: str
    cgroup_root: str
    api_port: int
    token: str
    cluster_id: str = CLUSTER_ID
    revision: str = REVISION
    bpffs: str = "/sys/fs/bpf"
    private_bpffs: bool = False
    xds_tls_port: int = XDS_TLS_PORT
    xds_plaintext_port: int = XDS_PLAINTEXT_PORT
    supervisor_pid: int = 0
    pids: dict[str, int] = field(default_factory=dict)
    started_at: float = 0.0

    @property
    def path(self) -> Path:
        return Path(self.dir)

    @property
    def kubeconfig(self) -> Path:
        return self.path / "kubeconfig"

    @property
    def pin_dir(self) -> Path:
        return Path(self.bpffs) / self.prefix

    def save(self) -> None:
        tmp = self.path / "state.json.tmp"
        tmp.write_text(json.dumps(asdict(self), indent=1))
        os.chmod(tmp, 0o600)
        tmp.replace(self.path / "state.json")

    @classmethod
    def load(cls, directory: Path) -> State | None:
        try:
            return cls(**json.loads((directory / "state.json").read_text()))
        except (OSError, ValueError, TypeError):
            return None


def cgroup2_mount() -> Path:
    """The detected cgroup v2 hierarchy (sandbox.cgroups), or SandboxError saying what to do."""
    from sandbox.cgroups import Cgroup2Missing, cgroup2_root

    try:
        return cgroup2_root()
    except Cgroup2Missing as e:
        raise SandboxError(f"the sandbox needs cgroup v2: {e}") from e


def is_bpffs(path: Path) -> bool:
    try:
        return os.statvfs(path) is not None and _fs_type(path) == "bpf"
    except OSError:
        return False


def _fs_type(path: Path) -> str:
    best, fstype = "", ""
    target = str(path.resolve())
    for line in Path("/proc/self/mounts").read_text().splitlines():
        f = line.split()
        if (
            len(f) > 2
            and (target == f[1] or target.startswith(f[1].rstrip("/") + "/"))
            and len(f[1]) >= len(best)
        ):
            best, fstype = f[1], f[2]
    return fstype


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- the supervisor (runs detached) -------------------------------------------------------------
def _commands(st: State) -> dict[str, list[str]]:
    py = sys.executable
    d = st.path
    return {
        "apiserver": [
            py,
            "-m",
            "sandbox.apiserver",
            "--port",
            str(st.api_port),
            "--kubeconfig",
            str(st.kubeconfig),
            "--state-dir",
            str(d / "apiserver"),
            f"--token={st.token}",  # one argument: a token may start with "-"
        ],
        "pilot": [
            py,
            "-m",
            "sandbox.pilot",
            "--kubeconfig",
            str(st.kubeconfig),
            "--cluster-id",
            st.cluster_id,
            "--revision",
            st.revision,
            "--tls-port",
            str(st.xds_tls_port),
            "--plaintext-port",
            str(st.xds_plaintext_port),
            "--state-dir",
            str(d / "pilot"),
        ],
        "kubelet": [
            py,
            "-m",
            "sandbox.kubelet",
            "--kubeconfig",
            str(st.kubeconfig),
            "--state-dir",
            str(d / "kubelet"),
            "--cgroup-root",
            st.cgroup_root,
            "--prefix",
            st.prefix,
            "--bpffs",
            st.bpffs,
        ],
    }


def _api_ready(st: State) -> bool:
    import urllib.request

    req = urllib.request.Request(
        f"http://127.0.0.1:{st.api_port}/version", headers={"Authorization": f"Bearer {st.token}"}
    )
    try:
        with urllib.request.urlopen(req, timeout=1) as resp:
            return resp.status == 200
    except OSError:
        return False


def supervise(directory: Path) -> int:
    """Run the components until SIGTERM; restart the ones that die."""
    st = State.load(directory)
    if st is None:
        print(f"supervisor: no state in {directory}", file=sys.stderr)
        return 2
    stop = False

    def on_term(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    st.supervisor_pid = os.getpid()
    st.save()
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (":" + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("BCC_KERNEL_SOURCE", str(REPO / ".build" / "kernel-src"))
    env.pop("KUBECONFIG", None)
    logs = st.path / "logs"
    procs: dict[str, subprocess.Popen] = {}
    backoff: dict[str, float] = {}
    next_start: dict[str, float] = {}
    started: dict[str, float] = {}
    commands = _commands(st)

    def start(name: str) -> None:
        with open(logs / f"{name}.log", "ab") as log:
            procs[name] = subprocess.Popen(
                commands[name],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                stdin=subprocess.DEVNULL,
                cwd=str(REPO),
            )
        started[name] = time.monotonic()
        st.pids[name] = procs[name].pid
        st.save()
        print(f"supervisor: started {name} pid {procs[name].pid}", file=sys.stderr, flush=True)

    for name in COMPONENTS:
        start(name)
        if name == "apiserver":
            deadline = time.monotonic() + 20
            while not _api_ready(st) and time.monotonic() < deadline and procs[name].poll() is None:
                time.sleep(0.1)
    while not stop:
        time.sleep(0.2)
        for name in COMPONENTS:
            p = procs.get(name)
            if p is not None and p.poll() is not None:
                ran = time.monotonic() - started[name]
                backoff[name] = 1.0 if ran > 60 or name not in backoff else min(backoff[name] * 2, 30.0)
                next_start[name] = time.monotonic() + backoff[name]
                print(
                    f"supervisor: {name} exited with {p.returncode}; restart in {backoff[name]:g}s",
                    file=sys.stderr,
                    flush=True,
                )
                procs.pop(name)
            elif p is None and time.monotonic() >= next_start.get(name, 0):
                start(name)
    for name in reversed(COMPONENTS):  # kubelet first: it stops the pods and removes their netns
        p = procs.get(name)
        if p is None:
            continue
        p.terminate()
        try:
            p.wait(timeout=20 if name == "kubelet" else 5)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        print(f"supervisor: stopped {name}", file=sys.stderr, flush=True)
    return 0


# --- up / down / status ---------------------------------------------------------------------------
def up(
    directory: Path | None = None,
    timeout: float = 60.0,
    log: Callable[[str], None] = lambda msg: None,
    xds_ports: tuple[int, int] = (XDS_TLS_PORT, XDS_PLAINTEXT_PORT),
    prefix: str | None = None,
) -> State:
    """Start the sandbox in the background and wait until API server, pilot and node are ready.

    `xds_ports` (TLS, plaintext) default to istiod's 15012/15010; tests pass free ports.
    """
    d = sandbox_dir(directory)
    if os.geteuid() != 0:
        raise SandboxError("the sandbox needs root (network namespaces, cgroups, BPF); run as root")
    existing = State.load(d)
    if existing is not None and pid_alive(existing.supervisor_pid):
        raise SandboxError(
            f"a sandbox already runs from {d} (prefix {existing.prefix}); "
            "use `kmeshctl sandbox status` or `kmeshctl sandbox down`"
        )
    if existing is not None:
        log(f"cleaning a previous sandbox that did not shut down ({existing.prefix})")
        down(d)
    for port in xds_ports:
        if not port_free(port):
            raise SandboxError(
                f"127.0.0.1:{port} is in use; the sandbox control plane listens there "
                "(stop whatever uses it, or `kmeshctl sandbox down` an older sandbox)"
            )
    shutil.rmtree(d / "logs", ignore_errors=True)  # logs of this run only (a stale "ready" line misleads)
    for sub in ("logs", "apiserver", "pilot", "kubelet"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    prefix = prefix or "ks" + secrets.token_hex(3)
    cg = cgroup2_mount() / f"kmesh-sandbox-{prefix}"
    st = State(
        dir=str(d),
        prefix=prefix,
        cgroup_root=str(cg),
        api_port=6443 if port_free(6443) else free_port(),
        token=secrets.token_urlsafe(24),
        started_at=time.time(),
        xds_tls_port=xds_ports[0],
        xds_plaintext_port=xds_ports[1],
    )
    if not is_bpffs(Path("/sys/fs/bpf")):
        st.bpffs, st.private_bpffs = str(d / "bpffs"), True
    st.save()  # recorded before anything is created, so `down` can always clean up
    if st.private_bpffs:
        Path(st.bpffs).mkdir(exist_ok=True)
        r = subprocess.run(["mount", "-t", "bpf", "bpf", st.bpffs], capture_output=True, text=True)
        if r.returncode != 0:
            down(d)
            raise SandboxError(f"cannot mount a bpf filesystem at {st.bpffs}: {r.stderr.strip()}")
        log(f"/sys/fs/bpf is not a bpf filesystem: pods see a private one ({st.bpffs}) at /sys/fs/bpf")
    cg.mkdir(exist_ok=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (":" + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    with open(d / "logs" / "supervisor.log", "ab") as out:
        sup = subprocess.Popen(
            [sys.executable, "-m", "sandbox.up", "supervise", str(d)],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env=env,
            cwd=str(REPO),
        )
    log(f"starting the API server, control plane and node (prefix {prefix}, logs in {d / 'logs'})")
    try:
        wait_ready(st, timeout, sup)
    except SandboxError:
        down(d)
        raise
    return State.load(d) or st


def wait_ready(st: State, timeout: float, sup: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    pending = ["apiserver", "pilot", "kubelet"]
    while time.monotonic() < deadline:
        if sup is not None and sup.poll() is not None:
            raise SandboxError(f"the sandbox supervisor exited ({sup.returncode}); see {st.path / 'logs'}")
        st = State.load(st.path) or st
        checks = component_health(st)
        pending = [n for n in COMPONENTS if not checks[n]["ready"]]
        if not pending:
            return
        time.sleep(0.2)
    tails = "; ".join(f"{n}: {_last_line(st.path / 'logs' / f'{n}.log')}" for n in pending)
    raise SandboxError(
        f"the sandbox did not become ready in {timeout:g}s (waiting for {', '.join(pending)}): {tails}"
    )


def _last_line(path: Path) -> str:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "no log"
    return lines[-1][:200] if lines else "empty log"


def _get_json(st: State, path: str) -> dict | None:
    import urllib.request

    req = urllib.request.Request(
        f"http://127.0.0.1:{st.api_port}{path}", headers={"Authorization": f"Bearer {st.token}"}
    )
    try:
        with urllib.request.urlopen(req, timeout=2) as resp:
            return json.loads(resp.read())
    except (OSError, ValueError):
        return None


def component_health(st: State) -> dict[str, dict]:
    """Per component: pid, running, ready (and a detail), from processes and the API."""
    out: dict[str, dict] = {}
    for name in COMPONENTS:
        pid = st.pids.get(name, 0)
        out[name] = {"pid": pid, "running": pid_alive(pid), "ready": False, "detail": ""}
    if out["apiserver"]["running"] and _api_ready(st):
        out["apiserver"].update(ready=True, detail=f"http://127.0.0.1:{st.api_port}")
    pilot_log = st.path / "logs" / "pilot.log"
    if out["pilot"]["running"] and out["apiserver"]["ready"]:
        svc = _get_json(st, f"/api/v1/namespaces/istio-system/services/istiod-{st.revision}")
        ready_line = "ready tls=" in (pilot_log.read_text(errors="replace") if pilot_log.exists() else "")
        if svc and ready_line and not port_free(st.xds_tls_port):
            out["pilot"].update(
                ready=True, detail=f"istiod-{st.revision}.istio-system xDS 127.0.0.1:{st.xds_tls_port}"
            )
    if out["kubelet"]["running"] and out["apiserver"]["ready"]:
        nodes = (_get_json(st, "/api/v1/nodes") or {}).get("items") or []
        for node in nodes:
            conds = {c.get("type"): c.get("status") for c in node.get("status", {}).get("conditions") or []}
            if conds.get("Ready") == "True":
                out["kubelet"].update(ready=True, detail=f"node {node['metadata']['name']}")
    return out


def daemon_runtime(d: Path) -> str:
    """How the node runs the kmesh daemon pod: "podman <image> (<id>)" or "process (<why>)"."""
    try:
        info = json.loads((d / "kubelet" / "daemon-runtime.json").read_text())
    except (OSError, ValueError):
        return "unknown (kubelet not started)"
    if info.get("running") == "podman":
        return f"podman container from {info.get('image')} ({info.get('imageId') or '?'})"
    if info.get("mode") == "process":
        return f"plain process ({info.get('reason')})"
    return "podman when the DaemonSet's image is in podman's storage (`make image`), else a plain process"


def status(directory: Path | None = None) -> dict:
    d = sandbox_dir(directory)
    st = State.load(d)
    if st is None:
        return {"dir": str(d), "running": False, "components": {}}
    health = component_health(st)
    pods = (_get_json(st, "/api/v1/pods") or {}).get("items") or [] if health["apiserver"]["ready"] else []
    return {
        "dir": str(d),
        "running": pid_alive(st.supervisor_pid),
        "prefix": st.prefix,
        "clusterId": st.cluster_id,
        "revision": st.revision,
        "kubeconfig": str(st.kubeconfig),
        "apiServer": f"http://127.0.0.1:{st.api_port}",
        "cgroupRoot": st.cgroup_root,
        "pinDir": str(st.pin_dir),
        "supervisorPid": st.supervisor_pid,
        "daemonRuntime": daemon_runtime(d),
        "components": health,
        "pods": [
            {
                "namespace": p["metadata"]["namespace"],
                "name": p["metadata"]["name"],
                "phase": p.get("status", {}).get("phase", ""),
                "ip": p.get("status", {}).get("podIP", ""),
            }
            for p in pods
        ],
    }


def _kill(pid: int, expect: str, timeout: float = 20.0) -> bool:
    """SIGTERM then SIGKILL a pid we started, only if its command line is still ours."""
    if not pid_alive(pid) or expect not in _cmdline(pid):
        return False
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + timeout
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if pid_alive(pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return True


def down(directory: Path | None = None) -> list[str]:
    """Stop and remove everything the sandbox made; safe after a crash and when run twice."""
    from sandbox.kubelet.runtime import cleanup_node

    d = sandbox_dir(directory)
    st = State.load(d)
    if st is None:
        return []
    done: list[str] = []
    if _kill(st.supervisor_pid, "sandbox.up", timeout=40):
        done.append(f"supervisor {st.supervisor_pid}")
    modules = {"apiserver": "sandbox.apiserver", "pilot": "sandbox.pilot", "kubelet": "sandbox.kubelet"}
    for name in ("kubelet", "pilot", "apiserver"):
        if _kill(st.pids.get(name, 0), modules[name]):
            done.append(f"{name} {st.pids[name]}")
    done += cleanup_node(st.prefix, Path(st.cgroup_root), d / "kubelet" / "pods")
    if st.pin_dir.exists() and st.pin_dir.parent == Path(st.bpffs) and st.prefix:
        shutil.rmtree(st.pin_dir, ignore_errors=True)
        done.append(f"pins {st.pin_dir}")
    if st.private_bpffs and Path(st.bpffs).exists():
        if _fs_type(Path(st.bpffs)) == "bpf" and os.path.ismount(st.bpffs):
            subprocess.run(["umount", "-l", st.bpffs], capture_output=True)
            done.append(f"bpffs {st.bpffs}")
        try:
            Path(st.bpffs).rmdir()
        except OSError:
            pass
    for f in ("kubeconfig", "state.json"):
        (d / f).unlink(missing_ok=True)
    return done


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "supervise":
        return supervise(Path(argv[1]))
    print(
        "usage: python -m sandbox.up supervise DIR  (use `kmeshctl sandbox up|down|status|exec`)",
        file=sys.stderr,
    )
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
