"""Packers for the authorization maps of bpf/include/km_authz.h (keep the two in lock step).

Addresses are 16 bytes (IPv4 as ::ffff:a.b.c.d); ids and ports are host order.
"""

from __future__ import annotations

import struct

EPOCH_BIT = 0x80000000
ID_NODE = 0xFFFFFFFF
MAX_ENTRIES = 1024  # per ruleset: KM_AUTHZ_MAX_ENTRIES

END_CLAUSE, END_RULE, END_POLICY, FALSE = 1, 2, 4, 8
ALLOW, DENY = 0, 1
REC_DENY, REC_NO_ALLOW, REC_DRY_DENY, REC_DRY_NO_ALLOW = 1, 2, 3, 4
REC_KINDS = {REC_DENY: "deny", REC_NO_ALLOW: "no_allow", REC_DRY_DENY: "dry_run_deny",
             REC_DRY_NO_ALLOW: "dry_run_no_allow"}

CFG = struct.Struct("=II24x")            # epoch, disabled
ADDR_KEY = struct.Struct("=I16s")        # epoch, addr
DST_VAL = struct.Struct("=IIII")         # ruleset, count, workload, pad
U32 = struct.Struct("=I")
U64 = struct.Struct("=Q")
ENTRY_KEY = struct.Struct("=II")         # ruleset, idx
ENTRY_VAL = struct.Struct("=IBBBxIIIIIII")  # policy, action, dry, flags, 7 set ids
LPM_KEY = struct.Struct("=II16s")        # prefixlen, set id, addr
PORT_KEY = struct.Struct("=II")          # set id, port
BITS_KEY = struct.Struct("=II")          # set id, word
LOG_KEY = struct.Struct("=II16s16sHBxI")  # policy, workload, saddr, daddr, dport, kind
LOG_VAL = struct.Struct("=QQ")           # count, last_ns

assert ENTRY_VAL.size == 36 and LOG_KEY.size == 48 and CFG.size == 32

# pin file name -> (key size, value size), checked when the daemon opens them
MAPS = {
    "authz_cfg": (4, CFG.size),
    "authz_dst": (ADDR_KEY.size, DST_VAL.size),
    "authz_ident": (ADDR_KEY.size, 4),
    "authz_entry": (ENTRY_KEY.size, ENTRY_VAL.size),
    "authz_ipset": (LPM_KEY.size, 1),
    "authz_port": (PORT_KEY.size, 1),
    "authz_bits": (BITS_KEY.size, 8),
    "authz_log": (LOG_KEY.size, LOG_VAL.size),
}


def addr16(raw: bytes) -> bytes:
    """4- or 16-byte address -> the 16-byte form the maps use."""
    if len(raw) == 4:
        return b"\0" * 10 + b"\xff\xff" + raw
    if len(raw) == 16:
        return raw
    raise ValueError(f"address of {len(raw)} bytes")


def addr_from16(raw: bytes) -> bytes:
    """Inverse of addr16: a v4-mapped address back to 4 bytes."""
    return raw[12:] if raw[:12] == b"\0" * 10 + b"\xff\xff" else raw


def epoch_of_id(ident: int) -> int:
    return 1 if ident & EPOCH_BIT else 0
