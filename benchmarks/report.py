"""Turn the sections' figures into ``results/latest.json``, ``results/latest.md`` and a table.

Why one place: the JSON keys are a published contract (issue 7: ``dataplane.*``,
``dataplane_keepalive.*``, ``control_plane.*``, ``cli.*``), the README pastes the markdown, and
the targets are judged the same way in all three outputs. A figure that could not be measured
is the string ``"not available: <reason>"``, never a missing key or a made-up number.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import subprocess
from collections.abc import Callable
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
COMMAND = "make bench   # = .venv/bin/python -m benchmarks"

MODES = ("direct", "bpf_vip", "envoy_proxy")
DP_KEYS = ("p50_ms", "p99_ms", "rps")
CP_KEYS = ("converge_100k_endpoints_s", "single_update_ms", "daemon_rss_mib")
CLI_KEYS = ("help_s", "dump_10k_s")
L7_MODES = ("kmesh_waypoint", "ambient_like")

# (label, json path, comparison, bound) — issue 7 "Targets".
TARGETS: tuple[tuple[str, str, str, float], ...] = (
    ("bpf_vip/direct p50 (new conn)", "ratios.bpf_vip_over_direct_p50", "<=", 1.05),
    ("envoy_proxy/bpf_vip p50 (new conn)", "ratios.envoy_proxy_over_bpf_vip_p50", ">=", 1.5),
    ("100k endpoints converge (s)", "control_plane.converge_100k_endpoints_s", "<=", 1.0),
    ("single update (ms)", "control_plane.single_update_ms", "<=", 10.0),
    ("daemon RSS (MiB)", "control_plane.daemon_rss_mib", "<=", 110.0),
    ("kmeshctl --help (s)", "cli.help_s", "<=", 0.3),
    ("dump workloads 10k (s)", "cli.dump_10k_s", "<=", 1.0),
    ("kmesh_waypoint/ambient_like p50 (new conn)", "ratios.kmesh_over_ambient_p50", "<=", 0.70),
    ("authz allowed p50, 1000 policies / none", "authz.allowed_overhead_p50", "<=", 1.03),
    ("authz compile+write 10k policies (s)", "authz.compile_10k_s", "<=", 1.0),
    ("scale converge 1m / 100k endpoints", "scale.ratio_1m_over_100k_converge", "<=", 12.0),
)
# scale.{point}.{key} (issue 12): the published part of benchmarks/scale.py's output
SCALE_POINTS = ("10k", "100k", "1m")
SCALE_KEYS = ("converge_s", "rss_mib", "map_mib")
AUTHZ_KEYS = ("allowed_overhead_p50", "compile_10k_s", "deny_latency_ms")
# Issue 12: new connections (connect() included), median over >= 9 rounds of the per-round ratio.
TARGETS = TARGETS + (
    ("monitoring on: bpf_vip/direct p50 (paired)", "dataplane.monitoring_on.vip_over_direct_p50",
     "<=", 1.03),
    ("monitoring off: bpf_vip/direct p50 (paired)", "dataplane.monitoring_off.vip_over_direct_p50",
     "<=", 1.01),
)
MONITORING_KEYS = ("monitoring_on", "monitoring_off", "tracing")  # tracing: informational, no target
DP_SECTIONS = (  # (section, title): the connect-inclusive headline first
    ("dataplane", "new connection per request, connect() included (kmesh-connload)"),
    ("dataplane_request_only", "new connection per request, request only (wrk `Connection: close`: "
                               "clock starts after the handshake)"),
    ("dataplane_keepalive", "keep-alive (wrk)"),
)


def _cmd(argv: list[str]) -> str:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        return (proc.stdout or proc.stderr).strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def machine_info(extra: dict | None = None) -> dict:
    """CPU model, cores, kernel, python, bcc, wrk, date, git commit."""
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    bcc = _cmd(["dpkg-query", "-W", "-f", "${Version}", "python3-bpfcc"]) or "not installed"
    wrk = _cmd(["wrk", "--version"]).split(" [")[0] or "not installed"
    info = {
        "cpu_model": cpu,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "bcc": bcc,
        "wrk": wrk.strip(),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "git_commit": _cmd(["git", "-C", str(RESULTS_DIR.parent.parent), "describe", "--always", "--dirty"]),
    }
    info.update(extra or {})
    return info


def lookup(doc: dict, path: str) -> object:
    node: object = doc
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def judge(doc: dict) -> list[dict]:
    """Each target with its value and whether it is met (None when not measured)."""
    ops: dict[str, Callable[[float, float], bool]] = {"<=": lambda a, b: a <= b, ">=": lambda a, b: a >= b}
    out = []
    for label, path, op, bound in TARGETS:
        value = lookup(doc, path)
        number = isinstance(value, int | float) and not isinstance(value, bool)
        met = ops[op](value, bound) if number else None
        out.append({"target": label, "key": path, "bound": f"{op} {bound:g}", "value": value, "met": met})
    return out


def assemble(machine: dict, sections: dict[str, dict]) -> dict:
    """The latest.json document from the sections' dicts (each may hold "not available" strings)."""
    http = sections.get("dataplane_http", {})
    doc: dict = {"machine": machine, "command": COMMAND}
    for section in ("dataplane", "dataplane_keepalive"):
        doc[section] = {}
        for mode in MODES:
            fig = http.get(section, {}).get(mode, http.get("error", "not available: not run"))
            doc[section][mode] = ({k: fig.get(k) for k in DP_KEYS} if isinstance(fig, dict) else fig)
    doc["ratios"] = dict(http.get("ratios", {}))
    _assemble_dataplane_extras(doc, http)
    l7 = sections.get("dataplane_l7", {})
    for section in ("dataplane_l7", "dataplane_l7_request_only", "dataplane_l7_keepalive"):
        doc[section] = {}
        for mode in L7_MODES:
            fig = l7.get(section, {}).get(mode, l7.get("error", "not available: not run"))
            doc[section][mode] = ({k: fig.get(k) for k in DP_KEYS} if isinstance(fig, dict) else fig)
    doc["ratios"].update(l7.get("ratios", {}))
    cp = sections.get("controlplane", {})
    cp = cp.get("control_plane", cp) if isinstance(cp, dict) else cp
    doc["control_plane"] = {k: (cp.get(k, cp.get("error", f"not available: controlplane gave no {k}"))
                                if isinstance(cp, dict) else cp) for k in CP_KEYS}
    if isinstance(cp, dict):
        doc["control_plane"].update({k: v for k, v in cp.items() if k not in CP_KEYS and k != "error"})
    cli = sections.get("cli", {}).get("cli", sections.get("cli", {}))
    doc["cli"] = {k: cli.get(k, cli.get("error", "not available: not run")) for k in CLI_KEYS}
    maps = sections.get("dataplane_maps", {})
    doc["reconciler"] = maps.get("reconciler", maps) if isinstance(maps, dict) else maps
    az = sections.get("authz", {})
    doc["authz"] = {k: (az.get(k, az.get("error", f"not available: authz gave no {k}"))
                        if isinstance(az, dict) else az) for k in AUTHZ_KEYS}
    doc["scale"] = scale_doc(sections.get("scale", {}))
    doc["targets"] = judge(doc)
    doc["details"] = {
        "dataplane_http": {
            "meta": http.get("meta"),
            **{section: {m: v for m, v in http.get(section, {}).items() if isinstance(v, dict)}
               for section in ("dataplane", "dataplane_request_only", "dataplane_keepalive")},
        },
        "cli": {k: v for k, v in cli.items() if k not in CLI_KEYS},
        "dataplane_l7": {
            "meta": l7.get("meta"),
            **{section: {m: v for m, v in l7.get(section, {}).items() if isinstance(v, dict)}
               for section in ("dataplane_l7", "dataplane_l7_request_only", "dataplane_l7_keepalive")},
        },
        "authz": az.get("details") if isinstance(az, dict) else None,
        "scale": sections.get("scale"),
    }
    return doc


