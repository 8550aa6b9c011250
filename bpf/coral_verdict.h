/* SPDX-License-Identifier: GPL-2.0 */
/* Counting: every packet a program sees ends in exactly one enum
 * coral_reason, counted per CPU, and (for the plain verdicts) turned into
 * the tc action. */
#ifndef CORAL_VERDICT_H
#define CORAL_VERDICT_H

#include "coral_maps.h"

/* Load-time setting: print every verdict to the trace pipe (debugging;
 * the verifier removes the call when false). */
const volatile bool coral_trace = false;

/* Every CORAL_PASS_* precedes every CORAL_DROP_* (see coral_consts.h). */
static __always_inline bool coral_reason_is_drop(enum coral_reason r)
{
	return r >= CORAL_DROP_FENCED;
}

/* Count one packet under reason r. */
static __always_inline void coral_count(struct __sk_buff *skb, enum coral_reason r)
{
	__u32 key = r;
	struct coral_counter *c = bpf_map_lookup_elem(&coral_counters, &key);

	if (c) {
		c->packets++;
		c->bytes += skb->len;
	}
	if (coral_trace)
		bpf_printk("coral: ifindex %u len %u reason %u", skb->ifindex, skb->len, r);
}

/* Count the packet and return the tc action its reason implies: drops are
 * TC_ACT_SHOT, everything else TC_ACT_OK (untouched). */
static __always_inline int coral_verdict(struct __sk_buff *skb, enum coral_reason r)
{
	coral_count(skb, r);
	return coral_reason_is_drop(r) ? TC_ACT_SHOT : TC_ACT_OK;
}

#endif /* CORAL_VERDICT_H */
