/* SPDX-License-Identifier: GPL-2.0 */
/* The backup's paths (docs/design.md, "Packet paths in duplex", 1-6).
 *
 * The backup owns the VIP: every client packet reaches it first. In duplex
 * it copies each one to the primary, keeps its own kernel's connection in
 * step (adoption, acknowledgements clamped to what it has sent, fake ACKs),
 * and turns its own segments into reports for the primary instead of
 * sending them to the client.
 */
#ifndef CORAL_BACKUP_H
#define CORAL_BACKUP_H

#include "coral_adopt.h"

/* A new connection's SYN in duplex: reserve its place in coral_conns (when
 * the table is full the backup serves the connection alone), record the
 * SYN's options, copy it to the primary and hold it back. */
static __always_inline enum coral_reason coral_backup_syn(struct __sk_buff *skb,
							  struct coral_pkt *pkt,
							  const struct coral_service *svc,
							  const struct coral_conn_key *key,
							  const struct coral_seg *seg,
							  const struct coral_conn_state *c)
{
	/* A retransmitted SYN keeps its entry; a new connection reusing a
	 * tracked 4-tuple (after TIME_WAIT) starts afresh. */
	if (!c || c->client_isn != seg->seq) {
		struct coral_conn_state init = {
			.mode = CORAL_MODE_DUPLEX,
			.client_isn = seg->seq,
			.last_ns = bpf_ktime_get_ns(),
		};

		if (bpf_map_update_elem(&coral_conns, key, &init, c ? BPF_EXIST : BPF_NOEXIST))
			return CORAL_PASS_SIMPLEX_FULL;
	}
	coral_hold_syn(skb, pkt);
	if (coral_copy_to_peer(skb, svc->state, seg))
		return CORAL_DROP_COPY_FAILED;
	return CORAL_DROP_SYN_HELD;
}

/* A client packet of a connection this host does not hold. In duplex, unless
 * this stack has a socket for it (a connection it serves alone: the table
 * was full at its SYN), it is one the primary serves alone, opened before
 * this host rejoined the pair and took the VIP: forward it to the primary.
 * Otherwise (simplex, a SYN, a socket or a handshake here) this stack
 * handles it. The
 * frame is readdressed to the peer; coral_ingress sends it back out. */
static __always_inline enum coral_reason coral_backup_unknown(struct __sk_buff *skb,
							      const struct coral_pkt *pkt,
							      const struct coral_service *svc,
							      const struct coral_seg *seg)
{
	struct bpf_sock_tuple tuple = {};
	struct bpf_sock *sk;
	bool here;

	if (svc->state->mode != CORAL_MODE_DUPLEX || seg->syn)
		return CORAL_PASS_SERVICE;
	tuple.ipv4.saddr = pkt->ip->saddr;
	tuple.ipv4.daddr = pkt->ip->daddr;
	tuple.ipv4.sport = pkt->tcp->source;
	tuple.ipv4.dport = pkt->tcp->dest;
	/* skc: a handshake under way here (a request socket) or a TIME_WAIT
	 * counts as this stack's too, not only full sockets. */
	sk = bpf_skc_lookup_tcp(skb, &tuple, sizeof(tuple.ipv4), BPF_F_CURRENT_NETNS, 0);
	if (sk) {
		here = sk->state != BPF_TCP_LISTEN;
		bpf_sk_release(sk);
		if (here)
			return CORAL_PASS_SERVICE;
	}
	if (coral_store_macs(skb, svc->state->peer_mac, svc->state->own_mac))
		return CORAL_DROP_REWRITE_FAILED;
	return CORAL_PASS_FORWARDED; /* redirected by the caller */
}

/* Let the backup's kernel see at most the acknowledgement of what it has
 * sent: Linux discards a segment acknowledging unsent data, payload and
 * all. The client's real acknowledgement is kept for the fake ACK. */
static __always_inline int coral_backup_clamp_in(struct __sk_buff *skb, const struct coral_pkt *pkt,
						 struct coral_conn_state *c,
						 const struct coral_seg *seg)
{
	__u32 deliver = seg->ack;

	if (!seg->has_ack || !c->backup_snd_nxt)
		return 0;
	/* The latest acknowledgement and what came with it; a reordered older
	 * segment changes nothing. */
	if (!c->client_ack || !coral_after(c->client_ack, seg->ack)) {
		c->client_ack = seg->ack;
		c->client_win = seg->win;
		if (seg->opts.has_ts) {
			c->client_tsval = seg->opts.tsval;
			c->client_tsecr = seg->opts.tsecr;
		}
	}
	if (coral_after(deliver, c->backup_snd_nxt))
		deliver = c->backup_snd_nxt;
	if (!c->delivered_ack || coral_after(deliver, c->delivered_ack))
		c->delivered_ack = deliver;
	if (deliver == seg->ack)
		return 0;
	return coral_tcp_store_u32(skb, pkt->l4_off, CORAL_TCP_ACK_OFF, bpf_htonl(seg->ack),
				   bpf_htonl(deliver));
}

