"""Run a command as on a pure cgroup v2 host, without changing this machine's cgroup layout.

Used by tests/test_portability.py as ``python tests/support/purev2.py CGROUP SHADOW -- CMD...``.

Why: the project must work where cgroup v2 is mounted at /sys/fs/cgroup (Debian 12, Ubuntu,
Kubernetes nodes) and no ``unified`` directory exists, not only on this hybrid machine. We build
that view privately:

1. ``enter``: this process joins CGROUP (a fresh child of the test run's cgroup), then re-execs
   itself under ``unshare -m --propagation private -C``: a private mount namespace and a cgroup
   namespace whose root is CGROUP.
2. ``inside``: /sys/fs/cgroup (with whatever was mounted under it) is unmounted and a fresh
   cgroup2 is mounted there, so its root is CGROUP; this process moves into the leaf ``/runner``
   (the namespace root must hold no process once controllers are on), and every controller that
   CGROUP offers is enabled in its ``cgroup.subtree_control``, as systemd does at a host's root.
   kubectl is shadowed: SHADOW (a script that records its use and fails) is first on PATH and is
   bind-mounted over the machine's /usr/bin/kubectl, so only the project's .venv/bin/kubectl works.
   Then CMD runs; everything mounted here disappears with the namespace.

What this covers: paths (no cgroup v2 at a fixed place, no ``unified``), detection through
/proc/self/mountinfo, a namespace root that is not exempt from the no-internal-processes rule,
and no machine kubectl. What it does not: controllers that this host binds to cgroup v1 (all but
hugetlb here) cannot be enabled without changing the machine's real root, so on such a host the
enabled set may be empty; tests/support/v2audit.py checks the process layout that rule requires
directly instead. The kernel, systemd and the rest of the host stay this machine's.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

CGROUP_FS = Path("/sys/fs/cgroup")
MACHINE_KUBECTL = Path("/usr/bin/kubectl")


def enter(cgroup: Path, argv: list[str]) -> None:
    (cgroup / "cgroup.procs").write_text(str(os.getpid()))
    os.execvp("unshare", ["unshare", "-m", "--propagation", "private", "-C",
                          sys.executable, __file__, "inside", *argv])


def inside(shadow: Path, cmd: list[str]) -> int:
    subprocess.run(["umount", "-R", str(CGROUP_FS)], check=True)
    subprocess.run(["mount", "-t", "cgroup2", "none", str(CGROUP_FS)], check=True)
    own = [ln for ln in Path("/proc/self/cgroup").read_text().splitlines() if ln.startswith("0::")]
    if own != ["0::/"] or (CGROUP_FS / "unified").exists():
        print(f"purev2: not a fresh pure v2 view ({own!r})", file=sys.stderr)
        return 2
    runner = CGROUP_FS / "runner"
    runner.mkdir()
    (runner / "cgroup.procs").write_text(str(os.getpid()))
    controllers = (CGROUP_FS / "cgroup.controllers").read_text().split()
    if controllers:
        (CGROUP_FS / "cgroup.subtree_control").write_text(" ".join(f"+{c}" for c in controllers))
    enabled = (CGROUP_FS / "cgroup.subtree_control").read_text().split()
    print(f"purev2: cgroup2 at {CGROUP_FS}, controllers enabled at its root: {enabled or 'none available'}",
          file=sys.stderr)
    if MACHINE_KUBECTL.exists():
        subprocess.run(["mount", "--bind", str(shadow), str(MACHINE_KUBECTL)], check=True)
    venv_bin = str(Path(sys.executable).parent)
    path = [p for p in os.environ.get("PATH", "").split(":") if p and p != venv_bin]
    env = {**os.environ, "PATH": ":".join([str(shadow.parent), *path])}
    env.pop("KMESH_CGROUP2_ROOT", None)
    try:
        return subprocess.run(cmd, env=env).returncode
    finally:
        _remove_netns(os.environ.get("KMESH_TEST_RUN_PREFIX", ""))


def _remove_netns(prefix: str) -> None:
    """Network namespaces the inner run left (it was killed before its finalizers ran): their
    /run/netns files are on the machine's filesystem but their mounts live only in this private
    mount namespace, so only here can `ip netns del` remove them whole."""
    run_netns = Path("/run/netns")
    if not prefix or not run_netns.is_dir():
        return
    for entry in run_netns.iterdir():
        if entry.name.startswith(f"{prefix}-"):
            subprocess.run(["ip", "netns", "del", entry.name], capture_output=True, check=False)


def main(argv: list[str]) -> int:
    if len(argv) > 3 and argv[0] == "enter":
        enter(Path(argv[1]), argv[2:])  # argv[2:] is SHADOW -- CMD...
    if len(argv) > 2 and argv[0] == "inside":
        return inside(Path(argv[1]), argv[argv.index("--") + 1:])
    print("usage: purev2.py enter CGROUP SHADOW -- CMD...", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
