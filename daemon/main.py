"""``kmesh-daemon``: the node agent process (``python -m daemon`` until the console script exists).

Startup order, each step only after the previous one worked:
admin + metrics listeners bound (so a port conflict fails in a second, before the BPF
compile, and ``kmeshctl status`` can say what is still starting) -> ``Dataplane.open``
(compile, reuse pins, attach) -> ``State`` + ``XdsClient`` + ``DataplaneSync`` -> enrollment
controller -> event hub (metrics, traces).

Exit: on SIGTERM the pins and attachments stay when the daemon's DaemonSet still exists (a
restart or rolling update: traffic keeps flowing through the pinned maps), and are removed
when the DaemonSet is gone (uninstall). ``kmesh-daemon uninstall`` removes them explicitly.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from daemon.config import ConfigError, DaemonConfig, parse_config
from daemon.logging_setup import setup_logging
from daemon.version import version_info

log = logging.getLogger("daemon")
REPO = Path(__file__).resolve().parent.parent


def _ensure_kernel_source() -> None:
    """bcc needs kernel headers; use the merged tree the setup builds when the distro's is absent."""
    if os.environ.get("BCC_KERNEL_SOURCE"):
        return
    if Path(f"/lib/modules/{os.uname().release}/build").exists():
        return
    from daemon.assets import kernel_headers_fallback

    built = kernel_headers_fallback()
    if built is not None:
        os.environ["BCC_KERNEL_SOURCE"] = str(built)


def inside_cgroup(cgroup_root: Path) -> bool:
    """Is this process in ``cgroup_root`` or below it? (The control connect must be.)"""
    own = ""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            own = line[3:]
    from daemon.cgroupmount import cgroup2_mounts

    for mount, _ in cgroup2_mounts():
        full = mount / own.lstrip("/")
        try:
            if full.resolve().is_relative_to(Path(cgroup_root).resolve()):
                return True
        except OSError:
            continue
    return False


def load_kube_client(cfg: DaemonConfig) -> Any:
    """KubeClient from KUBECONFIG/--kubeconfig, else the in-cluster service account."""
    from daemon.kube import KubeClient

    if cfg.kubeconfig:
        return KubeClient.from_kubeconfig(cfg.kubeconfig)
    return KubeClient.in_cluster()


def daemonset_still_exists(api: Any, cfg: DaemonConfig) -> bool | None:
    """True/False when known; None when it cannot be told (no POD_NAME, API unreachable).

    The DaemonSet is named by the Pod's owner reference, else by POD_NAME without its random
    suffix, else by its first dash-separated segment (Kmesh's rule).
    """
    if api is None or not cfg.pod_name:
        return None
    from daemon.kube import ApiError, pod_path

    candidates: list[str] = []
    try:
        pod = api.get(pod_path(cfg.pod_namespace, cfg.pod_name))
        for ref in (pod.get("metadata") or {}).get("ownerReferences") or []:
            if ref.get("kind") == "DaemonSet":
                candidates.append(ref.get("name", ""))
    except ApiError as exc:
        if exc.status != 404:
            return None
    except Exception:  # noqa: BLE001 - API unreachable: unknown
        return None
    if not candidates:
        candidates = [cfg.pod_name.rsplit("-", 1)[0], cfg.pod_name.split("-", 1)[0]]
    for name in dict.fromkeys(candidates):
        try:
            ds = api.get(f"/apis/apps/v1/namespaces/{cfg.pod_namespace}/daemonsets/{name}")
        except ApiError as exc:
            if exc.status == 404:
                continue
            return None
        except Exception:  # noqa: BLE001
            return None
        return not (ds.get("metadata") or {}).get("deletionTimestamp")
    return False


def _open_dataplane(dataplane_cls: Any, cfg: DaemonConfig) -> Any:
    """Dataplane.open; a cgroup v2 root (in-cluster /mnt/kmesh_cgroup2, mounted here if needed)
    only when the operator said so with --node-wide."""
    if cfg.allow_node_root:
        from daemon.cgroupmount import ensure_cgroup2

        if ensure_cgroup2(Path(cfg.cgroup_root)):
            log.info("mounted cgroup2", extra={"path": str(cfg.cgroup_root)})
    if cfg.capacity:  # --capacity: only the named sizes change; the others keep their defaults
        from daemon.dataplane.types import Capacity

        return dataplane_cls.open(cfg.cgroup_root, cfg.pin_dir, Capacity(**cfg.capacity),
                                  allow_root=cfg.allow_node_root)
    return dataplane_cls.open(cfg.cgroup_root, cfg.pin_dir, allow_root=cfg.allow_node_root)


