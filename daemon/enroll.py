"""Which pods on this node are managed, and registering their network namespaces.

Why here and not in a CNI plugin: the daemon must converge by itself after a restart (and
for pods that existed before it), so enrollment is a level-triggered controller: the desired
set comes from the pod and namespace labels watched through the Kubernetes API, the
registration is an idempotent control connect from inside the pod's netns, and the pod
annotation ``kmesh.net/redirection: enabled`` records the result for users and tools.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from daemon.kube import ApiError, KubeClient, Watch, pod_path

log = logging.getLogger("daemon.enroll")

MODE_LABEL = "istio.io/dataplane-mode"
MODE_KMESH = "kmesh"
MODE_NONE = "none"
WAYPOINT_LABEL = "gateway.istio.io/managed"
WAYPOINT_VALUE = "istio.io-mesh-controller"
REDIRECT_ANNOTATION = "kmesh.net/redirection"
REDIRECT_ENABLED = "enabled"
SIDECAR_CONTAINER = "istio-proxy"


@dataclass(frozen=True)
class PodInfo:
    """The fields of a Pod that enrollment looks at (from the API's JSON)."""

    uid: str
    name: str
    namespace: str
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    host_network: bool = False
    containers: tuple[str, ...] = ()
    phase: str = ""
    pod_ips: tuple[str, ...] = ()
    node_name: str = ""
    terminating: bool = False

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> PodInfo:
        meta = obj.get("metadata") or {}
        spec = obj.get("spec") or {}
        status = obj.get("status") or {}
        names = [c.get("name", "") for c in (spec.get("containers") or [])]
        names += [c.get("name", "") for c in (spec.get("initContainers") or [])]
        ips = [p.get("ip", "") for p in (status.get("podIPs") or []) if p.get("ip")]
        if not ips and status.get("podIP"):
            ips = [status["podIP"]]
        return cls(
            uid=meta.get("uid", ""),
            name=meta.get("name", ""),
            namespace=meta.get("namespace", ""),
            labels=dict(meta.get("labels") or {}),
            annotations=dict(meta.get("annotations") or {}),
            host_network=bool(spec.get("hostNetwork")),
            containers=tuple(names),
            phase=status.get("phase", ""),
            pod_ips=tuple(ips),
            node_name=spec.get("nodeName", ""),
            terminating=bool(meta.get("deletionTimestamp")),
        )

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def ipv6_only(self) -> bool:
        return bool(self.pod_ips) and all(":" in ip for ip in self.pod_ips)


def should_enroll(pod: PodInfo, namespace_labels: dict[str, str] | None) -> tuple[bool, str]:
    """(managed?, why). The rules of Kmesh's ``ShouldEnroll``: the pod label wins over the
    namespace label, ``none`` opts out, and pods that cannot or must not be redirected
    (host network, Istio sidecar, waypoint) are never managed."""
    if pod.host_network:
        return False, "hostNetwork pod"
    if SIDECAR_CONTAINER in pod.containers:
        return False, "has an istio-proxy sidecar"
    if pod.labels.get(WAYPOINT_LABEL) == WAYPOINT_VALUE:
        return False, "waypoint pod"
    pod_mode = pod.labels.get(MODE_LABEL, "").strip().lower()
    if pod_mode == MODE_KMESH:
        return True, "pod label"
    if pod_mode == MODE_NONE:
        return False, "pod label none"
    ns_mode = (namespace_labels or {}).get(MODE_LABEL, "").strip().lower()
    if ns_mode == MODE_KMESH:
        return True, "namespace label"
    return False, "not labelled"


_UUID = re.compile(r"[0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12}")


def find_pod_pids(proc_root: Path, uids: Iterable[str]) -> dict[str, int]:
    """Pod UID -> the lowest pid whose cgroup path names that UID.

    Kubelets put the pod UID in the cgroup path, with ``-`` (cgroupfs driver:
    ``kubepods/burstable/pod<uid>``) or ``_`` (systemd driver: ``kubepods-pod<uid_>.slice``);
    one pass over ``<proc_root>/*/cgroup`` serves every UID asked for. UUID-shaped UIDs are
    matched by extracting UUIDs from the path (linear in processes); others by substring.
    """
    wanted = {uid.lower().replace("_", "-"): uid for uid in uids}
    uuid_like = {k: v for k, v in wanted.items() if _UUID.fullmatch(k)}
    other = {k: v for k, v in wanted.items() if k not in uuid_like}
    found: dict[str, int] = {}
    if not wanted:
        return found
    try:
        pids = sorted(int(e) for e in os.listdir(proc_root) if e.isdigit())
    except OSError:
        return found
    for pid in pids:
        try:
            text = (proc_root / str(pid) / "cgroup").read_text()
        except OSError:
            continue
        if uuid_like:
            for match in _UUID.findall(text.lower()):
                uid = uuid_like.get(match.replace("_", "-"))
                if uid is not None and uid not in found:
                    found[uid] = pid
        for key, uid in other.items():
            if uid not in found and (key in text or key.replace("-", "_") in text):
                found[uid] = pid
        if len(found) == len(wanted):
            break
    return found


def netns_path(proc_root: Path, pid: int) -> Path:
    return proc_root / str(pid) / "ns" / "net"


def netns_inode(path: Path) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


@dataclass
class EnrolledPod:
    """A pod whose netns is registered in the manage map."""

    uid: str
    namespace: str
    name: str
    ips: tuple[str, ...]
    pid: int
    netns: str
    netns_inode: int
    netns_cookie: int
    since: float
    fd: int = -1  # held open so the netns outlives the pod until we deregistered it

    @property
    def held_path(self) -> Path | None:
        """A path to the enrolled netns that stays valid while we hold it (pod gone or not)."""
        return Path(f"/proc/{os.getpid()}/fd/{self.fd}") if self.fd >= 0 else None

    def release(self) -> None:
        if self.fd >= 0:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = -1

    def as_dict(self) -> dict[str, Any]:
        return {"namespace": self.namespace, "name": self.name, "uid": self.uid, "ips": list(self.ips),
                "netns": self.netns, "netns_cookie": self.netns_cookie,
                "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.since))}


ControlConnect = Callable[..., None]
NetnsCookie = Callable[[str | Path], int]


class EnrollmentController:
    """Watches namespaces and this node's pods; converges the manage map and annotations."""

    def __init__(
        self,
        api_client: KubeClient,
        node_name: str,
        proc_root: Path,
        control_connect: ControlConnect | None = None,
        netns_cookie: NetnsCookie | None = None,
        resync_seconds: float = 30.0,
    ) -> None:
        if control_connect is None or netns_cookie is None:
            from daemon import dataplane

            control_connect = control_connect or dataplane.control_connect
            netns_cookie = netns_cookie or dataplane.netns_cookie
        self._api = api_client
        self.node_name = node_name
        self.proc_root = proc_root
        self._control_connect = control_connect
        self._netns_cookie = netns_cookie
        self._resync = resync_seconds
        self._lock = threading.Condition()
        self._namespaces: dict[str, dict[str, str]] = {}
        self._pods: dict[str, PodInfo] = {}
        self._enrolled: dict[str, EnrolledPod] = {}
        self._pending: set[str] = set()
        self._retry_at: dict[str, float] = {}
        self._attempts: dict[str, int] = {}
        self._errors: dict[str, str] = {}
        self._synced = {"namespaces": False, "pods": False}
        self._converged = False
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._watchers: list[Any] = []

    # ----- public view -------------------------------------------------------------------
    def enrolled(self) -> list[EnrolledPod]:
        with self._lock:
            return sorted(self._enrolled.values(), key=lambda p: (p.namespace, p.name))

    def by_cookie(self, cookie: int) -> EnrolledPod | None:
        with self._lock:
            for pod in self._enrolled.values():
                if pod.netns_cookie == cookie:
                    return pod
        return None

    def find(self, namespace: str, name: str) -> EnrolledPod | None:
        with self._lock:
            for pod in self._enrolled.values():
                if pod.namespace == namespace and pod.name == name:
                    return pod
        return None

    def pod(self, namespace: str, name: str) -> PodInfo | None:
        with self._lock:
            for pod in self._pods.values():
                if pod.namespace == namespace and pod.name == name:
                    return pod
        return None

    @property
    def ready(self) -> bool:
        return self._converged

    def status(self) -> dict[str, Any]:
        with self._lock:
            enrolled = sorted(self._enrolled.values(), key=lambda p: (p.namespace, p.name))
            namespaces = sorted(n for n, labels in self._namespaces.items()
                                if labels.get(MODE_LABEL, "").lower() == MODE_KMESH)
            waiting = sorted(self._pods[u].key for u in self._retry_at if u in self._pods)
            return {
                "node": self.node_name,
                "synced": all(self._synced.values()),
                "converged": self._converged,
                "namespaces": namespaces,
                "pods": [p.as_dict() for p in enrolled],
                "waiting": waiting,
                "errors": dict(sorted(self._errors.items())),
            }

    # ----- lifecycle ---------------------------------------------------------------------
    def start(self) -> None:
        ns_watch = ListWatcher("namespaces", self._api, "/api/v1/namespaces", {}, self._on_namespace,
                               self._stop, on_synced=lambda: self._mark_synced("namespaces"))
        pod_watch = ListWatcher("pods", self._api, "/api/v1/pods",
                                {"fieldSelector": f"spec.nodeName={self.node_name}"}, self._on_pod,
                                self._stop, on_synced=lambda: self._mark_synced("pods"))
        self._watchers = [ns_watch, pod_watch]
        for target, name in ((ns_watch.run, "enroll-ns-watch"), (pod_watch.run, "enroll-pod-watch"),
                             (self._worker, "enroll-worker")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()
        for w in self._watchers:
            w.stop()
        with self._lock:
            self._lock.notify_all()
        for thread in self._threads:
            thread.join(timeout=2)

    # ----- watch callbacks ---------------------------------------------------------------
    def _mark_synced(self, what: str) -> None:
        with self._lock:
            self._synced[what] = True
            self._pending.update(self._pods)
            self._lock.notify_all()

    def _on_namespace(self, kind: str, obj: dict[str, Any]) -> None:
        meta = obj.get("metadata") or {}
        name = meta.get("name", "")
        with self._lock:
            old = self._namespaces.get(name)
            if kind == "DELETED":
                self._namespaces.pop(name, None)
            else:
                self._namespaces[name] = dict(meta.get("labels") or {})
            new = self._namespaces.get(name)
            if (old or {}).get(MODE_LABEL) != (new or {}).get(MODE_LABEL):
                self._pending.update(u for u, p in self._pods.items() if p.namespace == name)
                self._lock.notify_all()

    def _on_pod(self, kind: str, obj: dict[str, Any]) -> None:
        pod = PodInfo.from_json(obj)
        if not pod.uid:
            return
        with self._lock:
            if kind == "DELETED":
                self._pods.pop(pod.uid, None)
            else:
                self._pods[pod.uid] = pod
            self._pending.add(pod.uid)
            self._lock.notify_all()

    # ----- reconcile ---------------------------------------------------------------------
    def _worker(self) -> None:
        next_resync = time.monotonic() + self._resync
        while not self._stop.is_set():
            with self._lock:
                now = time.monotonic()
                due = [u for u, t in self._retry_at.items() if t <= now]
                for uid in due:
                    del self._retry_at[uid]
                self._pending.update(due)
                if now >= next_resync:
                    self._pending.update(self._pods)
                    self._pending.update(self._enrolled)
                    next_resync = now + self._resync
                if not self._pending or not all(self._synced.values()):
                    wake = min([next_resync, *self._retry_at.values()]) - now
                    self._lock.wait(timeout=max(0.05, min(wake, 1.0)))
                    continue
                batch = self._pending
                self._pending = set()
            try:
                self.reconcile(batch)
            except Exception:  # noqa: BLE001 - keep the controller alive, retry the batch
                log.exception("enrollment pass failed")
                with self._lock:
                    for uid in batch:
                        self._retry_at.setdefault(uid, time.monotonic() + 2.0)
            with self._lock:
                if not self._pending and not self._retry_at and all(self._synced.values()):
                    if not self._converged:
                        log.info("enrollment converged", extra={"enrolled": len(self._enrolled)})
                    self._converged = True

    def reconcile(self, uids: Iterable[str]) -> None:
        """Bring each named pod to its desired state; one /proc scan for the whole batch."""
        plans: list[tuple[str, PodInfo | None, bool]] = []
        with self._lock:
            for uid in uids:
                pod = self._pods.get(uid)
                want = False
                if pod is not None and pod.phase not in ("Succeeded", "Failed"):
                    ns_labels = self._namespaces.get(pod.namespace)
                    want, _ = should_enroll(pod, ns_labels)
                    # A terminating pod keeps what it has (its connections while draining stay
                    # translated) but is not newly enrolled; it is deregistered once deleted.
                    want = want and (not pod.terminating or uid in self._enrolled)
                plans.append((uid, pod, want))
        need_scan = []
        for uid, pod, want in plans:
            current = self._enrolled.get(uid)
            if want and current is not None and netns_inode(Path(current.netns)) == current.netns_inode:
                continue
            if pod is not None and not pod.terminating:
                need_scan.append(uid)
        pids = find_pod_pids(self.proc_root, need_scan) if need_scan else {}
        for uid, pod, want in plans:
            try:
                if want and pod is not None:
                    self._enroll(pod, pids.get(uid))
                else:
                    self._unenroll(uid, pod, pids.get(uid))
                with self._lock:
                    self._errors.pop(uid, None)
            except Exception as exc:  # noqa: BLE001 - one pod must not stop the others
                name = pod.key if pod else uid
                log.warning("enrollment of pod failed; will retry", extra={"pod": name, "error": str(exc)})
                self._schedule_retry(uid, f"{name}: {exc}")

    def _schedule_retry(self, uid: str, error: str | None = None) -> None:
        with self._lock:
            attempts = self._attempts.get(uid, 0) + 1
            self._attempts[uid] = attempts
            self._retry_at[uid] = time.monotonic() + min(0.25 * 2 ** min(attempts, 6), 10.0)
            if error:
                self._errors[uid] = error

    def _enroll(self, pod: PodInfo, pid: int | None) -> None:
        current = self._enrolled.get(pod.uid)
        if current is not None and netns_inode(Path(current.netns)) == current.netns_inode:
            self._annotate(pod, True)
            return
        if current is not None:
            # Same pod, new network namespace (sandbox recreated): deregister the old one first.
            self._deregister(current, pod.ipv6_only)
            with self._lock:
                self._enrolled.pop(pod.uid, None)
        if pid is None:
            # Not running yet (or its processes are gone): retry until they appear.
            log.debug("pod has no process yet", extra={"pod": pod.key})
            self._schedule_retry(pod.uid)
            return
        path = netns_path(self.proc_root, pid)
        inode = netns_inode(path)
        if inode is None:
            self._schedule_retry(pod.uid)
            return
        fd = os.open(path, os.O_RDONLY)
        if os.fstat(fd).st_ino != inode:  # the process moved or exited meanwhile: look again
            os.close(fd)
            self._schedule_retry(pod.uid)
            return
        entry = EnrolledPod(uid=pod.uid, namespace=pod.namespace, name=pod.name, ips=pod.pod_ips, pid=pid,
                            netns=str(path), netns_inode=inode, netns_cookie=0, since=time.time(), fd=fd)
        try:
            self._control_connect(entry.held_path, True, ipv6=pod.ipv6_only)
            entry.netns_cookie = self._netns_cookie(entry.held_path)
        except BaseException:
            entry.release()
            raise
        with self._lock:
            self._enrolled[pod.uid] = entry
            self._attempts.pop(pod.uid, None)
        self._annotate(pod, True)
        log.info("pod enrolled", extra={"pod": pod.key, "netns_cookie": entry.netns_cookie})

    def _deregister(self, entry: EnrolledPod, ipv6: bool) -> None:
        """Disable translation for an enrolled netns we still hold (even if its pod is gone)."""
        path = entry.held_path
        try:
            if path is not None:
                self._control_connect(path, False, ipv6=ipv6)
        finally:
            entry.release()

    def _unenroll(self, uid: str, pod: PodInfo | None, pid: int | None) -> None:
        with self._lock:
            current = self._enrolled.get(uid)
        annotated = pod is not None and pod.annotations.get(REDIRECT_ANNOTATION) == REDIRECT_ENABLED
        if current is None and not annotated:
            return
        ipv6 = pod.ipv6_only if pod else False
        if current is not None and current.fd >= 0:
            self._deregister(current, ipv6)
        elif pid is not None and pod is not None and not pod.terminating:
            # Annotated by an earlier daemon run, never registered by this one: disable via /proc.
            try:
                self._control_connect(netns_path(self.proc_root, pid), False, ipv6=ipv6)
            except (OSError, ValueError) as exc:
                if not isinstance(exc, ValueError) and exc.errno not in (errno.ENOENT, errno.ESRCH):
                    raise
        if pod is not None and not pod.terminating and annotated:
            self._annotate(pod, False)
        with self._lock:
            self._enrolled.pop(uid, None)
            self._attempts.pop(uid, None)
        if current is not None or annotated:
            log.info("pod unenrolled", extra={"pod": pod.key if pod else current.name if current else uid})

    def _annotate(self, pod: PodInfo, enabled: bool) -> None:
        has = pod.annotations.get(REDIRECT_ANNOTATION) == REDIRECT_ENABLED
        if has == enabled:
            return
        body = {"metadata": {"annotations": {REDIRECT_ANNOTATION: REDIRECT_ENABLED if enabled else None}}}
        try:
            self._api.merge_patch(pod_path(pod.namespace, pod.name), body)
        except ApiError as exc:
            if exc.status == 404:
                return
            raise


class ListWatcher:
    """List, then watch from the list's resourceVersion; re-list on 410 Gone or errors.

    Events arrive as the API's plain dicts. A re-list synthesizes DELETED for objects that
    vanished meanwhile. ``query`` (e.g. a fieldSelector) applies to both the list and the watch.
    """

    def __init__(self, what: str, api: KubeClient, path: str, query: dict[str, str],
                 on_event: Callable[[str, dict[str, Any]], None], stop: threading.Event,
                 on_synced: Callable[[], None] | None = None, watch_timeout: int = 240) -> None:
        self.what = what
        self._api = api
        self._path = path
        self._query = query
        self._on_event = on_event
        self._stop = stop
        self._on_synced = on_synced
        self._timeout = watch_timeout
        self._known: dict[str, dict[str, Any]] = {}
        self._watch: Watch | None = None

    def stop(self) -> None:
        if self._watch is not None:
            self._watch.stop()

    def _relist(self) -> str:
        data = self._api.list(self._path, **self._query) or {}
        items = data.get("items") or []
        rv = (data.get("metadata") or {}).get("resourceVersion", "")
        seen: dict[str, dict[str, Any]] = {}
        for item in items:
            uid = (item.get("metadata") or {}).get("uid") or (item.get("metadata") or {}).get("name", "")
            seen[uid] = item
        for uid, old in list(self._known.items()):
            if uid not in seen:
                self._on_event("DELETED", old)
        for item in items:
            self._on_event("ADDED", item)
        self._known = seen
        return rv

    def run(self) -> None:
        backoff = 0.5
        rv = ""
        need_list = True
        while not self._stop.is_set():
            try:
                if need_list:
                    rv = self._relist()
                    need_list = False
                    if self._on_synced:
                        self._on_synced()
                        self._on_synced = None
                self._watch = self._api.watch(self._path, rv, self._timeout, **self._query)
                if self._stop.is_set():  # stop() ran before this watch existed
                    self._watch.stop()
                for kind, obj in self._watch:
                    if self._stop.is_set():
                        break
                    meta = obj.get("metadata") or {}
                    if meta.get("resourceVersion"):
                        rv = meta["resourceVersion"]
                    if kind in ("ADDED", "MODIFIED", "DELETED"):
                        uid = meta.get("uid") or meta.get("name", "")
                        if kind == "DELETED":
                            self._known.pop(uid, None)
                        else:
                            self._known[uid] = obj
                        self._on_event(kind, obj)
                backoff = 0.5
            except ApiError as exc:
                if self._stop.is_set():
                    break
                if exc.status == 410:
                    log.info("watch expired; re-listing", extra={"resource": self.what})
                else:
                    log.warning("watch failed",
                                extra={"resource": self.what, "error": str(exc)})
                    self._stop.wait(backoff)
                    backoff = min(backoff * 2, 10.0)
                need_list = True
            except Exception as exc:  # noqa: BLE001 - network errors: back off, re-list
                if self._stop.is_set():
                    break
                log.warning("watch failed",
                            extra={"resource": self.what, "error": str(exc) or type(exc).__name__})
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 10.0)
                need_list = True
