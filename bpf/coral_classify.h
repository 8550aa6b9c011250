/* SPDX-License-Identifier: GPL-2.0 */
/* The first decision every program makes: is this frame a live service's
 * TCP traffic, someone else's traffic, or something to drop (malformed,
 * fenced)? Shared by every hook so they all agree on what "service
 * traffic" means.
 *
 * Policy for defects: coral drops only what is, or may be, service
 * traffic. A defective IPv4 packet whose addresses are readable (fixed
 * header present, version 4) is dropped only if its service-side address is
 * a VIP; otherwise it passes untouched and the kernel applies its own
 * checks. A packet too short to read an address from may be ours and is
 * dropped (the kernel's ip_rcv would drop it anyway).
 */
#ifndef CORAL_CLASSIFY_H
#define CORAL_CLASSIFY_H

#include "coral_maps.h"
#include "coral_parse.h"

/* A service found for a packet. state points into coral_services. */
struct coral_service {
	struct coral_service_key key;
	struct coral_service_state *state;
};

/* CORAL_CONTINUE if the host may speak for the service or VIP now,
 * otherwise why not. Any mode but duplex and simplex counts as fenced (fail
 * closed), and a lease is valid up to and including its expiry instant. */
static __always_inline enum coral_reason coral_fence_check(__u8 mode, __u64 lease_expiry_ns)
{
	if (mode != CORAL_MODE_DUPLEX && mode != CORAL_MODE_SIMPLEX)
		return CORAL_DROP_FENCED;
	if (lease_expiry_ns < bpf_ktime_get_ns())
		return CORAL_DROP_LEASE_EXPIRED;
	return CORAL_CONTINUE;
}

static __always_inline struct coral_vip_state *coral_vip_lookup(__be32 addr)
{
	struct coral_vip_key key = { .vip = addr };

	return bpf_map_lookup_elem(&coral_vips, &key);
}

/* An ARP packet leaving the host: one that claims a VIP (as sender, be it
 * a reply or a gratuitous request, both update neighbours' caches) is
 * dropped while the host is fenced for that VIP. */
static __always_inline enum coral_reason coral_classify_arp_out(struct __sk_buff *skb)
{
	struct coral_arp *arp = coral_parse_arp(skb);
	struct coral_vip_state *vs;
	__be32 spa;

	if (!arp)
		return CORAL_PASS_OTHER;
	__builtin_memcpy(&spa, arp->spa, sizeof(spa));
	vs = coral_vip_lookup(spa);
	if (!vs)
		return CORAL_PASS_OTHER;
	if (coral_fence_check(vs->mode, vs->lease_expiry_ns) != CORAL_CONTINUE)
		return CORAL_DROP_ARP_FENCED;
	return CORAL_PASS_VIP_ARP;
}

/* The service of a well-formed TCP packet, looked up on its destination
 * (to_service) or source side. CORAL_CONTINUE with svc set if the service
 * exists and is live; CORAL_PASS_OTHER if there is no such service; else
 * the fencing drop reason. */
static __always_inline enum coral_reason coral_service_lookup(const struct coral_pkt *pkt,
							      bool to_service,
							      struct coral_service *svc)
{
	struct coral_service_state *s;

	svc->key.vip = to_service ? pkt->ip->daddr : pkt->ip->saddr;
	svc->key.port = to_service ? pkt->tcp->dest : pkt->tcp->source;
	svc->key.pad = 0;
	s = bpf_map_lookup_elem(&coral_services, &svc->key);
	if (!s)
		return CORAL_PASS_OTHER;
	svc->state = s;
	return coral_fence_check(s->mode, s->lease_expiry_ns);
}

/* Classify a frame. to_service: the service side is the destination
 * (ingress, client -> VIP) rather than the source (egress). Returns
 * CORAL_CONTINUE for a live service's well-formed TCP (pkt and svc set),
 * otherwise the final reason. Pulls the headers linear first. */
static __always_inline enum coral_reason coral_classify(struct __sk_buff *skb, bool to_service,
							struct coral_pkt *pkt,
							struct coral_service *svc)
{
	enum coral_reason r;
	__be16 proto;

	coral_pull_headers(skb);
	proto = coral_parse_eth(skb);
	if (proto == bpf_htons(ETH_P_ARP) && !to_service)
		return coral_classify_arp_out(skb);
	if (proto != bpf_htons(ETH_P_IP))
		return CORAL_PASS_OTHER;

	r = coral_parse_ipv4_tcp(skb, pkt);
	if (r == CORAL_CONTINUE)
		return coral_service_lookup(pkt, to_service, svc);
	if (r == CORAL_PASS_OTHER || !pkt->ip)
		return r;
	/* At ingress a service address as source counts too: a broken frame
	 * claiming to come from a VIP must not reach a stack that could
	 * forward it. */
	if (coral_vip_lookup(to_service ? pkt->ip->daddr : pkt->ip->saddr) ||
	    (to_service && coral_vip_lookup(pkt->ip->saddr)))
		return r;
	return CORAL_PASS_OTHER;
}

#endif /* CORAL_CLASSIFY_H */
