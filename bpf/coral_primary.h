/* SPDX-License-Identifier: GPL-2.0 */
/* The primary's paths (docs/design.md, "Packet paths in duplex", 2, 7, 8).
 *
 * The primary does the work and talks to the client directly, but in
 * duplex it never acknowledges a client byte the backup's kernel does not
 * hold: acknowledgement, window and SACK blocks are clamped to the backup's
 * reports, and a report that raises the clamp is sent to the client at once
 * as an ACK.
 */
#ifndef CORAL_PRIMARY_H
#define CORAL_PRIMARY_H

#include "coral_repl.h"

/* Client -> service on the primary (copies from the backup in duplex,
 * straight from the router when this host owns the VIP alone). */
static __always_inline enum coral_reason coral_primary_in(const struct coral_pkt *pkt,
							  const struct coral_service *svc)
{
	struct coral_conn_state *c;
	struct coral_conn_key key;

	coral_key_in(pkt, &key);
	c = bpf_map_lookup_elem(&coral_conns, &key);
	if (c && !(pkt->tcp->syn && !pkt->tcp->ack && c->client_isn != bpf_ntohl(pkt->tcp->seq))) {
		c->last_ns = bpf_ktime_get_ns();
		return CORAL_PASS_SERVICE;
	}
	/* A new connection, or a new one reusing a tracked 4-tuple (Linux
	 * accepts a SYN on a TIME_WAIT socket's tuple): start afresh. */
	if (pkt->tcp->syn && !pkt->tcp->ack && svc->state->mode == CORAL_MODE_DUPLEX) {
		struct coral_conn_state init = {
			.mode = CORAL_MODE_DUPLEX,
			.client_isn = bpf_ntohl(pkt->tcp->seq),
			.last_ns = bpf_ktime_get_ns(),
		};

		if (bpf_map_update_elem(&coral_conns, &key, &init, c ? BPF_EXIST : BPF_NOEXIST))
			return CORAL_DROP_CONN_TABLE_FULL;
	} else if (c) {
		bpf_map_delete_elem(&coral_conns, &key); /* alone: the new one is not replicated */
	}
	return CORAL_PASS_SERVICE;
}

/* The right edge of the window the client may be offered: never beyond
 * the backup's (nor the primary's own). */
static __always_inline __u32 coral_clamped_edge(const struct coral_conn_state *c)
{
	__u32 edge = c->primary_ack + c->primary_win;

	if (c->flags & CORAL_CONN_BACKUP_SEEN)
		edge = coral_seq_min(edge, c->backup_ack + c->backup_win);
	return edge;
}

/* The window to advertise with acknowledgement ACK (coral_clamped_edge). */
static __always_inline __u16 coral_clamped_win(const struct coral_conn_state *c, __u32 ack)
{
	__u32 edge = coral_clamped_edge(c);
	__u32 win;

	if (!coral_after(edge, ack))
		return 0;
	win = (edge - ack) >> c->rcv_wscale;
	return win > 0xffff ? 0xffff : win;
}

/* Did the window the client may be offered, up to right edge EDGE before a
 * report, at least double with it (Linux's own rule for sending a window
 * update: a closed or nearly closed window that opened)? */
static __always_inline bool coral_window_opened(const struct coral_conn_state *c, __u32 edge)
{
	__u32 before = coral_after(edge, c->acked_to_client) ? edge - c->acked_to_client : 0;
	__u32 now = coral_clamped_edge(c);

	if (!coral_after(now, c->acked_to_client))
		return false;
	now -= c->acked_to_client;
	return now > before && now / 2 >= before;
}

/* Does the backup hold every byte of SACK block B? */
static __always_inline bool coral_backup_holds(const struct coral_conn_state *c,
					       const struct coral_sack_block *b)
{
	int i;

	if (!coral_after(b->end, c->backup_ack))
		return true;
	for (i = 0; i < 3; i++) {
		const struct coral_sack_block *h = &c->backup_sack[i];

		if (h->start != h->end && !coral_after(h->start, b->start) &&
		    !coral_after(b->end, h->end))
			return true;
	}
	return false;
}

/* Is block 0 of OPTS a duplicate report (D-SACK, RFC 2883): below the
 * segment's own acknowledgement ACK, or inside block 1? */
