"""Policies + workloads -> the flat tables bpf/authz.c walks (pure: no kernel access).

Why this shape (bpf/README.md, "Authorization", says more):
- Every identity predicate of a ``Match`` (namespaces, principals, service accounts and their
  ``not_*`` forms, with exact/prefix/suffix/presence string matches) is resolved here against
  the identities that exist (one per trust domain/namespace/service account of a known
  workload) into one bitset over identity ids. The kernel then answers "does the source's
  identity satisfy this match" with one lookup, and string matching never runs in the kernel.
  Identity 0 is "unknown source": it is in the bitset exactly when the match has no positive
  identity kind (so it fails ``namespaces``/``principals`` and passes their ``not_*`` forms).
- Address kinds become LPM-trie sets, port kinds hash sets; all sets are shared by content.
- A workload's applicable policies (GLOBAL, NAMESPACE of its namespace, WORKLOAD_SELECTOR named
  in its ``authorization_policies``) become one ruleset: the matches in order, each flagged
  with where its clause, rule and policy end. Workloads with the same applicable policies
  share a ruleset.

Ids carry the epoch in bit 31 so that two complete generations of tables can coexist.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from daemon.authz import layout as L

SCOPE_GLOBAL, SCOPE_NAMESPACE, SCOPE_SELECTOR = 0, 1, 2


class CompileError(ValueError):
    """A policy set the kernel tables cannot express (e.g. a ruleset over the entry limit)."""


@dataclass(frozen=True, slots=True)
class Identity:
    trust_domain: str
    namespace: str
    service_account: str

    @property
    def principal(self) -> str:
        """As Istio's principals are written: no ``spiffe://`` prefix."""
        return f"{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"


@dataclass(slots=True)
class WorkloadInfo:
    """What authorization needs of one workload."""

    uid: str
    name: str
    namespace: str
    addresses: tuple[bytes, ...]
    identity: Identity
    node: str = ""
    policies: tuple[str, ...] = ()  # Workload.authorization_policies ("ns/name")


@dataclass
class Compiled:
    """One epoch's worth of map contents, as packed (key, value) pairs, plus names for humans."""

    epoch: int
    cfg_epoch: int = 0
    dst: dict[bytes, bytes] = field(default_factory=dict)
    ident: dict[bytes, bytes] = field(default_factory=dict)
    entry: dict[bytes, bytes] = field(default_factory=dict)
    ipset: dict[bytes, bytes] = field(default_factory=dict)
    port: dict[bytes, bytes] = field(default_factory=dict)
    bits: dict[bytes, bytes] = field(default_factory=dict)
    # for dump/trace/metrics
    policy_ids: dict[int, str] = field(default_factory=dict)
    workload_ids: dict[int, str] = field(default_factory=dict)
    identities: dict[int, Identity] = field(default_factory=dict)
    rulesets: dict[int, list[str]] = field(default_factory=dict)  # ruleset id -> policy names
    selected: dict[str, list[str]] = field(default_factory=dict)  # policy -> local workload uids
    readable: dict[int, list[dict[str, Any]]] = field(default_factory=dict)  # ruleset -> entries

    def maps(self) -> dict[str, dict[bytes, bytes]]:
        return {"authz_dst": self.dst, "authz_ident": self.ident, "authz_entry": self.entry,
                "authz_ipset": self.ipset, "authz_port": self.port, "authz_bits": self.bits}


def fnv1a32(text: str) -> int:
    h = 0x811C9DC5
    for b in text.encode():
        h = ((h ^ b) * 0x01000193) & 0xFFFFFFFF
    return h


def stable_ids(names: Iterable[str], taken: set[int] | None = None) -> dict[str, int]:
    """FNV-1a-32 of each name (as Kmesh names its ids), 0 and collisions probed linearly; the
    same names get the same ids in every daemon process, so records survive a restart."""
    used = set(taken or ())
    out: dict[str, int] = {}
    for name in sorted(set(names)):
        i = fnv1a32(name) or 1
        while i in used or i in (0, L.ID_NODE):
            i = (i + 1) & 0xFFFFFFFF
        used.add(i)
        out[name] = i
    return out


def string_match(sm: Any, value: str | None) -> bool:
    """Istio StringMatch against a value; None (unknown source) matches nothing."""
    if value is None:
        return False
    kind = sm.WhichOneof("match_type")
    if kind == "exact":
        return value == sm.exact
    if kind == "prefix":
        return value.startswith(sm.prefix)
    if kind == "suffix":
        return value.endswith(sm.suffix)
    if kind == "presence":
        return True
    return False


