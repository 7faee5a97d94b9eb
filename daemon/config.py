"""Daemon configuration: flags and environment, validated before anything touches the kernel.

Why a separate module: every value that decides *where* the daemon acts (cgroup, pin
directory, listening addresses) is checked here, so a wrong flag fails in one line before a
BPF program is attached anywhere. The flag names follow the seed DaemonSet
(``--mode=dual-engine --enable-bypass=false --enable-bpf-log=true``) so the same manifest
runs this daemon unchanged.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_ADMIN_ADDR = "127.0.0.1:15200"
DEFAULT_METRICS_ADDR = ":15020"
DEFAULT_TOKEN_PATH = "/var/run/secrets/tokens/istio-token"
DEFAULT_ROOT_CA = "/var/run/secrets/istio/root-cert.pem"
DEFAULT_XDS_ADDRESS = "istiod.istio-system.svc:15012"
BPF_FS = Path("/sys/fs/bpf")
# /sys/fs/cgroup is the standard place of the node's cgroup v2 root even where it is not mounted yet.
STANDARD_CGROUP2_ROOT = Path("/sys/fs/cgroup")
SUBSYSTEMS = ("default", "xds", "dataplane", "enroll", "admin", "bpf")


class ConfigError(ValueError):
    """A flag or environment value the daemon refuses; the message says what to change."""


@dataclass
class DaemonConfig:
    """Everything the daemon needs to start, already validated."""

    mode: str = "dual-engine"
    enable_bypass: bool = False
    enable_bpf_log: bool = True
    monitoring: bool | None = None  # None: keep the pinned switch (on for a fresh install)
    cgroup_root: Path = Path("/mnt/kmesh_cgroup2")
    allow_node_root: bool = False  # --i-know-this-is-the-node-root: node-wide attach on purpose
    pin_dir: Path = BPF_FS / "kmesh"
    proc_root: Path = Path("/proc")
    admin_host: str = "127.0.0.1"
    admin_port: int = 15200
    metrics_host: str = ""
    metrics_port: int = 15020
    xds_address: str = DEFAULT_XDS_ADDRESS
    plaintext: bool = False
    cluster_id: str = "Kubernetes"
    pod_name: str = ""
    pod_namespace: str = "kmesh-system"
    instance_ip: str = ""
    service_account: str = "kmesh"
    node_name: str = ""
    token_path: Path | None = Path(DEFAULT_TOKEN_PATH)
    root_ca: Path | None = Path(DEFAULT_ROOT_CA)
    server_name: str | None = None
    kubeconfig: str | None = None
    log_levels: dict[str, str] = field(default_factory=dict)
    log_format: str = "logfmt"
    enroll: bool = True
    command: str = "run"
    # --capacity: map sizes (daemon.dataplane.types.Capacity fields); empty = the defaults
    capacity: dict[str, int] = field(default_factory=dict)
    # --xds-max-message-mib: largest xDS response accepted; 0 = the client's default (200 MiB)
    xds_max_message_mib: int = 0


def _bool(value: str) -> bool:
    v = value.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def split_hostport(addr: str, flag: str) -> tuple[str, int]:
    """``host:port``, ``:port`` or ``[v6]:port`` -> (host, port); a clear error otherwise."""
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{flag} {addr!r}: expected HOST:PORT, e.g. 127.0.0.1:15200")
    return host.strip("[]"), int(port)


def is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def default_proc_root() -> Path:
    """The host's /proc as the DaemonSet mounts it, else our own (sandbox, tests)."""
    host_proc = Path("/host/proc")
    return host_proc if (host_proc / "1").exists() else Path("/proc")