/* Client -> service on the backup. */
static __always_inline enum coral_reason coral_backup_in(struct __sk_buff *skb,
							 struct coral_pkt *pkt,
							 const struct coral_service *svc)
{
	struct coral_handshake *hs;
	struct coral_conn_state *c;
	struct coral_conn_key key;
	struct coral_seg seg;
	enum coral_reason r;
	__u8 mode;

	coral_key_in(pkt, &key);
	if (coral_read_seg(skb, pkt, &seg))
		return CORAL_DROP_REWRITE_FAILED;
	c = bpf_map_lookup_elem(&coral_conns, &key);
	if (seg.syn && !seg.has_ack) {
		if (svc->state->mode == CORAL_MODE_DUPLEX && (!c || c->mode == CORAL_MODE_DUPLEX))
			return coral_backup_syn(skb, pkt, svc, &key, &seg, c);
		/* Alone now: this host's stack answers the SYN itself, which
		 * voids any replicated handshake half done for the 4-tuple. */
		bpf_map_delete_elem(&coral_handshakes, &key);
		bpf_map_delete_elem(&coral_conns, &key);
		return CORAL_PASS_SERVICE;
	}
	if (!c)
		return coral_backup_unknown(skb, pkt, svc, &seg);
	c->last_ns = bpf_ktime_get_ns();
	mode = coral_conn_mode(svc->state, c);
	hs = bpf_map_lookup_elem(&coral_handshakes, &key);
	if (mode == CORAL_MODE_DUPLEX) {
		/* Until the primary's SYN-ACK is known, nothing passes in either
		 * direction: the primary retransmits its SYN-ACK (and its copy),
		 * the client its segment. */
		if (hs && !hs->synack_ns)
			return CORAL_DROP_HANDSHAKE_PENDING;
		if (coral_copy_to_peer(skb, svc->state, &seg))
			return CORAL_DROP_COPY_FAILED;
		if (coral_parse_ipv4_tcp(skb, pkt) != CORAL_CONTINUE)
			return CORAL_DROP_REWRITE_FAILED;
	}
	/* Adopt also when alone: a primary that died between its SYN-ACK and
	 * the client's ACK leaves a client that believes it is connected. */
	if (hs && hs->synack_ns && !seg.rst) {
		r = coral_adopt(skb, pkt, c->client_isn);
		if (r != CORAL_CONTINUE)
			return r;
	}
	if (seg.rst)
		return CORAL_PASS_SERVICE;
	if (coral_backup_clamp_in(skb, pkt, c, &seg))
		return CORAL_DROP_REWRITE_FAILED;
	return mode == CORAL_MODE_DUPLEX ? CORAL_PASS_CLONED : CORAL_PASS_SERVICE;
}

/* The primary's SYN-ACK, copied to the backup: the handshake record and the
 * connection's sequence anchors. */
static __always_inline enum coral_reason coral_backup_synack(struct __sk_buff *skb,
							     const struct coral_pkt *pkt)
{
	struct coral_conn_state *c;
	struct coral_conn_key key;
	__u32 next = bpf_ntohl(pkt->tcp->seq) + 1;

	coral_key_out(pkt, &key);
	c = bpf_map_lookup_elem(&coral_conns, &key);
	if (c) {
		c->primary_isn = next - 1;
		c->backup_snd_nxt = next;
		c->delivered_ack = next;
		c->rcv_wscale = coral_synack_wscale(skb, pkt);
	}
	return coral_record_synack(skb, pkt);
}

/* A copy of the backup's own segment, looped back to its ingress by
 * coral_backup_out: rewrite it into the client's acknowledgement of what
 * the backup has now sent (CoRAL's fake ack) and deliver it. */
