"""Optional persistence of the store in the state dir (``objects.json``), for restarts.

Off by default: the sandbox API server is an in-memory server and a fresh start is a fresh
cluster. With persistence on, a background thread writes a snapshot at most every
``interval`` seconds when something changed (and once more on stop); a restart loads it, keeps
the resourceVersion counter moving forward and answers watches from before the restart with
410 Gone, so clients relist exactly as after an etcd compaction.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

from . import kinds
from .kinds import ResourceType
from .objects import IpAllocator, NodePorts
from .store import Store

log = logging.getLogger("sandbox.apiserver")
FILENAME = "objects.json"


def _resolve(obj: dict[str, Any]) -> ResourceType | None:
    api_version = obj.get("apiVersion", "")
    group = api_version.rsplit("/", 1)[0] if "/" in api_version else ""
    return kinds.by_kind(obj.get("kind", ""), group)


def load(store: Store, ips: IpAllocator, state_dir: Path, node_ports: NodePorts | None = None) -> int:
    """Restore objects saved by a previous run; re-reserves their ClusterIPs/nodePorts. Returns the count."""
    path = state_dir / FILENAME
    if not path.exists():
        return 0
    snap = json.loads(path.read_text())
    n = store.restore(snap, _resolve)
    for obj in snap.get("objects") or []:
        if obj.get("kind") == "Service":
            ip = (obj.get("spec") or {}).get("clusterIP")
            if ip and ip != "None" and ips.contains(ip):
                ips.reserve(ip)
            for p in (obj.get("spec") or {}).get("ports") or [] if node_ports is not None else []:
                if p.get("nodePort"):
                    node_ports.reserve(p["nodePort"])
    return n


def save(store: Store, state_dir: Path) -> None:
    state_dir.mkdir(parents=True, exist_ok=True)
    tmp = state_dir / (FILENAME + ".tmp")
    tmp.write_text(json.dumps(store.snapshot(), separators=(",", ":")))
    os.replace(tmp, state_dir / FILENAME)


class Persister:
    """Background snapshot writer."""

    def __init__(self, store: Store, state_dir: Path, interval: float = 0.5) -> None:
        self.store = store
        self.state_dir = state_dir
        self.interval = interval
        self._stop = threading.Event()
        self._saved = -1
        self._thread = threading.Thread(target=self._run, name="apiserver-persist", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _flush(self) -> None:
        current = self.store.dirty
        if current != self._saved:
            try:
                save(self.store, self.state_dir)
                self._saved = current
            except OSError as e:
                log.warning("cannot save the API server state to %s: %s", self.state_dir, e)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._flush()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        self._flush()
