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

/* What connect() decided. */
struct km_choice {
    __u32 verdict;    /* KM_V_* */
    __u32 service_id; /* 0 for direct pod access */
    __u32 backend_id; /* 0 when none was chosen */
    __u16 port;       /* target port, network order (translated only) */
    __u16 pad;
    struct km_backend *be;
};

/* Look the destination up; on a service hit pick one endpoint.
 * Returns 0 when the destination is not a frontend (plain passthrough, nothing to record).
 * The pick: STRICT uses priority 0 only, FAILOVER the lowest non-empty priority, RANDOM keeps
 * everything in priority 0; a uniform random slot (weights are expanded into slots). */
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
    if (fe->kind == KM_FE_BACKEND) {
        c->verdict = KM_V_PASSTHROUGH;
        c->backend_id = fe->id;
        return 1;
    }
    __u32 svc_id = fe->id;
    c->service_id = svc_id;
    c->verdict = KM_V_NO_HEALTHY;
    struct km_service *svc = km_service.lookup(&svc_id);
    if (!svc)
        return 1;
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
        return 1;
    struct km_ep_key ek = {};
    ek.svc_id = svc_id;
    ek.prio = prio;
    ek.slot = bpf_get_prandom_u32() % count;
    struct km_ep_val *ep = km_endpoint.lookup(&ek);
    if (!ep)
        return 1;
    __u32 bid = ep->backend_id;
    struct km_backend *be = km_backend.lookup(&bid);
    if (!be)
        return 1;
    c->backend_id = bid;
    c->port = ep->port;
    c->be = be;
    c->verdict = KM_V_TRANSLATED;
    return 1;
}

/* Fill the common part of a connect event and the socket record, then emit / store them. */
static __always_inline void km_record(void *ctx, __u64 netns, struct km_sock *s, __u8 verdict,
                                      int store)
{
    struct km_event ev = {};
    ev.ts_ns = s->connect_ns;
    ev.netns_cookie = netns;
    ev.sock_cookie = bpf_get_socket_cookie(ctx);
    __builtin_memcpy(ev.orig_addr, s->orig_addr, 16);
    __builtin_memcpy(ev.backend_addr, s->backend_addr, 16);
    ev.orig_port = s->orig_port;
    ev.backend_port = s->backend_port;
    ev.service_id = s->service_id;
    ev.backend_id = s->backend_id;
    ev.kind = KM_EV_CONNECT;
    ev.verdict = verdict;
    ev.family = s->family;
    if (store) {
        __u64 ck = ev.sock_cookie;
        km_sock.update(&ck, s);
    }
    km_emit(&ev);
}

#endif /* KM_LB_H */