def string_match_text(sm: Any) -> str:
    kind = sm.WhichOneof("match_type")
    if kind == "exact":
        return sm.exact
    if kind == "prefix":
        return sm.prefix + "*"
    if kind == "suffix":
        return "*" + sm.suffix
    return "*"


class IdentityIndex:
    """Identity predicates as bitmasks over identity ids (bit 0: unknown source).

    Why masks and indexes: at 2,000 identities x thousands of matches, testing every identity
    against every match costs seconds; instead each StringMatch is resolved once against the
    distinct namespaces or principals (exact ones by dict lookup), and a Match's identity kinds
    combine with integer AND/OR."""

    def __init__(self, ident_id: dict[Identity, int]) -> None:
        self.universe = 0
        self.by_ns: dict[str, int] = {}
        self.by_principal: dict[str, int] = {}
        self.by_sa: dict[tuple[str, str], int] = {}
        for ident, i in ident_id.items():
            bit = 1 << i
            self.universe |= bit
            self.by_ns[ident.namespace] = self.by_ns.get(ident.namespace, 0) | bit
            self.by_principal[ident.principal] = self.by_principal.get(ident.principal, 0) | bit
            key = (ident.namespace, ident.service_account)
            self.by_sa[key] = self.by_sa.get(key, 0) | bit
        self._cache: dict[tuple[str, str, str], int] = {}

    def _string(self, table: dict[str, int], which: str, sm: Any) -> int:
        kind = sm.WhichOneof("match_type")
        value = getattr(sm, kind) if kind in ("exact", "prefix", "suffix") else ""
        if kind == "exact":
            return table.get(value, 0)
        if kind == "presence":
            return self.universe
        key = (which, kind or "", value)
        hit = self._cache.get(key)
        if hit is None:
            hit = 0
            for name, bits in table.items():
                if string_match(sm, name):
                    hit |= bits
            self._cache[key] = hit
        return hit

    def mask(self, m: Any) -> int:
        """Bits of the identities (and bit 0, unknown) satisfying every identity kind of m."""
        mask = self.universe | 1
        ns, pr = self.by_ns, self.by_principal
        for field_name, table, which, negate in (
                ("namespaces", ns, "ns", False), ("not_namespaces", ns, "ns", True),
                ("principals", pr, "p", False), ("not_principals", pr, "p", True)):
            values = getattr(m, field_name)
            if values:
                hit = 0
                for sm in values:
                    hit |= self._string(table, which, sm)
                mask = mask & ~hit if negate else mask & hit
        for field_name, negate in (("service_accounts", False), ("not_service_accounts", True)):
            values = getattr(m, field_name)
            if values:
                hit = 0
                for sa in values:
                    hit |= self.by_sa.get((sa.namespace, sa.serviceAccount), 0)
                mask = mask & ~hit if negate else mask & hit
        return mask


def _has_identity_kind(m: Any) -> bool:
    return bool(m.namespaces or m.not_namespaces or m.principals or m.not_principals
                or m.service_accounts or m.not_service_accounts)


def _cidr(a: Any) -> tuple[bytes, int]:
    """(16-byte address, prefix length in the 128-bit space) of an Address."""
    raw = bytes(a.address)
    if len(raw) == 4:
        return L.addr16(raw), 96 + min(a.length, 32)
    return raw, min(a.length, 128)


def _cidr_text(a: Any) -> str:
    return f"{ipaddress.ip_address(bytes(a.address))}/{a.length}"