def scale_doc(sc: object) -> dict:
    """scale.{10k,100k,1m}.{converge_s,rss_mib,map_mib} + the 1m/100k ratio; "not available" when absent."""
    if not isinstance(sc, dict):
        sc = {"error": f"not available: {sc}"}
    missing = sc.get("error", "not available: scale not run")
    out: dict = {}
    for point in SCALE_POINTS:
        fig = sc.get(point, missing)
        if isinstance(fig, dict) and "error" not in fig:
            out[point] = {k: fig.get(k, f"not available: no {k}") for k in SCALE_KEYS}
        else:
            out[point] = fig.get("error") if isinstance(fig, dict) else fig
    out["ratio_1m_over_100k_converge"] = sc.get("ratio_1m_over_100k_converge",
                                                "not available: needs the 1m and 100k points")
    return out


def _assemble_dataplane_extras(doc: dict, http: dict) -> None:
    """``dataplane_request_only.<mode>`` (wrk, clock after the handshake) and
    ``dataplane.monitoring_{on,off}`` and ``dataplane.tracing`` (paired bpf_vip/direct ratios
    with their spread)."""
    missing = http.get("error", "not available: not run")
    doc["dataplane_request_only"] = {}
    for mode in MODES:
        fig = http.get("dataplane_request_only", {}).get(mode, missing)
        doc["dataplane_request_only"][mode] = ({k: fig.get(k) for k in DP_KEYS} if isinstance(fig, dict)
                                               else fig)
    for key in MONITORING_KEYS:
        fig = http.get("dataplane", {}).get(key, missing)
        doc["dataplane"][key] = ({k: v for k, v in fig.items() if k != "per_round"} if isinstance(fig, dict)
                                 else fig)


