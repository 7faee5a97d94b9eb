"""The batch decoder's fast path (name, addresses and uid read straight from the bytes) gives
the same records and the same rejections as the general decoder, whatever the field order.

Hypothesis builds Workloads with every kind of field, then lays their bytes out as a serializer
does (field-number order), shuffled, with fields repeated, or cut short; each variant goes
through ``decode_batch`` (fast path first) and ``decode_address`` (full parse) and must agree.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon.state import ServiceRecord, WorkloadProfile, WorkloadRecord
from daemon.xds import native, resources
from daemon.xds.gen.istio.workload import workload_pb2 as wl
from daemon.xds.resources import ADDRESS_TYPE, Invalid, decode_address, decode_batch

text = st.text(alphabet=st.sampled_from("ab/-.é\x00"), max_size=6) | st.text(max_size=140)
addr = st.sampled_from([4, 16, 4, 0, 5]).flatmap(lambda n: st.binary(min_size=n, max_size=n))


@st.composite
def workloads(draw: st.DrawFn) -> wl.Workload:
    w = wl.Workload(uid=draw(text), name=draw(text), namespace=draw(text),
                    addresses=draw(st.lists(addr, max_size=3)))
    for f in ("node", "cluster_id", "network", "service_account", "trust_domain", "hostname",
              "canonical_name"):
        if draw(st.booleans()):
            setattr(w, f, draw(text))
    w.status = draw(st.sampled_from([0, 0, 1]))
    w.workload_type = draw(st.sampled_from([0, 2]))
    w.tunnel_protocol = draw(st.sampled_from([0, 1]))
    for key in draw(st.lists(st.sampled_from(["ns/a.svc", "ns/b.svc", "nokey", "x" * 200]), max_size=2)):
        w.services[key].ports.add(service_port=draw(st.sampled_from([80, 0, 70000])), target_port=8080)
    if draw(st.booleans()):
        w.locality.region, w.locality.zone = draw(text), "z"
    if draw(st.booleans()):
        w.waypoint.address.address = draw(addr)
    if draw(st.booleans()):
        w.capacity.value = draw(st.integers(0, 5))
    w.authorization_policies.extend(draw(st.lists(text, max_size=2)))
    return w


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _chunks(b: bytes) -> list[bytes]:
    """A message's bytes split into its fields (tag and all)."""
    out, p = [], 0
    while p < len(b):
        q = p
        while b[q] & 0x80:
            q += 1
        tag, q = b[p], q + 1
        if tag & 7 == 0:
            while b[q] & 0x80:
                q += 1
            q += 1
        else:  # length-delimited (the only other kind a Workload has at top level)
            n, shift = 0, 0
            while True:
                n |= (b[q] & 0x7F) << shift
                shift += 7
                q += 1
                if not b[q - 1] & 0x80:
                    break
            q += n
        out.append(b[p:q])
        p = q
    return out


def _same(name: str, value: bytes, plain: bool = True) -> None:
    for path in ("c", "c-held", "python"):
        _same_on(path, name, value, plain)


def _same_on(path: str, name: str, value: bytes, plain: bool) -> None:
    if path.startswith("c"):
        assert _real_load() is not None, "the C helper must build here (make setup installs cc, python3-dev)"
        _with_native(True)
    else:
        _with_native(False)
    resources._PROFILES.clear()  # the fast path must also build the profiles it uses
    resources._MIDS.clear()
    want: WorkloadRecord | ServiceRecord | None = None
    try:
        want = decode_address(name, ADDRESS_TYPE, value, "v1")  # type: ignore[assignment]
        reason = ""
    except Invalid as e:
        reason = str(e)
    from envoy.service.discovery.v3 import discovery_pb2

    resp = discovery_pb2.DeltaDiscoveryResponse(type_url=ADDRESS_TYPE)
    r = resp.resources.add(name=name, version="v1")
    r.resource.type_url, r.resource.value = ADDRESS_TYPE, value
    for _ in range(2):  # once building the profile, once finding it cached
        # a first push (nothing held) takes the C batch call; later ones go resource by resource
        held = (lambda _name: None) if path == "c-held" else None
        recs, errors, _n = decode_batch(resp.resources, ADDRESS_TYPE, held)
        if want is None:
            assert recs == [] and len(errors) == 1, (reason, errors)
            if "cannot decode" not in reason:
                assert errors[0].endswith(": " + reason), (reason, errors)
            continue
        assert errors == [] and len(recs) == 1, errors
        got = recs[0]
        if isinstance(want, ServiceRecord):
            assert got == want
            continue
        assert isinstance(got, WorkloadRecord) and isinstance(want, WorkloadRecord)
        assert (got.uid, got._name, got._addr, got._vd) == (want.uid, want._name, want._addr, want._vd)
        slots = [s for s in WorkloadProfile.__slots__ if s != "rest"]
        assert [getattr(got.profile, s) for s in slots] == [getattr(want.profile, s) for s in slots]
        # the full parse re-serializes the remainder in field order; the fast path keeps the order
        # the fields came in (as upb keeps unknown fields): the same message, the same bytes when
        # the layout was the plain one
        assert wl.Workload.FromString(got.profile.rest) == wl.Workload.FromString(want.profile.rest)
        if plain:
            assert got.profile.rest == want.profile.rest


