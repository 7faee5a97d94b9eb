/* sockops: connection counters (km_conn_stats) and established/close events (bytes, srtt) for
 * sockets connect4/6 recorded in km_sock; via-waypoint sockets go into km_wpsock. Untracked
 * sockets are ignored.
 * Metrics on: opened/closed/bytes are added in km_conn_stats (no event needed). Events only
 * with access logs on and a consumer present (km_config.trace_on). With neither, no state
 * callbacks are asked for; the waypoint hand-off works the same (its RTT callback is its own).
 * Records then stay in their km_sock slot until a newer socket takes it. */
#include "km_maps.h"

#define KM_TCP_CLOSE 7

static __always_inline __u8 km_sock_verdict(struct km_sock *s)
{
    return (s->flags & KM_SK_WAYPOINT)     ? KM_V_VIA_WAYPOINT
           : (s->flags & KM_SK_TRANSLATED) ? KM_V_TRANSLATED
                                           : KM_V_PASSTHROUGH;
}

/* Count one established (close = 0) or closed connection into km_conn_stats. */
static __always_inline void km_count(struct bpf_sock_ops *skops, struct km_sock *s, int close)
{
    struct km_conn_key key = {};
    key.netns_cookie = bpf_get_netns_cookie(skops);
    key.service_id = s->service_id;
    key.backend_id = s->backend_id;
    key.verdict = km_sock_verdict(s);
    if (!s->service_id) { /* no service name: the destination is named by its address */
        __builtin_memcpy(key.orig_addr, s->orig_addr, 16);
        key.orig_port = s->orig_port;
        key.family = s->family;
    }
    struct km_conn_val *v = km_conn_stats.lookup(&key);
    if (!v) {
        struct km_conn_val zero = {};
        km_conn_stats.update(&key, &zero); /* BPF_ANY: a racing insert keeps one entry */
        v = km_conn_stats.lookup(&key);
        if (!v)
            return;
    }
    if (!close) {
        __sync_fetch_and_add(&v->opened, 1);
        return;
    }
    __sync_fetch_and_add(&v->closed, 1);
    __sync_fetch_and_add(&v->bytes_sent, skops->bytes_acked);
    __sync_fetch_and_add(&v->bytes_received, skops->bytes_received);
}

static __always_inline void km_sock_event(struct bpf_sock_ops *skops, struct km_sock *s,
                                          __u64 ck, __u8 kind)
{
    struct km_event ev = {};
    __u64 now = bpf_ktime_get_ns();
    ev.ts_ns = now;
    ev.netns_cookie = bpf_get_netns_cookie(skops);
    ev.sock_cookie = ck;
    __builtin_memcpy(ev.orig_addr, s->orig_addr, 16);
    __builtin_memcpy(ev.backend_addr, s->backend_addr, 16);
    ev.orig_port = s->orig_port;
    ev.backend_port = s->backend_port;
    ev.service_id = s->service_id;
    ev.backend_id = s->backend_id;
    ev.family = s->family;
    ev.kind = kind;
    ev.verdict = km_sock_verdict(s);
    ev.duration_ns = now - s->connect_ns;
    if (kind == KM_EV_CLOSE) {
        ev.bytes_sent = skops->bytes_acked;
        ev.bytes_received = skops->bytes_received;
        volatile __u32 srtt = skops->srtt_us;
        ev.srtt_us = srtt >> 3; /* the kernel keeps srtt scaled by 8 */
    }
    km_emit(&ev);
}

