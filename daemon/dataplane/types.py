"""Public value types of the data plane API (see daemon/dataplane/__init__.py)."""

from __future__ import annotations

import hashlib
from dataclasses import astuple, dataclass, field


@dataclass(frozen=True)
class Capacity:
    """Map sizes. A change of any of them makes new maps (like a layout change).

    services counts service *ports*, endpoints counts endpoint *slots* (an endpoint of weight w
    takes up to 16 slots), frontends counts VIP:port pairs plus one per pod IP.
    """

    frontends: int = 262144
    services: int = 65536
    endpoints: int = 262144
    backends: int = 131072
    manage: int = 16384
    # socket slots (cookie % size) -> original destination (getpeername, events): an array of
    # 64-byte records, sized for live connections, not for the service count
    sockets: int = 65536

    def names(self) -> int:
        """The names table holds one entry per service port and per backend."""
        return self.services + self.backends

    def digest(self) -> str:
        """Short stable fingerprint, part of the pin subdirectory name."""
        return hashlib.sha256(repr(astuple(self)).encode()).hexdigest()[:8]

    def validate(self) -> None:
        for name, value in zip(("frontends", "services", "endpoints", "backends", "manage", "sockets"),
                               astuple(self), strict=True):
            if not isinstance(value, int) or not 1 <= value <= 1 << 24:
                raise ValueError(f"capacity {name}={value!r} must be an integer between 1 and {1 << 24}")


@dataclass
class ReconcileResult:
    """What one sync()/update() did. ``rejected`` maps a service name (or "backend/<uid>") to why."""

    written: int = 0
    deleted: int = 0
    rejected: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    write_seconds: float = 0.0  # of which: time spent in map syscalls
    # CLOCK_MONOTONIC when the pass's last map write returned (0.0: it wrote nothing): "the maps
    # hold everything" for converge figures, before the mirror bookkeeping and malloc_trim after it
    maps_written_monotonic: float = 0.0


@dataclass
class ConnEvent:
    """One ring-buffer record, decoded. ts_ns is CLOCK_MONOTONIC (bpf_ktime_get_ns); byte counts
    are the kernel's tcp bytes_acked / bytes_received (they include the SYN/FIN sequence numbers);
    srtt_us is the smoothed RTT at close; duration_ns is from connect() to this event."""

    ts_ns: int
    kind: str  # "connect" | "established" | "close"
    verdict: str  # "translated" | "passthrough" | "no_healthy_endpoint"
    netns_cookie: int
    sock_cookie: int
    orig_ip: str
    orig_port: int
    backend_ip: str
    backend_port: int
    service: str
    backend_uid: str
    bytes_sent: int
    bytes_received: int
    srtt_us: int
    duration_ns: int
