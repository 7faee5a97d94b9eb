/* tc ingress (tcx) on an enrolled pod's interface, inside its netns: L4 authorization.
 *
 * Only a TCP SYN (no ACK) to an address of a local workload is judged. A refused SYN is turned
 * into a RST|ACK answering it (MACs, addresses and ports swapped, ack = seq + 1) and sent back
 * out of the same interface, so the client's connect() fails with ECONNREFUSED at once and the
 * pod's stack never sees the SYN. Everything else passes untouched (fail open). See
 * bpf/README.md "Authorization" for the reasoning and the limits.
 */
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/tcp.h>
#include <uapi/linux/pkt_cls.h>
#include "km_maps.h"
#include "km_authz.h"

#define KM_AZ_CHUNK 32

struct km_az_ctx {
    __u32 ruleset;
    __u32 count;
    __u32 ident;
    __u32 dport;
    __u32 saddr[4];
    __u32 daddr[4];
    /* evaluation state */
    __u8 clause;      /* OR of the matches of the current clause */
    __u8 rule;        /* AND of the clauses of the current rule */
    __u8 policy;      /* OR of the rules of the current policy */
    __u8 deny;        /* an enforced DENY matched */
    __u8 have_allow;  /* an enforced ALLOW applies */
    __u8 allowed;     /* an enforced ALLOW matched */
    __u8 s_deny;      /* the same three counting dry-run policies as enforced */
    __u8 s_have_allow;
    __u8 s_allowed;
    __u8 pad[3];
    __u32 deny_policy;
    __u32 s_deny_policy;
    __u32 next;     /* first entry index the next walk step looks at */
    __u32 workload;
    __u32 l4_off;
    __u32 v6;
};

/* The evaluation state lives in a map value, not on the stack: the verifier then sees unknown
 * scalars instead of constant flag combinations, and the bounded loop stays verifiable. */
BPF_TABLE_PINNED("percpu_array", __u32, struct km_az_ctx, km_authz_scratch, 1, KM_PIN_DIR "/authz_scratch");
/* slot 0: authz_walk. The walk is split into tail calls of KM_AZ_CHUNK entries each, so every
 * program stays well inside the verifier's budget while a ruleset can hold up to
 * KM_AUTHZ_MAX_ENTRIES entries. Pinned with the generation, so an old entry program and a new
 * walk program (during a daemon restart) share the scratch state and the tables. */
BPF_TABLE_PINNED("prog", __u32, __u32, km_authz_jmp, 1, KM_PIN_DIR "/authz_jmp");

static __always_inline int km_az_in_ipset(__u32 set_id, __u32 *addr)
{
    struct km_authz_lpm_key k = {};
    k.prefixlen = 160;
    k.set_id = set_id;
    k.addr[0] = addr[0];
    k.addr[1] = addr[1];
    k.addr[2] = addr[2];
    k.addr[3] = addr[3];
    return km_authz_ipset.lookup(&k) != 0;
}

static __always_inline int km_az_in_ports(__u32 set_id, __u32 port)
{
    struct km_authz_port_key k = {};
    k.set_id = set_id;
    k.port = port;
    return km_authz_port.lookup(&k) != 0;
}

static __always_inline int km_az_in_ids(__u32 set_id, __u32 ident)
{
    struct km_authz_bits_key k = {};
    k.set_id = set_id;
    k.word = ident >> 6;
    __u64 *w = km_authz_bits.lookup(&k);
    if (!w)
        return 0;
    return (*w >> (ident & 63)) & 1;
}

static __always_inline int km_az_match(struct km_authz_entry *e, struct km_az_ctx *c)
{
    if (e->flags & KM_AZ_FALSE)
        return 0;
    if (e->port_set && !km_az_in_ports(e->port_set, c->dport))
        return 0;
    if (e->nport_set && km_az_in_ports(e->nport_set, c->dport))
        return 0;
    if (e->id_set && !km_az_in_ids(e->id_set, c->ident))
        return 0;
    if (e->src_set && !km_az_in_ipset(e->src_set, c->saddr))
        return 0;
    if (e->nsrc_set && km_az_in_ipset(e->nsrc_set, c->saddr))
        return 0;
    if (e->dst_set && !km_az_in_ipset(e->dst_set, c->daddr))
        return 0;
    if (e->ndst_set && km_az_in_ipset(e->ndst_set, c->daddr))
        return 0;
    return 1;
}

