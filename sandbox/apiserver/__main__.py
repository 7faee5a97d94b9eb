"""``python -m sandbox.apiserver --port N --kubeconfig PATH [--state-dir DIR]``.

Serves until SIGTERM/SIGINT. Prints ``apiserver ready on http://127.0.0.1:N`` on stderr once
the socket is bound and the kubeconfig written, so a parent can wait for that line.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path

from .server import ApiServer


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sandbox.apiserver", description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, default=6443, help="TCP port on 127.0.0.1 (0: any free port)")
    p.add_argument("--kubeconfig", type=Path, required=True, help="where to write the kubeconfig for clients")
    p.add_argument("--state-dir", type=Path, default=None, help="keeps the token signing key (sa.key)")
    p.add_argument("--token", default=None, help="static admin bearer token (default: random)")
    p.add_argument("--service-cidr", default="10.96.0.0/16", help="ClusterIP range (IPv4)")
    p.add_argument("--context", default="sandbox", help="kubeconfig context name")
    p.add_argument(
        "--persist",
        action="store_true",
        help="keep objects in STATE_DIR/objects.json across restarts (default: in memory only)",
    )
    p.add_argument(
        "--graceful-pod-deletion",
        action="store_true",
        help="deleting a pod bound to a node marks it Terminating until its kubelet removes it",
    )
    p.add_argument(
        "--tls",
        action="store_true",
        help="serve HTTPS (CA in STATE_DIR, written into the kubeconfig) so kubectl sends the token",
    )
    p.add_argument(
        "--no-anonymous",
        action="store_true",
        help="answer requests without a bearer token with 401 (use with --tls for kubectl)",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log every request to stderr")
    args = p.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        stream=sys.stderr,
        format="%(asctime)s %(name)s %(message)s",
    )
    if not 0 <= args.port <= 65535:
        print(f"error: --port {args.port} is out of range; give 0-65535", file=sys.stderr)
        return 2
    if args.persist and args.state_dir is None:
        print("error: --persist needs --state-dir", file=sys.stderr)
        return 2
    try:
        server = ApiServer(
            port=args.port,
            token=args.token,
            state_dir=args.state_dir,
            service_cidr=args.service_cidr,
            persist=args.persist,
            graceful_pod_deletion=args.graceful_pod_deletion,
            tls=args.tls,
            anonymous=not args.no_anonymous,
        )
        server.start()
    except (OSError, ValueError) as e:  # bind failure, bad CIDR, unreadable state
        print(f"error: cannot start the API server on 127.0.0.1:{args.port}: {e}", file=sys.stderr)
        return 1
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    try:
        server.write_kubeconfig(args.kubeconfig, args.context)
    except OSError as e:
        print(f"error: cannot write the kubeconfig {args.kubeconfig}: {e}", file=sys.stderr)
        server.stop()
        return 1
    print(f"apiserver ready on {server.url}", file=sys.stderr, flush=True)
    done.wait()
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
