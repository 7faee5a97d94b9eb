"""Bad hand-off headers against the real Envoy: the bad connection alone is closed (at once for
a malformed or oversized header, after the module's timeout for an incomplete one), a good
connection in parallel succeeds, the module's counter moves and the close reason shows in the
listener's access log (%CONNECTION_TERMINATION_DETAILS%)."""

from __future__ import annotations

import hashlib
import struct
import threading
import time
from collections.abc import Iterator

import pytest

from tests.support import tlv
from tests.support.procs import wait_for
from tests.waypoint.backends import Backend, sink_server
from tests.waypoint.client import connect, sink_roundtrip, wait_closed
from tests.waypoint.conftest import TIMEOUT_MS, Waypoint

TIMEOUT_S = TIMEOUT_MS / 1000
# generous: the machine is shared and loaded; what matters is "bounded", and the counters say why
SLACK_S = 10.0


@pytest.fixture(scope="module")
def sink() -> Iterator[Backend]:
    b = sink_server("127.0.0.41")
    yield b
    b.close()


def _good_header(sink: Backend) -> bytes:
    return tlv.encode(sink.ip, sink.port)


def _bad(sink: Backend) -> dict[str, tuple[bytes, str, str]]:
    good = _good_header(sink)
    addr = good[5:11]
    return {
        "wrong_type": (b"\x02" + good[1:], "header_malformed", "kmesh_tlv.bad_type"),
        "plain_http": (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "header_malformed", "kmesh_tlv.bad_type"),
        "length_7": (b"\x01" + struct.pack("!I", 7) + addr + b"\x00" + b"\xfe\0\0\0\0", "header_malformed",
                     "kmesh_tlv.bad_length"),
        "length_0": (b"\x01" + struct.pack("!I", 0) + b"\xfe\0\0\0\0" + b"x" * 20, "header_malformed",
                     "kmesh_tlv.bad_length"),
        "no_end_marker": (good[:11] + b"\xff\0\0\0\0", "header_malformed", "kmesh_tlv.bad_end_marker"),
        "end_marker_len": (good[:11] + b"\xfe\0\0\0\x01", "header_malformed", "kmesh_tlv.bad_end_marker"),
        "port_0": (tlv.encode(sink.ip, 0), "header_malformed", "kmesh_tlv.bad_port"),
        "oversized_19": (b"\x01" + struct.pack("!I", 19) + b"\0" * 24, "header_oversized",
                         "kmesh_tlv.oversized"),
        "oversized_4g": (b"\x01\xff\xff\xff\xff" + b"\0" * 40, "header_oversized", "kmesh_tlv.oversized"),
    }


CASES = ["wrong_type", "plain_http", "length_7", "length_0", "no_end_marker", "end_marker_len", "port_0",
         "oversized_19", "oversized_4g"]


def _access_log_has(wp: Waypoint, text: str) -> bool:
    return wp.access_log.exists() and text in wp.access_log.read_text(errors="replace")


@pytest.mark.parametrize("case", CASES)
def test_bad_header_closes_at_once_and_counts(waypoint_envoy: Waypoint, sink: Backend, case: str) -> None:
    data, counter, reason = _bad(sink)[case]
    accepted = len(sink.accepted)
    before = {c: waypoint_envoy.tlv_stat(c) for c in ("header_malformed", "header_oversized",
                                                      "header_timeout", "header_rejected")}
    with connect(waypoint_envoy.odst_port) as s:
        s.sendall(data)
        elapsed, got = wait_closed(s, TIMEOUT_S + SLACK_S)
    assert not got, "nothing may be answered on a rejected connection"
    wait_for(lambda: waypoint_envoy.tlv_stat(counter) == before[counter] + 1, 10, f"{counter} +1")
    assert waypoint_envoy.tlv_stat("header_rejected") == before["header_rejected"] + 1
    assert waypoint_envoy.tlv_stat("header_timeout") == before["header_timeout"], \
        f"closed by the timeout after {elapsed:.2f}s, not by the parser"
    wait_for(lambda: _access_log_has(waypoint_envoy, reason), 10, f"{reason} in the access log")
    assert len(sink.accepted) == accepted, "a rejected connection must never reach an upstream"


