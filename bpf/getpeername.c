/* cgroup/getpeername4 and getpeername6: a translated socket reports the VIP:port the
 * application connected to, not the backend (km_sock: the record in the slot of the socket cookie). */
#include "km_maps.h"

int getpeername4(struct bpf_sock_addr *ctx)
{
    __u64 ck = bpf_get_socket_cookie(ctx);
    struct km_sock *s = km_sock_find(ck);
    if (!s || !(s->flags & KM_SK_TRANSLATED) || s->family != KM_AF_INET)
        return 1;
    __u32 ip = s->orig_addr[0];
    __u32 port = s->orig_port;
    ctx->user_ip4 = ip;
    ctx->user_port = port;
    return 1;
}

int getpeername6(struct bpf_sock_addr *ctx)
{
    __u64 ck = bpf_get_socket_cookie(ctx);
    struct km_sock *s = km_sock_find(ck);
    if (!s || !(s->flags & KM_SK_TRANSLATED) || s->family != KM_AF_INET6)
        return 1;
    __u32 a0 = s->orig_addr[0], a1 = s->orig_addr[1], a2 = s->orig_addr[2], a3 = s->orig_addr[3];
    __u32 port = s->orig_port;
    ctx->user_ip6[0] = a0;
    ctx->user_ip6[1] = a1;
    ctx->user_ip6[2] = a2;
    ctx->user_ip6[3] = a3;
    ctx->user_port = port;
    return 1;
}
