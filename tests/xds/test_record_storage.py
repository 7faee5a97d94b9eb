"""WorkloadRecord's storage: on the C helper's ``Record`` (digest and version inline, not
tracked by the cyclic GC) it must behave exactly as the pure-Python class it replaces
(daemon.state._untracked), and the digest/version packing must round-trip."""

from __future__ import annotations

import gc
import sys

import pytest

from daemon import state as st
from daemon.xds import native

NATIVE = native.load() is not None


def _records(cls: type) -> tuple[object, object, object]:
    prof = st.WorkloadProfile("ns", node="n1", proxy_port=15008)
    a = cls("Kubernetes//Pod/ns/p1", "p1", (b"\x0a\x00\x00\x01",), prof, -5, "v1")
    b = cls("Kubernetes//Pod/ns/p1", "other", (b"\x0a\x00\x00\x01", b"\x00" * 15 + b"\x01"), prof, 7, "")
    c = cls("Kubernetes//Pod/ns/p2", "p2", (), prof, 2**62, "ver-ü")
    return a, b, c


def _view(r: object) -> tuple:
    return (r.uid, r.name, r._name, r.namespace, r.ipv4, r.ipv6, r.addresses, r.has_address,  # type: ignore[attr-defined]
            r.handoff_port, r.waypoint, r.digest, r.version, r.node, hash(r), repr(r))  # type: ignore[attr-defined]


@pytest.mark.skipif(not NATIVE, reason="no C helper: WorkloadRecord is the Python class")
def test_native_record_is_small_and_untracked() -> None:
    rec = st.make_workload_record("Kubernetes//Pod/ns/p1", "p1", b"\x0a\x00\x00\x01",
                                  st.WorkloadProfile("ns"), st._pack(1, "v"))
    assert type(rec) is st.WorkloadRecord and isinstance(rec, st.WorkloadRecord)
    assert not gc.is_tracked(rec)
    assert sys.getsizeof(rec) == 64  # digest and version inline: no other object
    assert rec._vd == st._pack(1, "v") and rec.version == "v" and rec.digest == 1
    assert type(rec).__name__ == "WorkloadRecord" and type(rec).__module__ == "daemon.state"
    with pytest.raises(AttributeError):
        rec.other = 1  # type: ignore[attr-defined]
    refs = sys.getrefcount(st.WorkloadRecord)
    many = [st.make_workload_record(f"u{i}", "", b"\x01\x02\x03\x04", rec.profile, b"\x00" * 8)
            for i in range(1000)]
    del many
    assert abs(sys.getrefcount(st.WorkloadRecord) - refs) < 10  # each instance's type reference released


def test_same_behaviour_as_the_python_class() -> None:
    py = st._untracked.__globals__["_PyWorkloadRecord"]
    for got, want in zip(_records(st.WorkloadRecord), _records(py), strict=True):
        assert _view(got) == _view(want)
        got.set_version("v9")  # type: ignore[attr-defined]
        want.set_version("v9")  # type: ignore[attr-defined]
        assert (got.version, got.digest, got.name) == (want.version, want.digest, want.name)  # type: ignore[attr-defined]
    a, b, c = _records(st.WorkloadRecord)
    a2, _, _ = _records(st.WorkloadRecord)
    assert a == a2 and a != b and a != c and {a: 1}[a2] == 1


@pytest.mark.parametrize("version", ["", "v1", "0123456789abcdef", "0123456789ABCDEF", "0123456789abcdeg",
                                     "0123456789abcd ef", "01234567 9abcdef", "ffffffffffffffff", "é" * 8,
                                     "0000000000000000", "abc", "1" * 17, "1" * 15])
