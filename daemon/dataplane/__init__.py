"""The eBPF data plane: bcc-compiled cgroup programs, pinned maps and the reconciler.

Public API (docs/interfaces "Data plane"):

    Dataplane.open(cgroup, pin_dir, capacity=None) -> Dataplane
    Dataplane.sync(projection) / .update(projection, services, backends) -> ReconcileResult
    Dataplane.read_back() / .raw_maps() / .map_pressure() / .poll_events(cb, timeout_ms)
    Dataplane.set_monitoring(access_log=None, metrics=None) / .monitoring() -> {"access_log",
        "metrics", "enabled"}: the pinned switch the programs read (both off: no events)
    Dataplane.close() (restart: keep pins and attachments) / .uninstall()
    control_connect(netns, enable, ipv6=False, cgroup=None) ; netns_cookie(netns)
    read_pins(pin_dir) -> same shape as read_back(), from pins alone (no compile)
    uninstall(cgroup, pin_dir, allow_root=False) ; detach(cgroup)   (no compile)

Nothing here imports bcc at import time; compiling happens in Dataplane.open.
"""

from daemon.dataplane.dataplane import Dataplane, detach, generation_name, uninstall
from daemon.dataplane.netns import control_connect, netns_cookie
from daemon.dataplane.readback import read_pins
from daemon.dataplane.types import Capacity, ConnEvent, ReconcileResult

__all__ = ["Capacity", "ConnEvent", "Dataplane", "ReconcileResult", "control_connect", "detach",
           "generation_name", "netns_cookie", "read_pins", "uninstall"]
