/* SPDX-License-Identifier: GPL-2.0 */
/* The backup's side of the handshake, by adoption (kernels >= 6.9).
 *
 * One sequence space for both hosts without per-packet translation: the
 * backup never lets its own stack answer a client's SYN. It holds the SYN
 * back (recording its options), records the primary's SYN-ACK when a copy
 * reaches it, and on the client's ACK asks its kernel to create the
 * connection from those attributes (bpf_sk_assign_tcp_reqsk): the new socket
 * takes ISN = ack - 1, i.e. the primary's, and timestamps continuing the
 * primary's clock.
 *
 * Included only by objects built for kernels with the kfunc: libbpf 1.1 has
 * no bpf_ksym_exists(), so an object referencing it does not load at all on
 * a kernel without it (coral_tc is the object for those; kmod/ gives them
 * the same adoption).
 */
#ifndef CORAL_ADOPT_H
#define CORAL_ADOPT_H

#include "coral_repl.h"

extern int bpf_sk_assign_tcp_reqsk(struct __sk_buff *skb, struct sock *sk,
				   struct bpf_tcp_req_attrs *attrs, int attrs__sz) __ksym;

#define TCP_MAX_WSCALE 14

/* The client's SYN: record its options, hold it back. A retransmitted SYN
 * starts the record afresh (the primary answers it with the same ISN, and
 * the SYN-ACK copy is recorded again). */
static __always_inline enum coral_reason coral_hold_syn(struct __sk_buff *skb,
							const struct coral_pkt *pkt)
{
	struct coral_conn_key key;
	struct coral_handshake hs = {};

	coral_key_in(pkt, &key);
	coral_parse_syn_opts(skb, pkt, &hs.client);
	bpf_map_update_elem(&coral_handshakes, &key, &hs, BPF_ANY);
	return CORAL_DROP_SYN_HELD;
}

/* The primary's SYN-ACK, seen by the backup: complete the record. Written
 * as a whole element, so a concurrent ACK sees the old or the new record,
 * never half of one. A SYN-ACK for a SYN the backup never held is dropped
 * without a record: adoption needs the client's options. */
static __always_inline enum coral_reason coral_record_synack(struct __sk_buff *skb,
							     const struct coral_pkt *pkt)
{
	struct coral_conn_key key;
	struct coral_handshake *old;
	struct coral_handshake hs;

	coral_key_out(pkt, &key);
	old = bpf_map_lookup_elem(&coral_handshakes, &key);

	if (!old)
		return CORAL_DROP_SYNACK_COPY;
	hs = *old;
	hs.primary_isn = bpf_ntohl(pkt->tcp->seq);
	coral_parse_syn_opts(skb, pkt, &hs.primary);
	hs.synack_ns = bpf_ktime_get_ns();
	bpf_map_update_elem(&coral_handshakes, &key, &hs, BPF_EXIST);
	return CORAL_DROP_SYNACK_COPY;
}

/* The attributes of the primary's negotiated connection, as this host's
 * kernel must recreate it. */
static __always_inline void coral_req_attrs(const struct coral_handshake *hs, __u32 ack_tsval,
					    struct bpf_tcp_req_attrs *a)
{
	__u8 both = hs->client.flags & hs->primary.flags;

	a->mss = hs->client.mss;
	a->wscale_ok = !!(both & CORAL_SYN_WSCALE);
	if (a->wscale_ok) {
		/* Ours must be exactly what the primary advertised: a wrong
		 * value is accepted silently and breaks windows. The client's
		 * is clamped as the kernel's own option parser does. */
		a->rcv_wscale = hs->primary.wscale;
		a->snd_wscale = hs->client.wscale > TCP_MAX_WSCALE ? TCP_MAX_WSCALE
								 : hs->client.wscale;
	}
	a->sack_ok = !!(both & CORAL_SYN_SACK_PERM);
	a->ecn_ok = !!(both & CORAL_SYN_ECN);
	a->tstamp_ok = !!(both & CORAL_SYN_TIMESTAMP);
	if (a->tstamp_ok) {
		a->rcv_tsval = ack_tsval;
		/* The primary's clock now: its SYN-ACK TSval plus the time
		 * since (ms clock). Anchoring at the SYN-ACK's value instead
		 * would put the backup behind, and PAWS would drop its
		 * segments after failover. */
		a->rcv_tsecr = hs->primary.tsval +
			       (__u32)((bpf_ktime_get_ns() - hs->synack_ns) / NSEC_PER_MSEC);
	}
}

/* The client's ACK (or first data segment, if the pure ACK was lost) of a
 * held handshake: adopt. CORAL_CONTINUE when there is nothing to adopt
 * (not a held handshake, or already adopted): the stack takes the segment. */
static __always_inline enum coral_reason coral_adopt(struct __sk_buff *skb,
						     const struct coral_pkt *pkt, __u32 client_isn)
{
	struct bpf_tcp_req_attrs attrs = {};
	struct bpf_sock_tuple tuple = {};
	struct coral_handshake *hs;
	struct coral_conn_key key;
	struct bpf_sock *sk;
	__u32 tsval;
	int err;

	coral_key_in(pkt, &key);
	hs = bpf_map_lookup_elem(&coral_handshakes, &key);
	if (!hs)
		return CORAL_CONTINUE;
	if (!hs->synack_ns)
		return CORAL_DROP_HANDSHAKE_PENDING;

	tuple.ipv4.saddr = pkt->ip->saddr;
	tuple.ipv4.daddr = pkt->ip->daddr;
	tuple.ipv4.sport = pkt->tcp->source;
	tuple.ipv4.dport = pkt->tcp->dest;
	sk = bpf_sk_lookup_tcp(skb, &tuple, sizeof(tuple.ipv4), BPF_F_CURRENT_NETNS, 0);
	if (!sk)
		return CORAL_DROP_ADOPT_NO_LISTENER;
	if (sk->state != BPF_TCP_LISTEN) {
		/* Adopted already and this is a later segment (which may
		 * acknowledge reply data, so its ack is past the ISN): the
		 * record is done with. Kept until now so that a segment
		 * arriving after a lost adopting ACK can still adopt. */
		bpf_sk_release(sk);
		bpf_map_delete_elem(&coral_handshakes, &key);
		return CORAL_CONTINUE;
	}
	/* Guard: only the ACK of this handshake may create a connection, and
	 * only a segment at the client's first sequence number: the kernel
	 * takes the client's ISN as seq - 1, so a later segment adopting (the
	 * ACK and first data dropped while the SYN-ACK copy was still on its
	 * way) would shift the backup's view of the stream. */
	if (bpf_ntohl(pkt->tcp->ack_seq) != hs->primary_isn + 1 ||
	    bpf_ntohl(pkt->tcp->seq) != client_isn + 1) {
		bpf_sk_release(sk);
		return CORAL_DROP_ADOPT_MISMATCH;
	}

	tsval = coral_parse_tsval(skb, pkt);
	coral_req_attrs(hs, tsval, &attrs);
	err = bpf_sk_assign_tcp_reqsk(skb, (struct sock *)sk, &attrs, sizeof(attrs));
	bpf_sk_release(sk);
	return err ? CORAL_DROP_ADOPT_FAILED : CORAL_PASS_ADOPTED;
}

#endif /* CORAL_ADOPT_H */
