"""Opt-in persistence: objects, resourceVersions and ClusterIPs survive a restart."""

from __future__ import annotations

from pathlib import Path

import pytest
from kubernetes import client, config, watch
from kubernetes.client.rest import ApiException

from sandbox.apiserver import ApiServer


def _core(server: ApiServer, kubeconfig: Path) -> client.CoreV1Api:
    server.write_kubeconfig(kubeconfig)
    return client.CoreV1Api(config.new_client_from_config(config_file=str(kubeconfig)))


def test_restart_with_persist_keeps_objects(tmp_path: Path) -> None:
    state = tmp_path / "state"
    first = ApiServer(port=0, state_dir=state, persist=True, token="t0k")
    first.start()
    try:
        core = _core(first, tmp_path / "kc")
        core.create_namespace({"metadata": {"name": "keep"}})
        cm = core.create_namespaced_config_map("keep", {"metadata": {"name": "cm"}, "data": {"a": "1"}})
        svc = core.create_namespaced_service(
            "keep", {"metadata": {"name": "s"}, "spec": {"ports": [{"port": 80}]}}
        )
        core.api_client.close()
    finally:
        first.stop()
    assert (state / "objects.json").exists()

    second = ApiServer(port=0, state_dir=state, persist=True, token="t0k")
    second.start()
    try:
        core = _core(second, tmp_path / "kc")
        got = core.read_namespaced_config_map("cm", "keep")
        assert got.metadata.uid == cm.metadata.uid and got.data == {"a": "1"}
        # The resourceVersion keeps moving forward ...
        updated = core.patch_namespaced_config_map("cm", "keep", {"data": {"a": "2"}})
        assert int(updated.metadata.resource_version) > int(cm.metadata.resource_version)
        # ... the Service keeps its address, which stays taken ...
        assert core.read_namespaced_service("s", "keep").spec.cluster_ip == svc.spec.cluster_ip
        with pytest.raises(ApiException) as e:
            core.create_namespaced_service(
                "keep",
                {
                    "metadata": {"name": "t"},
                    "spec": {"clusterIP": svc.spec.cluster_ip, "ports": [{"port": 1}]},
                },
            )
        assert e.value.status == 422
        # ... and a watch from before the restart must relist.
        with pytest.raises(ApiException) as e:
            for _ in watch.Watch().stream(
                core.list_namespaced_config_map,
                "keep",
                resource_version=cm.metadata.resource_version,
                timeout_seconds=2,
            ):
                pass
        assert e.value.status == 410
        core.api_client.close()
    finally:
        second.stop()


def test_without_persist_a_restart_is_a_new_cluster(tmp_path: Path) -> None:
    state = tmp_path / "state"
    for attempt in range(2):
        server = ApiServer(port=0, state_dir=state)
        server.start()
        try:
            core = _core(server, tmp_path / "kc")
            core.create_namespace({"metadata": {"name": "once"}})  # would be 409 on the 2nd start if kept
            core.api_client.close()
        finally:
            server.stop()
        assert not (state / "objects.json").exists(), attempt
