"""``python -m benchmarks`` (= ``make bench``): run every section, print a table, write results.

Sections run one after the other (the machine has few cores; nothing else of ours should
compete with a measurement). A section that cannot run (module not written yet, not root,
a tool missing) is recorded as ``"not available: <reason>"`` and the others still run; the
exit code is 0 unless writing the results fails, so a partial run is still published honestly.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

from benchmarks import report

MODES = ("direct", "bpf_vip", "envoy_proxy")
EXTRA_MODES = ("direct_mesh",)  # diagnostic: pod IP from the cgroup with our programs
QUICK_DIR = Path(tempfile.gettempdir()) / "kmesh-bench-quick"
SECTIONS = ("cli", "dataplane_maps", "controlplane", "dataplane_http", "dataplane_l7", "authz", "scale")


def _log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    p.add_argument("--only", action="append", choices=SECTIONS,
                   help="run only this section (repeatable); default: all")
    p.add_argument("--rounds", type=int, default=9,
                   help="data-plane rounds per mode (default 9); figures are medians over rounds")
    p.add_argument("--duration", type=float, default=2.0, help="seconds per wrk run (default 2)")
    p.add_argument("--connections", type=int, default=4, help="wrk connections (default 4)")
    p.add_argument("--conn-concurrency", type=int, default=1,
                   help="requests in flight for the connect-inclusive client kmesh-connload (default 1)")
    p.add_argument("--modes", default=",".join(MODES),
                   help=f"data-plane modes, comma-separated (default {','.join(MODES)}; diagnostic: "
                        f"{','.join(EXTRA_MODES)})")
    p.add_argument("--backend", choices=("auto", "nginx", "envoy"), default="auto",
                   help="HTTP backend: nginx (preferred, when found) or Envoy direct_response")
    p.add_argument("--no-pin", action="store_true", help="do not pin server/client to separate CPUs")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 1 round x 1 s, fewer CLI repetitions (figures not for publishing)")
    p.add_argument("--results-dir", type=Path, default=None,
                   help=f"where latest.json/latest.md go (default {report.RESULTS_DIR}; with --quick "
                        f"{QUICK_DIR}, so a smoke run never replaces the published figures)")
    p.add_argument("--cgroup-parent", type=Path, default=None,
                   help="parent of the benchmark cgroup (default: the cgroup v2 root's child)")
    args = p.parse_args(argv)
    for name in ("rounds", "connections", "conn_concurrency"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if args.duration < 1:
        p.error("--duration must be >= 1 (wrk counts whole seconds)")
    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    unknown = [m for m in modes if m not in MODES + EXTRA_MODES]
    if unknown or not modes:
        p.error(f"--modes: unknown {', '.join(unknown) or '(empty)'}; use some of "
                f"{', '.join(MODES + EXTRA_MODES)}")
    args.modes = modes
    if args.results_dir is None:
        args.results_dir = QUICK_DIR if args.quick else report.RESULTS_DIR
    return args


def _unavailable(exc: BaseException) -> str:
    return f"not available: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}"


def _run_cli(args: argparse.Namespace) -> dict:
    from benchmarks import cli

    if args.quick:
        return cli.run(help_runs=2, dump_runs=1, cgroup_parent=args.cgroup_parent)
    return cli.run(cgroup_parent=args.cgroup_parent)


def _run_controlplane(args: argparse.Namespace) -> dict:
    """benchmarks.controlplane on the real daemon: 3 fresh daemons (with --quick: 1)."""
    from benchmarks import controlplane

    return controlplane.run(repeats=1 if args.quick else 3, updates=5 if args.quick else 15,
                            cgroup_parent=args.cgroup_parent)


def _run_scale(args: argparse.Namespace) -> dict:
    """benchmarks.scale: 10k/100k/1M endpoints (with --quick: 1k and 10k, not for publishing)."""
    from benchmarks import scale

    return scale.run(scale.QUICK_POINTS if args.quick else scale.POINTS, cgroup_parent=args.cgroup_parent,
                     progress=_log)


def _run_http(args: argparse.Namespace) -> dict:
    if os.geteuid() != 0:
        return {"error": "not available: the data-plane benchmark needs root (netns, cgroups, BPF)"}
    from benchmarks import dataplane_http as dp

    settings = dp.Settings(rounds=1 if args.quick else args.rounds,
                           duration_s=1 if args.quick else args.duration,
                           warmup_s=1, connections=args.connections, pin=not args.no_pin,
                           backend=args.backend, modes=args.modes, conn_concurrency=args.conn_concurrency)
    if args.quick:
        settings.mon_rounds, settings.mon_duration_s = 3, 0.3
    if args.cgroup_parent is not None:
        settings.cgroup_parent = args.cgroup_parent
    return dp.run(settings)


def _run_l7(args: argparse.Namespace) -> dict:
    if os.geteuid() != 0:
        return {"error": "not available: the waypoint benchmark needs root (netns, cgroups, BPF)"}
    from benchmarks import dataplane_l7 as l7

    settings = l7.Settings(rounds=1 if args.quick else args.rounds,
                           duration_s=1 if args.quick else args.duration, warmup_s=1,
                           connections=args.connections, pin=not args.no_pin, backend=args.backend)
    if args.cgroup_parent is not None:
        settings.cgroup_parent = args.cgroup_parent
    return l7.run(settings)


def _run_foreign(name: str) -> dict:
    """benchmarks.dataplane_maps / benchmarks.controlplane: owned by other areas; run() -> dict."""
    try:
        module = importlib.import_module(f"benchmarks.{name}")
    except ModuleNotFoundError as exc:
        if exc.name == f"benchmarks.{name}":
            return {"error": f"not available: benchmarks/{name}.py not written yet"}
        raise
    result = module.run()
    if not isinstance(result, dict):
        return {"error": f"not available: benchmarks.{name}.run() returned {type(result).__name__}, not dict"}
    return result


def _on_sigterm(signum: int, _frame: object) -> None:
    """SIGTERM unwinds like Ctrl-C, so namespaces, cgroups, pins and processes are cleaned up."""
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if threading.current_thread() is not threading.main_thread():
        return _main(args)
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return _main(args)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _main(args: argparse.Namespace) -> int:
    repo = Path(__file__).resolve().parent.parent
    os.environ.setdefault("BCC_KERNEL_SOURCE", str(repo / ".build" / "kernel-src"))
    selected = args.only or list(SECTIONS)
    sections: dict[str, dict] = {}
    timings: dict[str, float] = {}
    for name in SECTIONS:
        if name not in selected:
            sections[name] = {"error": "not available: not selected (--only)"}
            continue
        _log(f"{name} ...")
        start = time.monotonic()
        try:
            if name == "cli":
                sections[name] = _run_cli(args)
            elif name == "dataplane_http":
                sections[name] = _run_http(args)
            elif name == "dataplane_l7":
                sections[name] = _run_l7(args)
            elif name == "controlplane":
                sections[name] = _run_controlplane(args)
            elif name == "scale":
                sections[name] = _run_scale(args)
            else:
                sections[name] = _run_foreign(name)
        except Exception as exc:  # noqa: BLE001 - one section failing must not lose the others
            traceback.print_exc(file=sys.stderr)
            sections[name] = {"error": _unavailable(exc)}
        timings[name] = round(time.monotonic() - start, 1)
        _log(f"{name} done in {timings[name]} s")
    envoy = ""
    try:
        from benchmarks import envoy_proc

        binary = envoy_proc.find_envoy()
        envoy = envoy_proc.envoy_version(binary) if binary else "not installed"
    except Exception as exc:  # noqa: BLE001 - machine info is best effort
        envoy = _unavailable(exc)
    doc = report.assemble(report.machine_info({"envoy": envoy, "section_seconds": timings,
                                               "quick": args.quick}), sections)
    json_path, md_path = report.write(doc, args.results_dir)
    sys.stdout.write(report.table(doc))
    _log(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