class Daemon:
    """Owns every component and their start/stop order."""

    def __init__(self, cfg: DaemonConfig) -> None:
        self.cfg = cfg
        self.stop_event = threading.Event()
        self.api: Any = None
        self.dataplane: Any = None
        self.state: Any = None
        self.xds: Any = None
        self.sync: Any = None
        self.enroll: Any = None
        self.hub: Any = None
        self.admin: Any = None
        self.metrics: Any = None
        self.authz: Any = None

    def start(self) -> None:
        from daemon.admin import AdminContext, AdminServer
        from daemon.events import EventHub, NameResolver
        from daemon.metrics import ConnectionMetrics, MetricsServer, MetricsSource

        cfg = self.cfg
        if cfg.enable_bypass:
            log.warning("--enable-bypass is accepted for the seed's manifest but has no effect")
        self.ctx = AdminContext(config=cfg, started=time.time())
        self.admin = AdminServer(cfg.admin_host, cfg.admin_port, self.ctx)
        self.metrics_source = MetricsSource(None, xds_status=self.ctx.xds_status)
        self.metrics = MetricsServer(cfg.metrics_host, cfg.metrics_port, self.metrics_source)
        self.admin.start()
        self.metrics.start()
        log.info("admin and metrics listening", extra={
            "admin": f"{cfg.admin_host}:{self.admin.server_address[1]}",
            "metrics": f"{cfg.metrics_host or '*'}:{self.metrics.server_address[1]}"})

        if cfg.enroll:
            self.api = load_kube_client(cfg)  # enrollment cannot work without the API
        elif cfg.pod_name:
            try:
                self.api = load_kube_client(cfg)
            except Exception as exc:  # noqa: BLE001 - only the SIGTERM DaemonSet check needs it
                log.warning("no Kubernetes API access: on exit the pins are kept",
                            extra={"error": f"{type(exc).__name__}: {exc}"})

        _ensure_kernel_source()
        from daemon.dataplane import Dataplane

        t0 = time.monotonic()
        self.dataplane = _open_dataplane(Dataplane, cfg)
        self.ctx.dataplane = self.dataplane
        if cfg.monitoring is not None:
            self.dataplane.set_monitoring(access_log=cfg.monitoring, metrics=cfg.monitoring)
        log.info("monitoring", extra=self.dataplane.monitoring())
        self.metrics_source.pressure = self.dataplane.map_pressure
        log.info("data plane loaded", extra={"cgroup": str(cfg.cgroup_root), "pin_dir": str(cfg.pin_dir),
                                             "seconds": round(time.monotonic() - t0, 2)})

        from daemon.state import State
        from daemon.wiring import DataplaneSync
        from daemon.xds.client import XdsClient, XdsConfig

        self.state = State(node_name=cfg.node_name, cluster_id=cfg.cluster_id)
        self.ctx.state = self.state
        xds_cfg = XdsConfig(
            address=cfg.xds_address, cluster_id=cfg.cluster_id, token_path=cfg.token_path,
            ca_path=cfg.root_ca, server_name=cfg.server_name, plaintext=cfg.plaintext,
            pod_name=cfg.pod_name, pod_namespace=cfg.pod_namespace, instance_ip=cfg.instance_ip,
            node_name=cfg.node_name, service_account=cfg.service_account)
        if cfg.xds_max_message_mib:
            xds_cfg.max_receive_bytes = cfg.xds_max_message_mib * 1024 * 1024
        self.xds = XdsClient(xds_cfg, self.state)
        self.sync = DataplaneSync(self.state, self.dataplane)
        self.ctx.xds, self.ctx.sync = self.xds, self.sync
        from daemon.authz.manager import AuthzManager, node_addresses

        node_ips = node_addresses(cfg.instance_ip, os.environ.get("KMESH_NODE_IPS", ""))
        sync = self.sync
        self.authz = AuthzManager(self.state, self.dataplane, node_name=cfg.node_name, node_ips=node_ips,
                                  after_first_sync=lambda: sync.syncs >= 1 or bool(sync.last_error))
        self.ctx.authz = self.authz
        self.xds.start()

        if cfg.enroll:
            import functools

            from daemon import dataplane as dp
            from daemon.enroll import EnrollmentController

            connect = dp.control_connect
            if not inside_cgroup(cfg.cgroup_root):
                # Control connects must come from inside the attached cgroup: a helper joins it.
                connect = functools.partial(dp.control_connect, cgroup=cfg.cgroup_root)
            self.enroll = EnrollmentController(self.api, cfg.node_name, cfg.proc_root,
                                               control_connect=connect, netns_cookie=dp.netns_cookie)
            self.ctx.enroll = self.enroll
            self.enroll.start()

        resolver = NameResolver(self.state, self.enroll)
        self.hub = EventHub(self.dataplane, log_events=cfg.enable_bpf_log)
        # counted in the kernel (km_conn_stats), read per scrape: no per-connection event needed
        conn = ConnectionMetrics(resolver, self.enroll, stats=self.dataplane.conn_stats, names=self.dataplane)
        self.metrics_source.conn = conn
        self.ctx.hub, self.ctx.resolver = self.hub, resolver
        self.hub.start()
        self.authz.enroll, self.authz.emit = self.enroll, self.hub.dispatch
        self.metrics_source.extra = self.authz.families
        self.authz.start()
        log.info("kmesh-daemon started", extra={"xds": cfg.xds_address, "cluster_id": cfg.cluster_id,
                                                "node": cfg.node_name})

    def stop(self, reason: str = "signal") -> int:
        """Stop every component; keep or remove the data plane as the DaemonSet's existence says."""
        for name in ("admin", "metrics"):
            server = getattr(self, name)
            if server is not None:
                try:
                    if name == "admin":
                        server.stop()
                    else:
                        server.shutdown()
                        server.server_close()
                except Exception:  # noqa: BLE001
                    pass
        for comp in (self.authz, self.hub, self.enroll, self.xds, self.sync):
            if comp is not None:
                try:
                    comp.stop()
                except Exception:  # noqa: BLE001
                    log.exception("stopping a component failed")
        if self.dataplane is None:
            return 0
        exists = daemonset_still_exists(self.api, self.cfg)
        if exists is False:
            log.info("DaemonSet is gone: detaching programs and removing pins", extra={"reason": reason})
            self._clear_annotations()
            self.dataplane.uninstall()
        else:
            why = "DaemonSet still exists" if exists else "DaemonSet state unknown"
            log.info(f"{why}: leaving pins and attachments for the next daemon "
                     "(run `kmesh-daemon uninstall` to remove them)", extra={"reason": reason})
            self.dataplane.close()
        return 0

    def _clear_annotations(self) -> None:
        if self.enroll is None or self.api is None:
            return
        from daemon.enroll import REDIRECT_ANNOTATION
        from daemon.kube import pod_path

        for pod in self.enroll.enrolled():
            try:
                self.api.merge_patch(pod_path(pod.namespace, pod.name),
                                     {"metadata": {"annotations": {REDIRECT_ANNOTATION: None}}})
            except Exception:  # noqa: BLE001 - best effort on the way out
                pass

    def run(self) -> int:
        def _on_signal(signum: int, _frame: Any) -> None:
            self.stop_event.set()
            self._signal = signal.Signals(signum).name

        self._signal = "exit"
        signal.signal(signal.SIGTERM, _on_signal)
        signal.signal(signal.SIGINT, _on_signal)
        from daemon.kube import KubeConfigError

        try:
            self.start()
        except (OSError, KubeConfigError) as exc:
            log.error("startup failed", extra={"error": str(exc)})
            self.stop("startup failure")
            return 1
        except Exception as exc:  # noqa: BLE001 - one line, not a traceback
            log.exception("startup failed", extra={"error": f"{type(exc).__name__}: {exc}"})
            self.stop("startup failure")
            return 1
        self.stop_event.wait()
        log.info("shutting down", extra={"signal": self._signal})
        return self.stop(self._signal)