static __always_inline bool coral_is_dsack(const struct coral_seg_opts *opts, __u32 ack)
{
	const struct coral_sack_block *b = &opts->sack[0];

	if (!coral_after(b->end, ack))
		return true;
	return opts->sack_n > 1 && !coral_after(opts->sack[1].start, b->start) &&
	       !coral_after(b->end, opts->sack[1].end);
}

/* The timestamp echo (TSecr) for an acknowledgement ACK to the client, when
 * the primary's own kernel echoes OWN. The client's Eifel check takes an
 * echo older than its retransmission as proof that the original arrived,
 * and undoes its loss recovery (RTO or fast retransmit alike). When the
 * backup's acknowledgement is the one sent, the original may have reached
 * the primary only; the backup's echo then says whether the retransmission
 * was needed, and the later of the two never claims an arrival the backup
 * did not see. */
static __always_inline __u32 coral_client_echo(const struct coral_conn_state *c, __u32 ack,
					       __u32 own)
{
	if (!(c->flags & CORAL_CONN_BACKUP_SEEN) || !c->backup_tsecr || ack != c->backup_ack)
		return own;
	return coral_after(c->backup_tsecr, own) ? c->backup_tsecr : own;
}

/* Rewrite the SACK option to keep only the blocks in HELD (bit i: block
 * i), blanking the rest with NOPs; with none held the whole option goes.
 * The client must not take a SACKed segment as safe when the backup lacks
 * it: it would never resend it, even after failover. */
__attribute__((noinline)) int coral_trim_sack(struct __sk_buff *skb, __u32 l4_off, __u32 tcp_hlen,
					     const struct coral_seg_opts *opts, __u32 held)
{
	/* A global function, verified once on its own: inlined into every
	 * caller, its loops exceed the verifier's budget. */
	__u8 old[64] = {}, new[64] = {};
	__u32 len = tcp_hlen - sizeof(struct tcphdr);
	__u32 off = l4_off + sizeof(struct tcphdr);
	__u32 start, stop;
	__u32 i, j, p, k = 0;
	__s64 diff;

	if (!opts)
		return -1;
	start = opts->sack_off;
	stop = start + opts->sack_len;
	if (len == 0 || len > TCP_OPTIONS_MAX || (len & 3) || stop > len)
		return -1;
	len = ((len - 4) & 0x3c) + 4; /* a no-op after the check: bounds the verifier sees */
	if (bpf_skb_load_bytes(skb, off, old, len))
		return -1;
	for (i = 0; i < TCP_OPTIONS_MAX; i++)
		new[i] = (i >= start && i < stop) ? TCPOPT_NOP : old[i];
	for (i = 0; i < 4; i++)
		k += (held >> i) & 1;
	if (k) {
		new[start & 63] = TCPOPT_SACK;
		new[(start + 1) & 63] = 2 + 8 * k;
		p = start + 2;
		for (i = 0; i < 4; i++) {
			if (!((held >> i) & 1))
				continue;
			for (j = 0; j < 4; j++) {
				new[(p + j) & 63] = opts->sack[i].start >> (24 - 8 * j);
				new[(p + 4 + j) & 63] = opts->sack[i].end >> (24 - 8 * j);
			}
			p += 8;
		}
	}
	diff = bpf_csum_diff((__be32 *)old, len, (__be32 *)new, len, 0);
	if (diff < 0)
		return -1;
	if (bpf_l4_csum_replace(skb, l4_off + CORAL_TCP_CSUM_OFF, 0, diff, 0))
		return -1;
	return bpf_skb_store_bytes(skb, off, new, len, 0);
}

/* Clamp a segment to the client: acknowledgement, window, timestamp echo,
 * SACK. */
