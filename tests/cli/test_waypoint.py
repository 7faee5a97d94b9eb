"""`kmeshctl waypoint` as a subprocess against the sandbox API server and the sandbox pilot
(revision 1-22-6, whose gateway controller deploys waypoints and writes their status).

There is no kubelet here: where a waypoint pod would become Ready, the test writes the
Deployment's readyReplicas as the kubelet's deployment controller would, and the pilot turns
that into Programmed=True. Results are read back with kubectl and the official client; every
bad input is checked to change nothing (resourceVersions of everything before == after).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.cli.conftest import REPO, ApiServer, Result, _env, free_port, run_cli
from tests.support.kubectl import kubectl_path
from tests.support.procs import start_logged, stop_process, wait_for

GROUP, VERSION = "gateway.networking.k8s.io", "v1"


@pytest.fixture(scope="module")
def cluster(apiserver: ApiServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    work = tmp_path_factory.mktemp("waypoint-pilot")
    cmd = [sys.executable, "-m", "sandbox.pilot", "--kubeconfig", apiserver.kubeconfig,
           "--revision", "1-22-6", "--tls-port", "0", "--plaintext-port", "0",
           "--state-dir", str(work / "state")]
    pilot, _ = start_logged(cmd, work / "pilot.log", "ready tls=", "sandbox.pilot")
    core = _core(apiserver)
    core.create_namespace({"metadata": {"name": "wp-a", "labels": {"istio.io/dataplane-mode": "Kmesh"}}})
    core.create_namespace({"metadata": {"name": "wp-b"}})
    core.create_namespace({"metadata": {"name": "wp-c", "labels": {"istio.io/use-waypoint": "other"}}})
    try:
        yield apiserver
    finally:
        stop_process(pilot)


def _core(srv: ApiServer):
    from kubernetes import client

    return client.CoreV1Api(srv.client())


def _custom(srv: ApiServer):
    from kubernetes import client

    return client.CustomObjectsApi(srv.client())


def _gateway(srv: ApiServer, ns: str, name: str) -> dict | None:
    from kubernetes.client.rest import ApiException

    try:
        return _custom(srv).get_namespaced_custom_object(GROUP, VERSION, ns, "gateways", name)
    except ApiException as e:
        if e.status == 404:
            return None
        raise


def _ns_labels(srv: ApiServer, ns: str) -> dict:
    return _core(srv).read_namespace(ns).metadata.labels or {}


def _ready(srv: ApiServer, ns: str, name: str) -> None:
    """Play the kubelet: the waypoint Deployment's pod is Ready."""
    from kubernetes import client

    apps = client.AppsV1Api(srv.client())
    wait_for(lambda: apps.read_namespaced_deployment(name, ns), 15, f"deployment {ns}/{name}")
    apps.patch_namespaced_deployment_status(name, ns, {"status": {
        "replicas": 1, "readyReplicas": 1, "availableReplicas": 1, "updatedReplicas": 1}})


def state(srv: ApiServer) -> dict[tuple[str, str, str], str]:
    """resourceVersion of every namespace, gateway, deployment and service."""
    from kubernetes import client

    api = srv.client()
    out: dict[tuple[str, str, str], str] = {}
    for it in client.CoreV1Api(api).list_namespace().items:
        out[("namespaces", "", it.metadata.name)] = it.metadata.resource_version
    for it in client.CoreV1Api(api).list_service_for_all_namespaces().items:
        out[("services", it.metadata.namespace, it.metadata.name)] = it.metadata.resource_version
    for it in client.AppsV1Api(api).list_deployment_for_all_namespaces().items:
        out[("deployments", it.metadata.namespace, it.metadata.name)] = it.metadata.resource_version
    for it in _custom(srv).list_cluster_custom_object(GROUP, VERSION, "gateways")["items"]:
        m = it["metadata"]
        out[("gateways", m["namespace"], m["name"])] = m["resourceVersion"]
    return out


def one_line_error(r: Result, code: int, *words: str) -> None:
    assert r.code == code, (r.code, r.out, r.err)
    assert len(r.err_lines) == 1 and r.err_lines[0].startswith("error: "), r.err
    for w in words:
        assert w in r.err, (w, r.err)
    assert r.out == ""


