"""Connection events: one thread drains the data plane's ring buffer and fans out.

Why one thread: the ring buffer has a single consumer; metrics and every ``/debug/trace``
stream see the same events, each trace subscriber through its own bounded queue so a slow
client drops its own events (counted) instead of stalling the metrics or the kernel side.
The monitoring switch (``Dataplane.set_monitoring``) gates the consumers too: with access logs
off no trace stream or debug log sees an event, with connection metrics off no metrics sink
does; the reader itself keeps running, so switching back on needs no restart.
The ``NameResolver`` turns the kernel's cookies, addresses and uids back into pod and
service names, from the daemon's state, for traces and metric labels.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, is_dataclass
from typing import Any

log = logging.getLogger("daemon.dataplane.events")
# km_config.mon_off bits (daemon/dataplane/layout.py MON_*; not imported: no BPF code here)
MON_ACCESSLOG = 1
MON_METRICS = 2
bpf_log = logging.getLogger("daemon.bpf")


def event_dict(event: Any) -> dict[str, Any]:
    """A ConnEvent (dataclass) or a dict, as a plain dict."""
    if is_dataclass(event):
        return asdict(event)  # type: ignore[arg-type]
    return dict(event)


class Subscription:
    """A bounded queue of events matching one filter (one trace client)."""

    def __init__(self, match: Callable[[Any], bool], maxsize: int = 4096) -> None:
        self.match = match
        self.queue: queue.Queue[Any] = queue.Queue(maxsize=maxsize)
        self.dropped = 0

    def offer(self, event: Any) -> None:
        try:
            self.queue.put_nowait(event)
        except queue.Full:
            self.dropped += 1

    def get(self, timeout: float) -> Any | None:
        try:
            return self.queue.get(timeout=timeout)
        except queue.Empty:
            return None


class EventHub:
    """Polls ``dataplane.poll_events`` on one thread; calls sinks and feeds subscriptions."""

    def __init__(self, dataplane: Any, log_events: bool = False) -> None:
        self._dataplane = dataplane
        self._sinks: list[tuple[Callable[[Any], None], int]] = []
        self._subs: list[Subscription] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._log_events = log_events
        self.events_total = 0
        self.errors = 0

    def add_sink(self, sink: Callable[[Any], None], monitoring: int = 0) -> None:
        """monitoring: the MON_* bit whose switch turns this sink off (0: always called)."""
        self._sinks.append((sink, monitoring))

    def _mon_off(self) -> int:
        return getattr(self._dataplane, "mon_off", 0) or 0

    def subscribe(self, match: Callable[[Any], bool], maxsize: int = 4096) -> Subscription:
        sub = Subscription(match, maxsize)
        with self._lock:
            self._subs.append(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        with self._lock:
            if sub in self._subs:
                self._subs.remove(sub)

    @property
    def subscribers(self) -> int:
        with self._lock:
            return len(self._subs)

    def dispatch(self, event: Any) -> None:
        """Deliver one event (called from the poll thread; public for tests of the fan-out)."""
        self.events_total += 1
        off = self._mon_off()
        if self._log_events and not off & MON_ACCESSLOG and bpf_log.isEnabledFor(logging.DEBUG):
            bpf_log.debug("connection event", extra=event_dict(event))
        for sink, bit in self._sinks:
            if off & bit:
                continue
            try:
                sink(event)
            except Exception:  # noqa: BLE001 - a sink bug must not stop the event stream
                self.errors += 1
                log.exception("event sink failed")
        if off & MON_ACCESSLOG:
            return
        with self._lock:
            subs = list(self._subs)
        for sub in subs:
            try:
                if sub.match(event):
                    sub.offer(event)
            except Exception:  # noqa: BLE001
                self.errors += 1

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="events", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._dataplane.poll_events(self.dispatch, timeout_ms=100)
            except Exception:  # noqa: BLE001 - keep polling; log once per burst
                self.errors += 1
                log.exception("polling connection events failed")
                self._stop.wait(1.0)


class NameResolver:
    """Workload/service names for uids, IPs and VIPs, indexed lazily from the State.

    The index is rebuilt at most once per ``min_interval`` seconds and only after the State
    reported a change, so resolving an event costs a dict lookup even at 10k workloads.
    """

    def __init__(self, state: Any, enroll: Any = None, min_interval: float = 0.5) -> None:
        self._state = state
        self._enroll = enroll
        self._min_interval = min_interval
        self._dirty = True
        self._built_at = 0.0
        self._lock = threading.Lock()
        self._by_ip: dict[str, str] = {}
        self._by_pod: dict[tuple[str, str], str] = {}
        self._vips: dict[str, str] = {}
        self._details: dict[str, tuple[bytes, dict[str, Any]]] = {}
        if state is not None and hasattr(state, "subscribe"):
            state.subscribe(self._on_change)

    def _on_change(self, _change: Any) -> None:
        self._dirty = True

    def _refresh(self) -> None:
        if not self._dirty or self._state is None:
            return
        now = time.monotonic()
        if now - self._built_at < self._min_interval:
            return
        import ipaddress

        self._dirty = False
        self._built_at = now
        by_ip: dict[str, str] = {}
        by_pod: dict[tuple[str, str], str] = {}
        vips: dict[str, str] = {}
        for uid, w in list(getattr(self._state, "workloads", {}).items()):
            for addr in w.addresses:
                by_ip[str(ipaddress.ip_address(addr))] = uid
            by_pod[(w.namespace, w.name)] = uid
        for name, s in list(getattr(self._state, "services", {}).items()):
            for vip in s.vips:
                vips[str(ipaddress.ip_address(vip))] = name
        self._by_ip, self._by_pod, self._vips = by_ip, by_pod, vips
        workloads = getattr(self._state, "workloads", {})
        for uid in [u for u in self._details if u not in workloads]:  # churned pods: drop their names
            self._details.pop(uid, None)

    def workload_uid(self, ip: str = "", namespace: str = "", name: str = "") -> str:
        with self._lock:
            self._refresh()
            if namespace and name and (namespace, name) in self._by_pod:
                return self._by_pod[(namespace, name)]
            return self._by_ip.get(ip, "")

    def service_for_vip(self, ip: str) -> str:
        with self._lock:
            self._refresh()
            return self._vips.get(ip, "")

    def workload(self, uid: str) -> dict[str, Any]:
        """Telemetry fields of a workload (name, namespace, workloadName, canonical*, ...)."""
        if not uid or self._state is None:
            return {}
        rec = getattr(self._state, "workloads", {}).get(uid)
        if rec is None:
            return {}
        cached = self._details.get(uid)
        if cached is not None and cached[0] is rec.raw:
            return cached[1]
        info: dict[str, Any] = {"uid": uid, "name": rec.name, "namespace": rec.namespace,
                                "workloadName": rec.name, "canonicalName": rec.name, "canonicalRevision": "",
                                "serviceAccount": "", "trustDomain": "cluster.local",
                                "clusterId": getattr(rec, "cluster_id", "")}
        if rec.raw:
            try:
                from daemon.xds import dump

                full = dump.workload_json(dump.wl.Address.FromString(rec.raw).workload)
                for key in ("workloadName", "canonicalName", "canonicalRevision", "serviceAccount",
                            "trustDomain", "clusterId"):
                    if full.get(key):
                        info[key] = full[key]
            except Exception:  # noqa: BLE001 - names are best effort; fall back to the pod name
                pass
        self._details[uid] = (rec.raw, info)
        return info

    def enrich(self, event: Any) -> dict[str, Any]:
        """One event as a trace record: kernel fields plus source pod, service, backend pod."""
        ev = event_dict(event)
        src = self._enroll.by_cookie(ev.get("netns_cookie", 0)) if self._enroll is not None else None
        service = ev.get("service") or self.service_for_vip(ev.get("orig_ip", ""))
        backend_uid = ev.get("backend_uid") or (
            self.workload_uid(ip=ev.get("backend_ip", "")) if ev.get("backend_ip") else "")
        backend = self.workload(backend_uid)
        ts = ev.get("ts_ns", 0)
        wall = time.time() if not ts else _mono_to_wall(ts)
        record: dict[str, Any] = {
            "time": _iso(wall),
            "kind": ev.get("kind", ""),
            "verdict": ev.get("verdict", ""),
            "source": {"namespace": src.namespace if src else "", "pod": src.name if src else "",
                       "netns_cookie": ev.get("netns_cookie", 0)},
            "original": {"ip": ev.get("orig_ip", ""), "port": ev.get("orig_port", 0), "service": service},
            "backend": {"ip": ev.get("backend_ip", ""), "port": ev.get("backend_port", 0),
                        "namespace": backend.get("namespace", ""), "pod": backend.get("name", ""),
                        "uid": backend_uid},
            "sock_cookie": ev.get("sock_cookie", 0),
        }
        if ev.get("kind") == "close":
            record.update({"bytes_sent": ev.get("bytes_sent", 0),
                           "bytes_received": ev.get("bytes_received", 0),
                           "duration_ms": round(ev.get("duration_ns", 0) / 1e6, 3),
                           "srtt_us": ev.get("srtt_us", 0)})
        record.update(ev.get("extra") or {})  # fields a producer resolved itself (authz records)
        return record


def _iso(wall: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(wall)) + f".{int(wall * 1000) % 1000:03d}Z"


_BOOT_OFFSET: float | None = None


def _mono_to_wall(ts_ns: int) -> float:
    """bpf_ktime_get_ns() is CLOCK_MONOTONIC; convert to wall-clock seconds."""
    global _BOOT_OFFSET
    if _BOOT_OFFSET is None:
        _BOOT_OFFSET = time.time() - time.monotonic()
    return _BOOT_OFFSET + ts_ns / 1e9
