"""The committed generated code is current, and the wire format matches Istio's field numbers."""

from __future__ import annotations

from pathlib import Path

from daemon.xds import genprotos
from daemon.xds.gen.istio.security import authorization_pb2 as az
from daemon.xds.gen.istio.workload import workload_pb2 as wl


def test_generated_code_is_not_stale(tmp_path: Path) -> None:
    written = genprotos.generate(tmp_path)
    assert written, "no *_pb2.py generated"
    for fresh in written:
        rel = fresh.relative_to(tmp_path)
        committed = genprotos.GEN_ROOT / rel
        assert committed.exists(), f"{rel} missing: run `make protos` and commit daemon/xds/gen"
        assert committed.read_text() == fresh.read_text(), f"{rel} is stale: run `make protos`"
    committed_all = {p.relative_to(genprotos.GEN_ROOT) for p in genprotos.GEN_ROOT.rglob("*_pb2.py")}
    assert committed_all == {p.relative_to(tmp_path) for p in written}, "stale extra generated files"


def _numbers(msg: type) -> dict[str, int]:
    return {f.name: f.number for f in msg.DESCRIPTOR.fields}


def test_workload_field_numbers() -> None:
    w = _numbers(wl.Workload)
    assert w["uid"] == 20 and w["name"] == 1 and w["addresses"] == 3 and w["hostname"] == 21
    assert w["services"] == 22 and w["status"] == 17 and w["locality"] == 24 and w["capacity"] == 27
    assert w["application_tunnel"] == 23 and w["network_gateway"] == 19 and w["network_mode"] == 25
    assert 15 not in w.values()
    s = _numbers(wl.Service)
    got = (s["addresses"], s["ports"], s["waypoint"], s["load_balancing"], s["ip_families"])
    assert got == (4, 5, 7, 8, 9)
    assert _numbers(wl.Port) == {"service_port": 1, "target_port": 2, "app_protocol": 3}
    assert _numbers(wl.LoadBalancing) == {"routing_preference": 1, "mode": 2, "health_policy": 3}
    assert _numbers(wl.GatewayAddress) == {"hostname": 1, "address": 2, "hbone_mtls_port": 3}
    assert wl.LoadBalancing.Mode.Value("PASSTHROUGH") == 3 and wl.LoadBalancing.Scope.Value("NETWORK") == 6


def test_authorization_field_numbers() -> None:
    assert _numbers(az.Authorization)["rules"] == 5 and _numbers(az.Authorization)["dry_run"] == 6
    assert _numbers(az.Clause) == {"matches": 2}
    m = _numbers(az.Match)
    assert m["destination_ports"] == 9 and m["service_accounts"] == 11 and m["not_service_accounts"] == 12
    assert _numbers(az.ServiceAccountMatch) == {"namespace": 1, "serviceAccount": 2}
    assert _numbers(az.StringMatch) == {"exact": 1, "prefix": 2, "suffix": 3, "presence": 4}


def test_known_istio_bytes_decode() -> None:
    """Hand-encoded bytes (field 20 uid, 3 address, 17 status) decode as Istio intends."""
    raw = b"\xa2\x01\x03uid" + b"\x1a\x04\x0a\x01\x02\x03" + b"\x88\x01\x01"
    w = wl.Workload.FromString(raw)
    assert (w.uid, w.addresses[0], w.status) == ("uid", b"\x0a\x01\x02\x03", wl.UNHEALTHY)
