/* Frontend lookup and endpoint choice, shared by connect4 and connect6. */
#ifndef KM_LB_H
#define KM_LB_H

#include "km_maps.h"

#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
#define KM_HTONL(x) __builtin_bswap32(x)
#define KM_HTONS(x) __builtin_bswap16(x)
#else
#define KM_HTONL(x) (x)
#define KM_HTONS(x) (x)
#endif

#define KM_CTL_TAKEN 0 /* recorded or removed: reject the connect with EPERM */
#define KM_CTL_FULL 1  /* manage map full: the caller sends it to a closed loopback port */
#define KM_CTL_OTHER 2 /* another port on the control address: leave it alone */

/* A connect to the control address (0.0.0.2 / [::2]) from a netns: :929 enrolls the netns
 * cookie in km_manage, :930 removes it. Shared by connect4 and connect6. */
static __always_inline int km_control(__u64 netns, __u16 dport)
{
    __u16 p = KM_HTONS(dport);
    if (p == KM_CTL_ENABLE) {
        __u32 one = 1;
        return km_manage.update(&netns, &one) ? KM_CTL_FULL : KM_CTL_TAKEN;
    }
    if (p == KM_CTL_DISABLE) {
        km_manage.delete(&netns);
        return KM_CTL_TAKEN;
    }
    return KM_CTL_OTHER;
}

#define KM_HANDOFF_TLV_PORT 15019 /* Kmesh's fixed waypoint port for the TLV hand-off */

/* What connect() decided. */
struct km_choice {
    __u32 verdict;    /* KM_V_* */
    __u32 service_id; /* 0 for direct pod access */
    __u32 backend_id; /* 0 when none was chosen; via a waypoint: the waypoint pod */
    __u16 port;       /* target port, network order (translated only) */
    __u8 handoff;     /* KM_HO_* (via a waypoint only) */
    __u8 pad;
    struct km_backend *be;
};

/* One endpoint of service port svc_id (svc: its km_service value, already looked up): STRICT
 * uses priority 0 only, FAILOVER the lowest non-empty priority, RANDOM keeps everything in
 * priority 0; a uniform random slot (weights are expanded into slots). Returns 1 with
 * backend_id/port/be filled, 0 when there is none. */
static __always_inline int km_pick(__u32 svc_id, struct km_service *svc, struct km_choice *c)
{
    __u32 prio = 0, count = 0;
    if (svc->lb_mode == KM_LB_FAILOVER) {
#pragma unroll
        for (int i = 0; i < KM_PRIOS; i++) {
            if (svc->count[i]) {
                prio = i;
                count = svc->count[i];
                break;
            }
        }
    } else {
        count = svc->count[0];
    }
    if (!count)
        return 0;
    struct km_ep_key ek = {};
    ek.svc_id = svc_id;
    ek.prio = prio;
    ek.slot = bpf_get_prandom_u32() % count;
    struct km_ep_val *ep = km_endpoint.lookup(&ek);
    if (!ep)
        return 0;
    __u32 bid = ep->backend_id;
    struct km_backend *be = km_backend.lookup(&bid);
    if (!be)
        return 0;
    c->backend_id = bid;
    c->port = ep->port;
    c->be = be;
    return 1;
}

/* The destination has a waypoint: pick one of the waypoint service's pods (same pick as any
 * service) and send the connection to its hand-off port. No pod, or a waypoint that names no
 * known service: KM_V_NO_WAYPOINT_EP, and the caller refuses the connect (L7 policy lives in
 * the waypoint, so bypassing it would be a hole). The second pass never looks at a waypoint's
 * own waypoint: one hop only. */
static __always_inline void km_waypoint(struct km_wp *wp, struct km_choice *c)
{
    c->verdict = KM_V_NO_WAYPOINT_EP;
    c->backend_id = 0;
    if (wp->family == KM_WP_UNRESOLVED)
        return;
    struct km_fe_key k = {};
    __builtin_memcpy(k.addr, wp->addr, 16);
    k.port = wp->port;
    k.family = wp->family;
    struct km_fe_val *fe = km_frontend.lookup(&k);
    if (!fe) { /* a waypoint named by a pod address: that pod */
        k.port = 0;
        fe = km_frontend.lookup(&k);
        if (!fe)
            return;
    }
    struct km_choice w = {};
    if (fe->kind == KM_FE_SERVICE) {
        __u32 wid = fe->id;
        struct km_service *wsvc = km_service.lookup(&wid);
        if (!wsvc || !km_pick(wid, wsvc, &w))
            return;
    } else {
        __u32 bid = fe->id;
        w.be = km_backend.lookup(&bid);
        if (!w.be)
            return;
        w.backend_id = bid;
    }
    struct km_backend *be = w.be;
    c->backend_id = w.backend_id;
    c->be = be;
    c->port = be->handoff_port ? be->handoff_port : KM_HTONS(KM_HANDOFF_TLV_PORT);
    c->handoff = be->handoff_mode == KM_HO_PROXY ? KM_HO_PROXY : KM_HO_TLV;
    c->verdict = KM_V_VIA_WAYPOINT;
}

/* Look the destination up; on a service hit pick one endpoint (or a waypoint pod).
 * Returns 0 when the destination is not a frontend (plain passthrough, nothing to record). */