static __always_inline int coral_primary_clamp(struct __sk_buff *skb, const struct coral_pkt *pkt,
					       struct coral_conn_state *c,
					       const struct coral_seg *seg)
{
	__u32 limit = c->flags & CORAL_CONN_BACKUP_SEEN ? c->backup_ack : c->client_isn + 1;
	__u32 ack = coral_after(seg->ack, limit) ? limit : seg->ack;
	__u16 win = coral_clamped_win(c, ack);
	__u32 echo;
	__u8 held = 0;
	int i;

	if (ack != seg->ack &&
	    coral_tcp_store_u32(skb, pkt->l4_off, CORAL_TCP_ACK_OFF, bpf_htonl(seg->ack),
				bpf_htonl(ack)))
		return -1;
	if (win < seg->win &&
	    coral_tcp_store_u16(skb, pkt->l4_off, CORAL_TCP_WIN_OFF, bpf_htons(seg->win),
				bpf_htons(win)))
		return -1;
	echo = coral_client_echo(c, ack, seg->opts.tsecr);
	if (seg->opts.has_ts && echo != seg->opts.tsecr &&
	    coral_tcp_store_u32(skb, pkt->l4_off, sizeof(struct tcphdr) + seg->opts.ts_off + 6,
				bpf_htonl(seg->opts.tsecr), bpf_htonl(echo)))
		return -1;
	for (i = 0; i < 4; i++) {
		if (i >= seg->opts.sack_n)
			break;
		/* The primary's duplicate report (D-SACK) says the client's
		 * retransmission was needless, which only the primary knows:
		 * the client would undo its recovery on it. Never passed. */
		if (i == 0 && coral_is_dsack(&seg->opts, seg->ack))
			continue;
		if (coral_backup_holds(c, &seg->opts.sack[i]))
			held |= 1 << i;
	}
	if (held != (1 << seg->opts.sack_n) - 1 &&
	    coral_trim_sack(skb, pkt->l4_off, pkt->tcp_hlen, &seg->opts, held))
		return -1;
	if (coral_after(ack, c->acked_to_client))
		c->acked_to_client = ack;
	return 0;
}

/* Service -> client on the primary: returns the tc action (it counts). */
static __always_inline int coral_primary_out(struct __sk_buff *skb, const struct coral_pkt *pkt,
					     const struct coral_service *svc)
{
	const struct coral_service_state *s = svc->state;
	struct coral_conn_state *c;
	struct coral_conn_key key;
	enum coral_reason close;
	struct coral_seg seg;
	__u32 end;
	__u8 mode;

	if (skb->mark == CORAL_MARK_CRAFTED) {
		skb->mark = 0;
		return coral_verdict(skb, CORAL_PASS_CRAFTED);
	}
	coral_key_out(pkt, &key);
	c = bpf_map_lookup_elem(&coral_conns, &key);
	if (!c)
		return coral_verdict(skb, CORAL_PASS_SERVICE);
	if (coral_read_seg(skb, pkt, &seg))
		return coral_verdict(skb, CORAL_DROP_REWRITE_FAILED);
	if (coral_mac_eq(seg.eth_dst, s->peer_mac))
		return coral_verdict(skb, CORAL_PASS_CRAFTED); /* our copy for the backup */
	c->last_ns = bpf_ktime_get_ns();
	mode = coral_conn_mode(s, c);
	__builtin_memcpy(c->client_mac, seg.eth_dst, ETH_ALEN);

	if (seg.syn) {
		c->primary_isn = seg.seq;
		c->primary_snd_nxt = seg.seq + 1;
		c->primary_ack = seg.ack;
		c->primary_win = seg.win; /* never scaled on a SYN */
		c->acked_to_client = seg.ack;
		c->rcv_wscale = coral_synack_wscale(skb, pkt);
		if (mode == CORAL_MODE_DUPLEX && coral_copy_to_peer(skb, s, &seg))
			return coral_verdict(skb, CORAL_DROP_COPY_FAILED);
		return coral_verdict(skb, CORAL_PASS_SERVICE);
	}
	close = coral_close_policy(skb, pkt, &key, &seg);
	if (coral_reason_is_drop(close))
		return coral_verdict(skb, close);
	end = seg.end - (close == CORAL_PASS_FIN_STRIPPED); /* the FIN did not leave */
	if (coral_after(end, c->primary_snd_nxt))
		c->primary_snd_nxt = end;
	if (seg.has_ack) {
		c->primary_ack = seg.ack;
		c->primary_win = (__u32)seg.win << c->rcv_wscale;
	}
	/* The highest timestamps, not the last: two CPUs' segments reach this
	 * program in any order, and a raised ACK with an older TSval than one
	 * the client already has is dropped by its PAWS check. */
	if (seg.opts.has_ts && (!c->primary_tsval || !coral_after(c->primary_tsval, seg.opts.tsval))) {
		c->primary_tsval = seg.opts.tsval;
		c->primary_tsecr = seg.opts.tsecr;
	}
	if (mode != CORAL_MODE_DUPLEX)
		return coral_verdict(skb, close == CORAL_CONTINUE ? CORAL_PASS_SERVICE : close);
	if (seg.has_ack && coral_primary_clamp(skb, pkt, c, &seg))
		return coral_verdict(skb, CORAL_DROP_REWRITE_FAILED);
	return coral_verdict(skb, close == CORAL_CONTINUE ? CORAL_PASS_CLAMPED : close);
}

