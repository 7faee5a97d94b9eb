/* Shared map layouts of the kmesh-py data plane.
 *
 * Every struct here has a ctypes twin in daemon/dataplane/layout.py; change both together and
 * bump KM_LAYOUT_VERSION there (the loader then builds fresh maps in a new pin subdirectory
 * instead of running new programs against old maps).
 *
 * The loader prepends these macros before this header:
 *   KM_PIN_DIR        string, the pin subdirectory, e.g. "/sys/fs/bpf/kmesh/v1-0123abcd"
 *   KM_MAX_FRONTEND, KM_MAX_SERVICE, KM_MAX_ENDPOINT, KM_MAX_BACKEND, KM_MAX_MANAGE,
 *   KM_MAX_SOCK, KM_MAX_NAMES  (map capacities)
 *
 * Byte order: addresses and ports are network order everywhere (as the kernel hands them to
 * sock_addr programs); ids, counts and flags are host order.
 */
#ifndef KM_MAPS_H
#define KM_MAPS_H

#define KM_IPPROTO_TCP 6
#define KM_AF_INET 2
#define KM_AF_INET6 10

/* frontend value kinds */
#define KM_FE_SERVICE 1 /* id is a service-port id (km_service key) */
#define KM_FE_BACKEND 2 /* id is a backend id: direct pod access, no rewrite */

/* lb modes (daemon/dataplane/model.py LbMode) */
#define KM_LB_RANDOM 0
#define KM_LB_STRICT 1
#define KM_LB_FAILOVER 2
#define KM_PRIOS 7

/* backend flags */
#define KM_BE_HAS_V4 1
#define KM_BE_HAS_V6 2

/* socket record flags */
#define KM_SK_TRANSLATED 1
#define KM_SK_WAYPOINT 2 /* sent to a waypoint: sk_msg writes the hand-off header */

/* waypoint hand-off: how the original destination travels in front of the stream */
#define KM_HO_TLV 1   /* Kmesh TLV (type 0x01, len, addr+port, end 0xfe + u32 0) */
#define KM_HO_PROXY 2 /* PROXY protocol v2 */
#define KM_WP_UNRESOLVED 255 /* wp_family of a waypoint that names no known address: fail closed */

/* event kinds / verdicts (daemon/dataplane/layout.py decodes them) */
#define KM_EV_CONNECT 1
#define KM_EV_ESTABLISHED 2
#define KM_EV_CLOSE 3
#define KM_V_TRANSLATED 1
#define KM_V_PASSTHROUGH 2
#define KM_V_NO_HEALTHY 3
#define KM_V_VIA_WAYPOINT 4     /* sent to a waypoint pod at its hand-off port */
#define KM_V_NO_WAYPOINT_EP 5   /* the destination has a waypoint with no endpoint: refused */

/* km_config.mon_off bits: a set bit switches that output off (0, a fresh map: all on) */
#define KM_MON_ACCESSLOG 1 /* connect events (trace, access log) */
#define KM_MON_METRICS 2   /* connection metrics; with both off sockops asks for no state callbacks */
#define KM_MON_ALL 3
#define KM_MON_NOTRACE 4   /* derived by km_mon_off(), never stored: km_config.trace_on is 0 */

/* km_conn_stats capacity: (netns, service, backend, verdict) tuples; LRU, so a full map ages
 * out the least recently used tuple (the daemon keeps what it already read; see metrics.py) */
#define KM_MAX_CONN_STATS 16384

/* control addresses: 0.0.0.2 and ::2, ports 929 (enable) / 930 (disable) */
#define KM_CTL_ENABLE 929
#define KM_CTL_DISABLE 930

/* km_frontend key: one service VIP:port (port = service port), or one pod IP (port 0). */
struct km_fe_key {
    __u32 addr[4];   /* v4: addr[0] only, rest 0; v6: 16 bytes */
    __u16 port;      /* network order; 0 for a pod IP */
    __u8 family;     /* KM_AF_INET / KM_AF_INET6 */
    __u8 pad;        /* always 0 */
};

/* km_frontend value */
struct km_fe_val {
    __u32 kind; /* KM_FE_SERVICE or KM_FE_BACKEND */
    __u32 id;   /* service-port id or backend id */
};