def uninstall(cfg: DaemonConfig) -> int:
    """Detach our programs from the cgroup and remove the pin directory."""
    _ensure_kernel_source()
    from daemon import dataplane as dp

    if not cfg.pin_dir.exists():
        log.info("nothing to uninstall", extra={"pin_dir": str(cfg.pin_dir)})
        return 0
    dp.uninstall(cfg.cgroup_root, cfg.pin_dir, allow_root=cfg.allow_node_root)
    log.info("uninstalled", extra={"pin_dir": str(cfg.pin_dir), "cgroup": str(cfg.cgroup_root)})
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_config(argv)
    except ConfigError as exc:
        print(f"kmesh-daemon: error: {exc}", file=sys.stderr)
        return 2
    setup_logging(cfg.log_levels, cfg.log_format)
    if cfg.command == "version":
        print(json.dumps(version_info(), indent=2))
        return 0
    if cfg.command == "uninstall":
        try:
            return uninstall(cfg)
        except Exception as exc:  # noqa: BLE001
            print(f"kmesh-daemon: error: uninstall failed: {exc}", file=sys.stderr)
            return 1
    return Daemon(cfg).run()


def _limit_malloc_arenas(arenas: int = 2) -> None:
    """Cap glibc malloc arenas (as MALLOC_ARENA_MAX=2) before any thread starts.

    Why: the gRPC, admin and event threads each get an arena by default; at 100k endpoints the
    fragmentation costs ~10 MiB of RSS for nothing (measured by benchmarks.controlplane).
    """
    import ctypes
    import ctypes.util

    m_arena_max = -8
    try:
        ctypes.CDLL(ctypes.util.find_library("c")).mallopt(m_arena_max, arenas)
    except (OSError, AttributeError):
        pass


def run() -> None:
    """Console-script entry point (``kmesh-daemon = "daemon.main:run"``)."""
    _limit_malloc_arenas()
    sys.exit(main())