/* Loop body: one entry of the ruleset (see km_authz.h for the structure). bcc cannot relocate
 * a bpf_loop callback, so this is an unrolled-by-the-verifier bounded loop instead. */
static __always_inline long km_az_step(__u32 idx, struct km_az_ctx *c)
{
    struct km_authz_entry_key k = {};
    k.ruleset = c->ruleset;
    k.idx = idx;
    struct km_authz_entry *e = km_authz_entry.lookup(&k);
    if (!e)
        return 1; /* a hole: stop (never happens with a complete epoch) */
    /* short cut: a clause already true, or a rule already false, needs no more matching */
    if (!c->clause && c->rule && km_az_match(e, c))
        c->clause = 1;
    __u8 f = e->flags;
    if (f & KM_AZ_END_CLAUSE) {
        c->rule = c->rule && c->clause;
        c->clause = 0;
    }
    if (f & KM_AZ_END_RULE) {
        c->policy = c->policy || c->rule;
        c->rule = 1;
    }
    if (f & KM_AZ_END_POLICY) {
        if (e->action == KM_AZ_DENY) {
            if (c->policy && !e->dry_run && !c->deny) {
                c->deny = 1;
                c->deny_policy = e->policy_id;
            }
            if (c->policy && !c->s_deny) {
                c->s_deny = 1;
                c->s_deny_policy = e->policy_id;
            }
        } else {
            if (!e->dry_run) {
                c->have_allow = 1;
                c->allowed |= c->policy;
            }
            c->s_have_allow = 1;
            c->s_allowed |= c->policy;
        }
        c->policy = 0;
        /* DENY policies come first (the compiler orders them so): once an enforced ALLOW has
         * matched, or an enforced and a counted DENY have, nothing later changes the outcome */
        if (c->allowed || (c->deny && c->s_deny))
            return 1;
    }
    return 0;
}

static __always_inline void km_az_record(struct km_az_ctx *c, __u32 workload, __u32 policy, __u8 kind)
{
    struct km_authz_log_key k = {};
    k.policy_id = policy;
    k.workload = workload;
    k.saddr[0] = c->saddr[0];
    k.saddr[1] = c->saddr[1];
    k.saddr[2] = c->saddr[2];
    k.saddr[3] = c->saddr[3];
    k.daddr[0] = c->daddr[0];
    k.daddr[1] = c->daddr[1];
    k.daddr[2] = c->daddr[2];
    k.daddr[3] = c->daddr[3];
    k.dport = (__u16)c->dport;
    k.kind = kind;
    __u64 now = bpf_ktime_get_ns();
    struct km_authz_log_val *v = km_authz_log.lookup(&k);
    if (v) {
        __sync_fetch_and_add(&v->count, 1);
        v->last_ns = now;
        return;
    }
    struct km_authz_log_val nv = {};
    nv.count = 1;
    nv.last_ns = now;
    km_authz_log.update(&k, &nv);
}