@pytest.mark.parametrize("prefix", [b"", b"\x01\x00\x00"], ids=["silent", "3_bytes"])
def test_incomplete_header_times_out_while_others_are_served(waypoint_envoy: Waypoint, sink: Backend,
                                                             prefix: bytes) -> None:
    before = waypoint_envoy.tlv_stat("header_timeout")
    with connect(waypoint_envoy.odst_port) as bad:
        if prefix:
            bad.sendall(prefix)
        # While the bad one waits, a good connection goes through end to end.
        payload = b"meanwhile" * 1000
        sha, n, ip, port = sink_roundtrip(waypoint_envoy.odst_port, [_good_header(sink)], payload)
        assert (sha, n, ip, port) == (hashlib.sha256(payload).hexdigest(), len(payload), sink.ip, sink.port)
        elapsed, got = wait_closed(bad, TIMEOUT_S + SLACK_S)
    assert not got
    # it waited for (most of) the timeout: the module, not the parser, closed it
    assert elapsed >= TIMEOUT_S * 0.5, f"closed after {elapsed:.2f}s, before the {TIMEOUT_S}s timeout"
    wait_for(lambda: waypoint_envoy.tlv_stat("header_timeout") == before + 1, 10, "header_timeout +1")
    wait_for(lambda: _access_log_has(waypoint_envoy, "kmesh_tlv.timeout"), 10, "timeout in the access log")


def test_incomplete_header_then_close_is_counted(waypoint_envoy: Waypoint) -> None:
    before = waypoint_envoy.tlv_stat("header_truncated")
    with connect(waypoint_envoy.odst_port) as s:
        s.sendall(b"\x01\x00\x00")
        time.sleep(0.2)  # let Envoy see the 3 bytes first
    wait_for(lambda: waypoint_envoy.tlv_stat("header_truncated") == before + 1, 10, "header_truncated +1")


def test_many_bad_and_good_connections_at_once(waypoint_envoy: Waypoint, sink: Backend) -> None:
    """20 stalled, 20 malformed and 20 good connections concurrently: all good ones succeed,
    every bad one is closed and counted, Envoy keeps no half-open pre-connection afterwards."""
    bad = _bad(sink)
    before = {c: waypoint_envoy.tlv_stat(c) for c in ("header_ok", "header_malformed", "header_timeout")}
    stalled = [connect(waypoint_envoy.odst_port) for _ in range(20)]
    for s in stalled:
        s.sendall(b"\x01")
    errors: list[BaseException] = []

    def good(i: int) -> None:
        try:
            payload = f"client {i} ".encode() * 500
            sha, n, _, _ = sink_roundtrip(waypoint_envoy.odst_port, [_good_header(sink)], payload)
            assert (sha, n) == (hashlib.sha256(payload).hexdigest(), len(payload))
        except BaseException as exc:  # noqa: BLE001 - collected and re-raised below
            errors.append(exc)

    def malformed() -> None:
        try:
            with connect(waypoint_envoy.odst_port) as s:
                s.sendall(bad["no_end_marker"][0])
                wait_closed(s, TIMEOUT_S + SLACK_S)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=good, args=(i,)) for i in range(20)]
    threads += [threading.Thread(target=malformed) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors[:3]
    for s in stalled:
        wait_closed(s, TIMEOUT_S + SLACK_S)
        s.close()
    wait_for(lambda: waypoint_envoy.tlv_stat("header_timeout") >= before["header_timeout"] + 20, 15,
             "20 timeouts counted")
    assert waypoint_envoy.tlv_stat("header_ok") >= before["header_ok"] + 20
    assert waypoint_envoy.tlv_stat("header_malformed") >= before["header_malformed"] + 20
    pre_active = f"listener.127.0.0.1_{waypoint_envoy.odst_port}.downstream_pre_cx_active"
    wait_for(lambda: waypoint_envoy.stat(pre_active) == 0, 15, "no pending pre-connections")
    assert waypoint_envoy.envoy.alive()
