// SPDX-License-Identifier: GPL-2.0
/* The data plane: tc programs for a server host's LAN interface.
 *
 * coral_ingress sees every frame arriving on the LAN, coral_egress every
 * frame leaving it. Each service packet is handled by the role this host
 * has for the packet's service (coral_services), so one host can be primary
 * for one service and backup for another. docs/design.md describes every
 * packet path and why.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "coral_backup.h"
#include "coral_primary.h"
#include "coral_sockops.h"
#include "coral_verdict.h"

/* A frame whose source is a service (VIP:port) arriving here: the
 * primary's SYN-ACK copy or a looped copy of our own segment (backup), or
 * the backup's report (primary). Returns the tc action. */
static __always_inline int coral_from_service(struct __sk_buff *skb, const struct coral_pkt *pkt,
					      const struct coral_service *svc)
{
	const struct coral_service_state *s = svc->state;
	__u8 dst[ETH_ALEN], src[ETH_ALEN];

	if (bpf_skb_load_bytes(skb, 0, dst, ETH_ALEN) ||
	    bpf_skb_load_bytes(skb, ETH_ALEN, src, ETH_ALEN))
		return coral_verdict(skb, CORAL_DROP_REWRITE_FAILED);
	if (s->role == CORAL_ROLE_PRIMARY) {
		if (coral_mac_eq(src, s->peer_mac))
			return coral_primary_report(skb, pkt, svc);
	} else if (coral_mac_eq(src, s->own_mac) && coral_mac_eq(dst, s->own_mac)) {
		return coral_verdict(skb, coral_backup_fake_ack(skb, pkt, svc));
	} else if (coral_mac_eq(src, s->peer_mac) && pkt->tcp->syn && pkt->tcp->ack) {
		return coral_verdict(skb, coral_backup_synack(skb, pkt));
	}
	return coral_verdict(skb, CORAL_DROP_PEER_STRAY);
}

/* Frames arriving on the LAN interface. */
SEC("tc")
int coral_ingress(struct __sk_buff *skb)
{
	struct coral_pkt pkt = {};
	struct coral_service svc;
	enum coral_reason r = coral_classify(skb, true, &pkt, &svc);

	if (r == CORAL_CONTINUE) {
		if (svc.state->role == CORAL_ROLE_BACKUP)
			r = coral_backup_in(skb, &pkt, &svc);
		else
			r = coral_primary_in(&pkt, &svc);
		if (r == CORAL_PASS_FORWARDED) { /* readdressed to the primary */
			coral_count(skb, r);
			return bpf_redirect(skb->ifindex, 0);
		}
	} else if (r == CORAL_PASS_OTHER && pkt.tcp) {
		r = coral_service_lookup(&pkt, false, &svc);
		if (r == CORAL_CONTINUE)
			return coral_from_service(skb, &pkt, &svc);
	}
	return coral_verdict(skb, r);
}

/* Frames leaving on the LAN interface. */
SEC("tc")
int coral_egress(struct __sk_buff *skb)
{
	struct coral_pkt pkt = {};
	struct coral_service svc;
	enum coral_reason r = coral_classify(skb, false, &pkt, &svc);

	if (r == CORAL_CONTINUE) {
		if (svc.state->role == CORAL_ROLE_BACKUP)
			return coral_backup_out(skb, &pkt, &svc);
		return coral_primary_out(skb, &pkt, &svc);
	}
	return coral_verdict(skb, r);
}

char LICENSE[] SEC("license") = "GPL";

/* Sockets below the cgroup the loader attached this to (coral_sockops.h). */
SEC("sockops")
int coral_sockops(struct bpf_sock_ops *ops)
{
	if (ops->op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB)
		coral_sock_established(ops);
	return 1;
}
