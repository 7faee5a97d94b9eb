"""``kmeshctl dump workloads|services|policies|bpf|all``: what one daemon holds.

Why plain string formatting: ``dump workloads`` must print 10,000 rows in well under a second;
a tabwriter-style column pass (the layout ``istioctl ztunnel-config`` prints: columns padded
to the widest cell plus one space) costs a few milliseconds, a rich table seconds.
Workloads, services and policies come from ``/debug/config_dump`` (the daemon's xDS state,
the same on every node); ``bpf`` comes from ``/debug/bpf`` (that node's kernel maps) and is
drawn as a tree like ``cilium-dbg bpf lb list``: frontend -> service -> backends with slots.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Sequence
from typing import Annotated, Any

import typer

from kmeshctl.common import (
    AllNamespacesOpt,
    ContextOpt,
    KubeconfigOpt,
    ListNamespaceOpt,
    UsageError,
    namespace_scope,
    to_yaml,
)
from kmeshctl.daemonlink import AdminAddrOpt, NodeOpt, find_one

WORKLOAD_COLUMNS = ("NAMESPACE", "POD NAME", "ADDRESS", "NODE", "WAYPOINT", "PROTOCOL", "STATUS")
SERVICE_COLUMNS = ("NAMESPACE", "SERVICE NAME", "SERVICE VIP", "WAYPOINT", "ENDPOINTS")
POLICY_COLUMNS = ("NAMESPACE", "POLICY NAME", "ACTION", "SCOPE")
KINDS = ("workloads", "services", "policies", "bpf", "all")
_ALIASES = {"workload": "workloads", "w": "workloads", "service": "services", "svc": "services",
            "s": "services", "policy": "policies", "pol": "policies", "p": "policies"}


def format_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """Columns padded to the widest cell + 1 space (Go tabwriter, padding 1); last column unpadded."""
    rows = [tuple(str(c) for c in r) for r in rows]
    widths = [len(h) for h in header]
    for row in rows:
        for i, cell in enumerate(row):
            if len(cell) > widths[i]:
                widths[i] = len(cell)
    last = len(header) - 1
    fmt_parts = [f"{{:<{w}}}" for w in widths[:last]]
    out = []
    for row in [tuple(header), *rows]:
        out.append(" ".join([*(f.format(c) for f, c in zip(fmt_parts, row, strict=False)), row[last]]))
    return "\n".join(out) + "\n"


def _strip_net(addr: str) -> str:
    """``network/ip`` -> ``ip`` (VIPs and waypoint addresses carry the network prefix)."""
    return addr.rsplit("/", 1)[-1] if "/" in addr else addr


class _WaypointNames:
    """Waypoint column: the Service matching a waypoint destination, as istioctl resolves it."""

    def __init__(self, services: list[dict[str, Any]]) -> None:
        self.by_vip: dict[str, str] = {}
        self.by_host: dict[str, str] = {}
        for s in services:
            for vip in s.get("vips") or []:
                self.by_vip[vip] = s.get("name", "")
                self.by_vip.setdefault("/" + _strip_net(vip), s.get("name", ""))
            self.by_host[f"{s.get('namespace', '')}/{s.get('hostname', '')}"] = s.get("name", "")

    def name(self, waypoint: dict[str, Any] | None) -> str:
        if not waypoint or not waypoint.get("destination"):
            return "None"
        dest = waypoint["destination"]
        return (self.by_host.get(dest) or self.by_vip.get(dest)
                or self.by_vip.get("/" + _strip_net(dest)) or "NA")


def workload_rows(dump: dict[str, Any]) -> list[tuple[str, ...]]:
    names = _WaypointNames(dump.get("services") or [])
    rows = []
    for w in dump.get("workloads") or []:
        ips = w.get("workloadIps") or w.get("addresses") or []
        address = ",".join(ips) if ips else (w.get("hostname") or "")
        rows.append((w.get("namespace", ""), w.get("name", ""), address, w.get("node", ""),
                     names.name(w.get("waypoint")), w.get("protocol", "TCP"), w.get("status", "")))
    rows.sort(key=lambda r: (r[0], r[1], r[3]))
    return rows


def service_rows(dump: dict[str, Any]) -> list[tuple[str, ...]]:
    services = dump.get("services") or []
    names = _WaypointNames(services)
    rows = []
    for s in services:
        endpoints = s.get("endpoints") or {}
        eps = endpoints.values() if isinstance(endpoints, dict) else endpoints
        total = healthy = 0
        for ep in eps:
            total += 1
            if ep.get("status", "Healthy") == "Healthy":
                healthy += 1
        vips = ",".join(_strip_net(v) for v in s.get("vips") or [])
        rows.append((s.get("namespace", ""), s.get("name", ""), vips, names.name(s.get("waypoint")),
                     f"{healthy}/{total}"))
    rows.sort(key=lambda r: (r[0], r[1]))
    return rows


def policy_rows(dump: dict[str, Any]) -> list[tuple[str, ...]]:
    rows = [(p.get("namespace", ""), p.get("name", ""), p.get("action", ""), p.get("scope", ""))
            for p in dump.get("policies") or []]
    rows.sort(key=lambda r: (r[0], r[1]))
    return rows


def render_workloads(dump: dict[str, Any]) -> str:
    return format_table(WORKLOAD_COLUMNS, workload_rows(dump))


def render_services(dump: dict[str, Any]) -> str:
    return format_table(SERVICE_COLUMNS, service_rows(dump))


def render_policies(dump: dict[str, Any]) -> str:
    selected = dump.get("_selected")
    if selected is None:  # an older daemon without /authz: no SELECTS column
        return format_table(POLICY_COLUMNS, policy_rows(dump))
    # with the daemon's authorization view: which local workloads each policy selects
    rows = [(*r, ",".join(selected.get(f"{r[0]}/{r[1]}", [])) or "-") for r in policy_rows(dump)]
    return format_table((*POLICY_COLUMNS, "SELECTS"), rows)


def _sorted_section(items: list[dict[str, Any]], *keys: str) -> list[dict[str, Any]]:
    return sorted(items, key=lambda x: tuple(str(x.get(k, "")) for k in keys))


def json_section(dump: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    """One section of the config dump, sorted like the table (stable for diffs and tests)."""
    if kind == "workloads":
        return _sorted_section(list(dump.get("workloads") or []), "namespace", "name", "node", "uid")
    if kind == "services":
        return _sorted_section(list(dump.get("services") or []), "namespace", "name", "hostname")
    return _sorted_section(list(dump.get("policies") or []), "namespace", "name")


# ----- bpf tree ----------------------------------------------------------------------------------

def _fmt_addr(ip: str, port: Any) -> str:
    if ip and ":" in ip:
        return f"[{ip}]:{port}"
    return f"{ip}:{port}"


def _addr_key(fe: dict[str, Any]) -> tuple[int, bytes]:
    import ipaddress

    text = str(fe.get("ip", fe.get("address", "")))
    try:
        addr = ipaddress.ip_address(text)
        return addr.version, addr.packed
    except ValueError:
        return 9, text.encode()


def _fmt_wp(wp: dict[str, Any] | None) -> str:
    """A km_wp as read back: `` => waypoint ns/name (ip:port)``; empty without a waypoint."""
    if not wp:
        return ""
    if wp.get("unresolved"):
        return " => waypoint UNRESOLVED (connections refused)"
    addr = _fmt_addr(wp.get("address", ""), wp.get("port", 0))
    return f" => waypoint {wp['service']} ({addr})" if wp.get("service") else f" => waypoint {addr}"


def render_bpf(bpf: dict[str, Any]) -> str:
    """frontend -> service -> backends with pod names and slots, then the enrolled netns."""
    maps = bpf.get("maps") or {}
    services = {s.get("name") or s.get("service"): s for s in maps.get("services") or []}
    by_port = {(s.get("name"), s.get("port")): s for s in maps.get("services") or []}
    backends = {b.get("uid") or b.get("name"): b for b in maps.get("backends") or []}
    endpoints_by_svc: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for ep in maps.get("endpoints") or []:
        key = (ep.get("service", ""), int(ep.get("service_port", ep.get("port", 0)) or 0))
        endpoints_by_svc.setdefault(key, []).append(ep)
        endpoints_by_svc.setdefault((ep.get("service", ""), -1), []).append(ep)
    lines = ["FRONTEND                 SERVICE / BACKEND (POD) (PRIORITY/SLOT)"]
    width = 24
    frontends = sorted(maps.get("frontends") or [],
                       key=lambda f: (f.get("kind", "service") != "service", _addr_key(f),
                                      int(f.get("port", 0) or 0)))
    rows: list[tuple[str, str]] = []
    for fe in frontends:
        addr = _fmt_addr(fe.get("ip", fe.get("address", "")), fe.get("port", 0))
        target = fe.get("service") or fe.get("backend") or fe.get("target", "")
        kind = fe.get("kind", "service")
        if kind == "backend":
            b = backends.get(target, {})
            rows.append((fe.get("ip", fe.get("address", "")),
                         f"pod {b.get('namespace', '')}/{b.get('name', '') or target} (backend)"
                         + _fmt_wp(b.get("waypoint"))))
            continue
        svc = by_port.get((target, fe.get("service_port"))) or services.get(target, {})
        mode = svc.get("lb_mode", "")
        rows.append((addr, f"{target}" + (f" [{mode}]" if mode else "") + _fmt_wp(svc.get("waypoint"))))
        eps = endpoints_by_svc.get((target, int(fe.get("port", 0) or 0))) or []
        for ep in sorted(eps, key=lambda e: (int(e.get("priority", e.get("prio", 0)) or 0),
                                             int(e.get("slot", 0) or 0))):
            uid = ep.get("backend_uid") or ep.get("backend", "")
            b = backends.get(uid, {})
            ip = ep.get("ip") or b.get("ipv4") or b.get("ip") or b.get("ipv6") or ""
            pod = f"{b.get('namespace', '')}/{b.get('name', '')}" if b.get("name") else uid
            ho = b.get("handoff") or {}
            proxy = f" [hand-off PROXY v2 :{ho.get('port')}]" if ho.get("encoding") == "proxy" else ""
            rows.append(("", f"  {_fmt_addr(ip, ep.get('target_port', ep.get('port', 0)))} ({pod}) "
                             f"({ep.get('priority', ep.get('prio', 0))}/{ep.get('slot', 0)}){proxy}"))
        if not eps:
            rows.append(("", "  (no endpoints)"))
    for left, right in rows:
        lines.append(f"{left:<{width}} {right}".rstrip())
    enrolled = bpf.get("enrolled") or []
    cookies = {int(m.get("netns_cookie", 0)) for m in maps.get("manage") or []}
    lines.append("")
    lines.append("ENROLLED NETNS COOKIE   POD")
    shown = set()
    for pod in sorted(enrolled, key=lambda p: (p.get("namespace", ""), p.get("name", ""))):
        cookie = int(pod.get("netns_cookie", 0))
        shown.add(cookie)
        # Enrolled but absent from the kernel's manage map: userspace and datapath diverged.
        state = "  (MISSING from manage map)" if "manage" in maps and cookie not in cookies else ""
        lines.append(f"{cookie:<23} {pod.get('namespace', '')}/{pod.get('name', '')}{state}")
    for cookie in sorted(cookies - shown):
        lines.append(f"{cookie:<23} (unknown pod)")
    pressure = bpf.get("pressure") or {}
    if pressure:
        lines.append("")
        lines.append(format_table(("MAP", "ENTRIES", "MAX", "FILL"),
                                  [(name, str(p.get("entries", 0)), str(p.get("max", 0)),
                                    f"{float(p.get('ratio', 0)):.1%}")
                                   for name, p in sorted(pressure.items())]).rstrip("\n"))
    return "\n".join(lines) + "\n"


def bpf_json(bpf: dict[str, Any]) -> dict[str, Any]:
    """The /debug/bpf body with every list sorted, so two dumps of equal maps are equal."""
    out = dict(bpf)
    maps = {}
    for name, items in (bpf.get("maps") or {}).items():
        if isinstance(items, list):
            items = sorted(items, key=lambda x: json.dumps(x, sort_keys=True))
        maps[name] = items
    out["maps"] = maps
    out["raw"] = {name: sorted(entries) for name, entries in (bpf.get("raw") or {}).items()}
    return out


# ----- command ---------------------------------------------------------------------------------

def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _emit_data(data: Any, output: str) -> None:
    if output == "json":
        _write(json.dumps(data, indent=2) + "\n")
    else:
        _write(to_yaml(data))


def fetch_config(daemon: Any, kind: str, output: str) -> dict[str, Any]:
    """Only the sections a view needs: the workload table needs services only to name waypoints."""
    if kind == "bpf":
        return {}
    if kind == "all":
        return daemon.get_json("/debug/config_dump")
    config = daemon.get_json(f"/debug/config_dump?types={kind}")
    needs_names = any(w.get("waypoint") for w in config.get("workloads") or [])
    if kind == "workloads" and output == "table" and needs_names:
        config["services"] = daemon.get_json("/debug/config_dump?types=services").get("services", [])
    return config


def dump(
    kind: Annotated[str, typer.Argument(help="workloads, services, policies, bpf or all.")],
    output: Annotated[str, typer.Option("-o", "--output", help="table, json or yaml.")] = "table",
    namespace: ListNamespaceOpt = None,
    all_namespaces: AllNamespacesOpt = False,
    node: NodeOpt = None,
    admin_addr: AdminAddrOpt = None,
    kubeconfig: KubeconfigOpt = None,
    context: ContextOpt = None,
) -> None:
    """Show what a daemon holds: its xDS view as tables, or its live BPF maps."""
    kind = _ALIASES.get(kind, kind)
    if kind not in KINDS:
        raise UsageError(f"unknown dump kind {kind!r}; use one of {', '.join(KINDS)}")
    if output not in ("table", "json", "yaml"):
        raise UsageError(f"--output must be one of table, json, yaml, not {output!r}")
    only = namespace_scope(namespace, all_namespaces)
    daemon = find_one(admin_addr, node, kubeconfig, context, need_node=kind in ("bpf", "all"))
    config = fetch_config(daemon, kind, output)
    if only is not None:
        for section in ("workloads", "services", "policies"):
            if isinstance(config.get(section), list):
                config[section] = [x for x in config[section] if x.get("namespace") == only]
    bpf = daemon.get_json("/debug/bpf") if kind in ("bpf", "all") else {}
    if output != "table":
        if kind == "bpf":
            _emit_data(bpf_json(bpf), output)
        elif kind == "all":
            data = {k: json_section(config, k) for k in ("workloads", "services", "policies")}
            data["bpf"] = bpf_json(bpf)
            _emit_data(data, output)
        else:
            _emit_data(json_section(config, kind), output)
        return
    if kind == "workloads":
        _write(render_workloads(config))
    elif kind == "services":
        _write(render_services(config))
    elif kind == "policies":
        config["_selected"] = _selected(daemon)
        _write(render_policies(config))
    elif kind == "bpf":
        _write(render_bpf(bpf) + render_authz(bpf.get("authz")))
    else:
        _write("------ WORKLOAD INFO ------\n" + render_workloads(config)
               + "\n------ SERVICE INFO ------\n" + render_services(config)
               + "\n------ POLICY INFO ------\n" + render_policies(config)
               + f"\n------ BPF MAPS (node {daemon.node or daemon.label}) ------\n" + render_bpf(bpf))


def _selected(daemon: Any) -> dict[str, list[str]] | None:
    """policy -> local workloads it selects, from the daemon's /authz (None: an older daemon)."""
    from kmeshctl.common import KmeshctlError

    try:
        return daemon.get_json("/authz").get("selected") or {}
    except KmeshctlError:
        return None


