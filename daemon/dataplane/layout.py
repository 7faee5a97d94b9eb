"""ctypes twins of the structs in bpf/include/km_maps.h, and the on-wire constants.

Keep this file and the header in lock step. Any change to a struct, a map's key/value or the
meaning of a field must bump ``LAYOUT_VERSION``: the loader then creates fresh maps in a new pin
subdirectory instead of running new programs against maps laid out for the old ones.
"""

from __future__ import annotations

import ctypes as ct
import struct

# 2: waypoint fields (km_wp in service/backend, sock handoff, wpsock); 3: km_config;
# 4: the reconciled maps are preallocated; 5: km_conn_stats (connection counters in the kernel),
# km_config.trace_on; 6: km_sock is an array of slots (cookie % size) whose records carry the cookie
LAYOUT_VERSION = 6
SOCK_SAME_SINCE = 6  # km_sock means the same since this version: its records carry over

AF_INET = 2
AF_INET6 = 10

FE_SERVICE = 1
FE_BACKEND = 2

BE_HAS_V4 = 1
BE_HAS_V6 = 2

SK_TRANSLATED = 1
SK_WAYPOINT = 2

HO_TLV = 1
HO_PROXY = 2
HO_NAMES = {HO_TLV: "tlv", HO_PROXY: "proxy"}
HANDOFF_TLV_PORT = 15019
WP_UNRESOLVED = 255

NAME_SERVICE = 1
NAME_BACKEND = 2
NAME_LEN = 256

PRIOS = 7

# km_config.mon_off bits (a set bit = that output off; 0 = everything on)
MON_ACCESSLOG = 1
MON_METRICS = 2
MON_ALL = MON_ACCESSLOG | MON_METRICS
MON_NOTRACE = 4  # derived in the kernel (km_config.trace_on == 0), never stored in mon_off
MAX_CONN_STATS = 16384  # km_conn_stats capacity (KM_MAX_CONN_STATS)

EVENT_KINDS = {1: "connect", 2: "established", 3: "close"}
VERDICTS = {1: "translated", 2: "passthrough", 3: "no_healthy_endpoint", 4: "via_waypoint",
            5: "no_waypoint_endpoint"}


class FeKey(ct.Structure):
    _fields_ = [("addr", ct.c_uint8 * 16), ("port", ct.c_uint16), ("family", ct.c_uint8), ("pad", ct.c_uint8)]


class FeVal(ct.Structure):
    _fields_ = [("kind", ct.c_uint32), ("id", ct.c_uint32)]


class Wp(ct.Structure):
    _fields_ = [("addr", ct.c_uint8 * 16), ("port", ct.c_uint16), ("family", ct.c_uint8), ("pad", ct.c_uint8)]


class ServiceVal(ct.Structure):
    _fields_ = [("lb_mode", ct.c_uint32), ("count", ct.c_uint32 * PRIOS), ("flags", ct.c_uint32), ("wp", Wp)]


class EpKey(ct.Structure):
    _fields_ = [("svc_id", ct.c_uint32), ("prio", ct.c_uint32), ("slot", ct.c_uint32)]


class EpVal(ct.Structure):
    _fields_ = [("backend_id", ct.c_uint32), ("port", ct.c_uint16), ("pad", ct.c_uint16)]


class BackendVal(ct.Structure):
    _fields_ = [("ip4", ct.c_uint8 * 4), ("ip6", ct.c_uint8 * 16), ("flags", ct.c_uint32), ("wp", Wp),
                ("handoff_port", ct.c_uint16), ("handoff_mode", ct.c_uint8), ("pad", ct.c_uint8)]


class SockVal(ct.Structure):
    _fields_ = [
        ("cookie", ct.c_uint64),  # the socket owning this km_sock slot; 0 = free
        ("orig_addr", ct.c_uint8 * 16),
        ("backend_addr", ct.c_uint8 * 16),
        ("orig_port", ct.c_uint16),
        ("backend_port", ct.c_uint16),
        ("family", ct.c_uint8),
        ("flags", ct.c_uint8),
        ("handoff", ct.c_uint8),
        ("pad", ct.c_uint8),
        ("service_id", ct.c_uint32),
        ("backend_id", ct.c_uint32),
        ("connect_ns", ct.c_uint64),
    ]


class HandoffVal(ct.Structure):
    """km_handoff socket storage (not dumped: sk_storage maps are keyed by sockets)."""

    _fields_ = [("orig_addr", ct.c_uint8 * 16), ("orig_port", ct.c_uint16), ("family", ct.c_uint8),
                ("mode", ct.c_uint8), ("done", ct.c_uint8), ("pad", ct.c_uint8 * 3)]


class NameKey(ct.Structure):
    _fields_ = [("kind", ct.c_uint32), ("id", ct.c_uint32)]


class NameVal(ct.Structure):
    _fields_ = [("name", ct.c_char * NAME_LEN)]


class LayoutVal(ct.Structure):
    _fields_ = [("version", ct.c_uint32), ("reserved", ct.c_uint32 * 7)]


