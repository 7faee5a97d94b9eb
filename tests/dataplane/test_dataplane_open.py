"""Dataplane.open refuses unsafe or unusable places before compiling or attaching anything."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.cgroupmount import cgroup2_root
from daemon.dataplane import Capacity, Dataplane, control_connect, netns_cookie

pytestmark = pytest.mark.kernel

CGROUP2_ROOT = cgroup2_root()  # wherever this host mounts it


def test_refuses_cgroup_v2_root(pin_root: Path) -> None:
    with pytest.raises(ValueError, match="cgroup v2 root"):
        Dataplane.open(CGROUP2_ROOT, pin_root / "never")
    assert not (pin_root / "never").exists()


def test_root_only_with_explicit_permission() -> None:
    from daemon.dataplane.loader import check_cgroup

    with pytest.raises(ValueError, match="cgroup v2 root"):
        check_cgroup(CGROUP2_ROOT)
    assert check_cgroup(CGROUP2_ROOT, allow_root=True) == CGROUP2_ROOT.resolve()  # checked, not attached


def test_refuses_non_cgroup_dir(pin_root: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a cgroup"):
        Dataplane.open(tmp_path, pin_root / "never")


def test_refuses_pin_dir_off_bpffs(test_cgroup: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="bpf filesystem"):
        Dataplane.open(test_cgroup, tmp_path / "pins")


def test_rejects_bad_capacity(test_cgroup: Path, pin_root: Path) -> None:
    with pytest.raises(ValueError, match="capacity services"):
        Dataplane.open(test_cgroup, pin_root / "never", Capacity(services=0))


def test_netns_helpers_reject_unknown_netns() -> None:
    with pytest.raises(ValueError, match="not found"):
        netns_cookie("kmesh-no-such-netns")
    with pytest.raises(ValueError, match="not found"):
        control_connect("kmesh-no-such-netns", True)


def test_control_connect_outside_attached_cgroup_raises(topology) -> None:
    # pytest itself is not in the cgroup with our programs: nothing takes the control connect
    with pytest.raises(RuntimeError, match="not taken by the data plane"):
        control_connect(topology.ns_path("c2"), True)


_PROBE = r"""
import json, sys
from pathlib import Path
from daemon.dataplane import Dataplane
dp = Dataplane.open(Path(sys.argv[1]), Path(sys.argv[2]))
maps = Path("/proc/self/maps").read_text()
status = Path("/proc/self/status").read_text().splitlines()
rss = next(int(l.split()[1]) for l in status if l.startswith("VmRSS:"))
print(json.dumps({"bcc_imported": "bcc" in sys.modules, "libbcc_mapped": "libbcc" in maps,
                  "llvm_mapped": "LLVM" in maps or "libclang" in maps, "rss_kib": rss,
                  "attached": dp.attached, "progs": sorted(dp.prog_ids())}))
dp.close()
"""


def test_open_keeps_bcc_and_llvm_out_of_the_process(make_cgroup, pin_root: Path) -> None:
    """The compile runs in a short-lived child: the process that opens the data plane (the daemon)
    never imports bcc nor maps libbcc/LLVM, and its resident memory stays small."""
    import json
    import subprocess
    import sys

    from daemon.dataplane import uninstall

    cg = make_cgroup("dp-nobcc")
    pins = pin_root / "nobcc"
    repo = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run([sys.executable, "-c", _PROBE, str(cg), str(pins)], cwd=repo,
                             capture_output=True, text=True, timeout=300, check=True)
        r = json.loads(out.stdout)
        assert r["attached"] and r["progs"] == ["authz", "connect4", "connect6", "getpeername4",
                                                "getpeername6", "sockops"], r
        assert not r["bcc_imported"] and not r["libbcc_mapped"] and not r["llvm_mapped"], r
        assert r["rss_kib"] < 60 * 1024, r  # the in-process compile alone left ~120 MiB resident
    finally:
        uninstall(cg, pins)
    assert not pins.exists()
