"""The kubelet loop: Pods bound to this node become sandboxes and processes; their status goes back.

Level-triggered: watches on Pods, workloads and Services only wake the loop; every pass lists what
it needs and reconciles (controllers, then pods, then hosts files, then status), and a pass also
runs every second anyway, so a lost watch event costs at most a second.

Container lifecycle (per container): start -> running; on exit the restartPolicy decides; restarts
wait 1 s, 2 s, 4 s ... up to 30 s (reset after 60 s of running), shown as CrashLoopBackOff with the
restart count in the Pod status. An image outside the catalog fails the Pod at once.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from sandbox.images import ImageError, NodeContext, Program, resolve
from sandbox.kubelet import podman, podspec
from sandbox.kubelet.api import Api, ApiError
from sandbox.kubelet.controllers import Controllers
from sandbox.kubelet.runtime import (
    Container,
    ContainerSpec,
    Mount,
    PodSandbox,
    Runtime,
    RuntimeError_,
    render_hosts,
)

log = logging.getLogger("sandbox.kubelet")
NODE_IP = "127.0.0.1"  # hostNetwork pods and the node itself: nothing addresses the machine's NICs
LOG_PATH_ANNOTATION = "sandbox.kmesh.io/log-path"
RUNTIME_INFO_ANNOTATION = "sandbox.kmesh.io/runtime-info"
BACKOFF_MAX = 30.0
GRACE_MAX = 5.0


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def ts(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class ContainerState:
    spec: dict
    program: Program | None = None
    current: Container | None = None
    restart_count: int = 0
    last_terminated: dict | None = None
    waiting: tuple[str, str] | None = ("ContainerCreating", "")
    next_start: float = 0.0
    backoff: float = 0.0
    ready: bool = False
    done: bool = False  # terminated and not to be restarted
    mounts: list[Mount] = field(default_factory=list)


@dataclass
class LocalPod:
    uid: str
    namespace: str
    name: str
    pod: dict
    sandbox: PodSandbox | None = None
    containers: dict[str, ContainerState] = field(default_factory=dict)
    failed: tuple[str, str] | None = None
    pending: tuple[str, str] | None = None
    start_time: str = field(default_factory=now)
    transitions: dict[str, tuple[str, str]] = field(default_factory=dict)
    sent_status: str = ""
    started: bool = False
    init: dict[str, ContainerState] = field(default_factory=dict)  # initContainers, run in order
    initialized: bool = False
    volumes: dict[str, str] = field(default_factory=dict)


def _read(path: str, default: str) -> str:
    try:
        return Path(path).read_text().strip() or default
    except OSError:
        return default


def _node_info() -> dict:
    machine_id = _read("/etc/machine-id", "0" * 32)
    return {
        "machineID": machine_id,
        "systemUUID": machine_id,
        "bootID": _read("/proc/sys/kernel/random/boot_id", ""),
        "kernelVersion": os.uname().release,
        "osImage": "kmesh sandbox",
        "containerRuntimeVersion": "sandbox://1",
        "kubeletVersion": "v1.30.0-sandbox",
        "kubeProxyVersion": "",
        "operatingSystem": "linux",
        "architecture": {"x86_64": "amd64", "aarch64": "arm64"}.get(os.uname().machine, os.uname().machine),
    }


class Kubelet:
    def __init__(
        self,
        kubeconfig: str,
        state_dir: Path,
        cgroup_root: Path,
        prefix: str,
        node_name: str | None = None,
        cidr: str = "10.244.0.0/24",
        bpffs: str = "/sys/fs/bpf",
    ) -> None:
        self.kubeconfig = str(Path(kubeconfig).resolve())
        self.api = Api(self.kubeconfig)
        self.node = node_name or socket.gethostname().split(".")[0].lower()
        self.runtime = Runtime(state_dir, cgroup_root, prefix, cidr)
        self.prefix = prefix
        self.host_aliases = {} if bpffs == "/sys/fs/bpf" else {"/sys/fs/bpf": bpffs}
        self.daemon_runtime, self.daemon_runtime_reason = choose_daemon_runtime(bpffs)
        self.podman = podman.PodmanRuntime(prefix, self.runtime.cgroup_root, self.kubeconfig)
        self.cgroup_alias = podman.CgroupMount(Path(state_dir), self.runtime.cgroup_root)
        self.runtime_file = Path(state_dir) / "daemon-runtime.json"
        self.ctx = NodeContext(
            cgroup_root=str(self.runtime.cgroup_root),
            pin_prefix=prefix,
            extra_daemon_env={
                k: v
                for k, v in {
                    "KUBECONFIG": self.kubeconfig,
                    "PYTHONUNBUFFERED": "1",
                    "BCC_KERNEL_SOURCE": os.environ.get("BCC_KERNEL_SOURCE", ""),
                }.items()
                if v
            },
            # the pilot's unix socket (sandbox layout: DIR/kubelet and DIR/pilot side by side)
            xds_socket=os.environ.get("KMESH_SANDBOX_XDS_SOCKET")
            or str(Path(state_dir).resolve().parent / "pilot" / "xds.sock"),
        )
        self.controllers = Controllers(self.api, self.node, self.event)
        self.pods: dict[str, LocalPod] = {}
        self.stop = threading.Event()
        self.wake = threading.Event()
        self._services: list[dict] = []
        self._last_heartbeat = 0.0

    # --- API helpers -------------------------------------------------------------------------
    def _get_cm(self, ns: str, name: str) -> dict | None:
        return self.api.get(f"/api/v1/namespaces/{ns}/configmaps/{name}")

    def _get_secret(self, ns: str, name: str) -> dict | None:
        return self.api.get(f"/api/v1/namespaces/{ns}/secrets/{name}")

    def _token(self, ns: str, sa: str, audiences: list[str], seconds: int) -> str:
        body = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {"audiences": audiences, "expirationSeconds": seconds},
        }
        path = f"/api/v1/namespaces/{ns}/serviceaccounts/{sa}/token"
        try:
            result = self.api.create(path, body)
        except ApiError as e:
            if e.status == 404 and sa == "default":
                # The controller-manager's job in a cluster: every namespace has a default account.
                self.api.create(
                    f"/api/v1/namespaces/{ns}/serviceaccounts",
                    {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "default"}},
                )
                result = self.api.create(path, body)
            elif e.status == 404:
                raise podspec.VolumeError(f'serviceaccount "{sa}" not found') from None
            else:
                raise podspec.VolumeError(f"token request for {ns}/{sa} failed: {e}") from None
        return result["status"]["token"]

    def event(self, obj: dict, type_: str, reason: str, message: str, component: str = "kubelet") -> None:
        meta = obj["metadata"]
        kind = obj.get("kind") or "Pod"
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": f"{meta['name']}.{secrets.token_hex(8)}", "namespace": meta["namespace"]},
            "involvedObject": {
                "kind": kind,
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta.get("uid"),
                "apiVersion": obj.get("apiVersion", "v1"),
            },
            "reason": reason,
            "message": message,
            "type": type_,
            "source": {"component": component, "host": self.node},
            "firstTimestamp": now(),
            "lastTimestamp": now(),
            "count": 1,
            "reportingComponent": component,
            "reportingInstance": self.node,
        }
        try:
            self.api.create(f"/api/v1/namespaces/{meta['namespace']}/events", body)
        except Exception as e:  # noqa: BLE001 - events are best effort, as in Kubernetes
            log.debug("event not recorded: %s", e)

    # --- node ----------------------------------------------------------------------------------
    def register_node(self) -> None:
        status = {
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True",
                    "reason": "KubeletReady",
                    "message": "sandbox kubelet is posting ready status",
                    "lastHeartbeatTime": now(),
                    "lastTransitionTime": now(),
                }
            ],
            "addresses": [
                {"type": "InternalIP", "address": NODE_IP},
                {"type": "Hostname", "address": self.node},
            ],
            "capacity": {"cpu": str(os.cpu_count() or 1), "pods": "110"},
            "allocatable": {"cpu": str(os.cpu_count() or 1), "pods": "110"},
            "nodeInfo": _node_info(),
        }
        body = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": self.node,
                "labels": {"kubernetes.io/hostname": self.node, "kubernetes.io/os": "linux"},
            },
            "spec": {"podCIDR": str(self.runtime.network.cidr)},
        }
        try:
            if self.api.get(f"/api/v1/nodes/{self.node}") is None:
                self.api.create("/api/v1/nodes", body)
            self.api.merge_patch(f"/api/v1/nodes/{self.node}/status", {"status": status})
        except ApiError as e:
            log.warning("node object not written (%s); pods still run with spec.nodeName=%s", e, self.node)
        self._last_heartbeat = time.monotonic()

    # --- main loop -------------------------------------------------------------------------------
    def run(self) -> None:
        self.runtime.teardown()  # a previous kubelet's leftovers; the API is the source of truth
        self.runtime.setup()
        if self.daemon_runtime != "process":
            self.cgroup_alias.setup()  # the node's /mnt/kmesh_cgroup2 (see podman.py)
            self.host_aliases["/mnt"] = str(self.cgroup_alias.mnt)
        self._write_runtime_file(None)
        self.register_node()
        watched = [
            "/api/v1/pods",
            "/api/v1/services",
            "/apis/apps/v1/deployments",
            "/apis/apps/v1/daemonsets",
            "/apis/apps/v1/replicasets",
        ]
        for path in watched:
            threading.Thread(
                target=self.api.watch,
                args=(path, self.wake.set, self.stop),
                daemon=True,
                name=f"watch {path}",
            ).start()
        log.info(
            "node %s ready (prefix %s, cgroup root %s)", self.node, self.prefix, self.runtime.cgroup_root
        )
        last_error = ""
        try:
            while not self.stop.is_set():
                self.wake.clear()
                try:
                    self.sync_once()
                    last_error = ""
                except ApiError as e:  # API server restarting: say so once, retry every pass
                    if str(e) != last_error:
                        log.warning("API call failed (retrying): %s", e)
                    last_error = str(e)
                except Exception:  # noqa: BLE001 - keep the node alive; the next pass retries
                    log.exception("sync failed")
                self.wake.wait(self._next_wait())
                time.sleep(0.05)  # coalesce bursts of watch events
        finally:
            self.shutdown()

    def _next_wait(self) -> float:
        wait = 1.0
        t = time.monotonic()
        for lp in self.pods.values():
            for cs in lp.containers.values():
                if cs.current is None and not cs.done and cs.next_start:
                    wait = min(wait, max(0.05, cs.next_start - t))
        return wait

    def shutdown(self) -> None:
        for lp in list(self.pods.values()):
            self._stop_pod(lp, delete_object=False)
        self.runtime.teardown()  # also podman containers, the cgroup alias and v1 cgroup dirs

    def _write_runtime_file(self, image: str | None) -> None:
        """What runs (or would run) the daemon pod, for `kmeshctl sandbox status`."""
        info = {"mode": self.daemon_runtime, "reason": self.daemon_runtime_reason}
        if image is not None:
            info.update(running="podman", image=image, imageId=podman.image_id(image))
        tmp = self.runtime_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(info))
        tmp.replace(self.runtime_file)

    def _use_podman(self, lp: LocalPod, cs: ContainerState) -> bool:
        """The daemon pod runs in podman when allowed, hostNetwork, and its image is in podman's storage."""
        if self.daemon_runtime == "process" or cs.program is None or cs.program.kind != "kmesh-daemon":
            return False
        if not lp.pod.get("spec", {}).get("hostNetwork"):
            return False
        image = cs.spec.get("image", "")
        if podman.image_exists(image):
            return True
        if self.daemon_runtime == "podman":
            raise RuntimeError_(f"image {image} is not in podman's storage: run `make image`")
        return False

    def _stop_container(self, c: Container, grace: float) -> None:
        if isinstance(c, podman.PodmanContainer):
            self.podman.stop(c, grace)
        else:
            self.runtime.stop_container(c, grace=grace)

    def sync_once(self) -> None:
        pods = self.api.list("/api/v1/pods")
        if self.controllers.reconcile(pods):
            pods = self.api.list("/api/v1/pods")
        self._services = self.api.list("/api/v1/services")
        mine = {
            p["metadata"]["uid"]: p
            for p in pods
            if p.get("spec", {}).get("nodeName") in (self.node, None, "")
        }
        for uid, lp in list(self.pods.items()):
            pod = mine.get(uid)
            if pod is None or pod["metadata"].get("deletionTimestamp"):
                self._stop_pod(lp, delete_object=pod is not None)
        for uid, pod in mine.items():
            if pod["metadata"].get("deletionTimestamp"):
                continue
            lp = self.pods.get(uid)
            if lp is None:
                if pod.get("status", {}).get("phase") in ("Succeeded", "Failed"):
                    continue  # finished before (e.g. by a previous kubelet): leave it as it is
                lp = self.pods[uid] = LocalPod(
                    uid, pod["metadata"]["namespace"], pod["metadata"]["name"], pod
                )
            lp.pod = pod
            if not lp.started and not lp.failed:
                self._start_pod(lp)
            self._supervise(lp)
            self._update_hosts(lp)
            self._report(lp)
        if time.monotonic() - self._last_heartbeat > 30:
            self.register_node()

    # --- pods ------------------------------------------------------------------------------------
    def _start_pod(self, lp: LocalPod) -> None:
        pod = lp.pod
        spec = pod.get("spec", {})
        host_network = bool(spec.get("hostNetwork"))
        if not spec.get("nodeName"):
            try:
                self.api.merge_patch(
                    f"/api/v1/namespaces/{lp.namespace}/pods/{lp.name}", {"spec": {"nodeName": self.node}}
                )
            except ApiError:
                pass
        inits = spec.get("initContainers") or []
        for c in inits:
            lp.init.setdefault(c["name"], ContainerState(spec=c))
        # A pod a previous kubelet ran (this one restarted) keeps counting its restarts.
        before = {st.get("name"): st for st in (pod.get("status") or {}).get("containerStatuses") or []}
        for c in spec.get("containers") or []:
            waiting = ("PodInitializing", "") if inits else ("ContainerCreating", "")
            cs = lp.containers.setdefault(c["name"], ContainerState(spec=c, waiting=waiting))
            old = before.get(c["name"])
            if old and not cs.restart_count and (old.get("restartCount") or old.get("started")):
                cs.restart_count = int(old.get("restartCount") or 0) + 1
        # Resolve every image first: an image outside the catalog fails the Pod before anything runs.
        for cs in [*lp.init.values(), *lp.containers.values()]:
            try:
                self._resolve(lp, cs)
            except ImageError as e:
                lp.failed = (e.reason, e.message)
                cs.waiting = (e.reason, e.message)
                self.event(pod, "Warning", "Failed", e.message)
                return
            except podspec.VolumeError as e:
                lp.pending = ("CreateContainerConfigError", str(e))
                cs.waiting = ("CreateContainerConfigError", str(e))
                return
        try:
            if lp.sandbox is None:
                lp.sandbox = self.runtime.create_sandbox(lp.uid, lp.namespace, lp.name, host_network)
                self.event(
                    pod,
                    "Normal",
                    "Scheduled",
                    f"Successfully assigned {lp.namespace}/{lp.name} to {self.node}",
                    "default-scheduler",
                )
                self._annotate_logs(lp)
            lp.pod.setdefault("status", {})["podIP"] = lp.sandbox.ip or NODE_IP
            lp.pod["status"]["hostIP"] = NODE_IP
            volumes = podspec.prepare_volumes(
                lp.pod,
                lp.sandbox.dir / "volumes",
                self._get_cm,
                self._get_secret,
                self._token,
                self.host_aliases,
            )
        except podspec.VolumeError as e:
            if lp.pending is None or lp.pending[1] != str(e):
                self.event(pod, "Warning", "FailedMount", f"MountVolume.SetUp failed: {e}")
            lp.pending = ("ContainerCreating", str(e))
            for cs in lp.containers.values():
                cs.waiting = ("ContainerCreating", str(e))
            return
        except RuntimeError_ as e:
            lp.failed = ("SandboxFailed", str(e))
            self.event(pod, "Warning", "FailedCreatePodSandBox", str(e))
            return
        lp.pending = None
        lp.volumes = volumes
        lp.started = True
        if lp.init:
            self._launch(lp, next(iter(lp.init.values())))
        else:
            self._start_main(lp)

    def _resolve(self, lp: LocalPod, cs: ContainerState) -> None:
        """The container's program (catalog), env and args; again once the pod has its address."""
        c = cs.spec
        version = (lp.pod["metadata"].get("labels") or {}).get("version") or lp.name
        ports = [p["containerPort"] for p in c.get("ports") or [] if p.get("containerPort")]
        env = podspec.container_env(lp.pod, c, self._get_cm, self._get_secret)
        cs.program = resolve(
            c.get("image", ""), c.get("command"), c.get("args"), env, ports, version, self.ctx
        )
        cs.program.argv = [podspec.expand(a, cs.program.env) for a in cs.program.argv]

    def _launch(self, lp: LocalPod, cs: ContainerState) -> None:
        cs.mounts = podspec.container_mounts(cs.spec, lp.volumes)
        try:
            self._resolve(lp, cs)  # env now sees status.podIP
        except (ImageError, podspec.VolumeError) as e:
            cs.waiting = ("CreateContainerConfigError", str(e))
            self._schedule_restart(lp, cs, ran=0.0)
            return
        self._start_container(lp, cs)

    def _start_main(self, lp: LocalPod) -> None:
        lp.initialized = True
        for cs in lp.containers.values():
            self._launch(lp, cs)

    def _annotate_logs(self, lp: LocalPod) -> None:
        """Tell the API server where each container's log is (it serves pods/log from there)."""
        assert lp.sandbox is not None
        logs = lp.sandbox.dir / "logs"
        spec = lp.pod.get("spec", {})
        names = [c["name"] for c in [*(spec.get("containers") or []), *(spec.get("initContainers") or [])]]
        annotations = {f"{LOG_PATH_ANNOTATION}.{n}": str(logs / f"{n}.log") for n in names}
        if names:
            annotations[LOG_PATH_ANNOTATION] = str(logs / f"{names[0]}.log")
        # Where pods/exec and pods/portforward find the netns and container pids (pod.json).
        annotations[RUNTIME_INFO_ANNOTATION] = str(lp.sandbox.dir / "pod.json")
        try:
            self.api.merge_patch(
                f"/api/v1/namespaces/{lp.namespace}/pods/{lp.name}",
                {"metadata": {"annotations": annotations}},
            )
        except ApiError as e:
            log.warning("log path annotation not written for %s/%s: %s", lp.namespace, lp.name, e)

    def _start_container(self, lp: LocalPod, cs: ContainerState) -> None:
        assert lp.sandbox is not None and cs.program is not None
        spec = ContainerSpec(
            name=cs.spec["name"],
            argv=cs.program.argv,
            env=cs.program.env,
            workdir=cs.spec.get("workingDir") or "/",
            mounts=cs.mounts,
        )
        try:
            if self._use_podman(lp, cs):
                env = podspec.container_env(lp.pod, cs.spec, self._get_cm, self._get_secret)
                cs.current = self.podman.start(lp.sandbox, cs.spec, env, cs.mounts)
                self._write_runtime_file(cs.spec.get("image", ""))
            else:
                cs.current = self.runtime.start_container(lp.sandbox, spec)
        except (OSError, RuntimeError_) as e:
            cs.waiting = ("RunContainerError", str(e))
            self._schedule_restart(lp, cs, ran=0.0)
            return
        cs.waiting = None
        cs.ready = False
        running = {n: c.current for n, c in [*lp.init.items(), *lp.containers.items()] if c.current}
        self.runtime.record_containers(lp.sandbox, running)
        self.event(lp.pod, "Normal", "Started", f"Started container {cs.spec['name']}")

    def _schedule_restart(self, lp: LocalPod, cs: ContainerState, ran: float) -> None:
        cs.backoff = 1.0 if (ran >= 60 or cs.backoff == 0) else min(cs.backoff * 2, BACKOFF_MAX)
        cs.next_start = time.monotonic() + cs.backoff
        name = cs.spec["name"]
        message = f"back-off {cs.backoff:g}s restarting failed container={name} pod={lp.name}_{lp.namespace}"
        cs.waiting = ("CrashLoopBackOff", message)
        self.event(lp.pod, "Warning", "BackOff", f"Back-off restarting failed container {name}")

    def _exited(self, cs: ContainerState) -> tuple[int, float] | None:
        """If the container's process ended: record it (lastState) and return (exit code, seconds ran)."""
        c = cs.current
        if c is None:
            return None
        rc = c.process.poll()
        if rc is None:
            return None
        finished = time.time()
        message = ""
        if rc in (126, 127):  # the launcher's own failure: its last log line says why
            lines = c.log_path.read_text(errors="replace").strip().splitlines() if c.log_path.exists() else []
            message = lines[-1] if lines else ""
        self._stop_container(c, grace=0)
        cs.current = None
        cs.ready = False
        code = 128 - rc if rc < 0 else rc  # killed by signal N -> 128+N, as a shell reports it
        cs.last_terminated = {
            "terminated": {
                "exitCode": code,
                "reason": "Completed" if rc == 0 else "Error",
                **({"message": message} if message else {}),
                "startedAt": ts(c.started_at),
                "finishedAt": ts(finished),
                "containerID": f"sandbox://{c.container_id}",
            }
        }
        return code, finished - c.started_at

    def _restart_due(self, lp: LocalPod, cs: ContainerState) -> None:
        if cs.current is None and not cs.done and cs.next_start and time.monotonic() >= cs.next_start:
            cs.restart_count += 1
            cs.next_start = 0.0
            self._launch(lp, cs)

    def _supervise(self, lp: LocalPod) -> None:
        if not lp.started or lp.failed:
            return
        policy = lp.pod.get("spec", {}).get("restartPolicy") or "Always"
        if not lp.initialized:
            self._supervise_init(lp, policy)
            return
        for cs in lp.containers.values():
            if cs.current is not None and cs.current.process.poll() is None:
                cs.ready = self._probe(lp, cs)
                continue
            ended = self._exited(cs)
            if ended is not None:
                code, ran = ended
                if policy == "Always" or (policy == "OnFailure" and code != 0):
                    self._schedule_restart(lp, cs, ran=ran)
                else:
                    cs.done = True
                    cs.waiting = None
            self._restart_due(lp, cs)

    def _supervise_init(self, lp: LocalPod, policy: str) -> None:
        """initContainers run one at a time, each to success, before the app containers start."""
        cs = next((c for c in lp.init.values() if not c.done), None)
        if cs is None:
            self._start_main(lp)
            return
        ended = self._exited(cs)
        if ended is not None:
            code, ran = ended
            if code == 0:
                cs.done, cs.waiting = True, None
                following = next((c for c in lp.init.values() if not c.done), None)
                if following is not None:
                    self._launch(lp, following)
                else:
                    self._start_main(lp)
                return
            if policy == "Never":
                cs.done = True
                lp.failed = ("Init:Error", f"init container {cs.spec['name']} exited with {code}")
                return
            self._schedule_restart(lp, cs, ran=ran)
        self._restart_due(lp, cs)

    def _probe(self, lp: LocalPod, cs: ContainerState) -> bool:
        target = podspec.probe_target(cs.spec.get("readinessProbe"), cs.spec)
        if target is None:
            return True
        kind, port, path = target
        host = (lp.sandbox.ip if lp.sandbox else None) or "127.0.0.1"
        netns = lp.sandbox.netns_path if lp.sandbox else None
        result: list[bool] = []

        def attempt() -> None:
            try:
                if netns:
                    from sandbox.kubelet.launch import CLONE_NEWNET, setns

                    setns(netns, CLONE_NEWNET)  # this thread only; it ends right after
                with socket.create_connection((host, port), timeout=1.0) as s:
                    if kind == "http":
                        s.sendall(f"GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
                        head = s.recv(64).decode(errors="replace").split()
                        result.append(len(head) > 1 and head[1].isdigit() and 200 <= int(head[1]) < 400)
                    else:
                        result.append(True)
            except OSError:
                result.append(False)

        t = threading.Thread(target=attempt, daemon=True)
        t.start()
        t.join(2.0)
        return bool(result and result[0])

    @staticmethod
    def _grace(lp: LocalPod) -> float:
        """terminationGracePeriodSeconds, capped at GRACE_MAX so deletes stay quick in the sandbox."""
        value = lp.pod.get("spec", {}).get("terminationGracePeriodSeconds")
        return min(float(value if value is not None else 30), GRACE_MAX)

    def _stop_pod(self, lp: LocalPod, delete_object: bool) -> None:
        for cs in [*lp.init.values(), *lp.containers.values()]:
            if cs.current is not None:
                self.event(lp.pod, "Normal", "Killing", f"Stopping container {cs.spec['name']}")
                self._stop_container(cs.current, grace=self._grace(lp))
                cs.current = None
        if lp.sandbox is not None:
            self.runtime.remove_sandbox(lp.sandbox)
        self.pods.pop(lp.uid, None)
        if delete_object:
            try:
                self.api.delete(f"/api/v1/namespaces/{lp.namespace}/pods/{lp.name}")
            except ApiError:
                pass

    def _update_hosts(self, lp: LocalPod) -> None:
        if lp.sandbox is None:
            return
        services = [
            (s["metadata"]["name"], s["metadata"]["namespace"], s.get("spec", {}).get("clusterIP", ""))
            for s in self._services
        ]
        loopback = (
            [f"{n}.{ns}" for n, ns, _ in services if ns == "istio-system" and n.startswith("istiod")]
            if lp.sandbox.host_network
            else []
        )
        self.runtime.write_hosts(
            lp.sandbox, render_hosts(lp.sandbox.ip, lp.name, lp.namespace, services, loopback)
        )

    # --- status ----------------------------------------------------------------------------------
    def _container_status(self, cs: ContainerState) -> dict:
        c = cs.current
        if c is not None:
            state = {"running": {"startedAt": ts(c.started_at)}}
        elif cs.done and cs.last_terminated:
            state = cs.last_terminated
        else:
            reason, message = cs.waiting or ("ContainerCreating", "")
            state = {"waiting": {"reason": reason, **({"message": message} if message else {})}}
        status = {
            "name": cs.spec["name"],
            "image": cs.spec.get("image", ""),
            "imageID": "",
            "ready": bool(c is not None and cs.ready),
            "started": c is not None,
            "restartCount": cs.restart_count,
            "state": state,
            "lastState": (cs.last_terminated if not cs.done else None) or {},
        }
        if c is not None:
            status["containerID"] = f"sandbox://{c.container_id}"
        return status

    def _phase(self, lp: LocalPod) -> str:
        if lp.failed:
            return "Failed"
        if not lp.initialized:
            return "Pending"
        states = list(lp.containers.values())
        if states and all(cs.done for cs in states):
            ok = all((cs.last_terminated or {}).get("terminated", {}).get("exitCode") == 0 for cs in states)
            return "Succeeded" if ok else "Failed"
        if any(cs.current is not None or cs.restart_count or cs.last_terminated for cs in states):
            return "Running"
        return "Pending"

    def _condition(self, lp: LocalPod, type_: str, ok: bool, reason: str | None = None) -> dict:
        status = "True" if ok else "False"
        prev = lp.transitions.get(type_)
        if prev is None or prev[0] != status:
            lp.transitions[type_] = (status, now())
        cond = {
            "type": type_,
            "status": status,
            "lastProbeTime": None,
            "lastTransitionTime": lp.transitions[type_][1],
        }
        if reason and not ok:
            cond["reason"] = reason
        return cond

    def _report(self, lp: LocalPod) -> None:
        phase = self._phase(lp)
        statuses = [self._container_status(cs) for cs in lp.containers.values()]
        ready = phase == "Running" and bool(statuses) and all(s["ready"] for s in statuses)
        status: dict = {
            "phase": phase,
            "hostIP": NODE_IP,
            "startTime": lp.start_time,
            "qosClass": "BestEffort",
            "conditions": [
                self._condition(lp, "PodScheduled", True),
                self._condition(lp, "Initialized", lp.initialized, "ContainersNotInitialized"),
                self._condition(lp, "ContainersReady", ready, "ContainersNotReady"),
                self._condition(lp, "Ready", ready, "ContainersNotReady"),
            ],
            "containerStatuses": statuses,
        }
        if lp.init:
            init_statuses = [self._container_status(cs) for cs in lp.init.values()]
            for st, cs in zip(init_statuses, lp.init.values(), strict=True):
                st["ready"] = cs.done  # an init container is ready once it completed
            status["initContainerStatuses"] = init_statuses
        if lp.sandbox is not None:
            ip = lp.sandbox.ip or NODE_IP
            status["podIP"] = ip
            status["podIPs"] = [{"ip": ip}]
        if lp.failed:
            status["reason"], status["message"] = lp.failed
        encoded = json.dumps(status, sort_keys=True)
        if encoded == lp.sent_status:
            return
        try:
            self.api.merge_patch(
                f"/api/v1/namespaces/{lp.namespace}/pods/{lp.name}/status", {"status": status}
            )
            lp.sent_status = encoded
        except ApiError as e:
            if e.status != 404:
                log.warning("status of %s/%s not written: %s", lp.namespace, lp.name, e)


def choose_daemon_runtime(bpffs: str) -> tuple[str, str]:
    """("podman"|"auto"|"process", why). $KMESH_SANDBOX_DAEMON_RUNTIME: auto (default), podman, process.

    auto runs the daemon pod in podman whenever its image is in podman's storage (`make image`).
    Podman needs the sandbox's private bpffs: pins made in a container must not land in the
    machine's /sys/fs/bpf.
    """
    wanted = os.environ.get("KMESH_SANDBOX_DAEMON_RUNTIME", "auto")
    if wanted not in ("auto", "podman", "process"):
        raise RuntimeError_(f"KMESH_SANDBOX_DAEMON_RUNTIME={wanted!r}: use auto, podman or process")
    if wanted == "process":
        return "process", "KMESH_SANDBOX_DAEMON_RUNTIME=process"
    if os.environ.get("KMESH_SANDBOX_DAEMON_COMMAND"):
        return "process", "KMESH_SANDBOX_DAEMON_COMMAND is set (development override)"
    if not podman.available():
        return "process", "podman is not installed"
    if bpffs == "/sys/fs/bpf":
        return "process", "/sys/fs/bpf is the machine's bpffs (podman mode needs the sandbox's private one)"
    return wanted, "image present" if wanted == "auto" else "KMESH_SANDBOX_DAEMON_RUNTIME=podman"
