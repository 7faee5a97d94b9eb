"""The compact workload records lose nothing: every field comes back, replicas share a profile.

A record keeps uid, name (only when the uid does not end with it), addresses and a digest; the
rest of the Workload lives once in a shared ``WorkloadProfile``. These tests pin that the
config dump and ``raw`` rebuild the exact Workload, that sharing happens only between identical
remainders, and that a record is the Backend the projection hands to the data plane.
"""

from __future__ import annotations

from dataclasses import fields

from xds_helpers import apply, ip, service, svc_key, workload

from daemon.dataplane.model import Backend
from daemon.state import State, WorkloadRecord, fold
from daemon.xds import dump
from daemon.xds.gen.istio.workload import workload_pb2 as wl
from daemon.xds.resources import ADDRESS_TYPE, decode_address, decode_batch

A = svc_key("a")


def rich(name: str = "r1", node: str = "n1", uid: str | None = None) -> wl.Address:
    a = workload(name, "fd00::7", services={A: [(80, 9090)], svc_key("b"): []}, node=node,
                 locality=("r", "z", "s"), capacity=3, app_tunnel_port=15008, healthy=False)
    w = a.workload
    if uid is not None:
        w.uid = uid
    w.addresses.append(ip("10.1.0.7"))  # v6 first, then v4: the order is kept
    w.hostname = "r1.example"
    w.service_account = "sa"
    w.canonical_name, w.canonical_revision, w.workload_name = "app", "v2", "app-v2"
    w.authorization_policies.extend(["default/p1", "default/p2"])
    w.waypoint.hostname.namespace, w.waypoint.hostname.hostname = "default", "wp.default.svc"
    w.waypoint.hbone_mtls_port = 15008
    w.network, w.trust_domain = "net1", "td.local"
    return a


def test_raw_and_dump_rebuild_every_field() -> None:
    a = rich()
    rec = decode_address(a.workload.uid, ADDRESS_TYPE, a.SerializeToString(), "v9")
    assert isinstance(rec, WorkloadRecord)
    assert wl.Address.FromString(rec.raw) == a
    assert rec.raw is rec.raw  # stable object while the record lives (callers cache on identity)
    assert dump.workload_json(dump.workload_message(rec)) == dump.workload_json(a.workload)
    assert rec.addresses == (ip("fd00::7"), ip("10.1.0.7")) and (rec.ipv4, rec.ipv6) == (ip("10.1.0.7"),
                                                                                         ip("fd00::7"))
    assert (rec.name, rec.namespace, rec.node, rec.network, rec.locality) == ("r1", "default", "n1", "net1",
                                                                              ("r", "z", "s"))
    assert (rec.status, rec.capacity, rec.app_tunnel_port, rec.version) == (1, 3, 15008, "v9")
    assert rec.services == {A: ((80, 9090),), svc_key("b"): ()}
    rec.set_version("v10")
    assert rec.version == "v10" and rec.digest == fold(hash(a.SerializeToString()))


def test_replicas_share_a_profile_only_when_identical() -> None:
    recs = [decode_address("", ADDRESS_TYPE, rich(f"r{i}").SerializeToString()) for i in range(3)]
    other_node = decode_address("", ADDRESS_TYPE, rich("r9", node="n2").SerializeToString())
    assert recs[0].profile is recs[1].profile is recs[2].profile
    assert other_node.profile is not recs[0].profile and other_node.node == "n2"
    assert [r.name for r in recs] == ["r0", "r1", "r2"]


def test_name_not_derivable_from_uid_is_kept() -> None:
    a = rich("pod-x", uid="Kubernetes//Pod/default/something-else")
    rec = decode_address("", ADDRESS_TYPE, a.SerializeToString())
    assert rec.name == "pod-x" and wl.Address.FromString(rec.raw) == a


