"""The waypoint shape (waypoint.md §2): kmesh-listener → cluster main_internal (internal
upstream) → internal listener whose original_dst filter restores the VIP from the filter state
the stock set_filter_state filter shared with upstream once; the chain is picked by VIP:port."""

from __future__ import annotations

import hashlib

from tests.support import tlv
from tests.waypoint.client import http_get, sink_roundtrip
from tests.waypoint.conftest import HANDOFF_VIP_PORT, VIP_A, VIP_B6, Waypoint


def _body(response: bytes) -> str:
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), response[:200]
    return body.decode()


def test_http_chain_chosen_by_ipv4_vip(waypoint_envoy: Waypoint) -> None:
    body = _body(http_get(waypoint_envoy.waypoint_port, tlv.encode(VIP_A, 80), "/a"))
    name, path, ip, port = body.split()
    assert (name, path) == ("svc-a", "/a")
    assert (ip, int(port)) == (waypoint_envoy.http_a.ip, waypoint_envoy.http_a.port)


def test_http_chain_chosen_by_ipv6_vip(waypoint_envoy: Waypoint) -> None:
    body = _body(http_get(waypoint_envoy.waypoint_port, tlv.encode(VIP_B6, 80), "/b"))
    assert body.split()[:2] == ["svc-b", "/b"]


def test_tcp_chain_reaches_original_destination(waypoint_envoy: Waypoint) -> None:
    """TCP chain → ORIGINAL_DST inside the internal listener: the host is the VIP from filter state."""
    sink = waypoint_envoy.tcp_a
    payload = b"tcp through main_internal" * 1000
    sha, n, ip, port = sink_roundtrip(waypoint_envoy.waypoint_port, [tlv.encode(VIP_A, sink.port)], payload)
    assert (ip, port) == (VIP_A, sink.port)
    assert (sha, n) == (hashlib.sha256(payload).hexdigest(), len(payload))


def test_unmatched_destination_gets_no_chain(waypoint_envoy: Waypoint) -> None:
    """A VIP:port the waypoint does not serve has no chain: the connection closes, no answer."""
    assert http_get(waypoint_envoy.waypoint_port, tlv.encode(VIP_A, 81), allow_reset=True) == b""
    assert waypoint_envoy.envoy.alive()


def test_module_typed_filter_state_is_not_shared_with_upstream(waypoint_envoy: Waypoint) -> None:
    """ABI probe: the module's set_filter_state_typed succeeds, but the value stays on the
    downstream connection, so the internal listener behind main_internal never sees the VIP (no
    chain matches). This is why envoycfg adds the stock set_filter_state filter (ONCE)."""
    assert http_get(waypoint_envoy.probe_port, tlv.encode(VIP_A, 80), allow_reset=True) == b""
    # set_filter_state_typed itself returned true (the module logs its result)
    waypoint_envoy.envoy.wait_log(f"typed filter state {VIP_A}:80 -> 1")
    # and the same request through the real hand-off works
    assert _body(http_get(waypoint_envoy.waypoint_port, tlv.encode(VIP_A, 80))).startswith("svc-a ")


def test_use_original_dst_hands_off_to_the_vip_listener(waypoint_envoy: Waypoint) -> None:
    """Listener with use_original_dst: the restored VIP:port picks the (bind_to_port: false)
    listener of that address, whose chain forwards to the backend; the catch-all chain of the
    receiving listener (to a closed port) is never used."""
    payload = b"handed off" * 500
    sha, n, _, _ = sink_roundtrip(waypoint_envoy.handoff_port, [tlv.encode(VIP_A, HANDOFF_VIP_PORT)], payload)
    assert (sha, n) == (hashlib.sha256(payload).hexdigest(), len(payload))
    assert waypoint_envoy.stat(f"listener.{VIP_A}_{HANDOFF_VIP_PORT}.downstream_cx_total") >= 1
