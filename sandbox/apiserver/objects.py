"""Object bookkeeping shared by the verbs: server-owned metadata, ClusterIP allocation, logs.

Kept apart from the REST dispatch so each verb's code reads as the real API server's flow:
decode -> admit (defaults, validation) -> store.
"""

from __future__ import annotations

import ipaddress
import json
import secrets
import string
import threading
import uuid
from datetime import UTC, datetime
from typing import Any

LOG_PATH_ANNOTATION = "sandbox.kmesh.io/log-path"


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def new_uid() -> str:
    return str(uuid.uuid4())


def generate_name(prefix: str) -> str:
    alphabet = "bcdfghjklmnpqrstvwxz2456789"
    return prefix + "".join(secrets.choice(alphabet) for _ in range(5))


def random_suffix(n: int = 5) -> str:
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(n))


class IpAllocator:
    """ClusterIP allocation from the service CIDR: the next free address after the last one handed
    out (wrapping around), so an address released on delete is not reused at once.

    The network address, the broadcast address and the first address (reserved for the
    ``kubernetes`` Service, as in real clusters) are never handed out.
    """

    def __init__(self, cidr: str = "10.96.0.0/16") -> None:
        self.network = ipaddress.ip_network(cidr)
        self._used: set[int] = set()
        self._lock = threading.Lock()
        self._next = int(self.network.network_address) + 2

    def contains(self, ip: str) -> bool:
        try:
            return ipaddress.ip_address(ip) in self.network
        except ValueError:
            return False

    def first(self) -> str:
        return str(self.network.network_address + 1)

    def is_free(self, ip: str) -> bool:
        with self._lock:
            return int(ipaddress.ip_address(ip)) not in self._used

    def reserve(self, ip: str) -> bool:
        with self._lock:
            n = int(ipaddress.ip_address(ip))
            if n in self._used:
                return False
            self._used.add(n)
            return True

    def allocate(self) -> str:
        with self._lock:
            lo = int(self.network.network_address) + 2
            hi = int(self.network.broadcast_address) - 1
            size = hi - lo + 1
            for i in range(size):
                n = lo + (self._next - lo + i) % size
                if n not in self._used:
                    self._used.add(n)
                    self._next = n + 1 if n < hi else lo
                    return str(ipaddress.ip_address(n))
        raise RuntimeError("service CIDR exhausted")

    def peek(self) -> str:
        """The address ``allocate`` would return, without taking it (for dry runs)."""
        with self._lock:
            lo = int(self.network.network_address) + 2
            hi = int(self.network.broadcast_address) - 1
            size = hi - lo + 1
            for i in range(size):
                n = lo + (self._next - lo + i) % size
                if n not in self._used:
                    return str(ipaddress.ip_address(n))
        raise RuntimeError("service CIDR exhausted")

    def release(self, ip: str | None) -> None:
        if not ip or ip == "None" or not self.contains(ip):
            return
        with self._lock:
            self._used.discard(int(ipaddress.ip_address(ip)))


class NodePorts:
    """nodePort allocation for NodePort/LoadBalancer Services from 30000-32767."""

    def __init__(self, lo: int = 30000, hi: int = 32767) -> None:
        self.lo, self.hi = lo, hi
        self._used: set[int] = set()
        self._lock = threading.Lock()
        self._next = lo

    def in_range(self, port: int) -> bool:
        return self.lo <= port <= self.hi

    def is_free(self, port: int) -> bool:
        with self._lock:
            return port not in self._used

    def reserve(self, port: int) -> None:
        with self._lock:
            self._used.add(port)

    def release(self, port: int | None) -> None:
        with self._lock:
            self._used.discard(port or -1)

    def allocate(self, take: bool, exclude: set[int]) -> int:
        """The next free port (taken unless ``take`` is False, for dry runs)."""
        with self._lock:
            size = self.hi - self.lo + 1
            for i in range(size):
                port = self.lo + (self._next - self.lo + i) % size
                if port not in self._used and port not in exclude:
                    if take:
                        self._used.add(port)
                        self._next = port + 1 if port < self.hi else self.lo
                    return port
        raise RuntimeError("node port range exhausted")


def clone(obj: Any) -> Any:
    """Deep copy of a JSON document (several times faster than copy.deepcopy for this data)."""
    return json.loads(json.dumps(obj))


def strip_for_compare(obj: dict[str, Any]) -> dict[str, Any]:
    """The object without fields that change on every write (for no-op detection)."""
    meta = {
        k: v for k, v in (obj.get("metadata") or {}).items() if k not in ("managedFields", "resourceVersion")
    }
    out = dict(obj)
    out["metadata"] = meta
    return out