/* Answer the SYN at l3_off / l4_off with a RST|ACK out of the interface it came in on. */
static __always_inline int km_az_reset(struct __sk_buff *skb, __u32 l4_off, int v6)
{
    void *data = (void *)(long)skb->data;
    void *data_end = (void *)(long)skb->data_end;
    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > data_end)
        return TC_ACT_OK;
    struct tcphdr *th = data + l4_off;
    if ((void *)(th + 1) > data_end)
        return TC_ACT_OK;

    __u8 mac[ETH_ALEN * 2];
    __builtin_memcpy(mac, eth->h_source, ETH_ALEN);
    __builtin_memcpy(mac + ETH_ALEN, eth->h_dest, ETH_ALEN);
    __u32 old_seq = th->seq;
    __u32 old_ack = th->ack_seq;
    __u32 old_word = *((__u32 *)th + 3); /* doff|flags|window */
    __u16 ports[2] = {th->dest, th->source};
    __u32 new_ack = bpf_htonl(bpf_ntohl(old_seq) + 1);
    __u32 new_seq = 0;
    /* keep doff and the reserved bits, flags = RST|ACK, window 0 */
    __u8 w[4];
    __builtin_memcpy(w, &old_word, 4);
    w[1] = 0x14; /* ACK (0x10) | RST (0x04) */
    w[2] = 0;
    w[3] = 0;
    __u32 new_word;
    __builtin_memcpy(&new_word, w, 4);

    __u32 addrs[8];
    __u32 l3_off = sizeof(struct ethhdr);
    __u32 a_off, a_len;
    if (v6) {
        a_off = l3_off + offsetof(struct ipv6hdr, saddr);
        a_len = 32;
    } else {
        a_off = l3_off + offsetof(struct iphdr, saddr);
        a_len = 8;
    }
    if (bpf_skb_load_bytes(skb, a_off, addrs, a_len) < 0)
        return TC_ACT_OK;
    __u32 swapped[8];
    if (v6) {
        swapped[0] = addrs[4]; swapped[1] = addrs[5]; swapped[2] = addrs[6]; swapped[3] = addrs[7];
        swapped[4] = addrs[0]; swapped[5] = addrs[1]; swapped[6] = addrs[2]; swapped[7] = addrs[3];
    } else {
        swapped[0] = addrs[1];
        swapped[1] = addrs[0];
    }
    __u32 csum_off = l4_off + offsetof(struct tcphdr, check);
    /* swapping addresses and ports leaves every checksum as it is; seq, ack and the flags word
     * are fixed up (the helper does nothing for CHECKSUM_PARTIAL, where the stack sums later) */
    bpf_l4_csum_replace(skb, csum_off, old_seq, new_seq, 4);
    bpf_l4_csum_replace(skb, csum_off, old_ack, new_ack, 4);
    bpf_l4_csum_replace(skb, csum_off, old_word, new_word, 4);
    bpf_skb_store_bytes(skb, 0, mac, sizeof(mac), 0);
    bpf_skb_store_bytes(skb, a_off, swapped, a_len, 0);
    bpf_skb_store_bytes(skb, l4_off, ports, 4, 0);
    bpf_skb_store_bytes(skb, l4_off + 4, &new_seq, 4, 0);
    bpf_skb_store_bytes(skb, l4_off + 8, &new_ack, 4, 0);
    bpf_skb_store_bytes(skb, l4_off + 12, &new_word, 4, 0);
    return bpf_redirect(skb->ifindex, 0);
}

