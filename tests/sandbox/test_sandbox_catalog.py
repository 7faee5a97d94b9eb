"""The image catalog and pod-spec rules (no processes, no root): what runs, with which env and mounts."""

from __future__ import annotations

import base64
import sys
from pathlib import Path

import pytest

from sandbox.images import ImageError, NodeContext, classify, daemon_flags, repository, resolve
from sandbox.kubelet import podspec


@pytest.fixture(autouse=True)
def _no_daemon_override(monkeypatch: pytest.MonkeyPatch) -> None:
    """The development override (KMESH_SANDBOX_DAEMON_COMMAND) must not leak into these rules."""
    monkeypatch.delenv("KMESH_SANDBOX_DAEMON_COMMAND", raising=False)


CTX = NodeContext(
    cgroup_root="/sys/fs/cgroup/kmesh-sandbox-x",
    pin_prefix="ksx",
    bin_dir=Path(sys.executable).parent,
)


@pytest.mark.parametrize(
    ("image", "kind"),
    [
        ("registry-cn-hangzhou.ack.aliyuncs.com/ack-demo/kmesh:v0.5.0", "kmesh-daemon"),
        ("ghcr.io/kmesh-py/kmesh-daemon:0.1.0", "kmesh-daemon"),
        ("ghcr.io/kmesh-net/kmesh:latest", "kmesh-daemon"),
        ("localhost:5000/kmesh@sha256:abcd", "kmesh-daemon"),
        ("fortio/fortio:latest_release", "fortio"),
        ("registry.example/mirror/fortio:1.60", "fortio"),
        ("nicolaka/netshoot:v0.13", "tools"),
        ("registry.example/netutils:1", "tools"),
        ("curlimages/curl:8.5.0", "tools"),
        ("busybox:1.36", "tools"),
        ("nginx:1.25", None),
        ("ghcr.io/kmesh-net/waypoint:v0.5", "waypoint"),
        ("docker.io/istio/proxyv2:1.22.6", "waypoint"),
    ],
)
def test_classify(image: str, kind: str | None) -> None:
    assert classify(image) == kind


def test_repository_strips_tag_and_digest_not_registry_port() -> None:
    assert repository("localhost:5000/a/b:tag") == "localhost:5000/a/b"
    assert repository("a/b@sha256:00") == "a/b"


def test_daemon_flags_seed_style_and_plain() -> None:
    seed = daemon_flags(["/bin/sh", "-c"], ["./start_kmesh.sh --mode=dual-engine --enable-bypass=false"])
    assert seed == ["--mode=dual-engine", "--enable-bypass=false"]
    plain = daemon_flags(["kmesh-daemon"], ["--mode=dual-engine", "--enable-bpf-log=true"])
    assert plain == ["--mode=dual-engine", "--enable-bpf-log=true"]
    # The sandbox decides where the daemon attaches: manifest flags cannot point it at the machine's root.
    assert daemon_flags(
        [], ["--cgroup-root", "/sys/fs/cgroup", "--pin-prefix=x", "--mode=dual-engine"]
    ) == ["--mode=dual-engine"]


def test_daemon_env_is_confined_to_the_sandbox(tmp_path: Path) -> None:
    (tmp_path / "kmesh-daemon").write_text("#!/bin/sh\n")
    ctx = NodeContext(cgroup_root=CTX.cgroup_root, pin_prefix="ksx", bin_dir=tmp_path)
    env = {"KMESH_CGROUP_ROOT": "/sys/fs/cgroup", "XDS_ADDRESS": "istiod:15012"}
    prog = resolve(
        "ghcr.io/kmesh-py/kmesh-daemon:0.1.0", ["kmesh-daemon"], ["--mode=dual-engine"], env, [], "x", ctx
    )
    assert prog.argv == [str(tmp_path / "kmesh-daemon"), "--mode=dual-engine"]
    assert prog.env["KMESH_CGROUP_ROOT"] == CTX.cgroup_root and prog.env["KMESH_PIN_PREFIX"] == "ksx"
    assert prog.env["XDS_ADDRESS"] == "istiod:15012"