static __always_inline int km_choose(struct km_fe_key *key, struct km_choice *c)
{
    struct km_fe_val *fe = km_frontend.lookup(key);
    if (!fe) {
        __u16 port = key->port;
        key->port = 0;
        fe = km_frontend.lookup(key);
        key->port = port;
        if (!fe)
            return 0;
    }
    __u32 id = fe->id;
    if (fe->kind == KM_FE_BACKEND) {
        c->verdict = KM_V_PASSTHROUGH;
        c->backend_id = id;
        struct km_backend *pod = km_backend.lookup(&id);
        if (pod && pod->wp.family)
            km_waypoint(&pod->wp, c);
        return 1;
    }
    c->service_id = id;
    c->verdict = KM_V_NO_HEALTHY;
    struct km_service *svc = km_service.lookup(&id);
    if (!svc)
        return 1;
    if (svc->wp.family) {
        km_waypoint(&svc->wp, c);
        return 1;
    }
    if (km_pick(id, svc, c)) /* svc: no second km_service lookup */
        c->verdict = KM_V_TRANSLATED;
    return 1;
}

/* Where a connect from a managed netns goes; shared by connect4 and connect6 (they only differ
 * in how they read and write the address). key: the destination as a frontend key (a v4-mapped
 * destination of a dual-stack socket is looked up as IPv4, and `mapped` says so). s: the socket
 * record, orig_* filled; on a rewrite backend_addr/backend_port/flags/handoff are set in the
 * socket's own address format (v4-mapped for a mapped socket), for the caller to copy into ctx.
 * Returns the verdict, or 0 when the destination is no frontend (untouched, nothing stored). */
static __always_inline __u8 km_translate(struct km_fe_key *key, struct km_sock *s, int mapped)
{
    struct km_choice c = {};
    if (!km_choose(key, &c))
        return 0;
    s->service_id = c.service_id;
    s->backend_id = c.backend_id;
    __u8 verdict = c.verdict;
    if (verdict != KM_V_TRANSLATED && verdict != KM_V_VIA_WAYPOINT)
        return verdict;
    /* the chosen pod has no address of the socket's family */
    __u8 none = verdict == KM_V_VIA_WAYPOINT ? KM_V_NO_WAYPOINT_EP : KM_V_NO_HEALTHY;
    struct km_backend *be = c.be;
    if (!be)
        return none;
    if (key->family == KM_AF_INET) {
        if (!(be->flags & KM_BE_HAS_V4))
            return none;
        if (mapped) {
            s->backend_addr[0] = 0;
            s->backend_addr[1] = 0;
            s->backend_addr[2] = KM_HTONL(0xffff);
            s->backend_addr[3] = be->ip4;
        } else {
            s->backend_addr[0] = be->ip4;
        }
    } else {
        if (!(be->flags & KM_BE_HAS_V6))
            return none;
        __builtin_memcpy(s->backend_addr, be->ip6, 16);
    }
    s->backend_port = c.port;
    s->flags = KM_SK_TRANSLATED;
    if (verdict == KM_V_VIA_WAYPOINT) {
        s->flags |= KM_SK_WAYPOINT;
        s->handoff = c.handoff;
    }
    return verdict;
}

/* TCP_BPF_SOCK_OPS_CB_FLAGS (recent kernels; the build's uapi headers may predate it) */
#define KM_TCP_BPF_SOCK_OPS_CB_FLAGS 1008

/* Store the socket record, then, unless access logs are off, emit the connect event. A
 * translated socket is always stored (getpeername restores the VIP from it, sockops reads the
 * waypoint hand-off); any other only while sockops counts or reports it (metrics or events on):
 * with monitoring off a direct pod connection costs no map write. When sockops will want the
 * close, the state callbacks are asked for here, in the same program, so that sockops needs no
 * km_sock lookup at TCP_CONNECT_CB (it still asks itself if this setsockopt is refused). */
static __always_inline void km_record(struct bpf_sock_addr *ctx, __u64 netns, struct km_sock *s,
                                      __u8 verdict, int store)
{
    __u32 off = km_mon_off();
    __u32 quiet = KM_EVENTS_OFF(off);
    int watched = !quiet || !(off & KM_MON_METRICS);
    if (!(s->flags & KM_SK_TRANSLATED) && !watched)
        store = 0;
    if (quiet && !store)
        return;
    __u64 ck = bpf_get_socket_cookie(ctx);
    if (watched || !quiet)
        s->connect_ns = bpf_ktime_get_ns(); /* only events and their durations use it */
    if (store) {
        struct km_sock *slot = km_sock_slot(ck);
        if (slot) {
            s->cookie = ck;
            __builtin_memcpy(slot, s, sizeof(*s));
        }
        if (watched) {
            int cbf = BPF_SOCK_OPS_STATE_CB_FLAG;
            bpf_setsockopt(ctx, KM_IPPROTO_TCP, KM_TCP_BPF_SOCK_OPS_CB_FLAGS, &cbf, sizeof(cbf));
        }
    }
    if (quiet)
        return;
    struct km_event ev = {};
    ev.ts_ns = s->connect_ns;
    ev.netns_cookie = netns;
    ev.sock_cookie = ck;
    __builtin_memcpy(ev.orig_addr, s->orig_addr, 16);
    __builtin_memcpy(ev.backend_addr, s->backend_addr, 16);
    ev.orig_port = s->orig_port;
    ev.backend_port = s->backend_port;
    ev.service_id = s->service_id;
    ev.backend_id = s->backend_id;
    ev.kind = KM_EV_CONNECT;
    ev.verdict = verdict;
    ev.family = s->family;
    km_emit(&ev);
}

#endif /* KM_LB_H */
