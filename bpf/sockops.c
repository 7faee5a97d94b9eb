/* sockops: established and close events (bytes, srtt) for sockets connect4/6 recorded in
 * km_sock; via-waypoint sockets go into km_wpsock. Untracked sockets are ignored.
 * Monitoring off (km_config: access log and metrics both off): no state callbacks are asked
 * for and no event is emitted; the waypoint hand-off works the same (its RTT callback is its own).
 * Records then leave km_sock by LRU eviction instead of at close. */
#include "km_maps.h"

#define KM_TCP_CLOSE 7

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
    ev.verdict = (s->flags & KM_SK_WAYPOINT)     ? KM_V_VIA_WAYPOINT
                 : (s->flags & KM_SK_TRANSLATED) ? KM_V_TRANSLATED
                                                 : KM_V_PASSTHROUGH;
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
    /* monitoring off: nothing to ask for at connect (and no km_sock lookup) */
    int quiet = (km_mon_off() & KM_MON_ALL) == KM_MON_ALL;
    if (op == BPF_SOCK_OPS_TCP_CONNECT_CB && quiet)
        return 1;
    __u64 ck = bpf_get_socket_cookie(skops);
    struct km_sock *s = km_sock.lookup(&ck);
    if (!s)
        return 1;
    if (op == BPF_SOCK_OPS_TCP_CONNECT_CB) {
        /* ask for state callbacks now, so a connect that never establishes still closes */
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
        if (!quiet)
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
    volatile __u32 newstate = skops->args[1];
    if (newstate != KM_TCP_CLOSE)
        return 1;
    if (!quiet) /* switched off since the connect: the record still goes */
        km_sock_event(skops, s, ck, KM_EV_CLOSE);
    km_sock.delete(&ck);
    return 1;
}