def test_daemon_missing_is_a_clear_failure(tmp_path: Path) -> None:
    ctx = NodeContext(cgroup_root=CTX.cgroup_root, pin_prefix="ksx", bin_dir=tmp_path)
    with pytest.raises(ImageError) as e:
        resolve("kmesh:v1", None, None, {}, [], "x", ctx)
    assert e.value.reason == "DaemonNotInstalled" and "make setup" in e.value.message


def test_fortio_gets_its_own_arguments_and_version() -> None:
    # Kmesh's sample: command fortio, fortio's flags in args.
    args = ["server", "-http-port", "0.0.0.0:8080", "-echo-server-default-params", "header=server:1"]
    p = resolve("fortio/fortio", ["fortio"], args, {}, [8080], "v2", CTX)
    assert p.argv[1:] == ["-m", "sandbox.images.fortio", "--sandbox-server", "fortio-v2", "--", *args]
    # The image's entrypoint is fortio: args only, or nothing (default command `server`).
    p = resolve("fortio/fortio", None, ["server"], {}, [8081], "v1", CTX)
    assert p.argv[-3:] == ["fortio-v1", "--", "server"]
    p = resolve("fortio/fortio", ["/usr/bin/fortio", "server"], None, {}, [], "v1", CTX)
    assert p.argv[-2:] == ["--", "server"]


def test_tools_images() -> None:
    assert resolve("busybox", None, None, {}, [], "x", CTX).argv == ["sleep", "infinity"]
    assert resolve("curlimages/curl", None, ["-s", "http://x"], {}, [], "x", CTX).argv == [
        "curl",
        "-s",
        "http://x",
    ]
    with pytest.raises(ImageError, match="executable file not found") as e:
        resolve("busybox", ["/agnhost", "netexec"], None, {}, [], "x", CTX)
    assert e.value.reason == "RunContainerError"


def test_unknown_image_names_the_catalog() -> None:
    with pytest.raises(ImageError) as e:
        resolve("nginx:1.25", None, None, {}, [], "x", CTX)
    assert e.value.reason == "ImageNotInCatalog"
    assert (
        "sandbox image catalog" in e.value.message
        and "fortio" in e.value.message
        and "kmesh" in e.value.message
    )


POD = {
    "metadata": {"name": "p", "namespace": "ns", "uid": "u1", "labels": {"app": "a"}},
    "spec": {"nodeName": "n1", "serviceAccountName": "kmesh"},
    "status": {"podIP": "10.244.0.9"},
}


