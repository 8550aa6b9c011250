/* SPDX-License-Identifier: GPL-2.0 */
/* Bounds-checked Ethernet / ARP / IPv4 / TCP parsing for tc programs.
 *
 * Every header access is preceded by a check against data_end; every length
 * field is checked against the bytes actually present (skb->len), so a
 * lying header can never make a later stage read past the packet or trust
 * garbage. Offsets, not pointers, survive helper calls that move packet
 * data (bpf_skb_pull_data, bpf_skb_store_bytes): re-derive pointers from
 * the offsets in struct coral_pkt after such calls.
 */
#ifndef CORAL_PARSE_H
#define CORAL_PARSE_H

#include "coral_consts.h"
#include "coral_structs.h"

/* Ethernet + longest IPv4 header + longest TCP header. */
#define CORAL_HDR_MAX (ETH_HLEN + 60 + 60)

/* A parsed frame. Pointers are valid until the next helper call that may
 * move packet data; offsets are from the start of the frame. */
struct coral_pkt {
	struct iphdr *ip;	/* set once the fixed IPv4 header is readable */
	struct tcphdr *tcp;	/* set once the TCP header is validated */
	__u32 l4_off;		/* offset of the TCP header */
	__u32 ip_len;		/* IPv4 total length, checked against skb->len */
	__u32 tcp_hlen;		/* TCP header length with options, bytes */
	__u32 payload_len;	/* TCP payload bytes */
};

/* ARP for IPv4 over Ethernet, as on the wire (RFC 826). Addresses are byte
 * arrays: the IPv4 ones are not 4-byte aligned. */
struct coral_arp {
	__be16 hrd;
	__be16 pro;
	__u8 hln;
	__u8 pln;
	__be16 op;
	__u8 sha[ETH_ALEN];
	__u8 spa[4];
	__u8 tha[ETH_ALEN];
	__u8 tpa[4];
};

/* skb->data and skb->data_end, read with one load each from the context
 * pointer itself. Plain C lets clang compute the field address into a
 * register first (after a helper call, to reuse it), and the verifier
 * rejects a dereference of a modified context pointer. */
static __always_inline void *coral_data(const struct __sk_buff *skb)
{
	void *p;

	asm volatile("%0 = *(u32 *)(%1 + %2)"
		     : "=r"(p)
		     : "r"(skb), "i"(__builtin_offsetof(struct __sk_buff, data)));
	return p;
}

static __always_inline void *coral_data_end(const struct __sk_buff *skb)
{
	void *p;

	asm volatile("%0 = *(u32 *)(%1 + %2)"
		     : "=r"(p)
		     : "r"(skb), "i"(__builtin_offsetof(struct __sk_buff, data_end)));
	return p;
}

/* Make the headers linear: GRO/GSO skbs may keep part of them in paged
 * fragments, where direct packet access cannot reach. Invalidates every
 * packet pointer; call it before parsing. */
static __always_inline void coral_pull_headers(struct __sk_buff *skb)
{
	__u32 want = skb->len < CORAL_HDR_MAX ? skb->len : CORAL_HDR_MAX;

	if (coral_data(skb) + want > coral_data_end(skb))
		bpf_skb_pull_data(skb, want);
}

/* The frame's EtherType (network order), or 0 if it has no full Ethernet
 * header. VLAN tags are not parsed: a tagged frame is not ours. */
static __always_inline __be16 coral_parse_eth(struct __sk_buff *skb)
{
	void *data = coral_data(skb);
	void *data_end = coral_data_end(skb);
	struct ethhdr *eth = data;

	if ((void *)(eth + 1) > data_end)
		return 0;
	return eth->h_proto;
}

/* The ARP header of an ARP frame, or NULL if it is not a complete IPv4 over
 * Ethernet ARP packet. */
static __always_inline struct coral_arp *coral_parse_arp(struct __sk_buff *skb)
{
	void *data = coral_data(skb);
	void *data_end = coral_data_end(skb);
	struct coral_arp *arp = data + ETH_HLEN;

	if ((void *)(arp + 1) > data_end)
		return NULL;
	if (arp->hrd != bpf_htons(ARPHRD_ETHER) || arp->pro != bpf_htons(ETH_P_IP) ||
	    arp->hln != ETH_ALEN || arp->pln != 4)
		return NULL;
	return arp;
}