class ConfigVal(ct.Structure):
    """km_config[0]: runtime switches (monitoring)."""

    _fields_ = [("mon_off", ct.c_uint32), ("trace_on", ct.c_uint32), ("reserved", ct.c_uint32 * 6)]


class ConnKey(ct.Structure):
    """km_conn_stats key; orig_* only without a service (direct pod access, passthrough)."""

    _fields_ = [("netns_cookie", ct.c_uint64), ("service_id", ct.c_uint32), ("backend_id", ct.c_uint32),
                ("orig_addr", ct.c_uint8 * 16), ("orig_port", ct.c_uint16), ("family", ct.c_uint8),
                ("verdict", ct.c_uint8), ("pad", ct.c_uint32)]


class ConnVal(ct.Structure):
    _fields_ = [("opened", ct.c_uint64), ("closed", ct.c_uint64), ("bytes_sent", ct.c_uint64),
                ("bytes_received", ct.c_uint64)]


class Event(ct.Structure):
    _fields_ = [
        ("ts_ns", ct.c_uint64),
        ("netns_cookie", ct.c_uint64),
        ("sock_cookie", ct.c_uint64),
        ("bytes_sent", ct.c_uint64),
        ("bytes_received", ct.c_uint64),
        ("duration_ns", ct.c_uint64),
        ("orig_addr", ct.c_uint8 * 16),
        ("backend_addr", ct.c_uint8 * 16),
        ("service_id", ct.c_uint32),
        ("backend_id", ct.c_uint32),
        ("srtt_us", ct.c_uint32),
        ("orig_port", ct.c_uint16),
        ("backend_port", ct.c_uint16),
        ("kind", ct.c_uint8),
        ("verdict", ct.c_uint8),
        ("family", ct.c_uint8),
        ("pad", ct.c_uint8 * 5),
    ]


# Map name (pin file name) -> (key struct, value struct). Sizes are checked against what bcc
# compiled at load time, so a header/ctypes mismatch fails loudly instead of corrupting maps.
MAP_LAYOUTS: dict[str, tuple[type, type]] = {
    "frontend": (FeKey, FeVal),
    "service": (ct.c_uint32, ServiceVal),
    "endpoint": (EpKey, EpVal),
    "backend": (ct.c_uint32, BackendVal),
    "manage": (ct.c_uint64, ct.c_uint32),
    "sock": (ct.c_uint32, SockVal),  # slot = socket cookie % max_entries
    "names": (NameKey, NameVal),
    "layout": (ct.c_uint32, LayoutVal),
    "config": (ct.c_uint32, ConfigVal),
    "conn_stats": (ConnKey, ConnVal),
}
# pin file name -> symbol in the C source
MAP_SYMBOLS = {name: f"km_{name}" for name in MAP_LAYOUTS}

# Fast packers (native byte order for ids; addresses/ports are passed in network order).
FE_KEY = struct.Struct("=16s2sBB")  # port as 2 network-order bytes
FE_VAL = struct.Struct("=II")
WP = struct.Struct("=16s2sBB")  # km_wp: addr, port as 2 network-order bytes, family, pad
SVC_VAL = struct.Struct("=I7II16s2sBB")  # lb_mode, count[7], flags, km_wp
EP_KEY = struct.Struct("=III")
EP_VAL = struct.Struct("=I2sH")  # port as 2 network-order bytes
BE_VAL = struct.Struct("=4s16sI16s2sBB2sBB")  # ip4, ip6, flags, km_wp, handoff port, mode, pad
U32 = struct.Struct("=I")
U64 = struct.Struct("=Q")
NAME_KEY = struct.Struct("=II")
NAME_VAL = struct.Struct(f"={NAME_LEN}s")
CONFIG_VAL = struct.Struct("=II24s")  # mon_off, trace_on, reserved
CONN_KEY = struct.Struct("=QII16s2sBBI")  # orig_port as 2 network-order bytes
CONN_VAL = struct.Struct("=QQQQ")
# km_event: ts, netns, sock, sent, received, duration, orig, backend, service, backend id, srtt,
# orig port, backend port (2 network-order bytes each), kind, verdict, family, pad
EVENT = struct.Struct("=QQQQQQ16s16sIII2s2sBBB5s")

for _s, _c in [(FE_KEY, FeKey), (FE_VAL, FeVal), (SVC_VAL, ServiceVal), (EP_KEY, EpKey), (EP_VAL, EpVal),
               (BE_VAL, BackendVal), (NAME_KEY, NameKey), (NAME_VAL, NameVal), (CONFIG_VAL, ConfigVal),
               (CONN_KEY, ConnKey), (CONN_VAL, ConnVal), (EVENT, Event)]:
    assert _s.size == ct.sizeof(_c), (_c.__name__, _s.size, ct.sizeof(_c))
assert ct.sizeof(Event) == 104 and ct.sizeof(SockVal) == 64 and WP.size == ct.sizeof(Wp)
assert ct.sizeof(ConnKey) == 40