def monitoring_lines(doc: dict) -> list[str]:
    """One line per monitoring state: the paired bpf_vip/direct p50 ratio and its spread."""
    lines = []
    for key in MONITORING_KEYS:
        fig = lookup(doc, f"dataplane.{key}")
        if isinstance(fig, dict):
            q1, q3 = (fig.get("iqr") or [None, None])[:2]
            lines.append(f"bpf_vip/direct p50, connect() included, {key.replace('_', ' ')}: "
                         f"{_fmt(fig.get('vip_over_direct_p50'))} (median of {fig.get('rounds')} paired "
                         f"rounds; min {_fmt(fig.get('min'))}, max {_fmt(fig.get('max'))}, "
                         f"IQR {_fmt(q1)}-{_fmt(q3)})")
        else:
            lines.append(f"bpf_vip/direct p50, {key.replace('_', ' ')}: {_fmt(fig)}")
    return lines


def _fmt(value: object, digits: int = 3) -> str:
    if isinstance(value, bool) or value is None:
        return "n/a" if value is None else str(value)
    if isinstance(value, float):
        return f"{value:,.{digits}f}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    text = str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def flatten(data: object, prefix: str = "", depth: int = 3) -> list[tuple[str, object]]:
    """Nested dicts as (dotted key, scalar) rows for display; lists are left to the JSON."""
    if not isinstance(data, dict):
        return [(prefix or "value", data)]
    rows: list[tuple[str, object]] = []
    for key, value in data.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and depth > 1:
            rows += flatten(value, name, depth - 1)
        elif not isinstance(value, dict | list):
            rows.append((name, value))
    return rows


def busy(loadavg: object, cores: object) -> bool:
    """True when the 1-minute load average before the run exceeds half the cores."""
    try:
        return float(str(loadavg).split()[0]) > 0.5 * int(cores)  # type: ignore[call-overload]
    except (ValueError, IndexError, TypeError):
        return False


def _mode_rows(doc: dict, section: str) -> list[tuple[str, object]]:
    """The published modes, then any diagnostic mode that was run (from details)."""
    rows: list[tuple[str, object]] = [(m, doc[section][m]) for m in MODES]
    extra = lookup(doc, f"details.dataplane_http.{section}") or {}
    rows += [(m, v) for m, v in extra.items()  # type: ignore[union-attr]
             if m not in MODES and isinstance(v, dict) and "p50_ms" in v]
    return rows


def _detail(doc: dict, section: str, mode: str, key: str) -> object:
    return lookup(doc, f"details.dataplane_http.{section}.{mode}.{key}")