/* Parse and validate IPv4 and, if the protocol is TCP, the TCP header.
 *
 * Returns CORAL_CONTINUE for a well-formed, unfragmented IPv4/TCP packet
 * (pkt fully set), CORAL_PASS_OTHER for well-formed IPv4 that is not TCP,
 * or the CORAL_DROP_* reason of the first defect. pkt->ip is set whenever
 * the fixed 20-byte header with version 4 was readable, so the caller can
 * still look at the addresses to decide whether a defect concerns a
 * service. IP options are skipped using IHL.
 */
static __always_inline enum coral_reason coral_parse_ipv4_tcp(struct __sk_buff *skb,
							      struct coral_pkt *pkt)
{
	void *data = coral_data(skb);
	void *data_end = coral_data_end(skb);
	struct iphdr *ip = data + ETH_HLEN;
	struct tcphdr *tcp;
	__u32 ihl, avail, tot, l4_len, doff;

	if ((void *)(ip + 1) > data_end)
		return CORAL_DROP_IP_TRUNCATED;
	if (ip->version != 4)
		return CORAL_DROP_IP_BAD_VERSION;
	pkt->ip = ip;
	if (ip->ihl < 5)
		return CORAL_DROP_IP_BAD_IHL;
	ihl = ip->ihl * 4;
	if (data + ETH_HLEN + ihl > data_end)
		return CORAL_DROP_IP_TRUNCATED;

	avail = skb->len - ETH_HLEN;
	tot = bpf_ntohs(ip->tot_len);
	/* BIG TCP: a GSO/GRO packet above 64 KiB carries tot_len 0. */
	if (tot == 0 && skb->gso_size && avail > 0xffff)
		tot = avail;
	if (tot < ihl || tot > avail)
		return CORAL_DROP_IP_BAD_TOTLEN;
	if (ip->frag_off & bpf_htons(IP_MF | IP_OFFSET))
		return CORAL_DROP_IP_FRAGMENT;
	pkt->ip_len = tot;
	if (ip->protocol != IPPROTO_TCP)
		return CORAL_PASS_OTHER;

	l4_len = tot - ihl;
	if (l4_len < sizeof(*tcp))
		return CORAL_DROP_TCP_TRUNCATED;
	tcp = data + ETH_HLEN + ihl;
	if ((void *)(tcp + 1) > data_end)
		return CORAL_DROP_TCP_TRUNCATED;
	doff = tcp->doff * 4;
	if (doff < sizeof(*tcp) || doff > l4_len)
		return CORAL_DROP_TCP_BAD_DOFF;
	if ((void *)tcp + doff > data_end)
		return CORAL_DROP_TCP_TRUNCATED;

	pkt->tcp = tcp;
	pkt->l4_off = ETH_HLEN + ihl;
	pkt->tcp_hlen = doff;
	pkt->payload_len = l4_len - doff;
	return CORAL_CONTINUE;
}

/* State of one walk over a TCP option list (coral_parse_syn_opts). */
/* What the replication paths need from a data segment's options: its
 * timestamps (values and where they are, to rewrite them) and its SACK
 * blocks (to check and, if needed, trim them). */
struct coral_seg_opts {
	__u32 tsval;
	__u32 tsecr;
	__u8 has_ts;
	__u8 ts_off;		/* offset of the timestamp option's kind byte in the options */
	__u8 sack_n;		/* blocks in sack[] (at most 4) */
	__u8 sack_off;		/* offset of the SACK option's kind byte in the options */
	__u8 sack_len;		/* its length byte */
	struct coral_sack_block sack[4];
};

/* One walk over a segment's options, for SYNs and data segments alike: a
 * bpf_loop() callback, verified once however many callers (a plain
 * 40-iteration loop parsed three times exceeded the verifier's budget). */
struct coral_opt_walk {
	__u8 buf[64];		/* the options; indexes are masked with 63 */
	__u32 off;		/* next option */
	__u32 len;		/* option bytes in buf, at most TCP_OPTIONS_MAX */
	struct coral_syn_opts syn;
	struct coral_seg_opts seg;
};