def _with_native(on: bool) -> None:
    """Make the batch decoder take (or skip) the C helper."""
    resources.native.load = _real_load if on else (lambda: None)  # type: ignore[assignment]


_real_load = native.load


@pytest.fixture(autouse=True)
def _restore_native() -> Iterator[None]:
    yield
    _with_native(True)


def _address(payload: bytes, tag: int = 0x0A) -> bytes:
    return bytes([tag]) + _varint(len(payload)) + payload


def _lay_out(payload: bytes, rnd: random.Random, layout: str) -> bytes:
    """The message's fields as sent ("plain"), shuffled, with one field repeated, or cut short."""
    parts = _chunks(payload)
    if layout == "shuffle":
        rnd.shuffle(parts)
    elif layout == "repeat" and parts:
        parts.insert(rnd.randrange(len(parts) + 1), rnd.choice(parts))
    elif layout == "cut" and payload:
        joined = b"".join(parts)
        parts = [joined[:rnd.randrange(len(joined))]]
    return b"".join(parts)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads(), st.randoms(use_true_random=False), st.sampled_from(["plain", "shuffle", "repeat", "cut"]),
       st.booleans())
def test_fast_path_agrees_with_full_parse(w: wl.Workload, rnd: random.Random, layout: str,
                                          named: bool) -> None:
    _same(w.uid if named else "", _address(_lay_out(w.SerializeToString(), rnd, layout)), layout == "plain")


def test_uid_tag_inside_an_earlier_field_is_not_taken_for_the_uid() -> None:
    w = wl.Workload(uid="u/p1", name="p1", namespace="ns", addresses=[bytes(4)], node="x\u00a2\x01\x04fake",
                    cluster_id="c")
    _same("u/p1", _address(w.SerializeToString()))
    w.node = "\u00a2\x01"  # the tag right at the start of the node's text
    _same("u/p1", _address(w.SerializeToString()))


@pytest.mark.parametrize("c_helper", [True, False])
def test_replicas_of_the_plain_layout_share_one_profile(c_helper: bool) -> None:
    _with_native(c_helper)
    resources._PROFILES.clear()
    resources._MIDS.clear()
    from envoy.service.discovery.v3 import discovery_pb2

    resp = discovery_pb2.DeltaDiscoveryResponse(type_url=ADDRESS_TYPE)
    for i in range(3):
        w = wl.Workload(uid=f"c//Pod/ns/p{i}", name=f"p{i}", namespace="ns", addresses=[bytes([10, 0, 0, i])],
                        node="n1", cluster_id="c", service_account="sa", trust_domain="td")
        w.services["ns/s.svc"].ports.add(service_port=80, target_port=8080)
        r = resp.resources.add(name=w.uid, version=f"v{i}")
        r.resource.type_url, r.resource.value = ADDRESS_TYPE, _address(w.SerializeToString())
    recs, errors, _ = decode_batch(resp.resources, ADDRESS_TYPE, None)
    assert errors == [] and len({id(r.profile) for r in recs}) == 1
    # the Python fast path remembers the fields before the uid; the C helper needs not
    assert bool(resources._MIDS) is not c_helper
    assert [(r.name, r.addresses, r.version) for r in recs] == [
        (f"p{i}", (bytes([10, 0, 0, i]),), f"v{i}") for i in range(3)]


