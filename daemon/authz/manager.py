"""The daemon's authorization component: state -> compiled tables -> kernel, links, records.

One worker thread does everything that writes, so map updates never interleave:
- after the State has synced once (a partial view must not drop a DENY that a restarted
  daemon's tables still enforce), every change of policies or workloads recompiles the whole
  table set and writes it as a new epoch (daemon/authz/writer.py explains the order);
- every enrolled pod gets the authz program linked to its interfaces (polled from the
  enrollment controller, 5 times a second); pins of pods no longer enrolled are removed once
  enrollment has converged;
- the kernel's record map of refused attempts is polled; new counts become trace events (for
  the source and the destination pod) and Prometheus counters.
Links a previous daemon left are switched to this process's program only after the first write
(a new map generation starts empty and must be filled first).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from daemon.authz import layout as L
from daemon.authz.attach import Links
from daemon.authz.compiler import Compiled, Identity, WorkloadInfo, compile_tables
from daemon.authz.writer import MapWriter
from daemon.dataplane import bpfsys

log = logging.getLogger("daemon.authz")
PROBE_SNAT = "169.254.7.127"  # istio-cni's source address for kubelet probes in ambient mode
ROOT_NAMESPACE = "istio-system"
DENY_LABELS = ("reporter", "policy", "action", "source_workload", "source_workload_namespace",
               "source_principal", "destination_workload", "destination_workload_namespace",
               "destination_principal", "destination_port", "response_flags")


def node_addresses(instance_ip: str, extra: str = "") -> list[bytes]:
    """The node's own addresses (kubelet probes come from there) plus Istio's probe SNAT one."""
    out = []
    for text in [instance_ip, PROBE_SNAT, *extra.split(",")]:
        text = text.strip()
        if not text:
            continue
        try:
            ip = ipaddress.ip_address(text)
        except ValueError:
            log.warning("ignoring node address %r: not an IP address", text)
            continue
        if not ip.is_loopback:
            out.append(ip.packed)
    return out


class AuthzManager:
    def __init__(self, state: Any, dataplane: Any, node_name: str = "", node_ips: list[bytes] | None = None,
                 enroll: Any = None, emit: Callable[[dict[str, Any]], None] | None = None,
                 root_namespace: str = ROOT_NAMESPACE, poll_s: float = 0.2,
                 after_first_sync: Callable[[], bool] | None = None) -> None:
        self.state = state
        # While the state holds no policy, the first compile waits for this (the data plane's
        # first full sync): it has nothing to enforce, and at 100k pods its CPU would be taken
        # from that sync under the GIL (~0.1 s of a converge). With policies it goes at once.
        self.after_first_sync = after_first_sync
        self.dataplane = dataplane
        self.node_name = node_name
        self.node_ips = list(node_ips or [])
        self.enroll = enroll
        self.emit = emit
        self.root_namespace = root_namespace
        self.poll_s = poll_s
        self.prog_fd = dataplane._loaded.prog_fds["authz"]
        self.writer = MapWriter(dataplane.gen_dir)
        self.links = Links(dataplane.pin_dir)
        # An older generation's walk program array is emptied when its last pin and fd go;
        # hold it until our own program is in every link (restart across a layout change).
        self._held: list[int] = []
        for gen in getattr(dataplane, "_old", []):
            try:
                self._held.append(bpfsys.obj_get(str(Path(gen) / "authz_jmp")))
            except OSError:
                pass
        self._cond = threading.Condition()
        self._dirty = True
        self._stop = False
        self._linked: dict[int, list[str]] = {}
        self._switched = False
        self.compiled: Compiled | None = None
        self.compiles = 0
        self.last_error = ""
        self.last_compile_s = 0.0
        self.last_applied = 0.0
        self.first_compile: dict[str, Any] | None = None  # when (monotonic) and with how many policies
        self._wl_cache: dict[bytes, tuple[str, str, str, tuple[str, ...], str]] = {}
        self._wl_prev: dict[bytes, tuple[str, str, str, tuple[str, ...], str]] = {}  # during a compile
        self._pol_cache: dict[bytes, Any] = {}
        self._seen: dict[bytes, int] | None = None
        self._by_ip: dict[bytes, WorkloadInfo] = {}
        self.denied: dict[tuple[str, ...], int] = {}
        self.dry_run: dict[tuple[str, ...], int] = {}
        self._thread = threading.Thread(target=self._run, name="authz", daemon=True)
        state.subscribe(self._on_change)

    # ----- lifecycle ----------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join(timeout=5)
        self.writer.close()
        for fd in self._held:
            os.close(fd)
        self._held = []

    def _on_change(self, change: Any) -> None:
        if not (change.full or change.policies) and self._policy_free():
            return  # no policy before or after: the tables are empty whatever the workloads do
        if change.full or change.policies or change.backends or getattr(change, "workloads", None):
            with self._cond:
                self._dirty = True
                self._cond.notify_all()

    def _policy_free(self) -> bool:
        """The tables in the kernel were compiled from no policy and the state holds none: a
        workload change cannot change them (at 100k pods a recompile is ~50 ms of CPU, which
        every single-workload update would otherwise pay)."""
        comp = self.compiled
        return comp is not None and not comp.policy_ids and not self._dirty and not self.state.policies

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every change so far is compiled and written (tests)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._dirty and not self._stop:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.05))
            return True

    # ----- enable/disable -----------------------------------------------------------------
    def set_enabled(self, enabled: bool) -> None:
        self.writer.set_enabled(enabled)
        log.info("authorization %s", "enabled" if enabled else "disabled")

    @property
    def enabled(self) -> bool:
        return self.writer.cfg()[1]

    # ----- worker -------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                if self._stop:
                    return
                dirty = self._dirty
            if dirty and self._may_compile():
                with self._cond:
                    self._dirty = False
                try:
                    self.compile_and_apply()
                except Exception as exc:  # noqa: BLE001 - keep the old tables, retry
                    self.last_error = f"{type(exc).__name__}: {exc}"
                    log.error("authorization tables not updated: %s", self.last_error)
                    with self._cond:
                        self._dirty = True
                    time.sleep(1.0)
                with self._cond:
                    self._cond.notify_all()
            if self.compiled is not None:
                try:
                    self._sync_links()
                except Exception as exc:  # noqa: BLE001
                    log.warning("authz links: %s", exc)
                try:
                    self._poll_records()
                except Exception as exc:  # noqa: BLE001
                    log.warning("authz records: %s", exc)
            with self._cond:
                # dirty but not synced yet: nothing to compile until the xDS stream has synced
                # (mark_synced notifies). Without the wait this loop spun on the GIL while the
                # first push was being decoded: +2 s on a 100k-endpoint converge.
                if not self._stop and (not self._dirty or not self._may_compile()):
                    self._cond.wait(self.poll_s)

    def _may_compile(self) -> bool:
        """Synced, and (a policy exists, or the data plane has had its first full sync)."""
        if not getattr(self.state, "synced", False):
            return False
        gate = self.after_first_sync
        return gate is None or bool(self.state.policies) or self.compiled is not None or gate()

    def _workload_infos(self) -> list[WorkloadInfo]:
        lock = getattr(self.state, "_lock", None)
        if lock is not None:
            with lock:
                records = list(self.state.workloads.values())
        else:
            records = list(self.state.workloads.values())
        return self._infos_of(records)

    def _infos_of(self, records: list[Any]) -> list[WorkloadInfo]:
        from daemon.xds.gen.istio.workload import workload_pb2 as wl

        out = []
        for rec in records:
            prof = rec.profile
            info = self._wl_cache.get(prof.rest)
            if info is None and self._wl_prev:
                info = self._wl_prev.get(prof.rest)
                if info is not None:
                    self._wl_cache[prof.rest] = info
            if info is None:
                w = wl.Workload.FromString(prof.rest)
                info = (w.trust_domain or "cluster.local", w.service_account or "default", w.node,
                        tuple(w.authorization_policies), w.namespace or prof.namespace)
                self._wl_cache[prof.rest] = info
            td, sa, node, pols, ns = info
            out.append(WorkloadInfo(uid=rec.uid, name=rec.name, namespace=ns, addresses=rec.addresses,
                                    identity=Identity(td, ns, sa), node=node, policies=pols))
        return out

    def _identity_infos(self) -> list[WorkloadInfo]:
        """One address-less WorkloadInfo per distinct workload profile (for the identity list)."""
        lock = getattr(self.state, "_lock", None)
        if lock is not None:
            with lock:
                profiles = {id(r.profile): r for r in self.state.workloads.values()}
        else:
            profiles = {id(r.profile): r for r in self.state.workloads.values()}
        out = []
        for rec in profiles.values():
            info = next(iter(self._infos_of([rec])))
            out.append(WorkloadInfo(uid=info.uid, name=info.name, namespace=info.namespace, addresses=(),
                                    identity=info.identity, node=info.node, policies=info.policies))
        return out

    def _policies(self) -> dict[str, Any]:
        from daemon.xds.gen.istio.security import authorization_pb2 as az

        out = {}
        for name, rec in list(self.state.policies.items()):
            p = self._pol_cache.get(rec.raw)
            if p is None:
                p = self._pol_cache[rec.raw] = az.Authorization.FromString(rec.raw)
            out[name] = p
        if len(self._pol_cache) > 4 * len(out) + 64:
            self._pol_cache = {rec.raw: out[n] for n, rec in list(self.state.policies.items()) if n in out}
        return out

    def compile_and_apply(self) -> Compiled:
        t0 = time.perf_counter()
        policies = self._policies()
        if self.first_compile is None:
            self.first_compile = {"started_monotonic": time.monotonic(), "policies": len(policies)}
        # the profile cache is rebuilt from the previous one: profiles no longer held drop out
        self._wl_prev, self._wl_cache = self._wl_cache, {}
        try:
            if policies:
                infos = self._workload_infos()
                self._by_ip = {a: w for w in infos for a in w.addresses}  # records -> names, per compile
            else:
                # nothing to judge: the tables stay empty whatever the workloads are, so do not build
                # (and keep) a view of every workload; at 100k pods that is ~0.5 s of CPU taken from
                # the first data-plane sync and ~20 MiB. One entry per identity keeps the dump's list.
                infos = self._identity_infos()
                self._by_ip = {}
                self._wl_cache = {}  # ~3 MiB at 10k profiles; the next compile (a policy came) refills it
        finally:
            self._wl_prev = {}
        compiled = compile_tables(policies, infos, self.writer.inactive_epoch(),
                                  node=self.node_name, node_addresses=self.node_ips,
                                  root_namespace=self.root_namespace)
        self.writer.apply(compiled)
        # keep what inspection reads (destinations, rulesets, names); the rest is in the kernel
        compiled.ident, compiled.entry, compiled.bits, compiled.port, compiled.ipset = {}, {}, {}, {}, {}
        self.compiled = compiled
        self.compiles += 1
        self.last_error = ""
        self.last_compile_s = time.perf_counter() - t0
        self.last_applied = time.time()
        if not self._switched:
            n = self.links.update_all(self.prog_fd)
            self._switched = True
            for fd in self._held:
                os.close(fd)
            self._held = []
            if n:
                log.info("authz program swapped into %d links of the previous daemon", n)
        log.debug("authorization tables written", extra={
            "policies": len(compiled.policy_ids), "rulesets": len(compiled.rulesets),
            "seconds": round(self.last_compile_s, 4)})
        return compiled

    # ----- links --------------------------------------------------------------------------
    def attach(self, netns: str | Path, cookie: int) -> list[str]:
        """Link the program into one pod netns (the daemon does this for enrolled pods)."""
        names = self.links.attach(netns, cookie, self.prog_fd)
        self._linked[cookie] = names
        return names

    def _sync_links(self) -> None:
        if self.enroll is None:
            return
        pods = self.enroll.enrolled()
        want = {p.netns_cookie: p for p in pods if p.netns_cookie}
        for cookie, pod in want.items():
            if cookie in self._linked:
                continue
            path = pod.held_path or pod.netns
            try:
                names = self.attach(path, cookie)
                log.info("authz linked", extra={"pod": f"{pod.namespace}/{pod.name}", "interfaces": names})
            except (OSError, ValueError) as exc:
                log.warning("authz link for pod failed", extra={"pod": f"{pod.namespace}/{pod.name}",
                                                                "error": str(exc)})
        if getattr(self.enroll, "ready", False):
            for cookie in set(self.links.pinned()) | set(self._linked):
                if cookie not in want:
                    self.links.detach(cookie)
                    self._linked.pop(cookie, None)

    # ----- records ------------------------------------------------------------------------
    def _poll_records(self) -> None:
        rows = self.writer.records()
        first = self._seen is None
        seen = self._seen or {}
        new: dict[bytes, int] = {}
        for k, v in rows:
            count, last_ns = L.LOG_VAL.unpack(v)
            new[k] = count
            delta = count - seen.get(k, 0) if k in seen else (0 if first else count)
            if delta > 0:
                self._record(k, delta, last_ns)
        self._seen = new

    def _who(self, addr: bytes) -> dict[str, Any]:
        """Workload name/namespace/principal (and enrolled netns cookie) owning an address."""
        w = self._by_ip.get(L.addr_from16(addr))
        if w is None:
            return {}
        out: dict[str, Any] = {"workload": w.name, "namespace": w.namespace, "uid": w.uid,
                               "principal": f"spiffe://{w.identity.principal}"}
        if self.enroll is not None:
            pod = self.enroll.find(w.namespace, w.name)
            if pod is not None:
                out["cookie"] = pod.netns_cookie
        return out

    def _record(self, key: bytes, delta: int, last_ns: int) -> None:
        pid, wid, saddr, daddr, dport, kind = L.LOG_KEY.unpack(key)[:6]
        comp = self.compiled
        policy = comp.policy_ids.get(pid, f"#{pid}") if comp is not None and pid else ""
        src = self._who(saddr)
        dst = self._who(daddr)
        reason = f"policy {policy}" if policy else "no ALLOW policy matched"
        rec_kind = L.REC_KINDS.get(kind, str(kind))
        action = "DENY" if kind in (L.REC_DENY, L.REC_DRY_DENY) else "ALLOW"
        flags = "DENIED" if kind in (L.REC_DENY, L.REC_NO_ALLOW) else "DRY_RUN"
        u = "unknown"
        labels = ("destination", policy or "none", action,
                  src.get("workload", u), src.get("namespace", u), src.get("principal", u),
                  dst.get("workload", u), dst.get("namespace", u), dst.get("principal", u), str(dport), flags)
        with self._cond:
            table = self.denied if kind in (L.REC_DENY, L.REC_NO_ALLOW) else self.dry_run
            table[labels] = table.get(labels, 0) + delta
        if self.emit is None:
            return
        src_ip = str(ipaddress.ip_address(L.addr_from16(saddr)))
        dst_ip = str(ipaddress.ip_address(L.addr_from16(daddr)))
        cookies = [c for c in (src.get("cookie"), dst.get("cookie")) if c]
        dry = kind in (L.REC_DRY_DENY, L.REC_DRY_NO_ALLOW)
        event = {
            "kind": "denied" if not dry else "dry_run_denied", "verdict": rec_kind, "ts_ns": last_ns,
            "netns_cookie": int(src.get("cookie") or 0), "netns_cookies": cookies,
            "orig_ip": dst_ip, "orig_port": dport, "backend_ip": dst_ip, "backend_port": dport,
            "extra": {"reason": reason, "policy": policy, "count": delta,
                      "source": {"namespace": src.get("namespace", ""), "pod": src.get("workload", ""),
                                 "ip": src_ip, "netns_cookie": int(src.get("cookie") or 0)},
                      "backend": {"ip": dst_ip, "port": dport, "namespace": dst.get("namespace", ""),
                                  "pod": dst.get("workload", ""), "uid": dst.get("uid", "")}},
        }
        try:
            self.emit(event)
        except Exception:  # noqa: BLE001
            log.exception("authz event sink failed")

    # ----- inspection ---------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        epoch, enabled = self.writer.cfg()
        comp = self.compiled
        return {"enabled": enabled, "epoch": epoch, "compiles": self.compiles, "last_error": self.last_error,
                "last_compile_s": round(self.last_compile_s, 4),
                "policies": len(comp.policy_ids) if comp else 0,
                "rulesets": len(comp.rulesets) if comp else 0,
                "linked_pods": len(self.links.pinned()), "first_compile": self.first_compile}

    def selected(self) -> dict[str, list[str]]:
        """policy "ns/name" -> the local workloads ("ns/name") it applies to."""
        comp = self.compiled
        if comp is None:
            return {}
        names = {w.uid: f"{w.namespace}/{w.name}" for w in self._workload_infos()}
        enrolled = None
        if self.enroll is not None:
            enrolled = {f"{p.namespace}/{p.name}" for p in self.enroll.enrolled()}

        def label(uid: str) -> str:
            name = names.get(uid, uid)
            return name if enrolled is None or name in enrolled else f"{name} (not enrolled)"

        return {p: sorted(label(u) for u in uids) for p, uids in comp.selected.items()}

    def dump(self) -> dict[str, Any]:
        """What `kmeshctl dump bpf` shows: the live tables, decoded."""
        comp = self.compiled
        out: dict[str, Any] = {"status": self.status(), "links": self.links.describe()}
        if comp is None:
            return out
        wl_names = {w.uid: f"{w.namespace}/{w.name}" for w in self._workload_infos()}
        dsts = []
        for k, v in sorted(comp.dst.items()):
            _, addr = L.ADDR_KEY.unpack(k)
            rid, count, wid, _ = L.DST_VAL.unpack(v)
            uid = comp.workload_ids.get(wid, "")
            dsts.append({"address": str(ipaddress.ip_address(L.addr_from16(addr))),
                         "ruleset": rid & 0x7FFFFFFF, "entries": count, "workload": wl_names.get(uid, uid)})
        out["destinations"] = dsts
        out["rulesets"] = [{"id": rid & 0x7FFFFFFF, "policies": comp.rulesets[rid],
                            "entries": comp.readable[rid]} for rid in sorted(comp.rulesets)]
        idents = comp.identities
        if not comp.policy_ids:  # not recompiled on workload changes (see _policy_free): fresh list
            idents = compile_tables({}, self._identity_infos(), 0).identities
        out["identities"] = [{"id": i, "principal": ident.principal}
                             for i, ident in sorted(idents.items())]
        out["counts"] = self.writer.counts()
        return out

    def families(self) -> list[Any]:
        from daemon.metrics import MetricFamily

        fams = []
        for name, table, help_text in (
                ("kmesh_authz_denied_connections_total", self.denied,
                 "TCP connections to managed pods refused by authorization policy (in the kernel)."),
                ("kmesh_authz_dry_run_denied_connections_total", self.dry_run,
                 "TCP connections a dry-run authorization policy would have refused (not enforced).")):
            fam = MetricFamily(name, "counter", help_text)
            with self._cond:
                items = sorted(table.items())
            for labels, value in items:
                fam.add(value, **dict(zip(DENY_LABELS, labels, strict=True)))
            fams.append(fam)
        return fams