static __always_inline __u32 coral_be32_at(const __u8 *buf, __u32 off)
{
	return ((__u32)buf[off & 63] << 24) | ((__u32)buf[(off + 1) & 63] << 16) |
	       ((__u32)buf[(off + 2) & 63] << 8) | buf[(off + 3) & 63];
}

static long coral_opt_step(__u32 index, void *ctx)
{
	struct coral_opt_walk *w = ctx;
	__u32 off = w->off, i, n;
	__u8 kind, olen;

	if (off >= w->len)
		return 1;
	kind = w->buf[off & 63];
	if (kind == TCPOPT_EOL)
		return 1;
	if (kind == TCPOPT_NOP) {
		w->off = off + 1;
		return 0;
	}
	if (off + 2 > w->len)
		return 1;
	olen = w->buf[(off + 1) & 63];
	if (olen < 2 || off + olen > w->len)
		return 1;
	if (kind == TCPOPT_MSS && olen == 4) {
		w->syn.mss = (w->buf[(off + 2) & 63] << 8) | w->buf[(off + 3) & 63];
		w->syn.flags |= CORAL_SYN_MSS;
	} else if (kind == TCPOPT_WINDOW && olen == 3) {
		w->syn.wscale = w->buf[(off + 2) & 63];
		w->syn.flags |= CORAL_SYN_WSCALE;
	} else if (kind == TCPOPT_SACK_PERM && olen == 2) {
		w->syn.flags |= CORAL_SYN_SACK_PERM;
	} else if (kind == TCPOPT_TIMESTAMP && olen == 10) {
		w->syn.tsval = w->seg.tsval = coral_be32_at(w->buf, off + 2);
		w->seg.tsecr = coral_be32_at(w->buf, off + 6);
		w->syn.flags |= CORAL_SYN_TIMESTAMP;
		w->seg.has_ts = 1;
		w->seg.ts_off = off;
	} else if (kind == TCPOPT_SACK && olen >= 10 && (olen - 2) % 8 == 0) {
		n = (olen - 2) / 8;
		w->seg.sack_off = off;
		w->seg.sack_len = olen;
		for (i = 0; i < 4; i++) {
			if (i >= n)
				break;
			w->seg.sack[i].start = coral_be32_at(w->buf, off + 2 + i * 8);
			w->seg.sack[i].end = coral_be32_at(w->buf, off + 6 + i * 8);
		}
		w->seg.sack_n = n > 4 ? 4 : n;
	}
	w->off = off + olen;
	return 0;
}

static __always_inline void coral_walk_opts(struct __sk_buff *skb, const struct coral_pkt *pkt,
					    struct coral_opt_walk *w)
{
	__u32 len = pkt->tcp_hlen - sizeof(struct tcphdr);

	w->syn.mss = TCP_MSS_DEFAULT;
	if (len > 0 && len <= TCP_OPTIONS_MAX &&
	    !bpf_skb_load_bytes(skb, pkt->l4_off + sizeof(struct tcphdr), w->buf, len)) {
		w->len = len;
		bpf_loop(TCP_OPTIONS_MAX, coral_opt_step, w, 0);
	}
}

/* The options of a SYN or SYN-ACK. */
static __always_inline void coral_parse_syn_opts(struct __sk_buff *skb,
						 const struct coral_pkt *pkt,
						 struct coral_syn_opts *o)
{
	struct coral_opt_walk w = {};

	coral_walk_opts(skb, pkt, &w);
	/* RFC 3168: a SYN asks for ECN with ECE+CWR, a SYN-ACK agrees with ECE. */
	if (pkt->tcp->ece && (pkt->tcp->ack || pkt->tcp->cwr))
		w.syn.flags |= CORAL_SYN_ECN;
	*o = w.syn;
}

static __always_inline __u32 coral_parse_tsval(struct __sk_buff *skb, const struct coral_pkt *pkt)
{
	struct coral_syn_opts o;

	coral_parse_syn_opts(skb, pkt, &o);
	return o.tsval;
}

/* The timestamps and SACK blocks of a (non-SYN) segment. */
static __always_inline void coral_parse_seg_opts(struct __sk_buff *skb,
						 const struct coral_pkt *pkt,
						 struct coral_seg_opts *o)
{
	struct coral_opt_walk w = {};

	coral_walk_opts(skb, pkt, &w);
	*o = w.seg;
}

#endif /* CORAL_PARSE_H */