def markdown(doc: dict) -> str:
    """The README section: machine, command, data-plane tables, ratios, control plane, CLI, targets."""
    m = doc["machine"]
    lines = [
        f"Measured {m['date']} on {m['cpu_model']} ({m['cores']} cores), kernel {m['kernel']}, "
        f"Python {m['python']}, bcc {m['bcc']}, {m.get('wrk', 'wrk')}, commit {m.get('git_commit', '?')}.",
        "",
        f"Command: `{COMMAND.split('#')[0].strip()}` (results in `benchmarks/results/latest.json`).",
        "",
    ]
    meta = (doc.get("details", {}).get("dataplane_http") or {}).get("meta") or {}
    if busy(meta.get("loadavg_before"), m.get("cores")):
        lines += [f"**Measured on a busy machine** (load average {meta['loadavg_before']} on "
                  f"{m['cores']} cores before the data-plane run): latency figures are noisy; rerun on an "
                  "idle machine.", ""]
    if meta:
        lines += [f"HTTP: {meta.get('client')}; backend {meta.get('backend')}; proxy {meta.get('proxy')}; "
                  f"{meta.get('rounds')} interleaved rounds x {meta.get('duration_s')} s per mode, median "
                  f"of rounds; CPUs {meta.get('cpus')}; load average before/after "
                  f"{meta.get('loadavg_before')} / {meta.get('loadavg_after')}. Monitoring: "
                  f"{meta.get('monitoring')}. kmesh-connload's clock covers socket + connect + request + "
                  "close; wrk's starts once the connection is established (the request-only table).", ""]
    for section, title in DP_SECTIONS:
        lines += [f"| HTTP, {title} | p50 ms | p99 ms | req/s | CPU µs/req |", "|---|---:|---:|---:|---:|"]
        for mode, fig in _mode_rows(doc, section):
            if isinstance(fig, dict):
                cells = " | ".join(_fmt(fig[k]) for k in DP_KEYS)
                cpu = _fmt(_detail(doc, section, mode, "cpu_us_per_req"), 1)
                lines.append(f"| {mode} | {cells} | {cpu} |")
            else:
                lines.append(f"| {mode} | {_fmt(fig)} | | | |")
        lines.append("")
    r = doc.get("ratios") or {}
    lines += ["| Ratio | p50, new conn (paired) | p50, request only (paired) | p50, keep-alive (paired) "
              "| CPU/req, new conn | CPU/req, keep-alive |", "|---|---:|---:|---:|---:|---:|"]
    for name, label in (("bpf_vip_over_direct", "bpf_vip / direct"),
                        ("envoy_proxy_over_bpf_vip", "envoy_proxy / bpf_vip")):
        cells = [f"{_fmt(r.get(f'{name}_p50{sfx}'))} ({_fmt(r.get(f'{name}_p50_paired{sfx}'))})"
                 for sfx in ("", "_request_only", "_keepalive")]
        cells += [_fmt(r.get(f"{name}_cpu{sfx}")) for sfx in ("", "_keepalive")]
        lines.append(f"| {label} | {' | '.join(cells)} |")
    lines += ["", "Paired: the median over rounds of the ratio within each round (runs close in time).", ""]
    lines += [f"- {line}" for line in monitoring_lines(doc)]
    lines.append("")
    l7meta = (doc.get("details", {}).get("dataplane_l7") or {}).get("meta") or {}
    if "dataplane_l7" in doc:
        if l7meta:
            lines += [f"Through a waypoint (benchmarks/dataplane_l7.py): waypoint {l7meta.get('waypoint')}; "
                      f"ztunnel stand-in {l7meta.get('ztunnel_stand_in')}; "
                      f"backend {l7meta.get('backend')}.", ""]
        for section, title in (("dataplane_l7", "waypoint, new connection per request, connect() included"),
                               ("dataplane_l7_request_only", "waypoint, new connection per request, "
                                                             "request only (wrk)"),
                               ("dataplane_l7_keepalive", "waypoint, keep-alive")):
            lines += [f"| HTTP, {title} | p50 ms | p99 ms | req/s |", "|---|---:|---:|---:|"]
            for mode, fig in doc[section].items():
                cells = " | ".join(_fmt(fig[k]) for k in DP_KEYS) if isinstance(fig, dict) else _fmt(fig)
                lines.append(f"| {mode} | {cells} |")
            lines.append("")
        lines += [f"kmesh_waypoint / ambient_like p50: {_fmt(r.get('kmesh_over_ambient_p50'))} new conn "
                  f"(paired {_fmt(r.get('kmesh_over_ambient_p50_paired'))}), "
                  f"{_fmt(r.get('kmesh_over_ambient_p50_request_only'))} request only, "
                  f"{_fmt(r.get('kmesh_over_ambient_p50_keepalive'))} keep-alive.", ""]
    for section, title in (("control_plane", "Control plane"), ("cli", "CLI"), ("authz", "Authorization"),
                           ("scale", "Scale (real daemon, one run per point)")):
        lines += [f"| {title} | value |", "|---|---:|"]
        rows = flatten(doc.get(section) or {})
        if section == "cli":
            rows += flatten(doc.get("details", {}).get("cli") or {})
        lines += [f"| {k} | {_fmt(v)} |" for k, v in rows]
        lines.append("")
    lines += ["| Target | Bound | Measured | Met |", "|---|---|---:|---|"]
    for t in doc["targets"]:
        met = {True: "yes", False: "**no**", None: "n/a"}[t["met"]]
        lines.append(f"| {t['target']} | {t['bound']} | {_fmt(t['value'])} | {met} |")
    lines.append("")
    rec = doc.get("reconciler")
    if rec:
        lines += ["| Data-plane maps (benchmarks/dataplane_maps.py) | value |", "|---|---:|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in flatten(rec)]
        lines.append("")
    return "\n".join(lines)


def table(doc: dict) -> str:
    """Plain-text table for stdout."""
    out = []
    for section in [s for s, _ in DP_SECTIONS]:
        out.append(f"{section:<22} {'p50 ms':>9} {'p99 ms':>9} {'req/s':>9} {'CPU us/req':>11}")
        for mode, fig in _mode_rows(doc, section):
            if isinstance(fig, dict):
                cells = " ".join(f"{_fmt(fig[k]):>9}" for k in DP_KEYS)
                cpu = _fmt(_detail(doc, section, mode, "cpu_us_per_req"), 1)
                out.append(f"  {mode:<20} {cells} {cpu:>11}")
            else:
                out.append(f"  {mode:<20} {_fmt(fig)}")
    for section in ("dataplane_l7", "dataplane_l7_request_only", "dataplane_l7_keepalive"):
        if section not in doc:
            continue
        out.append(f"{section:<22} {'p50 ms':>9} {'p99 ms':>9} {'req/s':>9}")
        for mode, fig in doc[section].items():
            cells = " ".join(f"{_fmt(fig[k]):>9}" for k in DP_KEYS) if isinstance(fig, dict) else _fmt(fig)
            out.append(f"  {mode:<20} {cells}")
    out.append("ratios")
    out += [f"  {k:<40} {_fmt(v)}" for k, v in doc.get("ratios", {}).items()]
    out += [f"  {line}" for line in monitoring_lines(doc)]
    for section in ("control_plane", "cli", "reconciler", "authz", "scale"):
        out.append(section)
        out += [f"  {k:<40} {_fmt(v)}" for k, v in flatten(doc.get(section))]
    out.append("targets")
    for t in doc["targets"]:
        met = {True: "met", False: "MISSED", None: "n/a"}[t["met"]]
        out.append(f"  {t['target']:<40} {_fmt(t['value']):>12} {t['bound']:<8} {met}")
    return "\n".join(out) + "\n"


def write(doc: dict, results_dir: Path = RESULTS_DIR) -> tuple[Path, Path]:
    """Write latest.json and latest.md atomically (tmp file + rename)."""
    results_dir.mkdir(parents=True, exist_ok=True)
    paths = (results_dir / "latest.json", results_dir / "latest.md")
    for path, text in zip(paths, (json.dumps(doc, indent=2) + "\n", markdown(doc)), strict=True):
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)
    return paths