# ----- generate (offline) ----------------------------------------------------------------------

def test_generate_prints_a_gateway_the_api_server_accepts(cluster: ApiServer) -> None:
    from kmeshctl import gatewayschema

    r = run_cli("waypoint", "generate", "-n", "wp-b", "--for", "workload", "-r", "1-22-6",
                "--name", "reviews-wp")
    assert r.code == 0 and r.err == "", r.err
    gw = yaml.safe_load(r.out)
    assert gw == {
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
        "metadata": {"name": "reviews-wp", "namespace": "wp-b",
                     "labels": {"istio.io/waypoint-for": "workload", "istio.io/rev": "1-22-6"},
                     "annotations": {"sidecar.istio.io/proxyImage": "ghcr.io/kmesh-net/waypoint:v0.5.0"}},
        "spec": {"gatewayClassName": "istio-waypoint",
                 "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]}}
    assert gatewayschema.problems(gw) == []
    # The real kubectl, strict field validation, server-side dry run: accepted, nothing created.
    p = subprocess.run([kubectl_path(), "--kubeconfig", cluster.kubeconfig, "apply", "--server-side",
                        "--dry-run=server", "--validate=strict", "-f", "-"], input=r.out, capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0 and "serverside-applied (server dry run)" in p.stdout, p.stderr
    assert _gateway(cluster, "wp-b", "reviews-wp") is None
    # No -n: no namespace in the YAML (kubectl apply puts it in the current one); json output.
    r = run_cli("waypoint", "generate", "--image", "docker.io/istio/proxyv2:1.22.6", "-o", "json")
    gw = json.loads(r.out)
    assert "namespace" not in gw["metadata"] and "labels" not in gw["metadata"]
    assert gw["metadata"]["annotations"]["sidecar.istio.io/proxyImage"] == "docker.io/istio/proxyv2:1.22.6"


@pytest.mark.parametrize(("args", "words"), [
    (["--for", "ingress"], ["invalid traffic type", "service, workload"]),
    (["--name", "none"], ["'none' is a reserved value"]),
    (["--name", "Bad_Name"], ["not a valid waypoint name"]),
    (["--name", "1abc"], ["not a valid waypoint name"]),
    (["-r", "1.22.6"], ["--revision", "not a valid revision"]),
    (["--image", "bad image"], ["--image", "not a valid image"]),
    (["-n", "Bad-NS"], ["--namespace", "not a valid namespace"]),
    (["-o", "xml"], ["--output"]),
])
def test_generate_bad_flags(args: list[str], words: list[str]) -> None:
    one_line_error(run_cli("waypoint", "generate", *args), 2, *words)


# ----- apply / list / status / delete ------------------------------------------------------------

def test_apply_wait_enroll_list_status(cluster: ApiServer) -> None:
    srv = cluster
    empty = run_cli("waypoint", "list", "-n", "wp-a", kubeconfig=srv.kubeconfig)
    assert empty.code == 0 and empty.out.strip() == "No waypoints found."
    env = _env(srv.kubeconfig, None)
    proc = subprocess.Popen([sys.executable, "-m", "kmeshctl.main", "waypoint", "apply", "-n", "wp-a",
                             "--enroll-namespace", "--wait"], cwd=str(REPO), env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: _gateway(srv, "wp-a", "waypoint"), 15, "gateway applied")
        time.sleep(0.5)
        assert proc.poll() is None  # still waiting: not programmed yet
        assert "istio.io/use-waypoint" not in _ns_labels(srv, "wp-a")  # enrolled only once ready
        _ready(srv, "wp-a", "waypoint")
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert out.splitlines() == ["waypoint wp-a/waypoint applied (created)",
                                'namespace wp-a labeled with "istio.io/use-waypoint: waypoint"']
    assert "using istiod revision 1-22-6" in err and "wp-a/waypoint programmed" in err
    assert _ns_labels(srv, "wp-a")["istio.io/use-waypoint"] == "waypoint"
    gw = _gateway(srv, "wp-a", "waypoint")
    assert gw["metadata"]["labels"] == {"istio.io/rev": "1-22-6"}  # discovered from the istiod Service
    assert ("kmeshctl", "Apply") in {(m["manager"], m["operation"]) for m in gw["metadata"]["managedFields"]}

    r = run_cli("waypoint", "list", "-n", "wp-a", kubeconfig=srv.kubeconfig)
    assert [ln.split() for ln in r.out.splitlines()] == [["NAME", "REVISION", "PROGRAMMED"],
                                                         ["waypoint", "1-22-6", "True"]]
    r = run_cli("waypoint", "list", "-A", kubeconfig=srv.kubeconfig)
    lines = [ln.split() for ln in r.out.splitlines()]
    assert lines[0] == ["NAMESPACE", "NAME", "REVISION", "PROGRAMMED"]
    assert ["wp-a", "waypoint", "1-22-6", "True"] in lines
    r = run_cli("waypoint", "list", "-A", "-o", "json", kubeconfig=srv.kubeconfig)
    row = {"namespace": "wp-a", "name": "waypoint", "revision": "1-22-6", "programmed": "True"}
    assert row in json.loads(r.out)
    r = run_cli("waypoint", "status", "-n", "wp-a", kubeconfig=srv.kubeconfig)
    lines = r.out.splitlines()
    assert lines[0].split() == ["NAME", "STATUS", "TYPE", "REASON", "MESSAGE"]
    assert lines[1].split()[:4] == ["waypoint", "True", "Programmed", "Programmed"]
    assert "waypoint.wp-a.svc.cluster.local:15008" in lines[1]
    r = run_cli("waypoint", "status", "-A", "-o", "yaml", kubeconfig=srv.kubeconfig)
    assert any(row["namespace"] == "wp-a" and row["status"] == "True" for row in yaml.safe_load(r.out))

    # Applying the same waypoint again changes nothing.
    before = state(srv)
    r = run_cli("waypoint", "apply", "-n", "wp-a", "--enroll-namespace", kubeconfig=srv.kubeconfig)
    assert r.code == 0, r.err
    assert r.out.splitlines() == ["waypoint wp-a/waypoint applied (unchanged)",
                                  'namespace wp-a already labeled with "istio.io/use-waypoint: waypoint"']
    assert state(srv) == before


def test_bad_inputs_change_nothing(cluster: ApiServer, tmp_path: Path) -> None:
    srv = cluster
    kc = srv.kubeconfig
    _custom(srv).create_namespaced_custom_object(GROUP, VERSION, "wp-b", "gateways", {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "Gateway", "metadata": {"name": "ingress"},
        "spec": {"gatewayClassName": "istio",
                 "listeners": [{"name": "http", "port": 80, "protocol": "HTTP"}]}})
    r = run_cli("waypoint", "apply", "-n", "wp-b", "--for", "service", kubeconfig=kc)
    assert r.code == 0, r.err
    before = state(srv)

    one_line_error(run_cli("waypoint", "apply", "-n", "nope", kubeconfig=kc), 1, "namespace nope not found",
                   "nothing was applied")
    one_line_error(run_cli("waypoint", "apply", "-n", "wp-b", "--for", "bogus", kubeconfig=kc), 2,
                   "invalid traffic type")
    # Name clash: the existing waypoint is for service; another Gateway class under that name.
    one_line_error(run_cli("waypoint", "apply", "-n", "wp-b", "--for", "workload", kubeconfig=kc), 1,
                   "already exists", "istio.io/waypoint-for=service", "--overwrite", "nothing was applied")
    one_line_error(run_cli("waypoint", "apply", "-n", "wp-b", "--name", "ingress", kubeconfig=kc), 1,
                   "a Gateway named ingress already exists", "class 'istio'")
    # The namespace already uses another waypoint.
    one_line_error(run_cli("waypoint", "apply", "-n", "wp-c", "--enroll-namespace", kubeconfig=kc), 1,
                   "already uses waypoint other", "--overwrite")
    # No cluster: nothing listens there / no kubeconfig at all.
    dead = tmp_path / "dead-kubeconfig"
    dead.write_text(Path(kc).read_text().replace(f":{srv.port}", f":{free_port()}"))
    one_line_error(run_cli("waypoint", "apply", "-n", "wp-b", kubeconfig=str(dead)), 1,
                   "cannot reach the Kubernetes API")
    one_line_error(run_cli("waypoint", "list", env={"HOME": str(tmp_path)}), 1, "no kubeconfig")
    # delete: unknown name, a non-waypoint Gateway, names with --all, nothing at all.
    one_line_error(run_cli("waypoint", "delete", "waypoint", "ghost", "-n", "wp-b", kubeconfig=kc), 1,
                   "not found in namespace wp-b: ghost", "nothing was deleted")
    one_line_error(run_cli("waypoint", "delete", "ingress", "-n", "wp-b", kubeconfig=kc), 1, "not a waypoint")
    one_line_error(run_cli("waypoint", "delete", "waypoint", "--all", "-n", "wp-b", kubeconfig=kc), 2,
                   "--all")
    one_line_error(run_cli("waypoint", "delete", "-n", "wp-b", kubeconfig=kc), 2, "specify a waypoint name")
    assert state(srv) == before

    # --overwrite replaces the clashing waypoint and switches the namespace's waypoint.
    r = run_cli("waypoint", "apply", "-n", "wp-b", "--for", "workload", "--overwrite", kubeconfig=kc)
    assert r.code == 0 and "applied (configured)" in r.out, r.err
    assert _gateway(srv, "wp-b", "waypoint")["metadata"]["labels"]["istio.io/waypoint-for"] == "workload"
    r = run_cli("waypoint", "apply", "-n", "wp-c", "--name", "mine", "--enroll-namespace", "--overwrite",
                kubeconfig=kc)
    assert r.code == 0, r.err
    assert "not enrolled in Kmesh" in r.err  # a warning, on stderr
    assert _ns_labels(srv, "wp-c")["istio.io/use-waypoint"] == "mine"


def test_wait_times_out_without_enrolling(cluster: ApiServer) -> None:
    srv = cluster
    _core(srv).create_namespace({"metadata": {"name": "wp-slow"}})
    r = run_cli("waypoint", "apply", "-n", "wp-slow", "--enroll-namespace", "-w", "--timeout", "3s",
                kubeconfig=srv.kubeconfig)
    assert r.code == 1 and r.err_lines[-1].startswith("error: timed out after 3s waiting for waypoint "
                                                      "wp-slow/waypoint"), r.err
    assert "0/1 replicas ready" in r.err_lines[-1]
    assert "istio.io/use-waypoint" not in _ns_labels(srv, "wp-slow")


def test_delete_by_name_and_all(cluster: ApiServer) -> None:
    from kubernetes import client

    srv = cluster
    kc = srv.kubeconfig
    _core(srv).create_namespace({"metadata": {"name": "wp-d"}})
    for name in ("one", "two", "three"):
        assert run_cli("waypoint", "apply", "-n", "wp-d", "--name", name, kubeconfig=kc).code == 0
    _custom(srv).create_namespaced_custom_object(GROUP, VERSION, "wp-d", "gateways", {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "Gateway", "metadata": {"name": "ingress"},
        "spec": {"gatewayClassName": "istio",
                 "listeners": [{"name": "http", "port": 80, "protocol": "HTTP"}]}})
    apps = client.AppsV1Api(srv.client())
    wait_for(lambda: len(apps.list_namespaced_deployment("wp-d").items) == 3, 15, "three deployments")
    r = run_cli("waypoint", "delete", "one", "-n", "wp-d", kubeconfig=kc)
    assert r.code == 0 and r.out.strip() == "waypoint wp-d/one deleted", r.err
    r = run_cli("waypoint", "delete", "--all", "-n", "wp-d", kubeconfig=kc)
    assert r.code == 0 and r.out.splitlines() == ["waypoint wp-d/three deleted", "waypoint wp-d/two deleted"]
    # Only waypoints: the ingress Gateway stays; the waypoints' Deployments go with them.
    assert _gateway(srv, "wp-d", "ingress") is not None
    wait_for(lambda: not apps.list_namespaced_deployment("wp-d").items, 15, "deployments garbage-collected")
    r = run_cli("waypoint", "delete", "--all", "-n", "wp-d", kubeconfig=kc)
    assert r.code == 0 and "No waypoints found" in r.out
