"""Daemon flags and environment: defaults, and the values it must refuse (one-line errors)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from daemon.cgroupmount import cgroup2_root
from daemon.config import ConfigError, parse_config

REPO = Path(__file__).resolve().parents[2]
BASE_ENV = {"NODE_NAME": "node1", "KMESH_CGROUP_ROOT": "/sys/fs/cgroup/kmesh-x"}
DETECTED = str(cgroup2_root())  # where this host mounts cgroup v2


def test_seed_flags_and_environment() -> None:
    env = dict(BASE_ENV, XDS_ADDRESS="istiod-1-22-6.istio-system.svc:15012", CLUSTER_ID="c1",
               POD_NAME="kmesh-abcde", POD_NAMESPACE="kmesh-system", INSTANCE_IP="10.0.0.5",
               SERVICE_ACCOUNT="kmesh", KMESH_PIN_PREFIX="kt-pins")
    cfg = parse_config(["--mode=dual-engine", "--enable-bypass=false", "--enable-bpf-log=true"], env)
    assert cfg.mode == "dual-engine" and cfg.enable_bypass is False and cfg.enable_bpf_log is True
    assert cfg.xds_address == "istiod-1-22-6.istio-system.svc:15012"
    assert cfg.cluster_id == "c1" and cfg.pod_name == "kmesh-abcde" and cfg.node_name == "node1"
    assert cfg.pin_dir == Path("/sys/fs/bpf/kt-pins")
    assert (cfg.admin_host, cfg.admin_port) == ("127.0.0.1", 15200)
    assert (cfg.metrics_host, cfg.metrics_port) == ("", 15020)
    assert cfg.token_path == Path("/var/run/secrets/tokens/istio-token")
    assert cfg.root_ca == Path("/var/run/secrets/istio/root-cert.pem")
    assert cfg.proc_root in (Path("/proc"), Path("/host/proc"))


def test_monitoring_flag() -> None:
    """Unset: keep the pinned switch (None); set: applied at start."""
    assert parse_config([], BASE_ENV).monitoring is None
    assert parse_config(["--monitoring=false"], BASE_ENV).monitoring is False
    assert parse_config(["--monitoring", "true"], BASE_ENV).monitoring is True


def test_plaintext_drops_token_and_ca() -> None:
    cfg = parse_config(["--plaintext"], BASE_ENV)
    assert cfg.plaintext and cfg.token_path is None and cfg.root_ca is None
    cfg = parse_config([], dict(BASE_ENV, XDS_PLAINTEXT="true"))
    assert cfg.plaintext


@pytest.mark.parametrize("addr", ["0.0.0.0:15200", "10.1.2.3:15200", ":15200", "[::]:15200", "example.com:1"])
def test_admin_addr_must_be_loopback(addr: str) -> None:
    with pytest.raises(ConfigError, match="loopback"):
        parse_config([f"--admin-addr={addr}"], BASE_ENV)


@pytest.mark.parametrize("addr", ["127.0.0.1:0", "[::1]:15200", "localhost:15200", "127.0.0.2:9"])
def test_admin_addr_loopback_accepted(addr: str) -> None:
    parse_config([f"--admin-addr={addr}"], BASE_ENV)


@pytest.mark.parametrize("root", [DETECTED, "/sys/fs/cgroup", DETECTED + "/"])
def test_node_cgroup_root_refused(root: str) -> None:
    with pytest.raises(ConfigError, match="machine's cgroup v2 root"):
        parse_config([f"--cgroup-root={root}"], {"NODE_NAME": "n"})
    cfg = parse_config([f"--cgroup-root={root}", "--i-know-this-is-the-node-root"], {"NODE_NAME": "n"})
    assert str(cfg.cgroup_root).rstrip("/") == root.rstrip("/")


def test_cgroup_root_required_and_absolute() -> None:
    with pytest.raises(ConfigError, match="--cgroup-root is required"):
        parse_config([], {"NODE_NAME": "n"})
    with pytest.raises(ConfigError, match="absolute"):
        parse_config(["--cgroup-root=relative/dir"], {"NODE_NAME": "n"})


def test_other_refusals() -> None:
    with pytest.raises(ConfigError, match="NODE_NAME"):
        parse_config([], {"KMESH_CGROUP_ROOT": "/tmp/x"})
    with pytest.raises(ConfigError, match="dual-engine"):
        parse_config(["--mode=kernel-native"], BASE_ENV)
    with pytest.raises(ConfigError, match="pin-prefix"):
        parse_config(["--pin-prefix=a/b"], BASE_ENV)
    with pytest.raises(ConfigError, match="unknown subsystem"):
        parse_config(["--log-level=foo:debug"], BASE_ENV)
    with pytest.raises(ConfigError, match="HOST:PORT"):
        parse_config(["--metrics-addr=15020"], BASE_ENV)
    cfg = parse_config(["--log-level=info", "--log-level=xds:debug,enroll:warn"], BASE_ENV)
    assert cfg.log_levels == {"default": "info", "xds": "debug", "enroll": "warn"}


def test_cli_error_is_one_line_exit_2() -> None:
    proc = subprocess.run([sys.executable, "-m", "daemon", "--admin-addr=0.0.0.0:15200"], cwd=REPO,
                          capture_output=True, text=True, timeout=30,
                          env={"PATH": "/usr/bin:/bin", "NODE_NAME": "n", "KMESH_CGROUP_ROOT": "/tmp/x"})
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "loopback" in proc.stderr
    assert proc.stdout == ""


def test_capacity_and_xds_message_flags() -> None:
    cfg = parse_config([], BASE_ENV)
    assert cfg.capacity == {} and cfg.xds_max_message_mib == 0
    cfg = parse_config(["--capacity", "frontends=2000000, endpoints=1500000", "--xds-max-message-mib", "600"],
                       BASE_ENV)
    assert cfg.capacity == {"frontends": 2_000_000, "endpoints": 1_500_000}
    assert cfg.xds_max_message_mib == 600
    from daemon.dataplane.types import Capacity

    cap = Capacity(**cfg.capacity)
    assert cap.frontends == 2_000_000 and cap.services == Capacity().services
    for bad, msg in (("frontend=5", "NAME=N"), ("endpoints=x", "not an integer"), ("endpoints", "NAME=N"),
                     ("backends=0", "between 1"), (f"sockets={(1 << 24) + 1}", "between 1")):
        with pytest.raises(ConfigError, match=msg):
            parse_config(["--capacity", bad], BASE_ENV)
    with pytest.raises(ConfigError, match="xds-max-message-mib"):
        parse_config(["--xds-max-message-mib", "-1"], BASE_ENV)
