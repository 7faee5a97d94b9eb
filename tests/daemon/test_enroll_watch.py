"""ListWatcher against the sandbox API server: list, watch from the list's resourceVersion,
re-list on 410 Gone (synthesizing DELETED for what vanished), keep following afterwards."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

from daemon.enroll import ListWatcher
from daemon.kube import KubeClient
from sandbox.apiserver.server import ApiServer


class _StaleFirstList(KubeClient):
    """The daemon's client whose first list is stale: an old resourceVersion + a ghost object."""

    lists: list[int]

    def list(self, path: str, **query: Any) -> dict[str, Any]:
        data = super().list(path, **query)
        self.lists.append(1)
        if len(self.lists) == 1:
            data["metadata"]["resourceVersion"] = "1"
            data["items"].append({"metadata": {"name": "ghost", "uid": "ghost-uid"}})
        return data


def test_list_watcher_relists_after_gone(tmp_path: Path) -> None:
    from kubernetes import client, config

    server = ApiServer(watch_history=3)
    server.start()
    kc = tmp_path / "kubeconfig"
    server.write_kubeconfig(kc, "sandbox")
    stop = threading.Event()
    try:
        core = client.CoreV1Api(config.new_client_from_config(config_file=str(kc)))
        for i in range(6):  # more writes than the watch history holds
            core.create_namespace({"metadata": {"name": f"w{i}"}})
        api = _StaleFirstList.from_kubeconfig(kc)
        api.lists = lists = []

        events: list[tuple[str, str]] = []
        synced = threading.Event()
        records: list[logging.LogRecord] = []
        handler = logging.Handler()
        handler.emit = records.append  # type: ignore[method-assign]
        enroll_log = logging.getLogger("daemon.enroll")
        old_level = enroll_log.level
        enroll_log.setLevel(logging.INFO)
        enroll_log.addHandler(handler)
        lw = ListWatcher("namespaces", api, "/api/v1/namespaces", {},
                         lambda k, o: events.append((k, o["metadata"]["name"])),
                         stop, on_synced=synced.set, watch_timeout=30)
        t = threading.Thread(target=lw.run, daemon=True)
        t.start()
        assert synced.wait(10)
        deadline = time.monotonic() + 10
        while ("DELETED", "ghost") not in events and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ("DELETED", "ghost") in events, events
        assert len(lists) >= 2
        assert any(r.getMessage() == "watch expired; re-listing" for r in records), records
        enroll_log.removeHandler(handler)
        enroll_log.setLevel(old_level)
        core.create_namespace({"metadata": {"name": "late"}})
        deadline = time.monotonic() + 10
        while ("ADDED", "late") not in events and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ("ADDED", "late") in events, events
        assert {f"w{i}" for i in range(6)} <= {n for k, n in events if k == "ADDED"}
    finally:
        stop.set()
        lw.stop()
        server.stop()
