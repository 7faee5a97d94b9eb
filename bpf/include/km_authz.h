/* L4 authorization (Istio AuthorizationPolicy) maps, shared by bpf/authz.c and the daemon.
 *
 * Every struct has a ctypes/struct twin in daemon/authz/layout.py; change both together (and
 * bump LAYOUT_VERSION in daemon/dataplane/layout.py so the loader makes fresh maps).
 *
 * The daemon compiles the policies that select each local workload into a "ruleset": a flat
 * list of entries the program walks once (see bpf/README.md, "Authorization"). Everything the
 * program reads is written under one *epoch* (bit 31 of every ruleset and set id, and a field of
 * the dst/ident keys); userspace fills the inactive epoch completely, then flips km_authz_cfg,
 * so a connection is judged either wholly by the old tables or wholly by the new ones.
 *
 * Addresses are 16 bytes, IPv4 as ::ffff:a.b.c.d, network order. Ids, counts: host order.
 */
#ifndef KM_AUTHZ_H
#define KM_AUTHZ_H

/* capacities (both epochs together); the loader may define them first */
#ifndef KM_AUTHZ_MAX_DST
#define KM_AUTHZ_MAX_DST 65536
#endif
#ifndef KM_AUTHZ_MAX_IDENT
#define KM_AUTHZ_MAX_IDENT 262144
#endif
#ifndef KM_AUTHZ_MAX_ENTRY
#define KM_AUTHZ_MAX_ENTRY 262144
#endif
#ifndef KM_AUTHZ_MAX_IPSET
#define KM_AUTHZ_MAX_IPSET 65536
#endif
#ifndef KM_AUTHZ_MAX_PORT
#define KM_AUTHZ_MAX_PORT 131072
#endif
#ifndef KM_AUTHZ_MAX_BITS
#define KM_AUTHZ_MAX_BITS 262144
#endif

#define KM_AUTHZ_EPOCH_BIT 0x80000000u
#ifndef KM_AUTHZ_MAX_ENTRIES
#define KM_AUTHZ_MAX_ENTRIES 1024 /* entries per ruleset the program walks (32 per tail call, at most 32 tail calls) */
#endif
#define KM_AUTHZ_ID_NODE 0xffffffffu /* ident value: the node itself (kubelet probes): exempt */

/* entry flags */
#define KM_AZ_END_CLAUSE 1
#define KM_AZ_END_RULE 2
#define KM_AZ_END_POLICY 4
#define KM_AZ_FALSE 8 /* evaluates false (a clause without matches, a policy without rules) */

#define KM_AZ_ALLOW 0
#define KM_AZ_DENY 1

/* record kinds (km_authz_log key) */
#define KM_AZ_REC_DENY 1        /* refused by a DENY policy (policy_id says which) */
#define KM_AZ_REC_NO_ALLOW 2    /* refused: ALLOW policies apply and none matched (policy_id 0) */
#define KM_AZ_REC_DRY_DENY 3    /* a dry-run DENY policy matched: not enforced */
#define KM_AZ_REC_DRY_NO_ALLOW 4 /* with dry-run ALLOW policies enforced it would be refused */

/* km_authz_cfg (array, 1 entry) */
struct km_authz_cfg {
    __u32 epoch;    /* 0 or 1: which tables are live */
    __u32 disabled; /* 1: `kmeshctl authz disable`; 0 (default): enforce */
    __u32 reserved[6];
};

/* km_authz_dst / km_authz_ident key: an address under one epoch */
struct km_authz_addr_key {
    __u32 epoch;
    __u32 addr[4];
};

/* km_authz_dst value: the local workload owning a destination address */
struct km_authz_dst {
    __u32 ruleset; /* km_authz_entry key prefix (epoch bit included) */
    __u32 count;   /* entries in the ruleset (0: no policy applies: allow) */
    __u32 workload; /* workload id (km_authz names), for records */
    __u32 pad;
};

/* km_authz_ident value: u32 identity id (>= 1; KM_AUTHZ_ID_NODE for node addresses). Absent
 * address: identity 0, "unknown" (matches no principal/namespace, matches every not_*). */

struct km_authz_entry_key {
    __u32 ruleset;
    __u32 idx;
};

/* One Istio `Match` (all present kinds AND-ed), plus where it ends in the policy structure.
 * A set id of 0 means "kind absent"; not_* sets must *not* contain the value. */
struct km_authz_entry {
    __u32 policy_id;
    __u8 action;  /* KM_AZ_ALLOW / KM_AZ_DENY */
    __u8 dry_run;
    __u8 flags;   /* KM_AZ_* */
    __u8 pad;
    __u32 id_set;    /* bitset over identity ids of sources that satisfy every identity kind */
    __u32 src_set;   /* LPM set: source_ips */
    __u32 nsrc_set;  /* LPM set: not_source_ips */
    __u32 dst_set;   /* LPM set: destination_ips */
    __u32 ndst_set;  /* LPM set: not_destination_ips */
    __u32 port_set;  /* port set: destination_ports */
    __u32 nport_set; /* port set: not_destination_ports */
};

/* km_authz_ipset: LPM trie; prefixlen counts the 32 set-id bits plus the address bits */
struct km_authz_lpm_key {
    __u32 prefixlen;
    __u32 set_id;
    __u32 addr[4];
};

struct km_authz_port_key {
    __u32 set_id;
    __u32 port; /* host order */
};

struct km_authz_bits_key {
    __u32 set_id;
    __u32 word; /* identity id / 64 */
};

/* km_authz_log: LRU of refused (and dry-run) connection attempts, polled by the daemon for
 * metrics and `kmeshctl trace`. */
struct km_authz_log_key {
    __u32 policy_id;
    __u32 workload;  /* destination workload id */
    __u32 saddr[4];
    __u32 daddr[4];
    __u16 dport;     /* host order */
    __u8 kind;       /* KM_AZ_REC_* */
    __u8 pad;
    __u32 pad2;
};

struct km_authz_log_val {
    __u64 count;
    __u64 last_ns;
};

BPF_TABLE_PINNED("array", __u32, struct km_authz_cfg, km_authz_cfg, 1, KM_PIN_DIR "/authz_cfg");
BPF_TABLE_PINNED("hash", struct km_authz_addr_key, struct km_authz_dst, km_authz_dst, KM_AUTHZ_MAX_DST,
                 KM_PIN_DIR "/authz_dst", BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("hash", struct km_authz_addr_key, __u32, km_authz_ident, KM_AUTHZ_MAX_IDENT,
                 KM_PIN_DIR "/authz_ident", BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("hash", struct km_authz_entry_key, struct km_authz_entry, km_authz_entry,
                 KM_AUTHZ_MAX_ENTRY, KM_PIN_DIR "/authz_entry", BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("lpm_trie", struct km_authz_lpm_key, __u8, km_authz_ipset, KM_AUTHZ_MAX_IPSET,
                 KM_PIN_DIR "/authz_ipset", BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("hash", struct km_authz_port_key, __u8, km_authz_port, KM_AUTHZ_MAX_PORT,
                 KM_PIN_DIR "/authz_port", BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("hash", struct km_authz_bits_key, __u64, km_authz_bits, KM_AUTHZ_MAX_BITS,
                 KM_PIN_DIR "/authz_bits", BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("lru_hash", struct km_authz_log_key, struct km_authz_log_val, km_authz_log, 16384,
                 KM_PIN_DIR "/authz_log");

#endif /* KM_AUTHZ_H */
