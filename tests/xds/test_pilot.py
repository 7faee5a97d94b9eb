"""The real client against the sandbox pilot (subprocess) fed by the sandbox API server."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import wait_for
from sandbox_env import Env, pod_body, service_body, set_pod_status

from daemon.state import State
from daemon.xds.client import ADDRESS_TYPE

NS = "shop"
SA_NS = "kmesh-system"


def uid(name: str, ns: str = NS) -> str:
    return f"Kubernetes//Pod/{ns}/{name}"


def endpoints(st: State, svc: str, port: int) -> dict[str, int]:
    s = st.projection().services.get(svc)
    if s is None:
        return {}
    sp = next((p for p in s.ports if p.port == port), None)
    return {e.backend_uid: e.target_port for e in sp.endpoints} if sp else {}


def test_istiod_service_and_root_cert_published(pilot_env: Env) -> None:
    env = pilot_env
    svc = env.core.read_namespaced_service("istiod-1-22", "istio-system")
    assert svc.metadata.labels["app"] == "istiod" and svc.metadata.labels["istio"] == "pilot"
    assert svc.metadata.labels["istio.io/rev"] == "1-22"
    assert {(p.name, p.port) for p in svc.spec.ports} == {("https-dns", 15012), ("grpc-xds", 15010)}
    root = (env.pilot.state_dir / "root-cert.pem").read_text()
    for ns in (NS, SA_NS, "default", "istio-system"):
        cm = env.core.read_namespaced_config_map("istio-ca-root-cert", ns)
        assert cm.data["root-cert.pem"] == root
    env.core.create_namespace({"metadata": {"name": "late"}})
    wait_for(lambda: _has_cm(env, "late"), what="root cert in a new namespace")


def _has_cm(env: Env, ns: str) -> bool:
    from kubernetes.client.rest import ApiException

    try:
        return bool(env.core.read_namespaced_config_map("istio-ca-root-cert", ns).data)
    except ApiException:
        return False


def test_service_and_pods_converge_then_removals(pilot_env: Env) -> None:
    env = pilot_env
    web = f"{NS}/web.{NS}.svc.cluster.local"
    env.core.create_namespaced_service(NS, service_body(
        "web", {"app": "web"}, [{"name": "http", "port": 80, "targetPort": 8080},
                                {"name": "admin", "port": 9000, "targetPort": "admin"}]))
    for i in range(3):
        cports = [{"name": "admin", "containerPort": 9901}]
        env.core.create_namespaced_pod(NS, pod_body(f"web-{i}", {"app": "web"}, container_ports=cports))
        set_pod_status(env.core, NS, f"web-{i}", f"10.1.0.{i + 1}", ready=i != 2)
    client, st = env.client()
    assert client.ready_event.wait(15), client.status()
    wait_for(lambda: len(endpoints(st, web, 80)) == 2, what="two ready endpoints")
    assert endpoints(st, web, 80) == {uid("web-0"): 8080, uid("web-1"): 8080}  # web-2 is not Ready
    assert endpoints(st, web, 9000) == {uid("web-0"): 9901, uid("web-1"): 9901}  # named targetPort
    assert uid("web-2") in st.projection().backends  # still a backend (direct pod access, authz)
    w0 = st.config_dump()["workloads"]
    w0 = next(w for w in w0 if w["name"] == "web-0")
    assert w0["node"] == "node-1" and w0["status"] == "Healthy" and w0["serviceAccount"] == "default"
    # readiness flips both ways
    set_pod_status(env.core, NS, "web-2", "10.1.0.3", ready=True)
    set_pod_status(env.core, NS, "web-0", "10.1.0.1", ready=False)
    wait_for(lambda: set(endpoints(st, web, 80)) == {uid("web-1"), uid("web-2")}, what="readiness flip")
    # scale down: pod deleted -> workload and backend removed
    env.core.delete_namespaced_pod("web-1", NS)
    wait_for(lambda: uid("web-1") not in st.workloads, what="pod removal")
    assert uid("web-1") not in st.projection().backends and set(endpoints(st, web, 80)) == {uid("web-2")}
    # service deleted -> gone from the projection, pods lose the membership
    env.core.delete_namespaced_service("web", NS)
    wait_for(lambda: web not in st.services, what="service removal")
    wait_for(lambda: not st.workloads[uid("web-2")].services, what="membership removal")
    assert web not in st.projection().services
    assert client.status()["nacks"] == 0


@pytest.mark.parametrize("case", ["cluster", "token", "audience", "namespace"])
def test_auth_failures_are_reported_and_state_untouched(pilot_env: Env, case: str, tmp_path: Path) -> None:
    env = pilot_env
    kw: dict[str, Any] = {}
    expect = "UNAUTHENTICATED"
    if case == "cluster":
        kw["cluster_id"] = "other-cluster"
    elif case == "token":
        bad = tmp_path / "bad-token"
        bad.write_text("not-a-jwt")
        kw["token_path"] = bad
    elif case == "audience":
        bad = tmp_path / "api-token"
        bad.write_text(env.request_token(SA_NS, "kmesh", audience="https://kubernetes.default.svc"))
        kw["token_path"] = bad
    else:
        kw["pod_namespace"] = "default"  # token is for kmesh-system
        expect = "PERMISSION_DENIED"
    client, st = env.client(**kw)
    wait_for(lambda: client.status()["reconnects"] >= 3, what="retries with backoff")
    s = client.status()
    assert s["last_error"].startswith(expect), s["last_error"]
    assert s["backoff_s"] > 0 and not s["ready"] and not s["connected"] and s["acks"] == 0
    assert st.counts() == {"services": 0, "workloads": 0, "policies": 0}


def test_pilot_killed_and_restarted_resyncs(pilot_env: Env) -> None:
    env = pilot_env
    env.core.create_namespaced_service(NS, service_body("db", {"app": "db"}, [{"port": 5432}]))
    for i in range(2):
        env.core.create_namespaced_pod(NS, pod_body(f"db-{i}", {"app": "db"}))
        set_pod_status(env.core, NS, f"db-{i}", f"10.2.0.{i + 1}", ready=True)
    db = f"{NS}/db.{NS}.svc.cluster.local"
    client, st = env.client()
    wait_for(lambda: len(endpoints(st, db, 5432)) == 2, what="db endpoints")
    streams = client.status()["streams"]
    env.pilot.kill()
    wait_for(lambda: not client.status()["connected"], what="disconnect noticed")
    # while the control plane is down: one pod goes away, one arrives; the cache is kept
    env.core.delete_namespaced_pod("db-0", NS)
    env.core.create_namespaced_pod(NS, pod_body("db-9", {"app": "db"}))
    set_pod_status(env.core, NS, "db-9", "10.2.0.9", ready=True)
    assert set(endpoints(st, db, 5432)) == {uid("db-0"), uid("db-1")}
    held = set(st.resource_versions("address"))
    env.pilot.start()
    wait_for(lambda: set(endpoints(st, db, 5432)) == {uid("db-1"), uid("db-9")}, timeout=20, what="resync")
    s = client.status()
    assert s["streams"] > streams and s["ready"] and s["reconnects"] >= 1
    sent = client.last_initial_versions[ADDRESS_TYPE]
    assert set(sent) == held and uid("db-0") in sent  # announced everything it held
    assert uid("db-0") not in st.workloads  # removed by the server's removed_resources