static __always_inline enum coral_reason coral_backup_fake_ack(struct __sk_buff *skb,
							       const struct coral_pkt *pkt,
							       const struct coral_service *svc)
{
	struct coral_ack_spec spec = {};
	struct coral_conn_state *c;
	struct coral_conn_key key;
	__u32 ack;

	coral_key_out(pkt, &key);
	c = bpf_map_lookup_elem(&coral_conns, &key);
	if (!c)
		return CORAL_DROP_PEER_STRAY;
	ack = coral_seq_min(c->client_ack, c->backup_snd_nxt);
	if (!coral_after(ack, c->delivered_ack))
		return CORAL_DROP_LOOP_STALE;
	spec.saddr = pkt->ip->daddr;
	spec.daddr = pkt->ip->saddr;
	spec.sport = pkt->tcp->dest;
	spec.dport = pkt->tcp->source;
	/* The backup's own acknowledgement is the client's next sequence
	 * number as the backup knows it. */
	spec.seq = bpf_ntohl(pkt->tcp->ack_seq);
	spec.ack = ack;
	spec.win = c->client_win;
	spec.has_ts = c->client_tsval || c->client_tsecr;
	spec.tsval = c->client_tsval;
	spec.tsecr = c->client_tsecr;
	if (coral_craft_ack(skb, &spec, svc->state->own_mac, svc->state->own_mac))
		return CORAL_DROP_REWRITE_FAILED;
	c->delivered_ack = ack;
	return CORAL_PASS_FAKE_ACK;
}

/* A reset the backup sends alone carries the client's latest acknowledgement
 * as its sequence number: the backup's own may lag what the client holds
 * (bytes the primary sent that the backup never wrote, or an acknowledgement
 * clamped on the way in), and the client accepts a reset only at the
 * sequence number it expects next (RFC 5961). */
static __always_inline int coral_backup_reset_seq(struct __sk_buff *skb,
						  const struct coral_pkt *pkt,
						  const struct coral_conn_state *c,
						  const struct coral_seg *seg)
{
	if (!seg->rst || !c->client_ack || !coral_after(c->client_ack, seg->seq))
		return 0;
	return coral_tcp_store_u32(skb, pkt->l4_off, CORAL_TCP_SEQ_OFF, bpf_htonl(seg->seq),
				   bpf_htonl(c->client_ack));
}

/* Service -> client on the backup: returns the tc action (it counts). */
static __always_inline int coral_backup_out(struct __sk_buff *skb, const struct coral_pkt *pkt,
					    const struct coral_service *svc)
{
	const struct coral_service_state *s = svc->state;
	struct coral_conn_state *c;
	struct coral_conn_key key;
	struct coral_seg seg;
	enum coral_reason r;
	bool lag;

	coral_key_out(pkt, &key);
	c = bpf_map_lookup_elem(&coral_conns, &key);
	if (!c)
		return coral_verdict(skb, CORAL_PASS_SERVICE);
	if (coral_read_seg(skb, pkt, &seg))
		return coral_verdict(skb, CORAL_DROP_REWRITE_FAILED);
	c->last_ns = bpf_ktime_get_ns();
	if (!c->backup_snd_nxt || coral_after(seg.end, c->backup_snd_nxt))
		c->backup_snd_nxt = seg.end;
	/* The client already acknowledged bytes the backup only now sent:
	 * loop a copy back to be turned into that acknowledgement. Source and
	 * destination MAC are both ours: the mark of a looped copy, and the
	 * stack takes it as addressed to this host. */
	lag = c->delivered_ack && coral_after(c->client_ack, c->delivered_ack) &&
	      coral_after(c->backup_snd_nxt, c->delivered_ack);
	if (lag && (coral_store_macs(skb, s->own_mac, s->own_mac) ||
		    bpf_clone_redirect(skb, skb->ifindex, BPF_F_INGRESS)))
		return coral_verdict(skb, CORAL_DROP_COPY_FAILED);

	if (coral_conn_mode(s, c) == CORAL_MODE_DUPLEX) {
		/* Never to the client: to the primary, as this host's report. */
		if (coral_store_macs(skb, s->peer_mac, s->own_mac))
			return coral_verdict(skb, CORAL_DROP_REWRITE_FAILED);
		return coral_verdict(skb, CORAL_PASS_BACKUP_REPORT);
	}
	if (lag && coral_store_macs(skb, seg.eth_dst, seg.eth_src))
		return coral_verdict(skb, CORAL_DROP_REWRITE_FAILED);
	r = coral_close_policy(skb, pkt, &key, &seg);
	if (r == CORAL_PASS_CLOSE && coral_backup_reset_seq(skb, pkt, c, &seg))
		return coral_verdict(skb, CORAL_DROP_REWRITE_FAILED);
	return coral_verdict(skb, r == CORAL_CONTINUE ? CORAL_PASS_SERVICE : r);
}

#endif /* CORAL_BACKUP_H */