int sockops(struct bpf_sock_ops *skops)
{
    volatile __u32 op = skops->op;
    if (op != BPF_SOCK_OPS_TCP_CONNECT_CB && op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB &&
        op != BPF_SOCK_OPS_STATE_CB && op != BPF_SOCK_OPS_RTT_CB)
        return 1;
    /* state callbacks: only the close matters; the others return before any map lookup */
    if (op == BPF_SOCK_OPS_STATE_CB) {
        volatile __u32 st = skops->args[1];
        if (st != KM_TCP_CLOSE)
            return 1;
    }
    if (op == BPF_SOCK_OPS_TCP_CONNECT_CB) {
        /* connect4/6 asked for the state callbacks already (km_record): nothing to do */
        volatile __u32 cbf = skops->bpf_sock_ops_cb_flags;
        if (cbf & BPF_SOCK_OPS_STATE_CB_FLAG)
            return 1;
    }
    __u32 off = km_mon_off();
    int events = !KM_EVENTS_OFF(off);
    int metrics = !(off & KM_MON_METRICS);
    /* nothing to count or report: nothing to ask for at connect (and no km_sock lookup) */
    if (op == BPF_SOCK_OPS_TCP_CONNECT_CB && !events && !metrics)
        return 1;
    __u64 ck = bpf_get_socket_cookie(skops);
    struct km_sock *s = km_sock_find(ck);
    if (!s)
        return 1;
    if (op == BPF_SOCK_OPS_TCP_CONNECT_CB) {
        /* ask for state callbacks now, so a connect that never establishes still closes
         * (only when connect4/6 could not: a kernel without TCP_BPF_SOCK_OPS_CB_FLAGS) */
        volatile __u32 cbf = skops->bpf_sock_ops_cb_flags;
        bpf_sock_ops_cb_flags_set(skops, cbf | BPF_SOCK_OPS_STATE_CB_FLAG);
        return 1;
    }
    if (op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB) {
        /* via a waypoint: the sk_msg program on km_wpsock writes the hand-off header in front
         * of the first byte. Established runs before the connecting thread wakes, so the
         * socket is in the map before any send. */
        if (s->flags & KM_SK_WAYPOINT) {
            struct bpf_sock *sk = skops->sk;
            if (sk) {
                struct km_handoff *h =
                    km_handoff.sk_storage_get(sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
                if (h) {
                    __builtin_memcpy(h->orig_addr, s->orig_addr, 16);
                    h->orig_port = s->orig_port;
                    h->family = s->family;
                    h->mode = s->handoff;
                    h->done = 0;
                    /* (a statement of its own: bcc appends a ';' to this call) */
                    long err = km_wpsock.sock_hash_update(skops, &ck, BPF_NOEXIST);
                    if (!err) {
                        volatile __u32 cbf = skops->bpf_sock_ops_cb_flags;
                        bpf_sock_ops_cb_flags_set(skops, cbf | BPF_SOCK_OPS_RTT_CB_FLAG);
                    }
                }
            }
        }
        if (metrics)
            km_count(skops, s, 0);
        if (events)
            km_sock_event(skops, s, ck, KM_EV_ESTABLISHED);
        return 1;
    }
    if (op == BPF_SOCK_OPS_RTT_CB) {
        /* An ACK on a via-waypoint socket: once the header is out, take the socket out of
         * km_wpsock so the rest of the connection is plain TCP (no sk_msg on every send, no
         * tcp_bpf receive path), and stop these callbacks. */
        struct bpf_sock *sk = skops->sk;
        if (!sk)
            return 1;
        struct km_handoff *h = km_handoff.sk_storage_get(sk, 0, 0);
        if (h && !h->done)
            return 1;
        km_wpsock.delete(&ck);
        volatile __u32 cbf = skops->bpf_sock_ops_cb_flags;
        bpf_sock_ops_cb_flags_set(skops, cbf & ~BPF_SOCK_OPS_RTT_CB_FLAG);
        return 1;
    }
    /* here: BPF_SOCK_OPS_STATE_CB to TCP_CLOSE (checked above) */
    /* switched off since the connect: the record still goes (and a connection opened while
     * metrics were off counts a close without an open; the counters are only monotonic) */
    if (metrics)
        km_count(skops, s, 1);
    if (events)
        km_sock_event(skops, s, ck, KM_EV_CLOSE);
    s->cookie = 0; /* free the slot */
    return 1;
}
