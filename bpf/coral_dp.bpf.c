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

#include "coral_adopt.h"
#include "coral_verdict.h"

/* Frames arriving on the LAN interface. */
SEC("tc")
int coral_ingress(struct __sk_buff *skb)
{
	struct coral_pkt pkt = {};
	struct coral_service svc;
	enum coral_reason r = coral_classify(skb, true, &pkt, &svc);

	if (r == CORAL_CONTINUE) {
		/* Client -> service. */
		if (!coral_adopting(svc.state) || pkt.tcp->rst)
			r = CORAL_PASS_SERVICE;
		else if (pkt.tcp->syn)
			r = pkt.tcp->ack ? CORAL_PASS_SERVICE : coral_hold_syn(skb, &pkt);
		else if (pkt.tcp->ack)
			r = coral_adopt(skb, &pkt);
		if (r == CORAL_CONTINUE)
			r = CORAL_PASS_SERVICE;
	} else if (r == CORAL_PASS_OTHER && pkt.tcp && pkt.tcp->syn && pkt.tcp->ack) {
		/* Perhaps the copy of the primary's SYN-ACK (service -> client). */
		r = coral_service_lookup(&pkt, false, &svc);
		if (r == CORAL_CONTINUE)
			r = coral_adopting(svc.state) ? coral_record_synack(skb, &pkt)
						      : CORAL_PASS_OTHER;
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

	if (r == CORAL_CONTINUE && coral_adopting(svc.state)) {
		/* Consumed, so TCP counts the segment as sent (see
		 * CORAL_DROP_BACKUP_SUPPRESSED). */
		coral_count(skb, CORAL_DROP_BACKUP_SUPPRESSED);
		return TC_ACT_STOLEN;
	}
	return coral_verdict(skb, r == CORAL_CONTINUE ? CORAL_PASS_SERVICE : r);
}

char LICENSE[] SEC("license") = "GPL";
