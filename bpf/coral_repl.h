/* SPDX-License-Identifier: GPL-2.0 */
/* Helpers shared by the backup's and the primary's replication paths:
 * sequence arithmetic, connection keys, the parsed view of a segment, the
 * effective mode of a connection, copies to the peer and the close policy.
 */
#ifndef CORAL_REPL_H
#define CORAL_REPL_H

#include "coral_classify.h"
#include "coral_craft.h"
#include "coral_csum.h"
#include "coral_verdict.h"

/* skb->mark of a frame the data plane crafted and sends out itself (a
 * raised ACK): the host's own egress passes it untouched. */
#define CORAL_MARK_CRAFTED 0xc0a1c0a1

/* Sequence space comparison (RFC 9293 modular arithmetic). */
static __always_inline bool coral_after(__u32 a, __u32 b)
{
	return (__s32)(a - b) > 0;
}

static __always_inline __u32 coral_seq_max(__u32 a, __u32 b)
{
	return coral_after(a, b) ? a : b;
}

static __always_inline __u32 coral_seq_min(__u32 a, __u32 b)
{
	return coral_after(a, b) ? b : a;
}

/* Key of the connection of a client -> service packet. */
static __always_inline void coral_key_in(const struct coral_pkt *pkt, struct coral_conn_key *k)
{
	k->client_ip = pkt->ip->saddr;
	k->vip = pkt->ip->daddr;
	k->client_port = pkt->tcp->source;
	k->vip_port = pkt->tcp->dest;
}

/* Key of the connection of a service -> client packet. */
static __always_inline void coral_key_out(const struct coral_pkt *pkt, struct coral_conn_key *k)
{
	k->client_ip = pkt->ip->daddr;
	k->vip = pkt->ip->saddr;
	k->client_port = pkt->tcp->dest;
	k->vip_port = pkt->tcp->source;
}

/* Everything the replication paths read from a segment, copied out of the
 * packet: helpers that rewrite or clone invalidate packet pointers. */
struct coral_seg {
	__u32 seq;
	__u32 ack;
	__u32 end;	/* seq + payload + SYN + FIN: the next sequence number */
	__u16 win;	/* raw window field */
	__u8 syn;
	__u8 has_ack;
	__u8 fin;
	__u8 rst;
	__u8 eth_dst[ETH_ALEN];
	__u8 eth_src[ETH_ALEN];
	struct coral_seg_opts opts;
};

static __always_inline int coral_read_seg(struct __sk_buff *skb, const struct coral_pkt *pkt,
					  struct coral_seg *seg)
{
	const struct tcphdr *t = pkt->tcp;

	seg->seq = bpf_ntohl(t->seq);
	seg->ack = bpf_ntohl(t->ack_seq);
	seg->win = bpf_ntohs(t->window);
	seg->syn = t->syn;
	seg->has_ack = t->ack;
	seg->fin = t->fin;
	seg->rst = t->rst;
	seg->end = seg->seq + pkt->payload_len + t->syn + t->fin;
	if (bpf_skb_load_bytes(skb, 0, seg->eth_dst, ETH_ALEN) ||
	    bpf_skb_load_bytes(skb, ETH_ALEN, seg->eth_src, ETH_ALEN))
		return -1;
	coral_parse_seg_opts(skb, pkt, &seg->opts);
	return 0;
}

static __always_inline bool coral_mac_eq(const __u8 *a, const __u8 *b)
{
	return a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3] && a[4] == b[4] &&
	       a[5] == b[5];
}

/* The mode a connection is handled in now: a connection opened in simplex
 * stays simplex; otherwise the service's mode decides. */
static __always_inline __u8 coral_conn_mode(const struct coral_service_state *s,
					    const struct coral_conn_state *c)
{
	return c->mode == CORAL_MODE_SIMPLEX ? CORAL_MODE_SIMPLEX : s->mode;
}

/* Send a copy of the frame to the peer host (destination MAC the peer's,
 * source MAC ours: the router's MAC must never appear on our switch port);
 * the frame itself continues unchanged. */
static __always_inline int coral_copy_to_peer(struct __sk_buff *skb,
					      const struct coral_service_state *s,
					      const struct coral_seg *seg)
{
	if (coral_store_macs(skb, s->peer_mac, s->own_mac))
		return -1;
	if (bpf_clone_redirect(skb, skb->ifindex, 0))
		return -1;
	return coral_store_macs(skb, seg->eth_dst, seg->eth_src);
}

/* What may leave for the client: FIN and RST only for a connection the
 * application marked closing (a crashed process falls silent instead of
 * resetting clients); the data of a segment with an unmarked FIN passes
 * without the flag. CORAL_CONTINUE: no FIN or RST, nothing to decide. */
static __always_inline enum coral_reason coral_close_policy(struct __sk_buff *skb,
							    const struct coral_pkt *pkt,
							    const struct coral_conn_key *key,
							    const struct coral_seg *seg)
{
	__be16 old, new;

	if (!seg->fin && !seg->rst)
		return CORAL_CONTINUE;
	if (bpf_map_lookup_elem(&coral_closing, key))
		return CORAL_PASS_CLOSE;
	if (seg->rst || pkt->payload_len == 0)
		return CORAL_DROP_UNMARKED_CLOSE;
	/* The 16 bits at offset 12: data offset, reserved bits, flags. */
	if (bpf_skb_load_bytes(skb, pkt->l4_off + 12, &old, sizeof(old)))
		return CORAL_DROP_REWRITE_FAILED;
	new = old & ~bpf_htons(0x0001); /* FIN */
	if (coral_tcp_store_u16(skb, pkt->l4_off, 12, old, new))
		return CORAL_DROP_REWRITE_FAILED;
	return CORAL_PASS_FIN_STRIPPED;
}

/* The window scale a SYN-ACK settles (the primary's, adopted by the
 * backup): its option if it has one (Linux offers it only when the client
 * did), else no scaling. */
static __always_inline __u8 coral_synack_wscale(struct __sk_buff *skb, const struct coral_pkt *pkt)
{
	struct coral_syn_opts o;

	coral_parse_syn_opts(skb, pkt, &o);
	if (!(o.flags & CORAL_SYN_WSCALE))
		return 0;
	return o.wscale > 14 ? 14 : o.wscale;
}

#endif /* CORAL_REPL_H */
