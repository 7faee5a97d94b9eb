"""kmeshctl reaching daemons through the Kubernetes API port-forward (the real client code).

Two daemons' admin APIs (real AdminServers with small stand-in components) sit behind a
stand-in of the API server's pods list + portforward websocket (fake_kubeapi.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from daemon.admin import AdminContext, AdminServer
from tests.daemon.fake_kubeapi import FakeKubeApi
from tests.daemon.test_admin import Dataplane, Enroll, Xds

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture()
def cluster(tmp_path: Path):
    servers = []
    xds_b = Xds()
    xds_b.connected = False
    for xds in (Xds(), xds_b):
        s = AdminServer("127.0.0.1", 0, AdminContext(config=None, dataplane=Dataplane(), xds=xds,
                                                     enroll=Enroll(), started=1.0))
        s.start()
        servers.append(s)
    api = FakeKubeApi({"kmesh-aaaaa": ("node-a", servers[0].server_address[1], True),
                       "kmesh-bbbbb": ("node-b", servers[1].server_address[1], True)})
    kc = tmp_path / "kubeconfig"
    api.write_kubeconfig(kc)
    yield api, kc
    api.shutdown()
    for s in servers:
        s.stop()


def kmeshctl(kc: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "KUBECONFIG": str(kc), "KMESH_SANDBOX_DIR": "/nonexistent"}
    env.pop("KMESH_ADMIN_ADDR", None)
    return subprocess.run([sys.executable, "-m", "kmeshctl.main", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)


def test_find_daemons_and_request_through_portforward(cluster) -> None:
    from kmeshctl.daemonlink import find_daemons, find_one

    api, kc = cluster
    daemons = find_daemons(kubeconfig=str(kc))
    assert [(d.label, d.node, d.ready) for d in daemons] == [("kmesh-aaaaa", "node-a", True),
                                                               ("kmesh-bbbbb", "node-b", True)]
    st = daemons[0].get_json("/status")
    assert st["xds"]["connected"] is True
    assert api.requests[-1] == ("kmesh-aaaaa", 15200, "Bearer fake-token")
    only_b = find_one(None, "node-b", str(kc), None)
    assert only_b.get_json("/status")["xds"]["connected"] is False
    assert api.requests[-1][0] == "kmesh-bbbbb"


def test_status_over_portforward_exits_nonzero_when_one_daemon_unhealthy(cluster) -> None:
    _, kc = cluster
    r = kmeshctl(kc, "status")
    assert r.returncode == 1, r.stderr
    assert "kmesh daemon kmesh-aaaaa on node node-a: READY" in r.stdout
    assert "kmesh daemon kmesh-bbbbb on node node-b: NOT READY" in r.stdout
    assert "1/2 daemons ready" in r.stdout
    r = kmeshctl(kc, "status", "--node", "node-a", "-o", "json")
    assert r.returncode == 0 and json.loads(r.stdout)["healthy"] is True
    from kmeshctl.common import KmeshctlError, UsageError
    from kmeshctl.daemonlink import find_daemons, find_one

    with pytest.raises(KmeshctlError, match="node 'node-x'; daemons run on: node-a, node-b"):
        find_daemons(node="node-x", kubeconfig=str(kc))
    with pytest.raises(UsageError, match="pick one with --node"):
        find_one(None, None, str(kc), None, need_node=True)


def test_sandbox_is_reached_through_its_api_servers_portforward(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A sandbox dir with a running API server: kmeshctl port-forwards to the daemon pod through it,
    as in a cluster (the real sandbox API server; the daemon pod is host-network, as installed)."""
    from kmeshctl.common import KmeshctlError
    from kmeshctl.daemonlink import find_daemons
    from sandbox.apiserver import ApiServer

    class Cfg:
        node_name, pod_name = "node-s", "kmesh-sbx"

    server = AdminServer("127.0.0.1", 0, AdminContext(config=Cfg(), xds=Xds(), started=1.0))
    server.start()
    api = ApiServer(port=0, state_dir=tmp_path / "api")
    api.start()
    try:
        api.write_kubeconfig(tmp_path / "kubeconfig")
        _host_network_daemon_pod(api, tmp_path)
        monkeypatch.setenv("KMESH_SANDBOX_DIR", str(tmp_path))
        monkeypatch.setenv("KMESH_SANDBOX_ADMIN_PORT", str(server.server_address[1]))
        monkeypatch.delenv("KUBECONFIG", raising=False)
        monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
        monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.kube/config to fall back to
        (d,) = find_daemons()
        assert (d.label, d.node, d.pod) == ("kmesh-sbx", "node-s", ("kmesh-system", "kmesh-sbx"))
        before = api.api.stream_counts.get("portforward", 0)
        assert d.get_json("/version")["pod"] == "kmesh-sbx"
        assert api.api.stream_counts["portforward"] == before + 1
        # Another cluster named explicitly: the sandbox is not used.
        other = tmp_path / "other-kubeconfig"
        other.write_text("{}")
        with pytest.raises(KmeshctlError, match="invalid kubeconfig"):
            find_daemons(kubeconfig=str(other))
    finally:
        api.stop()
        server.stop()
    # The sandbox's API server is down: not a running sandbox.
    with pytest.raises(KmeshctlError, match="no kubeconfig"):
        find_daemons()


def _host_network_daemon_pod(api, tmp_path: Path) -> None:
    """A Running hostNetwork pod app=kmesh whose runtime info (as the kubelet publishes it) exists."""
    from kubernetes import client, config

    core = client.CoreV1Api(config.new_client_from_config(str(tmp_path / "kubeconfig")))
    core.create_namespace({"metadata": {"name": "kmesh-system"}})
    info = tmp_path / "pod.json"
    pod = core.create_namespaced_pod("kmesh-system", {
        "metadata": {"name": "kmesh-sbx", "labels": {"app": "kmesh"},
                     "annotations": {"sandbox.kmesh.io/runtime-info": str(info)}},
        "spec": {"nodeName": "node-s", "hostNetwork": True,
                 "containers": [{"name": "kmesh", "image": "kmesh"}]}})
    info.write_text(json.dumps({"uid": pod.metadata.uid, "namespace": "kmesh-system", "name": "kmesh-sbx",
                                "hostNetwork": True, "netns": None, "containers": {}}))