def test_container_env_field_refs_and_expansion() -> None:
    cms = {("ns", "cm"): {"data": {"k": "v", "other": "o"}}}
    secrets = {("ns", "s"): {"data": {"pw": base64.b64encode(b"hunter2").decode()}}}
    container = {
        "envFrom": [{"configMapRef": {"name": "cm"}, "prefix": "CM_"}],
        "env": [
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "INSTANCE_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "SA", "valueFrom": {"fieldRef": {"fieldPath": "spec.serviceAccountName"}}},
            {"name": "APP", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
            {"name": "PW", "valueFrom": {"secretKeyRef": {"name": "s", "key": "pw"}}},
            {"name": "ADDR", "value": "$(INSTANCE_IP):80 $(NOPE)"},
        ],
    }
    env = podspec.container_env(
        POD, container, lambda ns, n: cms.get((ns, n)), lambda ns, n: secrets.get((ns, n))
    )
    assert env["POD_NAME"] == "p" and env["INSTANCE_IP"] == "10.244.0.9" and env["SA"] == "kmesh"
    assert env["APP"] == "a" and env["PW"] == "hunter2" and env["CM_k"] == "v"
    assert env["ADDR"] == "10.244.0.9:80 $(NOPE)"


def test_volumes_written_under_the_pod_dir(tmp_path: Path) -> None:
    pod = dict(
        POD,
        spec={
            **POD["spec"],
            "volumes": [
                {"name": "ca", "configMap": {"name": "istio-ca-root-cert"}},
                {
                    "name": "tok",
                    "projected": {
                        "sources": [
                            {
                                "serviceAccountToken": {
                                    "audience": "istio-ca",
                                    "expirationSeconds": 43200,
                                    "path": "istio-token",
                                }
                            }
                        ]
                    },
                },
                {"name": "cni", "hostPath": {"path": "/etc/cni/net.d-does-not-exist"}},
                {"name": "proc", "hostPath": {"path": "/proc"}},
                {"name": "bpf", "hostPath": {"path": "/sys/fs/bpf"}},
                {"name": "scratch", "emptyDir": {}},
            ],
        },
    )
    asked = []

    def token(ns: str, sa: str, aud: list[str], seconds: int) -> str:
        asked.append((ns, sa, aud, seconds))
        return "a.b.c"

    cms = {("ns", "istio-ca-root-cert"): {"data": {"root-cert.pem": "PEM"}}}
    bpffs = tmp_path / "bpffs"
    bpffs.mkdir()
    paths = podspec.prepare_volumes(
        pod,
        tmp_path,
        lambda ns, n: cms.get((ns, n)),
        lambda ns, n: None,
        token,
        {"/sys/fs/bpf": str(bpffs)},
    )
    assert Path(paths["ca"], "root-cert.pem").read_text() == "PEM"
    assert Path(paths["tok"], "istio-token").read_text() == "a.b.c"
    assert asked == [("ns", "kmesh", ["istio-ca"], 43200)]
    assert paths["cni"] == str(tmp_path / "cni") and not Path("/etc/cni/net.d-does-not-exist").exists()
    assert paths["proc"] == "/proc"
    assert paths["bpf"] == str(bpffs)  # the sandbox's private bpffs stands in for /sys/fs/bpf
    mounts = podspec.container_mounts(
        {"volumeMounts": [{"name": "ca", "mountPath": "/var/run/secrets/istio", "readOnly": True}]}, paths
    )
    assert mounts[0].target == "/var/run/secrets/istio" and mounts[0].read_only


def test_missing_configmap_makes_the_pod_wait(tmp_path: Path) -> None:
    pod = dict(POD, spec={"volumes": [{"name": "ca", "configMap": {"name": "istio-ca-root-cert"}}]})
    with pytest.raises(podspec.VolumeError, match='configmap "istio-ca-root-cert" not found'):
        podspec.prepare_volumes(pod, tmp_path, lambda ns, n: None, lambda ns, n: None, lambda *a: "")


def test_waypoint_runs_envoy_bootstrap_against_the_pilot_socket(tmp_path: Path) -> None:
    ctx = NodeContext(cgroup_root=CTX.cgroup_root, pin_prefix="ksx", xds_socket=str(tmp_path / "xds.sock"))
    prog = resolve(
        "docker.io/istio/proxyv2:1.22.6", None, ["proxy", "waypoint"], {"POD_NAME": "w"}, [], "x", ctx
    )
    assert prog.argv[1:] == ["-m", "sandbox.images.waypoint", "--xds-socket", str(tmp_path / "xds.sock")]
    assert prog.env["ISTIO_META_ISTIO_VERSION"] == "1.22.6"
    no_socket = NodeContext(cgroup_root=CTX.cgroup_root, pin_prefix="ksx")
    with pytest.raises(ImageError):
        resolve("ghcr.io/kmesh-net/waypoint:v0.5", None, None, {}, [], "x", no_socket)


def test_waypoint_bootstrap_is_what_istio_agent_writes() -> None:
    from sandbox.images import waypoint

    env = {
        "POD_NAME": "waypoint-5d8f-abc",
        "POD_NAMESPACE": "default",
        "INSTANCE_IP": "10.244.0.9",
        "ISTIO_META_CLUSTER_ID": "Kubernetes",
        "ISTIO_META_ISTIO_VERSION": "1.22.6",
    }
    b = waypoint.bootstrap(env, "/tmp/x.sock")
    assert b["node"]["id"] == "waypoint~10.244.0.9~waypoint-5d8f-abc.default~default.svc.cluster.local"
    md = b["node"]["metadata"]
    assert (
        md["NAMESPACE"] == "default" and md["CLUSTER_ID"] == "Kubernetes" and md["ISTIO_VERSION"] == "1.22.6"
    )
    assert md["INSTANCE_IPS"] == "10.244.0.9"
    assert b["dynamic_resources"]["ads_config"]["api_type"] == "DELTA_GRPC"
    assert b["admin"]["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 15000}
    xds = b["static_resources"]["clusters"][0]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]
    assert xds["endpoint"]["address"]["pipe"]["path"] == "/tmp/x.sock"
