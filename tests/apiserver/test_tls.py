"""Optional HTTPS with anonymous requests refused: kubectl then authenticates with the token."""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes import client, watch

from .conftest import Cluster, _start


@pytest.fixture(scope="module")
def tls_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    yield from _start(tmp_path_factory.mktemp("apiserver-tls"), tls=True, anonymous=False)


def test_kubectl_and_client_over_tls(tls_cluster: Cluster) -> None:
    assert tls_cluster.server.url.startswith("https://127.0.0.1:")
    out = tls_cluster.kubectl("get", "ns", "default", "-o", "json").stdout
    assert json.loads(out)["metadata"]["name"] == "default"
    ns = tls_cluster.new_namespace()
    core = client.CoreV1Api(tls_cluster.api_client())
    rv = core.list_namespaced_config_map(ns).metadata.resource_version
    core.create_namespaced_config_map(ns, {"metadata": {"name": "c"}})
    events = []
    for ev in watch.Watch().stream(
        core.list_namespaced_config_map, ns, resource_version=rv, timeout_seconds=3
    ):
        events.append((ev["type"], ev["object"].metadata.name))
        break
    assert events == [("ADDED", "c")]


def test_anonymous_is_refused(tls_cluster: Cluster, tmp_path: Path) -> None:
    ctx = ssl.create_default_context(cadata=tls_cluster.server.ca_pem.decode())
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"{tls_cluster.server.url}/api/v1/namespaces", context=ctx, timeout=5)
    assert e.value.code == 401
    assert json.loads(e.value.read())["reason"] == "Unauthorized"
    with urllib.request.urlopen(f"{tls_cluster.server.url}/version", context=ctx, timeout=5) as resp:
        assert json.load(resp)["major"] == "1"
    # kubectl with a wrong token: 401 and kubectl's usual message.
    bad = tmp_path / "kc"
    bad.write_text(tls_cluster.kubeconfig.read_text().replace(tls_cluster.server.token, "wrong"))
    res = tls_cluster.kubectl("--kubeconfig", str(bad), "get", "ns", check=False)
    assert res.returncode == 1 and "You must be logged in to the server" in res.stderr