def test_record_is_the_projected_backend() -> None:
    st = State()
    apply(st, service("a"), workload("w1", "10.1.0.1", services={A: []}),
          workload("h", None, services={A: []}))  # hostname only: a workload, not a backend
    p = st.projection()
    rec = st.workloads["Kubernetes//Pod/default/w1"]
    assert p.backends == {rec.uid: rec} and len(st.workloads) == 2
    # a record offers every Backend field (it is handed to the reconciler as the Backend)
    assert [getattr(rec, f.name) for f in fields(Backend)] == [
        rec.uid, "w1", "default", bytes([10, 1, 0, 1]), None, 0, None]
    assert [e.backend_uid for e in p.services[A].ports[0].endpoints] == [rec.uid]
    same = decode_address("", ADDRESS_TYPE, workload("w1", "10.1.0.1", services={A: []},
                                                     healthy=False).SerializeToString())
    assert same == rec and hash(same) == hash(rec)  # Backend equality: uid, name, namespace, ips
    moved = decode_address("", ADDRESS_TYPE, workload("w1", "10.1.0.2").SerializeToString())
    assert moved != rec
    h = "Kubernetes//Pod/default/h"
    seen = []
    st.subscribe(seen.append)
    apply(st, workload("h", "10.1.0.9", services={A: []}))  # gains an address: becomes a backend
    assert h in st.projection().backends and seen[-1].backends == {h}
    apply(st, workload("h", None, services={A: []}))  # loses it again
    assert h not in st.projection().backends and seen[-1].backends == {h} and h in st.workloads
    apply(st, removed=(h,))
    assert h not in st.workloads and seen[-1].backends == set()


def test_batch_skips_unchanged_and_names_bad_resources() -> None:
    from envoy.service.discovery.v3 import discovery_pb2

    st = State()
    good = workload("w1", "10.1.0.1", services={A: []})
    resp = discovery_pb2.DeltaDiscoveryResponse(type_url=ADDRESS_TYPE)
    for name, value in ((good.workload.uid, good.SerializeToString()), ("bad", b"\x0a\x02\xff\xff")):
        r = resp.resources.add(name=name, version="1")
        r.resource.type_url, r.resource.value = ADDRESS_TYPE, value
    records, errors, unchanged = decode_batch(resp.resources, ADDRESS_TYPE, st.held(True))
    assert len(records) == 1 and unchanged == 0 and errors[0].startswith("bad: cannot decode Address")
    st.apply_addresses(records)
    resp.resources[0].version = "2"
    records, errors, unchanged = decode_batch(resp.resources[:1], ADDRESS_TYPE, st.held(True))
    assert records == [] and unchanged == 1 and st.workloads[good.workload.uid].version == "2"


def test_a_big_response_applied_in_slices_equals_one_batch(monkeypatch) -> None:  # noqa: ANN001
    """The client decodes a big Address response a slice at a time and applies each slice as it
    comes (State.apply_address_batches): the state, the one change and the NACK reasons are those
    of applying it whole, including a workload whose Service comes in a later slice."""
    from envoy.service.discovery.v3 import discovery_pb2

    from daemon.xds import client as client_mod
    from daemon.xds.client import XdsClient, XdsConfig

    resp = discovery_pb2.DeltaDiscoveryResponse(type_url=ADDRESS_TYPE)
    items = [(f"Kubernetes//Pod/default/w{i}", workload(f"w{i}", f"10.1.{i // 200}.{i % 200 + 1}",
                                        services={svc_key(f"s{i % 7}"): [(80, 8080)]}).SerializeToString())
             for i in range(60)]
    items.insert(5, ("bad", b"\x0a\x02\xff\xff"))
    items += [(svc_key(f"s{j}"), service(f"s{j}", vip=f"10.96.0.{j + 1}").SerializeToString())
              for j in range(7)]
    for name, value in items:
        r = resp.resources.add(name=name, version="1")
        r.resource.type_url, r.resource.value = ADDRESS_TYPE, value

    def run(slice_size: int) -> tuple[State, list, str]:
        monkeypatch.setattr(client_mod, "DECODE_SLICE", slice_size)
        st = State()
        seen: list = []
        st.subscribe(seen.append)
        nack = XdsClient(XdsConfig(address="127.0.0.1:1", plaintext=True), st)._handle(resp)
        return st, seen, nack

    whole, seen1, nack1 = run(100_000)
    sliced, seen2, nack2 = run(8)
    assert nack1 == nack2 and nack1.startswith("bad: cannot decode Address")
    assert len(seen1) == len(seen2) == 1
    c1, c2 = seen1[0], seen2[0]
    assert (c1.services, c1.backends, c1.workloads) == (c2.services, c2.backends, c2.workloads)
    assert whole.workloads.keys() == sliced.workloads.keys() and len(whole.workloads) == 60
    assert whole.services.keys() == sliced.services.keys()
    p1, p2 = whole.projection(), sliced.projection()
    assert p1.services == p2.services and p1.backends == p2.backends
    assert all(len(s.ports[0].uids) in (8, 9) for s in p1.services.values())
