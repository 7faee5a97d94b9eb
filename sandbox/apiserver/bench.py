"""``python -m sandbox.apiserver.bench [N]``: write/list throughput through the official client.

Starts an in-process server on a free loopback port, creates N pods (default 500), lists them,
and patches each pod's status; prints one line per figure. For spotting regressions, not a
claim about real clusters.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from kubernetes import client, config

    from .server import ApiServer

    n = int((argv or sys.argv[1:] or ["500"])[0])
    with tempfile.TemporaryDirectory() as tmp, ApiServer(port=0) as srv:
        api = config.new_client_from_config(config_file=str(srv.write_kubeconfig(Path(tmp) / "kc")))
        core = client.CoreV1Api(api)
        core.create_namespace({"metadata": {"name": "bench"}})
        t = time.perf_counter()
        for i in range(n):
            core.create_namespaced_pod(
                "bench",
                {
                    "metadata": {"name": f"p{i}", "labels": {"app": f"a{i % 10}"}},
                    "spec": {
                        "nodeName": "n",
                        "containers": [{"name": "c", "image": "i", "ports": [{"containerPort": 80}]}],
                    },
                },
            )
        dt = time.perf_counter() - t
        print(f"create pod: {n / dt:.0f}/s ({dt * 1000 / n:.2f} ms each)")
        t = time.perf_counter()
        for _ in range(20):
            resp = core.list_namespaced_pod_with_http_info("bench", _preload_content=False)
            assert resp.read().count(b'"kind":"Pod"') == n  # the whole body, not deserialised
        print(f"list {n} pods (raw JSON): {(time.perf_counter() - t) / 20 * 1000:.1f} ms")
        t = time.perf_counter()
        for i in range(n):
            core.patch_namespaced_pod_status(f"p{i}", "bench", {"status": {"phase": "Running"}})
        dt = time.perf_counter() - t
        print(f"patch pod status: {n / dt:.0f}/s ({dt * 1000 / n:.2f} ms each)")
        api.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
