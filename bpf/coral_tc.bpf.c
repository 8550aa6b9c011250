// SPDX-License-Identifier: GPL-2.0
/* coral's tc classifier for the LAN interface (clsact ingress and egress).
 *
 * Today: classify, count, enforce fencing (service traffic in and out, and
 * ARP claims for the VIPs, are dropped once the service is fenced or the
 * agent's lease has expired), and drop malformed packets that are, or may
 * be, service traffic. Everything else passes untouched. The replication
 * verdicts (clone to the primary, ack clamping, suppression) build on this.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "coral_classify.h"
#include "coral_verdict.h"

static __always_inline int coral_tc(struct __sk_buff *skb, bool ingress)
{
	struct coral_pkt pkt = {};
	struct coral_service svc;
	enum coral_reason r = coral_classify(skb, ingress, &pkt, &svc);

	return coral_verdict(skb, r == CORAL_CONTINUE ? CORAL_PASS_SERVICE : r);
}

/* Client -> service traffic arriving on the LAN interface. */
SEC("tc")
int coral_ingress(struct __sk_buff *skb)
{
	return coral_tc(skb, true);
}

/* Service -> client traffic (and ARP) leaving on the LAN interface. */
SEC("tc")
int coral_egress(struct __sk_buff *skb)
{
	return coral_tc(skb, false);
}

char LICENSE[] SEC("license") = "GPL";