class _Sets:
    """Content-addressed set ids of one epoch."""

    def __init__(self, out: Compiled) -> None:
        self.out = out
        self.bit = L.EPOCH_BIT if out.epoch else 0
        self.next = 1
        self.ip: dict[frozenset, int] = {}
        self.ports: dict[frozenset, int] = {}
        self.ids: dict[int, int] = {}

    def _new(self) -> int:
        sid = self.bit | self.next
        self.next += 1
        return sid

    def ip_set(self, addrs: Iterable[Any]) -> int:
        key = frozenset(_cidr(a) for a in addrs)
        sid = self.ip.get(key)
        if sid is None:
            sid = self.ip[key] = self._new()
            for addr, plen in key:
                net = int.from_bytes(addr, "big") & (((1 << plen) - 1) << (128 - plen) if plen else 0)
                self.out.ipset[L.LPM_KEY.pack(32 + plen, sid, net.to_bytes(16, "big"))] = b"\x01"
        return sid

    def port_set(self, ports: Iterable[int]) -> int:
        key = frozenset(int(p) for p in ports)
        sid = self.ports.get(key)
        if sid is None:
            sid = self.ports[key] = self._new()
            for p in key:
                self.out.port[L.PORT_KEY.pack(sid, p)] = b"\x01"
        return sid

    def id_set(self, mask: int) -> int:
        sid = self.ids.get(mask)
        if sid is None:
            sid = self.ids[mask] = self._new()
            raw = mask.to_bytes((mask.bit_length() + 63) // 64 * 8, "little")
            for w in range(len(raw) // 8):
                chunk = raw[w * 8:(w + 1) * 8]
                if chunk != b"\0" * 8:
                    self.out.bits[L.BITS_KEY.pack(sid, w)] = L.U64.pack(int.from_bytes(chunk, "little"))
        return sid


def applicable(policy: Any, w: WorkloadInfo, root_namespace: str) -> bool:
    """ztunnel's rule: GLOBAL (the root namespace's policies), NAMESPACE of the workload's
    namespace, or named in the workload's authorization_policies."""
    if policy.scope == SCOPE_GLOBAL:
        return True
    if policy.scope == SCOPE_NAMESPACE:
        return policy.namespace == w.namespace
    return f"{policy.namespace}/{policy.name}" in w.policies


def compile_tables(policies: dict[str, Any], workloads: Iterable[WorkloadInfo], epoch: int,
                   node: str = "", node_addresses: Iterable[bytes] = (),
                   root_namespace: str = "istio-system") -> Compiled:
    """The complete map contents for one epoch. ``policies``: "ns/name" -> Authorization.
    Workloads on ``node`` (all, when node is "") get rulesets; every workload's addresses get
    an identity."""
    out = Compiled(epoch=epoch)
    bit = L.EPOCH_BIT if epoch else 0
    wls = list(workloads)
    idents = sorted({w.identity for w in wls},
                    key=lambda i: (i.trust_domain, i.namespace, i.service_account))
    ident_id = {ident: n + 1 for n, ident in enumerate(idents)}
    out.identities = {v: k for k, v in ident_id.items()}
    for w in wls:
        for a in w.addresses:
            out.ident[L.ADDR_KEY.pack(epoch, L.addr16(a))] = L.U32.pack(ident_id[w.identity])
    for a in node_addresses:
        out.ident[L.ADDR_KEY.pack(epoch, L.addr16(a))] = L.U32.pack(L.ID_NODE)

    pol_ids = stable_ids(policies)
    out.policy_ids = {v: k for k, v in pol_ids.items()}
    if not policies:  # nothing selects anything: no rulesets, no destinations, so no identities either
        out.ident = {}
        return out
    local = [w for w in wls if not node or w.node == node]
    wl_ids = stable_ids(w.uid for w in local)
    out.workload_ids = {v: k for k, v in wl_ids.items()}
    sets = _Sets(out)
    # identity predicate cache: Match bytes -> frozenset of identity ids (0 = unknown)
    id_cache: dict[bytes, int] = {}
    index = IdentityIndex(ident_id)
    rulesets: dict[tuple[str, ...], tuple[int, int]] = {}
    # index by scope: a workload's policies without scanning every policy
    global_names: list[str] = []
    by_namespace: dict[str, list[str]] = {}
    for n, p in policies.items():
        if p.scope == SCOPE_GLOBAL:
            global_names.append(n)
        elif p.scope == SCOPE_NAMESPACE:
            by_namespace.setdefault(p.namespace, []).append(n)
    for w in sorted(local, key=lambda x: x.uid):
        cand = {*global_names, *by_namespace.get(w.namespace, ()),
                *(n for n in w.policies if n in policies and policies[n].scope == SCOPE_SELECTOR)}
        # DENY policies first: the kernel stops at the first enforced ALLOW that matches
        names = tuple(sorted((n for n in cand if applicable(policies[n], w, root_namespace)),
                             key=lambda n: (policies[n].action != 1, n)))
        for n in names:
            out.selected.setdefault(n, []).append(w.uid)
        if not names:
            continue
        rs = rulesets.get(names)
        if rs is None:
            rid = bit | (len(rulesets) + 1)
            count = _emit_ruleset(out, rid, [policies[n] for n in names], [pol_ids[n] for n in names],
                                  sets, id_cache, index)
            rs = rulesets[names] = (rid, count)
            out.rulesets[rid] = list(names)
        for a in w.addresses:
            out.dst[L.ADDR_KEY.pack(epoch, L.addr16(a))] = L.DST_VAL.pack(rs[0], rs[1], wl_ids[w.uid], 0)
    if not out.dst:  # no policy applies here: the program stops at the destination lookup
        out.ident = {}
    return out


def _emit_ruleset(out: Compiled, rid: int, pols: list[Any], pids: list[int], sets: _Sets,
                  id_cache: dict[bytes, int], index: IdentityIndex) -> int:
    rows: list[tuple[int, int, int, int, tuple[int, ...], dict[str, Any]]] = []
    for pol, pid in zip(pols, pids, strict=True):
        action = L.DENY if pol.action == 1 else L.ALLOW
        dry = int(bool(pol.dry_run))
        if not pol.rules:  # a policy without rules matches nothing
            rows.append((pid, action, dry, L.FALSE | L.END_CLAUSE | L.END_RULE, (0,) * 7, {"false": True}))
        for rule in pol.rules:
            if not rule.clauses:  # a rule without clauses matches everything
                rows.append((pid, action, dry, L.END_CLAUSE | L.END_RULE, (0,) * 7, {"any": True}))
                continue
            for clause in rule.clauses:
                if not clause.matches:  # a clause without matches matches nothing
                    rows.append((pid, action, dry, L.FALSE | L.END_CLAUSE, (0,) * 7, {"false": True}))
                    continue
                for m in clause.matches:
                    flags, sids, text = _match(m, sets, id_cache, index)
                    rows.append((pid, action, dry, flags, sids, text))
                last = rows[-1]
                rows[-1] = (last[0], last[1], last[2], last[3] | L.END_CLAUSE, last[4], last[5])
            last = rows[-1]
            rows[-1] = (last[0], last[1], last[2], last[3] | L.END_RULE, last[4], last[5])
        last = rows[-1]
        rows[-1] = (last[0], last[1], last[2], last[3] | L.END_POLICY, last[4], last[5])
    if len(rows) > L.MAX_ENTRIES:
        raise CompileError(f"{len(rows)} matches apply to one workload (policies "
                           f"{', '.join(f'{p.namespace}/{p.name}' for p in pols[:5])}...): the kernel "
                           f"walks at most {L.MAX_ENTRIES}; split or simplify the policies")
    readable = []
    names = {pid: f"{p.namespace}/{p.name}" for p, pid in zip(pols, pids, strict=True)}
    for idx, (pid, action, dry, flags, sids, text) in enumerate(rows):
        out.entry[L.ENTRY_KEY.pack(rid, idx)] = L.ENTRY_VAL.pack(pid, action, dry, flags, *sids)
        ends = [n for bitv, n in ((L.END_CLAUSE, "clause"), (L.END_RULE, "rule"), (L.END_POLICY, "policy"))
                if flags & bitv]
        readable.append({"idx": idx, "policy": names[pid], "action": "DENY" if action else "ALLOW",
                         "dry_run": bool(dry), "match": text, "ends": ends})
    out.readable[rid] = readable
    return len(rows)


def _match(m: Any, sets: _Sets, id_cache: dict[bytes, int],
           index: IdentityIndex) -> tuple[int, tuple[int, ...], dict[str, Any]]:
    text: dict[str, Any] = {}
    flags = 0
    id_set = 0
    if _has_identity_kind(m):
        key = m.SerializeToString(deterministic=True)  # same Match, same identity set
        ids = id_cache.get(key)
        if ids is None:
            # bit 0 (unknown) survives only the not_* forms: no positive kind ever holds it
            ids = id_cache[key] = index.mask(m)
        if ids:
            id_set = sets.id_set(ids)
        else:
            flags |= L.FALSE
        for fname in ("namespaces", "not_namespaces", "principals", "not_principals"):
            vals = getattr(m, fname)
            if vals:
                text[fname] = [string_match_text(s) for s in vals]
        for fname in ("service_accounts", "not_service_accounts"):
            vals = getattr(m, fname)
            if vals:
                text[fname] = [f"{s.namespace}/{s.serviceAccount}" for s in vals]
        text["identities"] = ids.bit_count()
    sids = [id_set]
    for fname in ("source_ips", "not_source_ips", "destination_ips", "not_destination_ips"):
        vals = getattr(m, fname)
        sids.append(sets.ip_set(vals) if vals else 0)
        if vals:
            text[fname] = [_cidr_text(a) for a in vals]
    for fname in ("destination_ports", "not_destination_ports"):
        vals = getattr(m, fname)
        sids.append(sets.port_set(vals) if vals else 0)
        if vals:
            text[fname] = sorted(vals)
    if not text:
        text = {"any": True}
    return flags, tuple(sids), text