/* A waypoint reference: the frontend (waypoint service VIP and its HBONE port, usually 15008)
 * whose endpoints are the waypoint pods. family 0 = no waypoint; KM_WP_UNRESOLVED = a waypoint
 * that names no known service (the connect is refused rather than bypassing it). */
struct km_wp {
    __u32 addr[4];
    __u16 port;   /* network order */
    __u8 family;  /* 0, KM_AF_INET, KM_AF_INET6 or KM_WP_UNRESOLVED */
    __u8 pad;
};

/* km_service key: u32 service-port id (allocated by userspace, >= 1).
 * value: the load-balancing header of one service port. */
struct km_service {
    __u32 lb_mode;         /* KM_LB_* */
    __u32 count[KM_PRIOS]; /* number of endpoint slots at each priority */
    __u32 flags;           /* reserved, 0 */
    struct km_wp wp;       /* the waypoint connections to this service port go to */
};

/* km_endpoint key: slot `slot` (0-based, < count[prio]) of priority `prio` of a service port.
 * An endpoint with capacity weight w occupies several slots (see reconciler), so a uniform
 * pick of a slot is a weighted pick of an endpoint. */
struct km_ep_key {
    __u32 svc_id;
    __u32 prio;
    __u32 slot;
};

/* km_endpoint value */
struct km_ep_val {
    __u32 backend_id; /* km_backend key */
    __u16 port;       /* target port, network order */
    __u16 pad;
};

/* km_backend key: u32 backend id (>= 1). value: */
struct km_backend {
    __u32 ip4;    /* network order, valid if flags & KM_BE_HAS_V4 */
    __u32 ip6[4]; /* valid if flags & KM_BE_HAS_V6 */
    __u32 flags;
    struct km_wp wp;      /* this pod's own waypoint (direct pod access) */
    __u16 handoff_port;   /* as a waypoint pod: where redirected connections go, network order */
    __u8 handoff_mode;    /* as a waypoint pod: KM_HO_TLV or KM_HO_PROXY */
    __u8 pad;
};

/* km_sock key: u32 slot = socket cookie % KM_MAX_SOCK (an array: see the map below). value: what
 * connect() decided, for getpeername (restore the VIP) and for sockops events, with the cookie
 * of the socket that owns the slot (0: free). */
struct km_sock {
    __u64 cookie;          /* the socket this record is for; 0 = free slot */
    __u32 orig_addr[4];    /* the address the application connected to */
    __u32 backend_addr[4]; /* where the socket really goes */
    __u16 orig_port;       /* network order */
    __u16 backend_port;    /* network order */
    __u8 family;
    __u8 flags;            /* KM_SK_* */
    __u8 handoff;          /* KM_HO_* when flags & KM_SK_WAYPOINT */
    __u8 pad;
    __u32 service_id;      /* 0 for direct pod access */
    __u32 backend_id;      /* via a waypoint: the waypoint pod */
    __u64 connect_ns;
};

/* km_names key: {kind, id}; value: NUL-padded name. Written by userspace only, so that a new
 * daemon process (or `kmeshctl dump bpf`) can decode ids without its predecessor's memory.
 * kind 1 = service port ("ns/host:port"), kind 2 = backend ("uid\0name\0namespace"). */
struct km_name_key {
    __u32 kind;
    __u32 id;
};
struct km_name {
    char name[256];
};

/* km_layout (array, 1 entry): the layout version the maps in this directory were made for. */
struct km_layout {
    __u32 version;
    __u32 reserved[7];
};

/* km_config (array, 1 entry, pinned): runtime switches the daemon flips (`kmeshctl monitoring`).
 * Pinned with the other maps so a restarted daemon (and the programs still attached while it is
 * away) keep the setting. Zero means "on", so a fresh generation behaves as before the switch. */
struct km_config {
    __u32 mon_off;     /* KM_MON_* bits switched off */
    __u32 trace_on;    /* 1 while the daemon has an event consumer (trace stream, event debug log):
                        * ring-buffer events are emitted only then (and with access logs on) */
    __u32 reserved[6]; /* 0 */
};

/* km_conn_stats: connection counters aggregated in the kernel (connection metrics), so that a
 * connection costs the daemon nothing until a scrape reads the map. The orig_* fields are set
 * only without a service (direct pod access, passthrough), whose destination is named by its
 * address; otherwise they are 0 so that one service/backend pair is one entry. */
