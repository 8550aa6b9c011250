// SPDX-License-Identifier: GPL-2.0
/* Lab tooling, not the data plane: random loss of a service's TCP packets
 * on the receiving side of a link (a drop in the sender's own egress is
 * not a loss: TCP notices and resends at once). Attached ahead of coral's
 * filter (lower tc priority); passes everything else on to it. */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "coral_parse.h"

#define TC_ACT_UNSPEC (-1)

/* Load-time settings: the service address, and the loss rate in parts per
 * million of its packets. */
const volatile __be32 lossy_vip = 0;
const volatile __u32 lossy_ppm = 0;

/* Packets dropped (index 0) and seen (index 1): proof the loss happened. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, __u64);
	__uint(max_entries, 2);
} lossy_stats SEC(".maps");

static __always_inline void lossy_count(__u32 i)
{
	__u64 *v = bpf_map_lookup_elem(&lossy_stats, &i);

	if (v)
		__sync_fetch_and_add(v, 1);
}

SEC("tc")
int coral_lossy(struct __sk_buff *skb)
{
	struct coral_pkt pkt = {};

	coral_pull_headers(skb);
	if (coral_parse_eth(skb) != bpf_htons(ETH_P_IP) ||
	    coral_parse_ipv4_tcp(skb, &pkt) != CORAL_CONTINUE)
		return TC_ACT_UNSPEC;
	if (pkt.ip->saddr != lossy_vip && pkt.ip->daddr != lossy_vip)
		return TC_ACT_UNSPEC;
	lossy_count(1);
	if (bpf_get_prandom_u32() % 1000000 >= lossy_ppm)
		return TC_ACT_UNSPEC;
	lossy_count(0);
	return TC_ACT_SHOT;
}

char LICENSE[] SEC("license") = "GPL";
