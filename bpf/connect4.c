/* cgroup/connect4: control connects (enrolment) and service translation for IPv4 TCP; the
 * decision (service, pod, waypoint) is km_translate() in include/km_lb.h, shared with connect6. */
#include "km_lb.h"

int connect4(struct bpf_sock_addr *ctx)
{
    if (ctx->protocol != KM_IPPROTO_TCP)
        return 1;
    /* volatile: keep every ctx load 4 bytes wide (clang may merge or narrow them, which the
     * verifier rejects for sock_addr contexts) */
    volatile __u32 dst = ctx->user_ip4;
    volatile __u32 uport = ctx->user_port;
    __u16 dport = (__u16)uport;
    __u64 netns = bpf_get_netns_cookie(ctx);

    if (dst == KM_HTONL(2)) { /* 0.0.0.2: control address */
        int r = km_control(netns, dport);
        if (r == KM_CTL_FULL) {
            /* EPERM tells the caller it was recorded. With the map full, send the connect to
             * 127.0.0.1:9 instead: refused inside the netns, so nothing leaves and the caller
             * sees another errno. */
            ctx->user_ip4 = KM_HTONL(0x7f000001);
            ctx->user_port = (__u32)KM_HTONS(9);
        }
        return r == KM_CTL_TAKEN ? 0 : 1;
    }
    if (!km_manage.lookup(&netns))
        return 1; /* unmanaged netns: fail open, untouched */

    struct km_fe_key key = {};
    key.addr[0] = dst;
    key.port = dport;
    key.family = KM_AF_INET;
    struct km_sock s = {};
    s.orig_addr[0] = dst;
    s.orig_port = dport;
    s.backend_addr[0] = dst;
    s.backend_port = dport;
    s.family = KM_AF_INET;
    __u8 verdict = km_translate(&key, &s, 0);
    if (!verdict) {
        km_record(ctx, netns, &s, KM_V_PASSTHROUGH, 0);
        return 1;
    }
    if (s.flags & KM_SK_TRANSLATED) {
        __u32 ip = s.backend_addr[0];
        ctx->user_ip4 = ip;
        ctx->user_port = (__u32)s.backend_port;
    }
    /* a waypoint without a pod: refuse at once (EPERM), never bypass it */
    int refuse = verdict == KM_V_NO_WAYPOINT_EP;
    km_record(ctx, netns, &s, verdict, !refuse);
    return refuse ? 0 : 1;
}
