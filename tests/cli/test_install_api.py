"""`kmeshctl install` / `uninstall` against the sandbox API server, checked with the official
kubernetes client and kubectl. Each test gets a fresh, empty API server."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

from tests.cli.conftest import REPO, ApiServer, _env, run_cli, snapshot
from tests.support.kubectl import kubectl_path

CID = "c0f1e2d3c4b5a6978"
MANAGED = "app.kubernetes.io/managed-by=kmeshctl"


def _istiod(srv: ApiServer, *revisions: str) -> None:
    """What istiod's chart creates: Service istiod[-rev] in istio-system, app=istiod, istio.io/rev."""
    docs = [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "istio-system"}}]
    for rev in revisions:
        name = "istiod" if rev == "default" else f"istiod-{rev}"
        docs.append({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": "istio-system",
                         "labels": {"app": "istiod", "istio": "pilot", "istio.io/rev": rev}},
            "spec": {"selector": {"app": "istiod", "istio.io/rev": rev},
                     "ports": [{"name": "grpc-xds", "port": 15010}, {"name": "https-dns", "port": 15012},
                               {"name": "https-webhook", "port": 443, "targetPort": 15017}]}})
    _kubectl_apply(srv, docs, "istio-installer")


def _kubectl_apply(srv: ApiServer, docs: list[dict], manager: str) -> None:
    text = "".join("---\n" + yaml.safe_dump(d) for d in docs)
    p = subprocess.run([kubectl_path(), "--kubeconfig", srv.kubeconfig, "apply", "--server-side",
                        f"--field-manager={manager}", "-f", "-"], input=text, capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0, p.stderr


def _get_json(srv: ApiServer, *args: str) -> dict:
    return json.loads(srv.kubectl("get", *args, "-o", "json").stdout)


def _container(srv: ApiServer) -> dict:
    ds = _get_json(srv, "daemonset", "kmesh", "-n", "kmesh-system")
    (c,) = ds["spec"]["template"]["spec"]["containers"]
    return c


def _env_of(c: dict) -> dict:
    return {e["name"]: e.get("value") for e in c["env"]}


def _assert_one_error_line(r, code: int = 1) -> str:
    assert r.code == code, r
    lines = r.err_lines
    assert len(lines) == 1 and lines[0].startswith("error: "), r.err
    assert "Traceback" not in r.err and r.out == ""
    return lines[0]


def test_install_discovers_istiod_and_is_idempotent(fresh_apiserver: ApiServer) -> None:
    srv = fresh_apiserver
    _istiod(srv, "1-22-6")
    r = run_cli("install", "--cluster-id", CID, kubeconfig=srv.kubeconfig)
    assert r.code == 0, r.err
    assert "using control plane istiod-1-22-6.istio-system.svc:15012" in r.err
    lines = r.out.splitlines()
    assert len(lines) == 8 and all(line.endswith(" created") for line in lines), r.out
    assert "daemonset.apps/kmesh created" in lines
    assert "envoyfilter.networking.istio.io/skip-tunneling created" in lines

    c = _container(srv)
    assert _env_of(c)["XDS_ADDRESS"] == "istiod-1-22-6.istio-system.svc:15012"
    assert _env_of(c)["CLUSTER_ID"] == CID
    ds = _get_json(srv, "daemonset", "kmesh", "-n", "kmesh-system", "--show-managed-fields")
    managers = {(m["manager"], m["operation"]) for m in ds["metadata"]["managedFields"]}
    assert ("kmeshctl", "Apply") in managers
    efs = _get_json(srv, "envoyfilters.networking.istio.io", "-n", "istio-system", "-l", MANAGED)
    assert sorted(i["metadata"]["name"] for i in efs["items"]) == [
        "add-listener-filter", "add-original-dst-cluster", "skip-tunneling"]

    before = snapshot(srv)
    r = run_cli("install", "--cluster-id", CID, "-o", "json", kubeconfig=srv.kubeconfig)
    assert r.code == 0, r.err
    results = json.loads(r.out)
    assert len(results) == 8 and {x["result"] for x in results} == {"unchanged"}
    assert snapshot(srv) == before

    r = run_cli("install", "--cluster-id", CID, "--image", "registry.example/kmesh:v2",
                kubeconfig=srv.kubeconfig)
    assert r.code == 0, r.err
    assert "daemonset.apps/kmesh configured" in r.out.splitlines()
    assert sum(line.endswith(" unchanged") for line in r.out.splitlines()) == 7
    assert _container(srv)["image"] == "registry.example/kmesh:v2"


def test_explicit_xds_needs_no_istiod_and_no_envoyfilters(fresh_apiserver: ApiServer) -> None:
    srv = fresh_apiserver
    r = run_cli("install", "--xds", "[fd00::15]:15012", "--cluster-id", "Kubernetes", "--no-envoyfilters",
                kubeconfig=srv.kubeconfig)
    assert r.code == 0, r.err
    assert len(r.out.splitlines()) == 5
    assert _env_of(_container(srv))["XDS_ADDRESS"] == "[fd00::15]:15012"
    # without --no-envoyfilters and no Istio namespace: refused before anything is applied
    before = snapshot(srv)
    line = _assert_one_error_line(run_cli("install", "--xds", "istiod.istio-system.svc:15012", "--cluster-id",
                                          "Kubernetes", kubeconfig=srv.kubeconfig))
    assert "istio-system not found" in line and "--no-envoyfilters" in line
    assert snapshot(srv) == before


def test_discovery_with_no_istiod_changes_nothing(fresh_apiserver: ApiServer) -> None:
    srv = fresh_apiserver
    _istiod(srv)  # istio-system exists, no istiod Service
    before = snapshot(srv)
    line = _assert_one_error_line(run_cli("install", "--cluster-id", CID, kubeconfig=srv.kubeconfig))
    assert "no istiod Service" in line and "--xds" in line
    assert snapshot(srv) == before


def test_discovery_with_two_revisions_never_guesses(fresh_apiserver: ApiServer) -> None:
    srv = fresh_apiserver
    _istiod(srv, "1-22-6", "1-23-2")
    before = snapshot(srv)
    line = _assert_one_error_line(run_cli("install", "--cluster-id", CID, kubeconfig=srv.kubeconfig))
    assert "istiod-1-22-6 (revision 1-22-6)" in line and "istiod-1-23-2 (revision 1-23-2)" in line
    assert "--revision" in line
    line = _assert_one_error_line(run_cli("install", "--cluster-id", CID, "--revision", "1-24-0",
                                          kubeconfig=srv.kubeconfig))
    assert "istio.io/rev=1-24-0" in line
    assert snapshot(srv) == before

    r = run_cli("install", "--cluster-id", CID, "--revision", "1-23-2", kubeconfig=srv.kubeconfig)
    assert r.code == 0, r.err
    assert "using control plane istiod-1-23-2.istio-system.svc:15012" in r.err
    assert _env_of(_container(srv))["XDS_ADDRESS"] == "istiod-1-23-2.istio-system.svc:15012"


def test_conflict_with_another_field_manager_applies_nothing(fresh_apiserver: ApiServer) -> None:
    srv = fresh_apiserver
    _istiod(srv, "default")
    # a platform team already owns ClusterRole kmesh's rules (server-side apply, other manager)
    _kubectl_apply(srv, [{"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
                          "metadata": {"name": "kmesh"},
                          "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]}]}],
                   "platform-team")
    before = snapshot(srv)
    line = _assert_one_error_line(run_cli("install", "--cluster-id", CID, kubeconfig=srv.kubeconfig))
    assert "ClusterRole kmesh" in line and "platform-team" in line and "nothing was applied" in line
    assert snapshot(srv) == before
    assert srv.kubectl("get", "namespace", "kmesh-system", check=False).returncode != 0


def test_rejection_in_a_new_namespace_leaves_nothing_behind(fresh_apiserver: ApiServer,
                                                             tmp_path: Path) -> None:
    """A DaemonSet the server rejects (422): its namespace had to be created to validate it and
    is removed again; every other object stays untouched. Templates come from a copy of
    manifests/ given by KMESH_MANIFESTS_DIR, with the DaemonSet's selector broken."""
    srv = fresh_apiserver
    _istiod(srv, "default")
    broken = tmp_path / "manifests"
    shutil.copytree(REPO / "manifests", broken, ignore=shutil.ignore_patterns("samples"))
    ds = broken / "kmesh" / "daemonset.yaml"
    text = ds.read_text()
    assert "    matchLabels:\n      app: kmesh" in text
    ds.write_text(text.replace("    matchLabels:\n      app: kmesh", "    matchLabels:\n      app: other"))
    before = snapshot(srv)
    r = run_cli("install", "--cluster-id", CID, kubeconfig=srv.kubeconfig,
                env={"KMESH_MANIFESTS_DIR": str(broken)})
    line = _assert_one_error_line(r)
    assert "DaemonSet kmesh-system/kmesh rejected by the API server (422" in line
    assert "nothing was applied" in line
    after = snapshot(srv)
    assert {k: v for k, v in after.items() if k[0] != "namespaces" or k[2] != "kmesh-system"} == before
    ns = srv.kubectl("get", "namespace", "kmesh-system", "-o", "json", check=False)
    assert ns.returncode != 0 or json.loads(ns.stdout)["status"].get("phase") == "Terminating"


def test_uninstall_deletes_only_what_install_created(fresh_apiserver: ApiServer) -> None:
    srv = fresh_apiserver
    _istiod(srv, "default")
    r = run_cli("install", "--cluster-id", CID, kubeconfig=srv.kubeconfig)
    assert r.code == 0, r.err
    foreign = [
        {"apiVersion": "networking.istio.io/v1alpha3", "kind": "EnvoyFilter",
         "metadata": {"name": "team-filter", "namespace": "istio-system"},
         "spec": {"configPatches": [{"applyTo": "CLUSTER", "match": {"context": "ANY"},
                                     "patch": {"operation": "MERGE", "value": {"connect_timeout": "3s"}}}]}},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
         "metadata": {"name": "kmesh-viewer", "labels": {"app.kubernetes.io/managed-by": "helm"}},
         "rules": []},
        {"apiVersion": "v1", "kind": "ConfigMap",
         "metadata": {"name": "team-notes", "namespace": "kmesh-system"}, "data": {"a": "b"}},
    ]
    _kubectl_apply(srv, foreign, "team")
    r = run_cli("uninstall", kubeconfig=srv.kubeconfig)
    assert r.code == 0, r.err
    assert "namespace kmesh-system kept" in r.err and "configmap/team-notes" in r.err
    out = r.out.splitlines()
    assert "daemonset.apps/kmesh deleted" in out and "namespace/kmesh-system kept" in out
    assert sum(line.endswith(" deleted") for line in out) == 7
    srv.kubectl("get", "envoyfilters.networking.istio.io", "team-filter", "-n", "istio-system")
    assert srv.kubectl("get", "clusterrole", "kmesh-viewer").returncode == 0
    assert srv.kubectl("get", "configmap", "team-notes", "-n", "kmesh-system").returncode == 0
    assert srv.kubectl("get", "service", "istiod", "-n", "istio-system").returncode == 0
    for kind, name in [("daemonset", "kmesh"), ("serviceaccount", "kmesh")]:
        assert srv.kubectl("get", kind, name, "-n", "kmesh-system", check=False).returncode != 0
    assert srv.kubectl("get", "clusterrole", "kmesh", check=False).returncode != 0
    assert json.loads(srv.kubectl("get", "envoyfilters.networking.istio.io", "-A", "-l", MANAGED, "-o",
                                  "json").stdout)["items"] == []

    srv.kubectl("delete", "configmap", "team-notes", "-n", "kmesh-system")
    r = run_cli("uninstall", "-o", "json", kubeconfig=srv.kubeconfig)
    assert r.code == 0, r.err
    assert json.loads(r.out) == [{"kind": "Namespace", "namespace": "", "name": "kmesh-system",
                                  "result": "deleted"}]
    r = run_cli("uninstall", kubeconfig=srv.kubeconfig)
    assert r.code == 0 and r.out == "" and "nothing to uninstall" in r.err


def _mark_ready_when_created(srv: ApiServer, stop: threading.Event) -> None:
    """Plays the DaemonSet controller + kubelet: reports one scheduled, ready pod."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    apps = client.AppsV1Api(srv.client())
    while not stop.is_set():
        try:
            ds = apps.read_namespaced_daemon_set("kmesh", "kmesh-system")
            time.sleep(1.0)  # let the CLI observe "not ready" first
            apps.patch_namespaced_daemon_set_status("kmesh", "kmesh-system", {"status": {
                "desiredNumberScheduled": 1, "currentNumberScheduled": 1, "numberReady": 1,
                "updatedNumberScheduled": 1, "numberAvailable": 1,
                "observedGeneration": ds.metadata.generation}})
            return
        except ApiException:
            time.sleep(0.2)


def test_wait_until_daemonset_ready_and_timeout(fresh_apiserver: ApiServer) -> None:
    srv = fresh_apiserver
    r = run_cli("install", "--xds", "istiod.istio-system.svc:15012", "--cluster-id", CID, "--no-envoyfilters",
                "--wait", "--timeout", "2s", kubeconfig=srv.kubeconfig)
    assert r.code == 1
    assert r.err_lines[-1] == ("error: timed out after 2s waiting for DaemonSet kmesh-system/kmesh: 0/0 pods "
                               "ready; see kubectl -n kmesh-system get pods -l app=kmesh")
    srv.kubectl("delete", "daemonset", "kmesh", "-n", "kmesh-system")

    stop = threading.Event()
    t = threading.Thread(target=_mark_ready_when_created, args=(srv, stop), daemon=True)
    t.start()
    p = subprocess.run([sys.executable, "-m", "kmeshctl.main", "install", "--xds",
                        "istiod.istio-system.svc:15012", "--cluster-id", CID, "--no-envoyfilters", "--wait",
                        "--timeout", "30s"], capture_output=True, text=True, env=_env(srv.kubeconfig, None),
                       cwd=str(REPO), timeout=60)
    stop.set()
    t.join(5)
    assert p.returncode == 0, p.stderr
    assert "DaemonSet kmesh-system/kmesh ready" in p.stderr and "1/1 pods ready" in p.stderr
    assert "daemonset.apps/kmesh created" in p.stdout


def test_conflict_with_an_own_manager_is_forced_and_custom_namespace(fresh_apiserver: ApiServer) -> None:
    """Fields held by another kmeshctl manager (e.g. an older tool version) are taken over
    (force), unlike a foreign manager's; install into a non-default namespace; uninstall
    --dry-run lists and deletes nothing."""
    srv = fresh_apiserver
    _kubectl_apply(srv, [{"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
                          "metadata": {"name": "kmesh"},
                          "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]}]}],
                   "kmeshctl-0.0.1")
    r = run_cli("install", "--xds", "10.0.0.1:15012", "--cluster-id", CID, "--no-envoyfilters",
                "-n", "mesh-agents", kubeconfig=srv.kubeconfig)
    assert r.code == 0, r.err
    assert "clusterrole.rbac.authorization.k8s.io/kmesh configured" in r.out.splitlines()
    role = _get_json(srv, "clusterrole", "kmesh")
    assert any("patch" in rule["verbs"] for rule in role["rules"])
    binding = _get_json(srv, "clusterrolebinding", "kmesh")
    assert binding["subjects"][0]["namespace"] == "mesh-agents"
    srv.kubectl("get", "daemonset", "kmesh", "-n", "mesh-agents")

    before = snapshot(srv)
    r = run_cli("uninstall", "--dry-run", kubeconfig=srv.kubeconfig)
    assert r.code == 0, r.err
    assert len(r.out.splitlines()) == 5 and all(x.endswith(" would be deleted") for x in r.out.splitlines())
    assert snapshot(srv) == before
