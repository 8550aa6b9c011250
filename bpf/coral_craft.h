/* SPDX-License-Identifier: GPL-2.0 */
/* Turning a received or looped segment into a pure ACK, in place.
 *
 * Two paths need an acknowledgement no kernel would send by itself: the
 * primary's raised ACK (a backup report raised the clamp) and the backup's
 * fake ACK (the client's acknowledgement of bytes the backup only now sent).
 * Both reuse the segment at hand: its payload is cut and its TCP header
 * replaced by a fixed layout (20 bytes, or 32 with NOP NOP TIMESTAMP), so
 * the checksums are computed in full over a small, known header instead of
 * being patched.
 *
 * Checksums are complete (not CHECKSUM_PARTIAL seeds): crafted frames come
 * from frames received on the LAN (already checksummed in software or
 * hardware) or are delivered locally (where a partial checksum is trusted).
 */
#ifndef CORAL_CRAFT_H
#define CORAL_CRAFT_H

#include "coral_csum.h"
#include "coral_parse.h"

/* The TCP header of a crafted ACK. */
struct coral_ack_hdr {
	struct tcphdr th;
	__u8 opts[12];	/* NOP NOP TIMESTAMP(10), when timestamps are on */
};

/* What a crafted ACK says. Addresses and ports in network order, the rest
 * in host order. */
struct coral_ack_spec {
	__be32 saddr;
	__be32 daddr;
	__be16 sport;
	__be16 dport;
	__u32 seq;
	__u32 ack;
	__u16 win;	/* raw window field */
	__u8 has_ts;
	__u32 tsval;
	__u32 tsecr;
};

static __always_inline __u16 coral_csum_fold(__s64 csum)
{
	__u64 sum = (__u64)csum;

	sum = (sum & 0xffffffff) + (sum >> 32);
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return ~sum;
}

static __always_inline void coral_put_be32(__u8 *p, __u32 v)
{
	p[0] = v >> 24;
	p[1] = v >> 16;
	p[2] = v >> 8;
	p[3] = v;
}

/* Rewrite the IPv4/TCP frame at hand (IPv4 header without options) into
 * the ACK SPEC describes, Ethernet addresses DST and SRC. Packet pointers
 * are invalid afterwards. Returns 0, or a negative error (the frame is then
 * in an undefined state and must be dropped). */
static __always_inline int coral_craft_ack(struct __sk_buff *skb, const struct coral_ack_spec *spec,
					   const __u8 *dst, const __u8 *src)
{
	struct coral_ack_hdr h = {};
	struct iphdr ip;
	__u32 tcp_len = spec->has_ts ? sizeof(h) : sizeof(h.th);
	__u64 pseudo;
	__s64 sum;

	if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip, sizeof(ip)) || ip.ihl != 5)
		return -1;
	if (bpf_skb_change_tail(skb, ETH_HLEN + sizeof(ip) + tcp_len, 0))
		return -1;

	ip.saddr = spec->saddr;
	ip.daddr = spec->daddr;
	ip.tot_len = bpf_htons(sizeof(ip) + tcp_len);
	ip.check = 0;
	sum = bpf_csum_diff(0, 0, (__be32 *)&ip, sizeof(ip), 0);
	if (sum < 0)
		return -1;
	ip.check = coral_csum_fold(sum);

	h.th.source = spec->sport;
	h.th.dest = spec->dport;
	h.th.seq = bpf_htonl(spec->seq);
	h.th.ack_seq = bpf_htonl(spec->ack);
	h.th.doff = tcp_len / 4;
	h.th.ack = 1;
	h.th.window = bpf_htons(spec->win);
	if (spec->has_ts) {
		h.opts[0] = TCPOPT_NOP;
		h.opts[1] = TCPOPT_NOP;
		h.opts[2] = TCPOPT_TIMESTAMP;
		h.opts[3] = 10;
		coral_put_be32(&h.opts[4], spec->tsval);
		coral_put_be32(&h.opts[8], spec->tsecr);
	}
	/* Pseudo-header, then the header itself (there is no payload). */
	pseudo = (__u64)spec->saddr + spec->daddr + bpf_htons(IPPROTO_TCP) + bpf_htons(tcp_len);
	pseudo = (pseudo & 0xffffffff) + (pseudo >> 32);
	pseudo = (pseudo & 0xffffffff) + (pseudo >> 32);
	sum = bpf_csum_diff(0, 0, (__be32 *)&h, spec->has_ts ? sizeof(h) : sizeof(h.th),
			   (__u32)pseudo);
	if (sum < 0)
		return -1;
	h.th.check = coral_csum_fold(sum);

	if (bpf_skb_store_bytes(skb, ETH_HLEN, &ip, sizeof(ip), 0))
		return -1;
	if (bpf_skb_store_bytes(skb, ETH_HLEN + sizeof(ip), &h, spec->has_ts ? sizeof(h) : sizeof(h.th),
				0))
		return -1;
	return coral_store_macs(skb, dst, src);
}

#endif /* CORAL_CRAFT_H */