@pytest.mark.parametrize("digest", [0, 1, -1, 2**63 - 1, -(2**63), 0x7F_FFFF_FFFF_FFFF])
def test_version_and_digest_round_trip(version: str, digest: int) -> None:
    vd = st._pack(digest, version)
    assert st._vd_version(vd) == version and st._vd_digest(vd) == st.fold(digest)
    packed = len(version) == 16 and all(c in "0123456789abcdef" for c in version)
    assert len(vd) == 7 + (8 if packed else len(version.encode()))
    for cls in (st.WorkloadRecord, st._PyWorkloadRecord):
        for name in ("q", "p"):  # kept apart / the uid's last segment
            rec = cls("Kubernetes//Pod/ns/p", name, (b"\x01\x02\x03\x04",), st.WorkloadProfile("ns"),
                      digest, version)
            assert (rec.version, rec.digest, rec.name) == (version, st.fold(digest), name)
            for v in ("v2", "fedcba9876543210", version):
                rec.set_version(v)
                assert (rec.version, rec.digest, rec.name) == (v, st.fold(digest), name)
            assert rec._vd == ((vd, "q") if name == "q" else vd)
            rec._vd = st._pack(7, "abc")
            assert (rec.version, rec.digest, rec.name, rec._name) == ("abc", 7, "p", None)


@pytest.mark.skipif(not NATIVE, reason="no C helper")
@pytest.mark.parametrize("version", ["", "v1", "0123456789abcdef", "0123456789abcdeF", "ffffffffffffffff",
                                     "0123456789abcde", "é" * 8])
def test_c_helper_packs_as_python(version: str) -> None:
    from google.protobuf import any_pb2

    from daemon.xds.gen.istio.workload import workload_pb2 as wl

    w = wl.Workload(uid="Kubernetes//Pod/ns/p", name="p", namespace="ns", addresses=[b"\x01\x02\x03\x04"])
    value = wl.Address(workload=w).SerializeToString()
    raw = any_pb2.Any(type_url="type.googleapis.com/istio.workload.Address", value=value).SerializeToString()
    got = native.load().workload(raw, "Kubernetes//Pod/ns/p", version)  # type: ignore[union-attr]
    assert got is not None
    assert got[4] == st._pack(hash(value), version)


@pytest.mark.skipif(not NATIVE, reason="no C helper: WorkloadRecord is the Python class")
@pytest.mark.parametrize("name", ["p1", "", "other", "Pod/ns/p1", "Kubernetes//Pod/ns/p1", "1"])
@pytest.mark.parametrize("version", ["0123456789abcdef", "", "v1", "0123456789ABCDEF", "ver-ü"])
def test_records_made_by_the_c_helper_equal_make_workload_record(name: str, version: str) -> None:
    """batch(make=None) builds each record in C; it must be the record that
    make_workload_record builds from the same parts (name kept only when it is not the uid's
    last segment, version packed only when it is 16 lowercase hex digits)."""
    from daemon.xds import resources
    from daemon.xds.gen.istio.workload import workload_pb2 as wl
    from daemon.xds.gen.kmesh import ads_pb2

    mod = native.load()
    assert mod is not None
    w = wl.Workload(uid="Kubernetes//Pod/ns/p1", name=name, namespace="ns", addresses=[b"\x0a\x00\x00\x01"])
    r = ads_pb2.Resource(name=w.uid, version=version)
    r.resource.type_url = resources.ADDRESS_TYPE
    r.resource.value = wl.Address(workload=w).SerializeToString()
    raw = [r.SerializeToString()]
    got = mod.batch(raw, {}, resources._profile_of_whole, None, resources._plain_service, None)[0]
    want = mod.batch(raw, {}, resources._profile_of_whole, resources.make_workload_record,
                     resources._plain_service, None)[0]
    assert len(got) == len(want) == 1 and got[0] is not None
    a, b = got[0], want[0]
    assert type(a) is type(b) is st.WorkloadRecord
    assert a._vd == b._vd and a == b
    assert _view(a) == _view(b) and a.version == version
    assert sys.getrefcount(a) == sys.getrefcount(b)
    assert not gc.is_tracked(a)