def render_authz(authz: dict[str, Any] | None) -> str:
    """The compiled authorization tables: destinations -> rulesets -> entries, readable."""
    if not authz:
        return ""
    st = authz.get("status") or {}
    state = "enabled" if st.get("enabled") else "disabled"
    lines = ["", f"AUTHORIZATION ({state}, epoch {st.get('epoch', 0)}, {st.get('policies', 0)} policies, "
                 f"{len(authz.get('links') or [])} links)"]
    lines.append(format_table(("DESTINATION", "WORKLOAD", "RULESET", "ENTRIES"),
                              [(d["address"], d.get("workload", ""), str(d["ruleset"]), str(d["entries"]))
                               for d in authz.get("destinations") or []]).rstrip("\n"))
    for rs in authz.get("rulesets") or []:
        lines.append(f"ruleset {rs['id']}: {', '.join(rs.get('policies') or [])}")
        for e in rs.get("entries") or []:
            match = e.get("match") or {}
            text = "; ".join(f"{k}={v}" for k, v in match.items())
            dry = " dry-run" if e.get("dry_run") else ""
            ends = f" [end {'+'.join(e.get('ends') or [])}]" if e.get("ends") else ""
            lines.append(f"  {e['idx']:>3} {e['action']}{dry} {e['policy']}: {text}{ends}")
    return "\n".join(lines) + "\n"


def register(app: typer.Typer) -> None:
    app.command("dump", help="Show a daemon's workloads, services, policies or live BPF maps.")(dump)