struct km_conn_key {
    __u64 netns_cookie;  /* the client's network namespace (enrolled pod) */
    __u32 service_id;    /* 0 for direct pod access and passthrough */
    __u32 backend_id;    /* via a waypoint: the waypoint pod; 0 for passthrough */
    __u32 orig_addr[4];  /* service_id 0 only */
    __u16 orig_port;     /* service_id 0 only, network order */
    __u8 family;         /* service_id 0 only */
    __u8 verdict;        /* KM_V_* */
    __u32 pad;           /* 0 */
};
struct km_conn_val {
    __u64 opened;         /* established */
    __u64 closed;
    __u64 bytes_sent;     /* of closed connections (bytes_acked) */
    __u64 bytes_received; /* of closed connections */
};

/* ring buffer record */
struct km_event {
    __u64 ts_ns;
    __u64 netns_cookie;
    __u64 sock_cookie;
    __u64 bytes_sent;
    __u64 bytes_received;
    __u64 duration_ns;
    __u32 orig_addr[4];
    __u32 backend_addr[4];
    __u32 service_id;
    __u32 backend_id;
    __u32 srtt_us;
    __u16 orig_port;    /* network order */
    __u16 backend_port; /* network order */
    __u8 kind;          /* KM_EV_* */
    __u8 verdict;       /* KM_V_* */
    __u8 family;
    __u8 pad[5];
};

/* The reconciled maps are preallocated: a batch insert into a preallocated hash is 2-5x faster
 * than into a BPF_F_NO_PREALLOC one (a full sync of 10k services x 10 endpoints writes 430k
 * elements), at the price of their full capacity in kernel memory up front (bpf/README.md). */
BPF_TABLE_PINNED("hash", struct km_fe_key, struct km_fe_val, km_frontend, KM_MAX_FRONTEND,
                 KM_PIN_DIR "/frontend", 0);
BPF_TABLE_PINNED("hash", __u32, struct km_service, km_service, KM_MAX_SERVICE,
                 KM_PIN_DIR "/service", 0);
BPF_TABLE_PINNED("hash", struct km_ep_key, struct km_ep_val, km_endpoint, KM_MAX_ENDPOINT,
                 KM_PIN_DIR "/endpoint", 0);
BPF_TABLE_PINNED("hash", __u32, struct km_backend, km_backend, KM_MAX_BACKEND,
                 KM_PIN_DIR "/backend", 0);
/* km_manage: u64 netns cookie -> u32 1 (managed). Written by the control connects. */
BPF_TABLE_PINNED("hash", __u64, __u32, km_manage, KM_MAX_MANAGE, KM_PIN_DIR "/manage",
                 BPF_F_NO_PREALLOC);
/* km_sock is an array indexed by socket cookie modulo its size, not a hash: a hash or LRU update
 * (bpf_map_update_elem: bucket lock, free-list pop) cost ~1.3 us per connect on the bench VM,
 * about 1 % of a whole new HTTP connection, while an array slot is a pointer the program writes
 * through (the lookup is inlined). Cookies are handed out in increasing order, so a slot is
 * reused only after KM_MAX_SOCK newer sockets asked for one: a socket still open by then loses
 * its record (getpeername then shows the pod; the LRU of layout <= 5 aged records out alike). */
BPF_TABLE_PINNED("array", __u32, struct km_sock, km_sock, KM_MAX_SOCK, KM_PIN_DIR "/sock");
BPF_TABLE_PINNED("hash", struct km_name_key, struct km_name, km_names, KM_MAX_NAMES,
                 KM_PIN_DIR "/names", 0);
BPF_TABLE_PINNED("array", __u32, struct km_layout, km_layout, 1, KM_PIN_DIR "/layout");
BPF_TABLE_PINNED("array", __u32, struct km_config, km_config, 1, KM_PIN_DIR "/config");
BPF_TABLE_PINNED("lru_hash", struct km_conn_key, struct km_conn_val, km_conn_stats,
                 KM_MAX_CONN_STATS, KM_PIN_DIR "/conn_stats");

/* The record slot of socket cookie `ck` (never NULL for a valid index; checked anyway). */
static __always_inline struct km_sock *km_sock_slot(__u64 ck)
{
    __u32 i = (__u32)(ck % KM_MAX_SOCK);
    return km_sock.lookup(&i);
}

