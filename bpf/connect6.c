/* cgroup/connect6: control connects ([::2]) and translation for IPv6 TCP, including
 * v4-mapped destinations (::ffff:a.b.c.d) of dual-stack sockets. */
#include "km_lb.h"

int connect6(struct bpf_sock_addr *ctx)
{
    if (ctx->protocol != KM_IPPROTO_TCP)
        return 1;
    /* volatile: keep every ctx load 4 bytes wide (clang may merge them into 8-byte loads) */
    volatile __u32 a0 = ctx->user_ip6[0];
    volatile __u32 a1 = ctx->user_ip6[1];
    volatile __u32 a2 = ctx->user_ip6[2];
    volatile __u32 a3 = ctx->user_ip6[3];
    volatile __u32 uport = ctx->user_port;
    __u16 dport = (__u16)uport;
    __u64 netns = bpf_get_netns_cookie(ctx);

    if (a0 == 0 && a1 == 0 && a2 == 0 && a3 == KM_HTONL(2)) { /* [::2]: control address */
        int r = km_control(netns, dport);
        if (r == KM_CTL_FULL) { /* refused on [::1]:9, see connect4 */
            ctx->user_ip6[0] = 0;
            ctx->user_ip6[1] = 0;
            ctx->user_ip6[2] = 0;
            ctx->user_ip6[3] = KM_HTONL(1);
            ctx->user_port = (__u32)KM_HTONS(9);
        }
        return r == KM_CTL_TAKEN ? 0 : 1;
    }
    if (!km_manage.lookup(&netns))
        return 1;

    int mapped = (a0 == 0 && a1 == 0 && a2 == KM_HTONL(0xffff));
    struct km_fe_key key = {};
    if (mapped) {
        key.addr[0] = a3;
        key.family = KM_AF_INET;
    } else {
        key.addr[0] = a0;
        key.addr[1] = a1;
        key.addr[2] = a2;
        key.addr[3] = a3;
        key.family = KM_AF_INET6;
    }
    key.port = dport;
    struct km_sock s = {};
    s.orig_addr[0] = a0;
    s.orig_addr[1] = a1;
    s.orig_addr[2] = a2;
    s.orig_addr[3] = a3;
    s.orig_port = dport;
    __builtin_memcpy(s.backend_addr, s.orig_addr, 16);
    s.backend_port = dport;
    s.family = KM_AF_INET6;
    __u8 verdict = km_translate(&key, &s, mapped);
    if (!verdict) {
        km_record(ctx, netns, &s, KM_V_PASSTHROUGH, 0);
        return 1;
    }
    if (s.flags & KM_SK_TRANSLATED) {
        __u32 b0 = s.backend_addr[0], b1 = s.backend_addr[1], b2 = s.backend_addr[2],
              b3 = s.backend_addr[3];
        ctx->user_ip6[0] = b0;
        ctx->user_ip6[1] = b1;
        ctx->user_ip6[2] = b2;
        ctx->user_ip6[3] = b3;
        ctx->user_port = (__u32)s.backend_port;
    }
    int refuse = verdict == KM_V_NO_WAYPOINT_EP; /* see connect4 */
    km_record(ctx, netns, &s, verdict, !refuse);
    return refuse ? 0 : 1;
}