@pytest.mark.parametrize("c_helper", [True, False])
def test_a_re_push_counts_only_real_changes(c_helper: bool) -> None:
    """A re-sent workload with the same bytes is not a change (only its version is taken); one
    with other bytes is decoded again; a service re-sent unchanged is skipped the same way."""
    from envoy.service.discovery.v3 import discovery_pb2

    from daemon.state import State

    _with_native(c_helper)

    def push(addr_last: int, version: str) -> discovery_pb2.DeltaDiscoveryResponse:
        resp = discovery_pb2.DeltaDiscoveryResponse(type_url=ADDRESS_TYPE)
        for i in range(4):
            w = wl.Workload(uid=f"c//Pod/ns/p{i}", name=f"p{i}", namespace="ns", node="n1",
                            addresses=[bytes([10, 0, 0, addr_last if i == 3 else i])])
            r = resp.resources.add(name=w.uid, version=f"{version}-{i}")
            r.resource.type_url, r.resource.value = ADDRESS_TYPE, _address(w.SerializeToString())
        svc = wl.Service(name="s", namespace="ns", hostname="s.ns.svc", addresses=[wl.NetworkAddress(
            address=bytes([10, 96, 0, 1]))], ports=[wl.Port(service_port=80, target_port=8080)])
        r = resp.resources.add(name="ns/s.ns.svc", version=version)
        r.resource.type_url, r.resource.value = ADDRESS_TYPE, wl.Address(service=svc).SerializeToString()
        return resp

    st = State()
    recs, errors, unchanged = decode_batch(push(3, "a").resources, ADDRESS_TYPE, st.held(True))
    assert (len(recs), errors, unchanged) == (5, [], 0)
    st.apply_addresses(recs)
    recs, errors, unchanged = decode_batch(push(9, "b").resources, ADDRESS_TYPE, st.held(True))
    assert errors == [] and unchanged == 4 and [r.uid for r in recs] == ["c//Pod/ns/p3"]
    assert recs[0].addresses == (bytes([10, 0, 0, 9]),) and recs[0].version == "b-3"
    assert [st.workloads[f"c//Pod/ns/p{i}"].version for i in range(3)] == ["b-0", "b-1", "b-2"]
    assert st.services["ns/s.ns.svc"].version == "b"


@st.composite
def services(draw: st.DrawFn) -> wl.Service:
    svc = wl.Service(name=draw(text), namespace=draw(st.sampled_from(["ns", "ns", "", "é"])),
                     hostname=draw(st.sampled_from(["s.ns.svc", "s.ns.svc", "", "h"])))
    for _ in range(draw(st.integers(0, 2))):
        a = svc.addresses.add(address=draw(addr))
        if draw(st.booleans()):
            a.network = draw(text)
    for _ in range(draw(st.integers(0, 2))):
        svc.ports.add(service_port=draw(st.sampled_from([80, 0, 65535, 70000])),
                      target_port=draw(st.sampled_from([8080, 9090, 0, 70000])),
                      app_protocol=draw(st.sampled_from([0, 1])))
    rare = st.integers(0, 4).map(lambda n: n == 0)  # fields the C helper leaves to protobuf
    if draw(rare):
        svc.load_balancing.mode = 1
    if draw(rare):
        svc.waypoint.address.address = bytes(4)
    if draw(rare):
        svc.subject_alt_names.append(draw(text))
    svc.ip_families = draw(st.sampled_from([0, 3]))
    svc.canonical = draw(st.booleans())
    return svc


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(services(), st.randoms(use_true_random=False), st.sampled_from(["plain", "shuffle", "repeat", "cut"]),
       st.booleans())
def test_services_fast_path_agrees_with_full_parse(svc: wl.Service, rnd: random.Random, layout: str,
                                                   named: bool) -> None:
    raw = _lay_out(svc.SerializeToString(), rnd, layout)
    _same(f"{svc.namespace}/{svc.hostname}" if named else "", _address(raw, 0x12))


def test_a_plain_service_is_read_by_the_c_helper() -> None:
    svc = wl.Service(name="s", namespace="ns", hostname="s.ns.svc",
                     ports=[wl.Port(service_port=80, target_port=8080)],
                     addresses=[wl.NetworkAddress(network="n", address=bytes([10, 96, 0, 1]))])
    value = wl.Address(service=svc).SerializeToString()
    from envoy.service.discovery.v3 import discovery_pb2

    resp = discovery_pb2.DeltaDiscoveryResponse(type_url=ADDRESS_TYPE)
    r = resp.resources.add(name="ns/s.ns.svc", version="v1")
    r.resource.type_url, r.resource.value = ADDRESS_TYPE, value
    mod = _real_load()
    assert mod is not None
    out, todo, unchanged = mod.batch([r.SerializeToString()], {}, None, None, resources._plain_service, None)
    assert (todo, unchanged) == ([], 0)
    assert out == [decode_address("ns/s.ns.svc", ADDRESS_TYPE, value, "v1")]
    assert out[0].ports == ((80, 8080),) and out[0].vips == (bytes([10, 96, 0, 1]),)
    _same("ns/s.ns.svc", value)