/* The record of socket `ck`, or NULL when its slot is free or holds another socket's. */
static __always_inline struct km_sock *km_sock_find(__u64 ck)
{
    struct km_sock *s = km_sock_slot(ck);
    if (!s || s->cookie != ck)
        return 0;
    return s;
}

/* Which monitoring outputs are off (KM_MON_* bits, plus KM_MON_NOTRACE when nobody consumes
 * events): one array lookup, the whole cost of the switch on the connect path. */
static __always_inline __u32 km_mon_off(void)
{
    __u32 zero = 0;
    struct km_config *c = km_config.lookup(&zero);
    if (!c)
        return KM_MON_NOTRACE;
    return c->mon_off | (c->trace_on ? 0 : KM_MON_NOTRACE);
}

/* ring-buffer events flow only with access logs on and a consumer present */
#define KM_EVENTS_OFF(off) ((off) & (KM_MON_ACCESSLOG | KM_MON_NOTRACE))
/* km_handoff (socket storage, keyed by the socket itself): what the sk_msg program writes in
 * front of a via-waypoint socket's first byte. Copied from km_sock by sockops when the socket
 * is established (sk_msg programs cannot read the socket cookie, so not km_sock itself). */
struct km_handoff {
    __u32 orig_addr[4]; /* the destination the application connected to (as in km_sock) */
    __u16 orig_port;    /* network order */
    __u8 family;        /* of the socket: KM_AF_INET / KM_AF_INET6 (maybe v4-mapped) */
    __u8 mode;          /* KM_HO_* */
    __u8 done;          /* 1 once the header is written: exactly once */
    __u8 pad[3];
};
struct km_handoff_table_t {
    int key;
    struct km_handoff leaf;
    void *(*sk_storage_get)(void *, void *, int);
    int (*sk_storage_delete)(void *);
    __u32 flags;
};
__attribute__((section("maps/sk_storage:" KM_PIN_DIR "/handoff")))
struct km_handoff_table_t km_handoff = {.flags = BPF_F_NO_PREALLOC};
BPF_ANNOTATE_KV_PAIR(km_handoff, int, struct km_handoff);

/* km_wpsock: via-waypoint sockets (socket cookie -> socket), added by sockops once established;
 * the sk_msg program attached to it writes the hand-off header. Sockets leave it on close. */
struct km_wpsock_table_t {
    __u64 key;
    int leaf;
    int (*update)(__u64 *, int *);
    int (*delete)(__u64 *);
    int (*sock_hash_update)(void *, void *, __u64);
    int (*msg_redirect_hash)(void *, void *, __u64);
    int (*sk_redirect_hash)(void *, void *, __u64);
    __u32 max_entries;
};
/* bcc has no pinned variant of BPF_SOCKHASH: the same struct with a "type:pin" section */
__attribute__((section("maps/sockhash:" KM_PIN_DIR "/wpsock")))
struct km_wpsock_table_t km_wpsock = {.max_entries = KM_MAX_SOCK};
BPF_ANNOTATE_KV_PAIR(km_wpsock, __u64, int);

/* Connection events; not pinned: each loader reads its own programs' buffer. 256 KiB. */
BPF_RINGBUF_OUTPUT(km_events, 64);
/* Events since the last wake-up, per CPU (not pinned, like the ring). The reader polls with a
 * bounded timeout (100 ms), so only every KM_RB_WAKE_EVERY-th event on a CPU wakes it: a trace
 * sees an event at most that late, and a busy node pays one wake-up per batch instead of one
 * per event. (bcc 0.26 cannot call bpf_ringbuf_query on a table, hence the count.) */
BPF_PERCPU_ARRAY(km_rb_pending, __u32, 1);
#define KM_RB_WAKE_EVERY 64

static __always_inline void km_emit(struct km_event *ev)
{
    __u32 zero = 0;
    __u64 flags = BPF_RB_NO_WAKEUP;
    __u32 *n = km_rb_pending.lookup(&zero);
    if (!n || ++*n >= KM_RB_WAKE_EVERY) {
        flags = BPF_RB_FORCE_WAKEUP;
        if (n)
            *n = 0;
    }
    km_events.ringbuf_output(ev, sizeof(*ev), flags);
}

#endif /* KM_MAPS_H */
