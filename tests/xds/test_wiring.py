"""DataplaneSync ordering rules: nothing before the first full sync, then named updates, retry on error.

A recording stand-in for the Dataplane interface is used here to observe call order; the real
BPF data plane is exercised in test_dataplane_xds.py and test_property.py.
"""

from __future__ import annotations

import threading
from typing import Any

from conftest import wait_for
from xds_helpers import apply, service, svc_key, workload

from daemon.dataplane.model import Projection
from daemon.state import State
from daemon.wiring import DataplaneSync

A = svc_key("a")


class Recorder:
    def __init__(self, fail_first_update: bool = False) -> None:
        self.calls: list[tuple[str, Any, Any, set[str], set[str]]] = []
        self.fail = fail_first_update
        self.lock = threading.Lock()

    def sync(self, projection: Projection) -> Any:
        with self.lock:
            self.calls.append(("sync", set(projection.services), set(projection.backends), set(), set()))
        return type("R", (), {"written": 1, "deleted": 0, "rejected": {}})()

    def update(self, projection: Projection, services: Any, backends: Any) -> Any:
        with self.lock:
            if self.fail:
                self.fail = False
                raise RuntimeError("map full")
            self.calls.append(("update", set(projection.services), set(projection.backends), set(services),
                               set(backends)))
        return type("R", (), {"written": 1, "deleted": 0, "rejected": {}})()


def test_first_full_then_named_updates() -> None:
    st, rec = State(), Recorder()
    sync = DataplaneSync(st, rec)
    try:
        apply(st, service("a"), workload("w1", services={A: []}))
        assert sync.flush(5) and rec.calls == []  # not synced yet: nothing may be written
        st.mark_synced()
        assert sync.flush(5)
        assert rec.calls == [("sync", {A}, {"Kubernetes//Pod/default/w1"}, set(), set())]
        apply(st, workload("w2", "10.1.0.2", services={A: []}))
        assert sync.flush(5)
        kind, _, backends, services, changed = rec.calls[-1]
        assert kind == "update" and services == {A} and changed == {"Kubernetes//Pod/default/w2"}
        assert backends == {"Kubernetes//Pod/default/w1", "Kubernetes//Pod/default/w2"}
    finally:
        sync.stop()


def test_failure_is_reported_and_followed_by_full_resync() -> None:
    st, rec = State(), Recorder(fail_first_update=True)
    st.mark_synced()
    sync = DataplaneSync(st, rec, retry_s=0.05)  # state already synced: a full sync at once
    try:
        assert sync.flush(5) and rec.calls[0][0] == "sync"
        apply(st, service("a"))
        wait_for(lambda: len(rec.calls) >= 2, what="retry")
        assert sync.flush(5)
        assert rec.calls[1][0] == "sync" and rec.calls[1][1] == {A}  # the failed update became a full sync
        assert sync.status()["last_error"] == ""
    finally:
        sync.stop()
