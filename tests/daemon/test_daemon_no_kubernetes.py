"""A started daemon never imports the official ``kubernetes`` client (issue 12: ~24 MiB of RSS)
nor grpcio (~13 MiB: its xDS stream runs on daemon/xds/h2grpc.py).

The real daemon runs under ``python -X importtime``, which logs every import when it happens,
lazy ones included, through a whole life: start, list+watch, enrolling pods (merge patches),
SIGTERM with the DaemonSet check and clearing the annotations. Its log must name our client
(``daemon.kube``) and never ``kubernetes``.
"""

from __future__ import annotations

import re
import signal

import pytest

from tests.daemon.conftest import PY, Env, Proc, wait_for

pytestmark = pytest.mark.kernel

PODS = {"cli", "be1", "be2"}


def _imported(log: str) -> set[str]:
    return {m.group(1) for m in re.finditer(r"^import time:\s+\d+ \|\s+\d+ \|\s*(\S+)\s*$", log, re.M)}


def test_started_daemon_never_imports_kubernetes(env: Env) -> None:
    assert env.daemon is not None
    env.daemon.stop(signal.SIGTERM)  # the fixture's daemon: replaced by one that logs its imports
    cmd = env.daemon_cmd()
    assert cmd[0] == PY
    daemon = Proc("daemon-importtime", [PY, "-X", "importtime", *cmd[1:]], env.work / "daemon-importtime.log",
                  env.daemon_env())
    daemon.start("kmesh-daemon started", timeout=120)
    env.daemon = daemon  # the fixture stops it at the end, whatever happens here
    env.label_namespace("Kmesh")
    try:
        wait_for(lambda: PODS <= env.enrolled(), 60, "pods enrolled")
        wait_for(lambda: all(env.annotation(p) == "enabled" for p in PODS), 30, "annotations patched")
    finally:
        env.label_namespace(None)
    wait_for(lambda: not (PODS & env.enrolled()), 60, "pods unenrolled")
    env.label_namespace("Kmesh")
    wait_for(lambda: PODS <= env.enrolled(), 60, "pods enrolled again")
    wait_for(lambda: env.annotation("cli") == "enabled", 30, "annotation on cli")
    # SIGTERM without a DaemonSet: reads the Pod and DaemonSet (404s), clears the annotations.
    assert daemon.stop(signal.SIGTERM) == 0
    assert all(env.annotation(p) is None for p in PODS)
    log = daemon.log.read_text()
    modules = _imported(log)
    want = {"daemon.kube", "daemon.enroll", "daemon.xds.client", "http.client", "ssl"}
    assert want <= modules, sorted(modules)[:50]
    leaked = sorted(m for m in modules if m.split(".")[0] in ("kubernetes", "urllib3", "grpc"))
    assert not leaked, leaked
    env.label_namespace(None)
    env.start_daemon()  # leave the module's environment as the fixture made it
