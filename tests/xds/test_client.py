"""The delta ADS client against a real gRPC server speaking istiod's delta semantics."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from conftest import AdsHarness, wait_for
from xds_helpers import ip, name_of, projection_of, service, svc_key, workload

from daemon.xds.client import ADDRESS_TYPE, AUTHORIZATION_TYPE
from daemon.xds.gen.istio.security import authorization_pb2 as az
from daemon.xds.gen.istio.workload import workload_pb2 as wl
from sandbox.pilot import ca
from sandbox.pilot.server import Authenticator, AuthError

A = svc_key("a")


def put(ads: AdsHarness, *addrs: wl.Address, removed: tuple[str, ...] = ()) -> None:
    ads.store.update(ADDRESS_TYPE, {name_of(a): a.SerializeToString() for a in addrs}, removed)


def test_converges_acks_and_removals(ads: AdsHarness, make_client: Any) -> None:
    put(ads, service("a"), workload("w1", "10.1.0.1", services={A: []}),
        workload("w2", "10.1.0.2", services={A: []}))
    pol = az.Authorization(name="deny", namespace="default", action=az.DENY)
    ads.store.update(AUTHORIZATION_TYPE, {"default/deny": pol.SerializeToString()})
    client, st = make_client(ads.address)
    assert client.ready_event.wait(10)
    wait_for(lambda: len(st.workloads) == 2, what="two workloads")
    assert set(st.policies) == {"default/deny"}
    s = client.status()
    assert s["ready"] and s["connected"] and s["nacks"] == 0 and s["acks"] >= 2
    assert {h["type_url"] for h in s["history"]} == {ADDRESS_TYPE, AUTHORIZATION_TYPE}
    # the server saw an ACK with the nonce of each response
    sent = {(h["type_url"], h["nonce"]) for h in s["history"]}
    wait_for(lambda: sent <= {(t, n) for t, n, err in ads.servicer.streams[-1].acks if not err}, what="ACKs")
    put(ads, removed=("Kubernetes//Pod/default/w1",))
    ads.store.update(AUTHORIZATION_TYPE, removed=["default/deny"])
    wait_for(lambda: set(st.workloads) == {"Kubernetes//Pod/default/w2"} and not st.policies, what="removal")
    eps = st.projection().services[A].ports[0].endpoints
    assert [e.backend_uid for e in eps] == ["Kubernetes//Pod/default/w2"]


def test_node_identity_and_metadata(ads: AdsHarness, make_client: Any, token_file: Path) -> None:
    seen: list[dict[str, str]] = []

    class Capture(Authenticator):
        def authenticate(self, metadata: Mapping[str, str]) -> Any:
            seen.append(dict(metadata))
            return None

    ads.stop()
    ads.authenticator = Capture()
    ads.start()
    client, st = make_client(ads.address, token_path=token_file, cluster_id="cluster-7", node_name="node-1",
                             service_account="kmesh")
    assert client.ready_event.wait(10)
    rec = ads.servicer.streams[-1]
    assert rec.node_id == "ztunnel~10.0.0.5~kmesh-abc.kmesh-system~kmesh-system.svc.cluster.local"
    md = rec.node_metadata
    assert (md["NAMESPACE"], md["CLUSTER_ID"]) == ("kmesh-system", "cluster-7")
    assert (md["INSTANCE_IPS"], md["NODE_NAME"]) == ("10.0.0.5", "node-1")
    assert (md["SERVICE_ACCOUNT"], md["MESH_ID"]) == ("kmesh", "cluster.local")
    # both subscriptions are wildcard (no names) and carry the node; Address comes first
    assert rec.subscriptions == [(ADDRESS_TYPE, [], True), (AUTHORIZATION_TYPE, [], True)]
    assert seen[-1]["authorization"] == "Bearer token-one" and seen[-1]["clusterid"] == "cluster-7"
    # the token file is re-read for every stream
    token_file.write_text("token-two")
    ads.stop()
    ads.start()
    wait_for(lambda: len(seen) >= 2 and seen[-1]["authorization"] == "Bearer token-two", what="new token")


def test_malformed_resource_is_nacked_by_name_rest_applied(ads: AdsHarness, make_client: Any) -> None:
    client, st = make_client(ads.address)
    assert client.ready_event.wait(10)
    bad_ip = wl.Address(workload=wl.Workload(uid="Kubernetes//Pod/default/bad", addresses=[b"\x01\x02\x03"]))
    bad_port = service("badport", ports=[(70000, 1)])
    ads.store.update(ADDRESS_TYPE, {
        "Kubernetes//Pod/default/bad": bad_ip.SerializeToString(),
        svc_key("badport"): bad_port.SerializeToString(),
        "garbage": b"\xff\xff\xff",
        "wrongtype": service("x").SerializeToString(),
        A: service("a").SerializeToString(),
        "Kubernetes//Pod/default/good": workload("good", services={A: []}).SerializeToString(),
    }, any_type_url={"wrongtype": "type.googleapis.com/istio.workload.Workload"})
    wait_for(lambda: client.status()["nacks"] >= 1, what="a NACK")
    err = client.status()["history"][-1]["error"]
    assert "Kubernetes//Pod/default/bad: workload address has 3 bytes" in err
    assert f"{svc_key('badport')}: service port service_port 70000 out of range" in err
    assert "garbage: cannot decode Address" in err and "wrongtype: resource type" in err
    assert err.count("; ") == 3
    # the server received exactly that error_detail; the valid resources were applied
    wait_for(lambda: any(e == err for _, _, e in ads.servicer.streams[-1].acks), what="NACK at server")
    assert set(st.workloads) == {"Kubernetes//Pod/default/good"} and set(st.services) == {A}
    # the NACKed names are not claimed on the next stream
    ads.stop()
    ads.start()
    wait_for(lambda: ads.servicer.streams and ads.servicer.streams[-1].initial_versions, what="resync")
    claimed = ads.servicer.streams[-1].initial_versions[ADDRESS_TYPE]
    assert set(claimed) == {A, "Kubernetes//Pod/default/good"}


def test_reconnect_resyncs_with_initial_versions_and_drops_stale(ads: AdsHarness, make_client: Any) -> None:
    put(ads, service("a"), workload("w1", "10.1.0.1", services={A: []}),
        workload("w2", "10.1.0.2", services={A: []}))
    client, st = make_client(ads.address)
    assert client.ready_event.wait(10)
    wait_for(lambda: len(st.workloads) == 2)
    versions = st.resource_versions("address")
    ads.stop()
    wait_for(lambda: not client.status()["connected"], what="disconnect")
    assert len(st.workloads) == 2  # cache kept while disconnected
    # the restarted server no longer has w1, has a changed w2 and a new w3
    put(ads, removed=("Kubernetes//Pod/default/w1",))
    put(ads, workload("w2", "10.1.0.22", services={A: []}), workload("w3", "10.1.0.3", services={A: []}))
    ads.start()
    wait_for(lambda: set(st.workloads) == {"Kubernetes//Pod/default/w2", "Kubernetes//Pod/default/w3"},
             what="resync")
    assert st.projection().backends["Kubernetes//Pod/default/w2"].ipv4 == ip("10.1.0.22")
    rec = ads.servicer.streams[-1]
    assert rec.initial_versions[ADDRESS_TYPE] == versions  # everything held, with real versions
    assert client.status()["reconnects"] >= 1
    assert st.projection() == projection_of({n: v for n, (_, v) in ads.store.snapshot(ADDRESS_TYPE).items()})


def test_backoff_grows_and_error_is_reported(make_client: Any) -> None:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there
    client, st = make_client(f"127.0.0.1:{port}", initial_backoff_s=0.05, max_backoff_s=0.4)
    wait_for(lambda: client.status()["reconnects"] >= 4, what="several attempts")
    s = client.status()
    assert not s["connected"] and not s["ready"] and s["last_error"].startswith("UNAVAILABLE")
    assert 0.2 <= s["backoff_s"] <= 0.4


def test_tls_with_server_name_override(ads: AdsHarness, make_client: Any, tmp_path: Path) -> None:
    cert = ca.load_or_create(tmp_path / "ca", "istio-system", "1-22")
    (tmp_path / "root-cert.pem").write_bytes(cert.root_pem)
    ads.stop()
    ads.tls = (cert.key_pem, cert.cert_pem)
    ads.start()
    put(ads, service("a"))
    client, st = make_client(f"localhost:{ads.port}", plaintext=False, ca_path=tmp_path / "root-cert.pem",
                             server_name="istiod-1-22.istio-system.svc")
    assert client.ready_event.wait(10) and set(st.services) == {A}
    # a name the certificate does not carry fails verification
    bad, _ = make_client(f"localhost:{ads.port}", plaintext=False, ca_path=tmp_path / "root-cert.pem",
                         server_name="istiod.other.svc")
    wait_for(lambda: bad.status()["reconnects"] >= 1 and bad.status()["last_error"], what="TLS failure")
    assert not bad.status()["ready"]
    # TLS is the default: without a CA and without the explicit plaintext flag nothing is sent
    noca, _ = make_client(ads.address, plaintext=False)
    wait_for(lambda: "root certificate" in noca.status()["last_error"], what="config error")


def test_auth_rejection_is_reported_with_backoff(ads: AdsHarness, make_client: Any) -> None:
    class Reject(Authenticator):
        def authenticate(self, metadata: Mapping[str, str]) -> Any:
            raise AuthError("UNAUTHENTICATED", "authentication failure: nope")

    put(ads, service("a"))
    ads.stop()
    ads.authenticator = Reject()
    ads.start()
    client, st = make_client(ads.address, initial_backoff_s=0.05, max_backoff_s=0.3)
    wait_for(lambda: client.status()["reconnects"] >= 3, what="retries")
    s = client.status()
    assert s["last_error"] == "UNAUTHENTICATED: authentication failure: nope"
    assert s["backoff_s"] > 0 and not s["ready"] and st.counts()["services"] == 0


def test_full_resend_of_unchanged_resources_is_skipped(ads: AdsHarness, make_client: Any) -> None:
    """istiod <= 1.30 ignores initial_resource_versions and resends everything on a new stream."""
    from daemon.state import Change

    put(ads, service("a"), workload("w1", "10.1.0.1", services={A: []}),
        workload("w2", "10.1.0.2", services={A: []}))
    ads.stop()
    ads.honor_versions = False
    ads.start()
    client, st = make_client(ads.address)
    wait_for(lambda: len(st.workloads) == 2, what="initial")
    changes: list[Change] = []
    st.subscribe(changes.append)
    streams = client.status()["streams"]
    ads.stop()
    put(ads, workload("w2", "10.1.0.22", services={A: []}))  # one real change while away
    ads.start()
    wait_for(lambda: client.status()["streams"] > streams and any(c.full for c in changes), what="resync")
    assert client.status()["unchanged_skipped"] == 2  # service a and w1 came again, identical
    touched = set().union(*(c.services for c in changes)), set().union(*(c.backends for c in changes))
    assert touched == ({A}, {"Kubernetes//Pod/default/w2"})
