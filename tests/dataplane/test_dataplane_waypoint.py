"""Waypoint redirection in the kernel: connections to a service (or pod) with a waypoint go to a
waypoint pod's hand-off port with the original destination written once in front of the stream.

A raw sink stands in for the waypoint here (it stores every stream verbatim), so the header and
the payload are checked byte for byte with this file's own decoders (wp_env). The Envoy tests
are in test_dataplane_waypoint_envoy.py and test_dataplane_waypoint_tlv.py.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from dp_topo import HERE, PY, VIP4, ip4, ip6, uid
from wp_env import (
    PROXY_PORT,
    TLV_PORT,
    WEB_VIP4,
    WEB_VIP6,
    WP_IP4,
    WP_UID,
    decode_pp2,
    decode_tlv,
    projection,
    run_client,
)

from daemon.dataplane.model import Endpoint, Service, ServicePort, Waypoint
from daemon.dataplane.types import ConnEvent


@pytest.fixture(scope="module")
def wp_pod(topology, wp_netns: str, run_prefix: str) -> Iterator[Path]:
    """The raw sink in the waypoint pod on :15019 (TLV) and :15030 (PROXY v2)."""
    out = Path(f"/tmp/{run_prefix}-wpsink")
    shutil.rmtree(out, ignore_errors=True)
    proc = subprocess.Popen([PY, str(HERE / "wp_sink.py"), "--netns", f"/run/netns/{wp_netns}",
                             "--dir", str(out), "--port", str(TLV_PORT), "--port", str(PROXY_PORT)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        yield out
    finally:
        proc.kill()
        proc.wait(timeout=10)
        shutil.rmtree(out, ignore_errors=True)


@pytest.fixture()
def wdp(dp, wp_pod: Path) -> Iterator:
    for f in wp_pod.glob("*.bin"):
        f.unlink()
    yield dp
    dp.sync(projection())  # leave no waypoint-specific content for the next test's reset


def _stream(sink: Path, port: int, deadline: float = 10.0) -> bytes:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        got = sorted(sink.glob(f"{port}-*.bin"))
        if got:
            assert len(got) == 1, got
            data = got[0].read_bytes()
            got[0].unlink()
            return data
        time.sleep(0.02)
    raise AssertionError(f"nothing arrived on :{port}")


def _payload(tmp_path: Path, size: int) -> tuple[Path, bytes]:
    data = os.urandom(size)
    p = tmp_path / f"payload-{size}"
    p.write_bytes(data)
    return p, data


CASES = [("send", 1), ("send", 4 << 20), ("writev", 100_000), ("sendfile", 300_000), ("splice", 200_000),
         ("small", 3000)]


@pytest.mark.parametrize("encoding", ["tlv", "proxy"])
@pytest.mark.parametrize(("mode", "size"), CASES, ids=[f"{m}-{s}" for m, s in CASES])
def test_header_once_then_exact_payload_v4(wdp, topology, wp_pod, tmp_path, encoding, mode, size) -> None:
    port = PROXY_PORT if encoding == "proxy" else TLV_PORT
    assert not wdp.sync(projection(handoff_port=PROXY_PORT if encoding == "proxy" else 0)).rejected
    path, data = _payload(tmp_path, size)
    r = run_client(topology, "c1", f"{WEB_VIP4}:80", path, mode)
    assert not r["error"], r
    assert r["reply"] == f"got {len(data) + (28 if encoding == 'proxy' else 16)}\n", r
    assert r["peer"] == [WEB_VIP4, 80], r  # getpeername: the VIP, not the waypoint pod
    stream = _stream(wp_pod, port)
    if encoding == "tlv":
        ip, dport, n = decode_tlv(stream)
        assert (ip, dport, n) == (WEB_VIP4, 80, 16)
    else:
        src, dst, n = decode_pp2(stream)
        assert dst == (WEB_VIP4, 80) and n == 28
        assert src == (r["sock"][0], r["sock"][1]) == (ip4("c1"), r["sock"][1])
    assert hashlib.sha256(stream[n:]).hexdigest() == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("encoding", ["tlv", "proxy"])
@pytest.mark.parametrize("family", ["v6", "dual"])
@pytest.mark.parametrize("size", [1, 4 << 20])
def test_header_v6_and_dual_stack(wdp, topology, wp_pod, tmp_path, encoding, family, size) -> None:
    """IPv6 VIP: 28-byte TLV / 52-byte PROXY v2; a dual-stack socket to ::ffff:VIP4: the IPv4 forms."""
    proxy = encoding == "proxy"
    assert not wdp.sync(projection(handoff_port=PROXY_PORT if proxy else 0)).rejected
    path, data = _payload(tmp_path, size)
    if family == "v6":
        r = run_client(topology, "c1", f"[{WEB_VIP6}]:80", path)
        want_dst, want_src, hlen = (WEB_VIP6, 80), ip6("c1"), (52 if proxy else 28)
        assert r["peer"] == [WEB_VIP6, 80], r
    else:
        r = run_client(topology, "c1", f"{WEB_VIP4}:80", path, dual=True)
        want_dst, want_src, hlen = (WEB_VIP4, 80), ip4("c1"), (28 if proxy else 16)
        assert r["peer"] == [f"::ffff:{WEB_VIP4}", 80], r
    assert not r["error"] and r["reply"] == f"got {len(data) + hlen}\n", r
    stream = _stream(wp_pod, PROXY_PORT if proxy else TLV_PORT)
    if proxy:
        src, dst, n = decode_pp2(stream)
        assert (dst, src[0], src[1], n) == (want_dst, want_src, r["sock"][1], hlen)
    else:
        ip, dport, n = decode_tlv(stream)
        assert ((ip, dport), n) == (want_dst, hlen)
    assert hashlib.sha256(stream[n:]).digest() == hashlib.sha256(data).digest()


def _sockhash_keys(path: Path) -> int:
    """Number of keys in a pinned sockhash (get_next_key: sockhash values cannot be read)."""
    import ctypes as ct
    import struct as st

    from daemon.dataplane import bpfsys

    fd = bpfsys.obj_get(str(path))
    try:
        n, key, nxt = 0, ct.create_string_buffer(8), ct.create_string_buffer(8)
        first = True
        while n < 100000:
            attr = ct.create_string_buffer(24)
            st.pack_into("=IIQQ", attr, 0, fd, 0, 0 if first else ct.addressof(key), ct.addressof(nxt))
            try:
                bpfsys._bpf(4, attr)  # BPF_MAP_GET_NEXT_KEY
            except FileNotFoundError:  # ENOENT: past the last key
                return n
            n += 1
            first = False
            ct.memmove(key, nxt, 8)
        return n
    finally:
        os.close(fd)


def test_socket_leaves_the_sockhash_after_the_header(wdp, topology, wp_pod, tmp_path) -> None:
    """Once the header is out (and acknowledged) the socket leaves km_wpsock: the rest of the
    connection is plain TCP. The bytes after the pause still arrive exactly once, unprefixed."""
    assert not wdp.sync(projection()).rejected
    path, data = _payload(tmp_path, 300_000)
    wpsock = wdp.gen_dir / "wpsock"
    proc = subprocess.Popen([PY, str(HERE / "wp_client.py"), "--netns", topology.ns_path("c1"), "--cgroup",
                             str(topology.cgroup), "--target", f"{WEB_VIP4}:80", "--mode", "pause",
                             "--payload", str(path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "paused"
    end = time.monotonic() + 1.2
    while _sockhash_keys(wpsock) and time.monotonic() < end:
        time.sleep(0.05)
    assert _sockhash_keys(wpsock) == 0
    r = json.loads(proc.stdout.read())
    proc.wait(timeout=30)
    assert r["reply"] == f"got {len(data) + 16}\n", r
    stream = _stream(wp_pod, TLV_PORT)
    assert decode_tlv(stream) == (WEB_VIP4, 80, 16) and stream[16:] == data


def test_handoff_with_monitoring_off(wdp, topology, wp_pod, tmp_path) -> None:
    """Monitoring off (no state callbacks, no events): sockops still puts the via-waypoint socket
    in km_wpsock (header written once, getpeername the VIP) and its RTT callback still takes it
    out after the header."""
    assert not wdp.sync(projection()).rejected
    wdp.set_monitoring(access_log=False, metrics=False)
    wdp.poll_events(lambda _e: None, timeout_ms=50)  # earlier tests' events
    try:
        path, data = _payload(tmp_path, 300_000)
        wpsock = wdp.gen_dir / "wpsock"
        proc = subprocess.Popen([PY, str(HERE / "wp_client.py"), "--netns", topology.ns_path("c1"),
                                 "--cgroup", str(topology.cgroup), "--target", f"{WEB_VIP4}:80", "--mode",
                                 "pause", "--payload", str(path)], stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None and proc.stdout.readline().strip() == "paused"
        end = time.monotonic() + 1.2
        while _sockhash_keys(wpsock) and time.monotonic() < end:
            time.sleep(0.05)
        assert _sockhash_keys(wpsock) == 0
        r = json.loads(proc.stdout.read())
        proc.wait(timeout=30)
        assert r["reply"] == f"got {len(data) + 16}\n" and r["peer"] == [WEB_VIP4, 80], r
        stream = _stream(wp_pod, TLV_PORT)
        assert decode_tlv(stream) == (WEB_VIP4, 80, 16) and stream[16:] == data
        seen: list[ConnEvent] = []
        wdp.poll_events(seen.append, timeout_ms=200)
        assert not [e for e in seen if e.orig_ip == WEB_VIP4], seen
    finally:
        wdp.set_monitoring(access_log=True, metrics=True)


def test_no_waypoint_plain_lb_no_header(wdp, topology, wp_pod, tmp_path) -> None:
    """A service without a waypoint whose endpoint is the sink port: balanced in the kernel as
    before, and the stream arrives without any header."""
    proj = projection()
    plain = Service("default/plain", (bytes([10, 96, 0, 40]),),
                    (ServicePort(80, (Endpoint(WP_UID, TLV_PORT),)),))
    proj.services[plain.name] = plain
    assert not wdp.sync(proj).rejected
    path, data = _payload(tmp_path, 5000)
    r = run_client(topology, "c1", "10.96.0.40:80", path)
    assert r["reply"] == f"got {len(data)}\n" and r["peer"] == ["10.96.0.40", 80], r
    assert _stream(wp_pod, TLV_PORT) == data


def _events(dp, want, timeout: float = 5.0) -> list[ConnEvent]:
    seen: list[ConnEvent] = []
    end = time.monotonic() + timeout
    while time.monotonic() < end and not want(seen):
        dp.poll_events(seen.append, timeout_ms=100)
    return seen


@pytest.mark.parametrize("why", ["no_endpoint", "unresolved"])
def test_waypoint_without_endpoint_refuses_at_once(wdp, topology, tmp_path, why) -> None:
    if why == "no_endpoint":
        proj = projection(wp_endpoint=False)
    else:
        proj = projection(web_waypoint=Waypoint(b"", 15008, "default/missing"))
    assert not wdp.sync(proj).rejected
    wdp.poll_events(lambda e: None, timeout_ms=10)
    path, _ = _payload(tmp_path, 10)
    for target in (f"{WEB_VIP4}:80", f"[{WEB_VIP6}]:80"):
        r = run_client(topology, "c1", target, path)
        assert r["errno"] == errno.EPERM and r["seconds"] < 2.0, r  # at once, never a hang
    seen = _events(wdp, lambda s: sum(e.verdict == "no_waypoint_endpoint" for e in s) >= 2)
    bad = [e for e in seen if e.verdict == "no_waypoint_endpoint"]
    assert len(bad) >= 2 and all(e.kind == "connect" and e.service == "default/wpweb:80" or
                                 e.service.startswith("default/wpweb") for e in bad), seen


def test_pod_waypoint_direct_access(wdp, topology, wp_pod, tmp_path) -> None:
    """A workload waypoint: connections straight to the pod IP go to the waypoint too."""
    assert not wdp.sync(projection(pod_waypoint="s1")).rejected
    path, data = _payload(tmp_path, 777)
    r = run_client(topology, "c1", f"{ip4('s1')}:8080", path)
    assert r["reply"] == f"got {len(data) + 16}\n" and r["peer"] == [ip4("s1"), 8080], r
    stream = _stream(wp_pod, TLV_PORT)
    assert decode_tlv(stream) == (ip4("s1"), 8080, 16) and stream[16:] == data
    # s2 has no waypoint: plain passthrough to the server
    assert topology.client("c1", f"{ip4('s2')}:8080")["ok"] == 1


def test_waypoint_named_by_pod_address(wdp, topology, wp_pod, tmp_path) -> None:
    """A GatewayAddress may name the waypoint pod itself rather than its Service VIP."""
    from wp_env import WP_IP4 as pod_ip

    from daemon.dataplane.model import Waypoint as W

    assert not wdp.sync(projection(web_waypoint=W(bytes(int(x) for x in pod_ip.split(".")), 15008))).rejected
    path, data = _payload(tmp_path, 100)
    r = run_client(topology, "c1", f"{WEB_VIP4}:80", path)
    assert r["reply"] == f"got {len(data) + 16}\n", r
    assert decode_tlv(_stream(wp_pod, TLV_PORT))[:2] == (WEB_VIP4, 80)


def test_via_waypoint_events_name_the_waypoint_pod(wdp, topology, tmp_path) -> None:
    assert not wdp.sync(projection()).rejected
    wdp.poll_events(lambda e: None, timeout_ms=10)
    path, _ = _payload(tmp_path, 10)
    r = run_client(topology, "c1", f"{WEB_VIP4}:80", path)
    assert not r["error"], r
    seen = _events(wdp, lambda s: any(e.kind == "close" and e.verdict == "via_waypoint" for e in s))
    evs = {e.kind: e for e in seen if e.verdict == "via_waypoint"}
    assert set(evs) == {"connect", "established", "close"}, seen
    c = evs["connect"]
    assert (c.orig_ip, c.orig_port, c.backend_ip, c.backend_port, c.backend_uid) == (
        WEB_VIP4, 80, WP_IP4, TLV_PORT, WP_UID), c
    assert c.service.startswith("default/wpweb"), c
    assert evs["close"].bytes_sent >= 10 + 16


def test_unmanaged_client_not_redirected(wdp, topology) -> None:
    """c2 is in the cgroup but not enrolled (as a waypoint pod never is): even to a pod that has
    a waypoint its connects are left alone, so a waypoint's own upstream connections never loop
    back into a waypoint."""
    assert not wdp.sync(projection(pod_waypoint="s1")).rejected
    r = topology.client("c2", f"{ip4('s1')}:8080", in_cgroup=True)
    assert r["ok"] == 1 and r["counts"] == {"s1": 1}, r
    assert topology.client("c1", f"{VIP4}:80", n=3)["ok"] == 3  # no waypoint on default/web: plain LB


def test_dump_bpf_shows_waypoints(wdp) -> None:
    """read-back (dump bpf -o json) and the tree view name each service's and pod's waypoint and
    the waypoint pods' hand-off."""
    from kmeshctl.dump import render_bpf

    assert not wdp.sync(projection(handoff_port=PROXY_PORT, pod_waypoint="s1")).rejected
    rb = wdp.read_back()
    want = {"address": "10.96.0.30", "port": 15008, "service": "default/waypoint"}
    svc = {(s["name"], s["port"]): s for s in rb["services"]}
    assert svc[("default/wpweb", 80)]["waypoint"] == want
    assert svc[("default/web", 80)]["waypoint"] is None
    assert svc[("default/waypoint", 15008)]["waypoint"] is None
    be = {b["uid"]: b for b in rb["backends"]}
    assert be[uid("s1")]["waypoint"] == want and be[uid("s2")]["waypoint"] is None
    assert be[WP_UID]["handoff"] == {"port": PROXY_PORT, "encoding": "proxy"}
    assert be[uid("s2")]["handoff"] == {"port": TLV_PORT, "encoding": "tlv"}
    text = render_bpf({"maps": rb})
    assert "default/wpweb [RANDOM] => waypoint default/waypoint (10.96.0.30:15008)" in text
    assert "pod default/s1 (backend) => waypoint default/waypoint (10.96.0.30:15008)" in text
    assert f"[hand-off PROXY v2 :{PROXY_PORT}]" in text
    assert wdp.sync(projection(web_waypoint=Waypoint(b"", 15008))).rejected == {}
    assert "=> waypoint UNRESOLVED" in render_bpf({"maps": wdp.read_back()})


def test_trace_line_of_a_via_waypoint_connection() -> None:
    from kmeshctl.trace import format_event

    rec = {"time": "2026-12-03T08:00:00.000Z", "kind": "connect", "verdict": "via_waypoint",
           "source": {"namespace": "default", "pod": "sleep"},
           "original": {"ip": "10.96.0.3", "port": 80, "service": "default/fortio.default.svc.cluster.local"},
           "backend": {"ip": "10.244.0.9", "port": 15019, "namespace": "default", "pod": "waypoint-7d9f"}}
    assert format_event(rec).endswith(
        "default/sleep -> 10.96.0.3:80 (default/fortio) => waypoint default/waypoint-7d9f 10.244.0.9:15019 "
        "VIA_WAYPOINT")
    rec.update(kind="close", bytes_sent=120, bytes_received=300, duration_ms=2.5, srtt_us=40)
    line = format_event(rec)
    assert "=> waypoint default/waypoint-7d9f 10.244.0.9:15019 CLOSED sent=120B recv=300B" in line
