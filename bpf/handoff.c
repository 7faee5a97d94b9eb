/* sk_msg on km_wpsock: the waypoint hand-off header, written once in front of the first byte
 * a via-waypoint socket sends, so the waypoint learns the original destination (the kernel
 * rewrote the connect to the waypoint pod). Two encodings, per waypoint pod (km_handoff.mode):
 *   KM_HO_TLV    Kmesh's TLV: 0x01, be32 length 6|18, address + port (network order),
 *                end marker 0xfe + be32 0                              (16 / 28 bytes)
 *   KM_HO_PROXY  PROXY protocol v2: signature, PROXY command, TCP over IPv4/IPv6,
 *                source = this socket's address, destination = the original VIP:port
 *                                                                      (28 / 52 bytes)
 * A v4-mapped destination of a dual-stack socket is encoded as IPv4. */
#include "km_lb.h"

#define KM_TLV_V4 16
#define KM_TLV_V6 28
#define KM_PP_V4 28
#define KM_PP_V6 52

static __always_inline void km_put32(__u8 *p, __u32 be)
{
    __builtin_memcpy(p, &be, 4);
}

/* PROXY v2 signature, version/command 0x21, family byte, be16 address-block length */
static __always_inline void km_pp_head(__u8 *d, __u8 fam, __u8 alen)
{
    d[0] = 0x0d; d[1] = 0x0a; d[2] = 0x0d; d[3] = 0x0a; d[4] = 0x00; d[5] = 0x0d;
    d[6] = 0x0a; d[7] = 0x51; d[8] = 0x55; d[9] = 0x49; d[10] = 0x54; d[11] = 0x0a;
    d[12] = 0x21;
    d[13] = fam;
    d[14] = 0;
    d[15] = alen;
}

static __always_inline void km_tlv_tail(__u8 *d)
{
    d[0] = 0xfe;
    d[1] = 0;
    d[2] = 0;
    d[3] = 0;
    d[4] = 0;
}

int handoff(struct sk_msg_md *msg)
{
    struct bpf_sock *sk = msg->sk;
    if (!sk)
        return SK_PASS;
    struct km_handoff *s = km_handoff.sk_storage_get(sk, 0, 0);
    if (!s || s->done)
        return SK_PASS;
    int v4 = s->family == KM_AF_INET ||
             (s->orig_addr[0] == 0 && s->orig_addr[1] == 0 && s->orig_addr[2] == KM_HTONL(0xffff));
    int proxy = s->mode == KM_HO_PROXY;
    __u32 len = proxy ? (v4 ? KM_PP_V4 : KM_PP_V6) : (v4 ? KM_TLV_V4 : KM_TLV_V6);
    /* no header means the waypoint would misread the stream: fail this send instead */
    if (bpf_msg_push_data(msg, 0, len, 0))
        return SK_DROP;
    if (bpf_msg_pull_data(msg, 0, len, 0))
        return SK_DROP;
    __u8 *d = msg->data;
    __u8 *end = msg->data_end;
    __u16 dport = s->orig_port;
    if (proxy) {
        volatile __u32 sport_h = msg->local_port; /* host order */
        __u16 sport = KM_HTONS((__u16)sport_h);
        if (v4) {
            if (d + KM_PP_V4 > end)
                return SK_DROP;
            volatile __u32 src;
            if (s->family == KM_AF_INET)
                src = msg->local_ip4;
            else
                src = msg->local_ip6[3];
            km_pp_head(d, 0x11, 12);
            km_put32(d + 16, src);
            km_put32(d + 20, v4 && s->family == KM_AF_INET ? s->orig_addr[0] : s->orig_addr[3]);
            __builtin_memcpy(d + 24, &sport, 2);
            __builtin_memcpy(d + 26, &dport, 2);
        } else {
            if (d + KM_PP_V6 > end)
                return SK_DROP;
            volatile __u32 l0 = msg->local_ip6[0];
            volatile __u32 l1 = msg->local_ip6[1];
            volatile __u32 l2 = msg->local_ip6[2];
            volatile __u32 l3 = msg->local_ip6[3];
            km_pp_head(d, 0x21, 36);
            km_put32(d + 16, l0);
            km_put32(d + 20, l1);
            km_put32(d + 24, l2);
            km_put32(d + 28, l3);
            km_put32(d + 32, s->orig_addr[0]);
            km_put32(d + 36, s->orig_addr[1]);
            km_put32(d + 40, s->orig_addr[2]);
            km_put32(d + 44, s->orig_addr[3]);
            __builtin_memcpy(d + 48, &sport, 2);
            __builtin_memcpy(d + 50, &dport, 2);
        }
    } else if (v4) {
        if (d + KM_TLV_V4 > end)
            return SK_DROP;
        d[0] = 0x01;
        km_put32(d + 1, KM_HTONL(6));
        km_put32(d + 5, s->family == KM_AF_INET ? s->orig_addr[0] : s->orig_addr[3]);
        __builtin_memcpy(d + 9, &dport, 2);
        km_tlv_tail(d + 11);
    } else {
        if (d + KM_TLV_V6 > end)
            return SK_DROP;
        d[0] = 0x01;
        km_put32(d + 1, KM_HTONL(18));
        km_put32(d + 5, s->orig_addr[0]);
        km_put32(d + 9, s->orig_addr[1]);
        km_put32(d + 13, s->orig_addr[2]);
        km_put32(d + 17, s->orig_addr[3]);
        __builtin_memcpy(d + 21, &dport, 2);
        km_tlv_tail(d + 23);
    }
    s->done = 1;
    return SK_PASS;
}