def build_parser(environ: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    env = (os.environ if environ is None else environ).get
    p = argparse.ArgumentParser(
        prog="kmesh-daemon",
        description="Kmesh node agent: workload xDS -> eBPF socket load balancing.",
    )
    p.add_argument("command", nargs="?", default="run", choices=("run", "uninstall", "version"),
                   help="run (default), uninstall (detach programs and remove pins), version")
    p.add_argument("--mode", default="dual-engine", help="only dual-engine is supported")
    p.add_argument("--enable-bypass", type=_bool, default=False, metavar="BOOL")
    p.add_argument("--enable-bpf-log", type=_bool, default=True, metavar="BOOL",
                   help="log every connection event at debug level on the 'bpf' logger")
    p.add_argument("--monitoring", type=_bool, default=None, metavar="BOOL",
                   help="access logs and connection metrics (ring-buffer events) on or off at start; "
                        "unset: keep the setting pinned by the previous daemon (on for a fresh install); "
                        "switch at run time with `kmeshctl monitoring`")
    p.add_argument("--cgroup-root", default=env("KMESH_CGROUP_ROOT"),
                   help="cgroup v2 directory to attach to (env KMESH_CGROUP_ROOT); required")
    p.add_argument("--i-know-this-is-the-node-root", "--node-wide", action="store_true",
                   dest="i_know_this_is_the_node_root",
                   help="allow attaching at the node's cgroup v2 root (node-wide redirection, as in a "
                        "cluster); mounts cgroup2 at --cgroup-root if it is not mounted yet")
    p.add_argument("--pin-prefix", default=env("KMESH_PIN_PREFIX", "kmesh"),
                   help="pin directory name under /sys/fs/bpf (env KMESH_PIN_PREFIX)")
    p.add_argument("--bpf-fs", default=env("KMESH_BPF_FS", str(BPF_FS)),
                   help="bpf filesystem the pin directory lives on (env KMESH_BPF_FS; default /sys/fs/bpf)")
    p.add_argument("--proc-root", default=None, help="host /proc (default /host/proc if present)")
    p.add_argument("--admin-addr", default=DEFAULT_ADMIN_ADDR, help="admin API, loopback only")
    p.add_argument("--metrics-addr", default=DEFAULT_METRICS_ADDR, help="Prometheus /status/metric")
    p.add_argument("--plaintext", action="store_true", default=_bool(env("XDS_PLAINTEXT", "false")),
                   help="xDS without TLS or token (port 15010; env XDS_PLAINTEXT)")
    p.add_argument("--xds-address", default=env("XDS_ADDRESS", DEFAULT_XDS_ADDRESS))
    p.add_argument("--cluster-id", default=env("CLUSTER_ID", "Kubernetes"))
    p.add_argument("--token-path", default=env("XDS_TOKEN_PATH", DEFAULT_TOKEN_PATH))
    p.add_argument("--root-ca", default=env("XDS_ROOT_CA", DEFAULT_ROOT_CA))
    p.add_argument("--server-name", default=env("XDS_SERVER_NAME"))
    p.add_argument("--kubeconfig", default=env("KUBECONFIG"), help="default: in-cluster config")
    p.add_argument("--node-name", default=env("NODE_NAME"))
    p.add_argument("--no-enroll", action="store_true", help="do not watch pods (debugging)")
    p.add_argument("--capacity", default=env("KMESH_CAPACITY", ""), metavar="NAME=N[,NAME=N...]",
                   help=f"BPF map sizes, e.g. frontends=2000000,endpoints=2000000 (names: "
                        f"{', '.join(CAPACITY_FIELDS)}; env KMESH_CAPACITY); a change makes new maps")
    p.add_argument("--xds-max-message-mib", type=int, default=0, metavar="MIB",
                   help="largest xDS response accepted (default 200 MiB; raise it past ~800k endpoints)")
    p.add_argument("--log-level", action="append", default=[], metavar="[SUBSYS:]LEVEL",
                   help=f"e.g. info or xds:debug; subsystems {', '.join(SUBSYSTEMS)}")
    p.add_argument("--log-format", choices=("logfmt", "json"), default=env("KMESH_LOG_FORMAT", "logfmt"))
    return p


def _parse_levels(items: list[str]) -> dict[str, str]:
    levels: dict[str, str] = {}
    for item in items:
        for part in item.split(","):
            name, sep, level = part.rpartition(":")
            name = name if sep else "default"
            if name not in SUBSYSTEMS:
                raise ConfigError(f"--log-level {part!r}: unknown subsystem; "
                                  f"use one of {', '.join(SUBSYSTEMS)}")
            if level.lower() not in ("debug", "info", "warning", "warn", "error"):
                raise ConfigError(f"--log-level {part!r}: level must be debug, info, warn or error")
            levels[name] = level.lower()
    return levels


CAPACITY_FIELDS = ("frontends", "services", "endpoints", "backends", "manage", "sockets")


def parse_capacity(text: str) -> dict[str, int]:
    """``frontends=2000000,endpoints=2000000`` -> {"frontends": 2000000, ...}, checked like Capacity."""
    out: dict[str, int] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or name not in CAPACITY_FIELDS:
            raise ConfigError(f"--capacity {part!r}: expected NAME=N with NAME one of "
                              f"{', '.join(CAPACITY_FIELDS)}")
        try:
            n = int(value)
        except ValueError:
            raise ConfigError(f"--capacity {part!r}: {value!r} is not an integer") from None
        if not 1 <= n <= 1 << 24:
            raise ConfigError(f"--capacity {part!r}: must be between 1 and {1 << 24}")
        out[name] = n
    return out


def node_cgroup_roots() -> set[Path]:
    """The machine's cgroup v2 roots (every cgroup2 mount point, wherever the host mounts it):
    attaching there would redirect every process on the node."""
    from daemon.cgroupmount import cgroup2_mounts

    try:
        mounts = {Path(os.path.realpath(m)) for m, _ in cgroup2_mounts()}
    except OSError:
        mounts = set()
    return mounts | {STANDARD_CGROUP2_ROOT}


def validate_cgroup_root(value: str | None, allow_node_root: bool) -> Path:
    """The attach point must be a cgroup v2 dir chosen on purpose, never the node root by accident."""
    if not value:
        raise ConfigError("--cgroup-root is required (env KMESH_CGROUP_ROOT); in a cluster the "
                          "DaemonSet mounts cgroup2 at /mnt/kmesh_cgroup2")
    path = Path(value)
    if not path.is_absolute():
        raise ConfigError(f"--cgroup-root {value!r}: must be an absolute path")
    resolved = Path(os.path.realpath(path))
    if resolved in node_cgroup_roots() and not allow_node_root:
        raise ConfigError(f"--cgroup-root {value}: that is the machine's cgroup v2 root; pick a child "
                          "cgroup, or pass --i-know-this-is-the-node-root")
    return path


def validate_pin_prefix(prefix: str, bpf_fs: str | Path = BPF_FS) -> Path:
    if not prefix or "/" in prefix or prefix in (".", ".."):
        raise ConfigError(f"--pin-prefix {prefix!r}: expected a single directory name, e.g. kmesh")
    if not Path(bpf_fs).is_absolute():
        raise ConfigError(f"--bpf-fs {bpf_fs!r}: must be an absolute path")
    return Path(bpf_fs) / prefix


def parse_config(argv: list[str] | None = None, environ: Mapping[str, str] | None = None) -> DaemonConfig:
    """Flags + environment -> DaemonConfig, or ConfigError with a one-line fix."""
    env = os.environ if environ is None else environ
    ns = build_parser(env).parse_args(argv)
    if ns.mode != "dual-engine":
        raise ConfigError(f"--mode {ns.mode!r}: only dual-engine is supported")
    admin_host, admin_port = split_hostport(ns.admin_addr, "--admin-addr")
    if not is_loopback_host(admin_host):
        raise ConfigError(f"--admin-addr {ns.admin_addr!r}: the admin API listens on loopback only "
                          "(127.0.0.1 or ::1); use kmeshctl's port-forward to reach it")
    metrics_host, metrics_port = split_hostport(ns.metrics_addr, "--metrics-addr")
    split_hostport(ns.xds_address, "XDS_ADDRESS")
    cfg = DaemonConfig(
        mode=ns.mode,
        enable_bypass=ns.enable_bypass,
        enable_bpf_log=ns.enable_bpf_log,
        monitoring=ns.monitoring,
        proc_root=Path(ns.proc_root) if ns.proc_root else default_proc_root(),
        admin_host=admin_host,
        admin_port=admin_port,
        metrics_host=metrics_host,
        metrics_port=metrics_port,
        xds_address=ns.xds_address,
        plaintext=ns.plaintext,
        cluster_id=ns.cluster_id,
        pod_name=env.get("POD_NAME", ""),
        pod_namespace=env.get("POD_NAMESPACE", "kmesh-system"),
        instance_ip=env.get("INSTANCE_IP", ""),
        service_account=env.get("SERVICE_ACCOUNT", "kmesh"),
        node_name=ns.node_name or "",
        token_path=None if ns.plaintext else Path(ns.token_path),
        root_ca=None if ns.plaintext else Path(ns.root_ca),
        server_name=ns.server_name or None,
        kubeconfig=ns.kubeconfig or None,
        log_levels=_parse_levels(ns.log_level),
        log_format=ns.log_format,
        enroll=not ns.no_enroll,
        command=ns.command,
        capacity=parse_capacity(ns.capacity or ""),
    )
    if ns.xds_max_message_mib < 0 or ns.xds_max_message_mib > 2047:
        raise ConfigError(f"--xds-max-message-mib {ns.xds_max_message_mib}: must be between 1 and 2047 "
                          "(0 = default)")
    cfg.xds_max_message_mib = ns.xds_max_message_mib
    cfg.pin_dir = validate_pin_prefix(ns.pin_prefix, ns.bpf_fs)
    if cfg.command == "version":
        return cfg
    cfg.cgroup_root = validate_cgroup_root(ns.cgroup_root, ns.i_know_this_is_the_node_root)
    cfg.allow_node_root = ns.i_know_this_is_the_node_root
    if cfg.command == "run":
        if not cfg.proc_root.is_dir():
            raise ConfigError(f"--proc-root {cfg.proc_root}: not a directory")
        if cfg.enroll and not cfg.node_name:
            raise ConfigError("NODE_NAME is not set: the daemon enrolls only pods on its own node "
                              "(set it from spec.nodeName, or pass --no-enroll)")
    return cfg