/* A report from the backup (its own segment, suppressed and redirected to
 * us): take its acknowledgement, window and SACK blocks; if the clamp rose
 * above what the client was last told, or the window the backup limits
 * opened (its application read: a window update), turn the report into
 * that ACK and send it to the client now; a client facing a closed window
 * would otherwise learn of the opening only from its next zero-window
 * probe, whose timer backs off to seconds. Returns the tc action (it
 * counts). */
static __always_inline int coral_primary_report(struct __sk_buff *skb, const struct coral_pkt *pkt,
						const struct coral_service *svc)
{
	const struct coral_service_state *s = svc->state;
	struct coral_ack_spec spec = {};
	struct coral_conn_state *c;
	struct coral_conn_key key;
	struct coral_seg seg;
	enum coral_reason sent;
	__u32 clamp, edge;
	bool seen;
	int i;

	coral_key_out(pkt, &key);
	c = bpf_map_lookup_elem(&coral_conns, &key);
	if (!c)
		return coral_verdict(skb, CORAL_DROP_PEER_STRAY);
	if (coral_read_seg(skb, pkt, &seg))
		return coral_verdict(skb, CORAL_DROP_REWRITE_FAILED);
	c->last_ns = bpf_ktime_get_ns();
	if (!seg.has_ack || seg.syn)
		return coral_verdict(skb, CORAL_DROP_REPORT_CONSUMED);
	/* The backup's echo only grows (its kernel's PAWS state): the
	 * highest is its latest, whatever order reports arrive in. */
	if (seg.opts.has_ts && (!c->backup_tsecr || coral_after(seg.opts.tsecr, c->backup_tsecr)))
		c->backup_tsecr = seg.opts.tsecr;
	/* The edge the client may have been offered (before its first report
	 * the backup limits nothing). */
	seen = c->flags & CORAL_CONN_BACKUP_SEEN;
	edge = coral_clamped_edge(c);
	/* A report older than the latest (reordered) changes nothing. */
	if (!(c->flags & CORAL_CONN_BACKUP_SEEN) || !coral_after(c->backup_ack, seg.ack)) {
		c->backup_ack = seg.ack;
		c->backup_win = (__u32)seg.win << c->rcv_wscale;
		c->flags |= CORAL_CONN_BACKUP_SEEN;
		for (i = 0; i < 3; i++) {
			if (i < seg.opts.sack_n) {
				c->backup_sack[i] = seg.opts.sack[i];
			} else {
				c->backup_sack[i].start = 0;
				c->backup_sack[i].end = 0;
			}
		}
	}

	clamp = coral_seq_min(c->primary_ack, c->backup_ack);
	if (coral_after(clamp, c->acked_to_client))
		sent = CORAL_PASS_RAISED_ACK;
	else if (seen && coral_window_opened(c, edge))
		sent = CORAL_PASS_WINDOW_OPENED;
	else
		sent = CORAL_DROP_REPORT_CONSUMED;
	if (coral_conn_mode(s, c) != CORAL_MODE_DUPLEX || sent == CORAL_DROP_REPORT_CONSUMED)
		return coral_verdict(skb, CORAL_DROP_REPORT_CONSUMED);
	if (sent == CORAL_PASS_WINDOW_OPENED)
		clamp = c->acked_to_client;

	spec.saddr = pkt->ip->saddr;
	spec.daddr = pkt->ip->daddr;
	spec.sport = pkt->tcp->source;
	spec.dport = pkt->tcp->dest;
	spec.seq = c->primary_snd_nxt;
	spec.ack = clamp;
	spec.win = coral_clamped_win(c, clamp);
	spec.has_ts = c->primary_tsval || c->primary_tsecr;
	spec.tsval = c->primary_tsval;
	spec.tsecr = coral_client_echo(c, clamp, c->primary_tsecr);
	if (coral_craft_ack(skb, &spec, c->client_mac, s->own_mac))
		return coral_verdict(skb, CORAL_DROP_REWRITE_FAILED);
	c->acked_to_client = clamp;
	skb->mark = CORAL_MARK_CRAFTED;
	coral_count(skb, sent);
	return bpf_redirect(skb->ifindex, 0);
}

#endif /* CORAL_PRIMARY_H */