int authz(struct __sk_buff *skb)
{
    void *data = (void *)(long)skb->data;
    void *data_end = (void *)(long)skb->data_end;
    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > data_end)
        return TC_ACT_OK;

    /* parse into locals first: every packet of an established connection leaves at the
     * SYN test, touching no map */
    __u32 saddr[4] = {}, daddr[4] = {};
    __u32 l4_off;
    int v6 = 0;
    if (eth->h_proto == bpf_htons(ETH_P_IP)) {
        struct iphdr *ip = (void *)(eth + 1);
        if ((void *)(ip + 1) > data_end)
            return TC_ACT_OK;
        if (ip->protocol != KM_IPPROTO_TCP || ip->ihl < 5)
            return TC_ACT_OK;
        if (ip->frag_off & bpf_htons(0x3fff))
            return TC_ACT_OK; /* fragments: not a plain SYN */
        l4_off = sizeof(struct ethhdr) + ip->ihl * 4;
        saddr[2] = bpf_htonl(0xffff);
        saddr[3] = ip->saddr;
        daddr[2] = bpf_htonl(0xffff);
        daddr[3] = ip->daddr;
    } else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
        struct ipv6hdr *ip6 = (void *)(eth + 1);
        if ((void *)(ip6 + 1) > data_end)
            return TC_ACT_OK;
        if (ip6->nexthdr != KM_IPPROTO_TCP)
            return TC_ACT_OK;
        l4_off = sizeof(struct ethhdr) + sizeof(struct ipv6hdr);
        __builtin_memcpy(saddr, &ip6->saddr, 16);
        __builtin_memcpy(daddr, &ip6->daddr, 16);
        v6 = 1;
    } else {
        return TC_ACT_OK;
    }
    if (l4_off > 80)
        return TC_ACT_OK;
    struct tcphdr *th = data + l4_off;
    if ((void *)(th + 1) > data_end)
        return TC_ACT_OK;
    if (!th->syn || th->ack || th->rst)
        return TC_ACT_OK; /* only connection attempts are judged */
    __u32 dport = bpf_ntohs(th->dest);

    __u32 zero = 0;
    struct km_authz_cfg *cfg = km_authz_cfg.lookup(&zero);
    if (!cfg || cfg->disabled)
        return TC_ACT_OK;
    struct km_authz_addr_key ak = {};
    ak.epoch = cfg->epoch;
    __builtin_memcpy(ak.addr, daddr, 16);
    struct km_authz_dst *dst = km_authz_dst.lookup(&ak);
    if (!dst || !dst->count)
        return TC_ACT_OK; /* not a local workload's address, or no policy applies */
    __builtin_memcpy(ak.addr, saddr, 16);
    __u32 *ident = km_authz_ident.lookup(&ak);
    __u32 id = ident ? *ident : 0;
    if (id == KM_AUTHZ_ID_NODE)
        return TC_ACT_OK; /* the node (kubelet probes) */

    struct km_az_ctx *cp = km_authz_scratch.lookup(&zero);
    if (!cp)
        return TC_ACT_OK;
    __builtin_memset(cp, 0, sizeof(*cp));
    __builtin_memcpy(cp->saddr, saddr, 16);
    __builtin_memcpy(cp->daddr, daddr, 16);
    cp->dport = dport;
    cp->ident = id;
    cp->ruleset = dst->ruleset;
    cp->count = dst->count;
    cp->workload = dst->workload;
    cp->l4_off = l4_off;
    cp->v6 = v6;
    cp->rule = 1;
    cp->next = 0;
    km_authz_jmp.call(skb, 0);
    return TC_ACT_OK; /* no walk program: fail open */
}

static __always_inline int km_az_finish(struct __sk_buff *skb, struct km_az_ctx *cp)
{
    __u32 workload = cp->workload;
    int refuse = cp->deny || (cp->have_allow && !cp->allowed);
    int s_refuse = cp->s_deny || (cp->s_have_allow && !cp->s_allowed);
    if (!refuse) {
        if (s_refuse)
            km_az_record(cp, workload, cp->s_deny ? cp->s_deny_policy : 0,
                         cp->s_deny ? KM_AZ_REC_DRY_DENY : KM_AZ_REC_DRY_NO_ALLOW);
        return TC_ACT_OK;
    }
    km_az_record(cp, workload, cp->deny ? cp->deny_policy : 0, cp->deny ? KM_AZ_REC_DENY : KM_AZ_REC_NO_ALLOW);
    return km_az_reset(skb, cp->l4_off & 0xff, cp->v6);
}

int authz_walk(struct __sk_buff *skb)
{
    __u32 zero = 0;
    struct km_az_ctx *cp = km_authz_scratch.lookup(&zero);
    if (!cp)
        return TC_ACT_OK;
    __u32 base = cp->next;
    /* the ruleset ends at its first missing index (an epoch is cleared before it is written) */
    for (__u32 j = 0; j < KM_AZ_CHUNK; j++) {
        if (km_az_step(base + j, cp))
            return km_az_finish(skb, cp);
    }
    cp->next = base + KM_AZ_CHUNK;
    if (cp->next < KM_AUTHZ_MAX_ENTRIES)
        km_authz_jmp.call(skb, 0);
    return km_az_finish(skb, cp); /* the compiler refuses longer rulesets; never reached */
}
