"""Helpers shared by several test areas: the in-netns TCP client/server scripts
(netclient.py, netserver.py, run as subprocesses inside a pod's netns/cgroup) and the
daemon/cluster start-up helpers used by tests/daemon and tests/policy."""

from pathlib import Path

SUPPORT = Path(__file__).resolve().parent
NETCLIENT = SUPPORT / "netclient.py"
NETSERVER = SUPPORT / "netserver.py"
