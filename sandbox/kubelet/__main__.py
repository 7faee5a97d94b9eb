"""``python -m sandbox.kubelet --kubeconfig PATH --state-dir DIR --cgroup-root DIR --prefix P``

Runs the sandbox's one node until SIGTERM/SIGINT, then stops every pod and removes what it made.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

from sandbox.kubelet.node import Kubelet
from sandbox.kubelet.runtime import RuntimeError_


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sandbox.kubelet", description=__doc__)
    p.add_argument("--kubeconfig", required=True)
    p.add_argument("--state-dir", required=True, type=Path)
    p.add_argument(
        "--cgroup-root",
        required=True,
        type=Path,
        help="a child directory of the cgroup v2 mount (never the mount itself)",
    )
    p.add_argument("--prefix", required=True, help="unique name prefix for netns and pins")
    p.add_argument("--node-name", default=None, help="default: the host name")
    p.add_argument("--pod-cidr", default="10.244.0.0/24")
    p.add_argument(
        "--bpffs",
        default="/sys/fs/bpf",
        help="host directory that pods' hostPath /sys/fs/bpf maps to (a bpf filesystem)",
    )
    p.add_argument("-v", "--verbose", action="store_true")
    a = p.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if a.verbose else logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s kubelet %(levelname)s %(message)s",
    )
    try:
        kubelet = Kubelet(
            a.kubeconfig, a.state_dir, a.cgroup_root, a.prefix, a.node_name, a.pod_cidr, a.bpffs
        )
    except RuntimeError_ as e:
        print(f"kubelet: {e}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: kubelet.stop.set())
    signal.signal(signal.SIGINT, lambda *_: kubelet.stop.set())
    try:
        kubelet.run()
    except RuntimeError_ as e:
        print(f"kubelet: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
