// SPDX-License-Identifier: GPL-2.0
/* Test-only program: exercises the rewriting helpers of coral_csum.h (and
 * load-time settings) under BPF_PROG_TEST_RUN, before any data-plane path
 * depends on them. Never attached. tests/test_bpf_packets.py drives it.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "coral_csum.h"
#include "coral_parse.h"

/* What to write, set by the test before load. */
const volatile __u32 selftest_ack_delta = 0;
const volatile __u16 selftest_window = 0;
const volatile __u8 selftest_dst_mac[ETH_ALEN] = {};
const volatile __u8 selftest_src_mac[ETH_ALEN] = {};

/* Add selftest_ack_delta to the ack number, set the window to
 * selftest_window and rewrite both MACs of a well-formed IPv4/TCP frame;
 * TC_ACT_SHOT if it is not one or a helper fails. */
SEC("tc")
int coral_selftest_rewrite(struct __sk_buff *skb)
{
	struct coral_pkt pkt = {};
	__be32 old_ack, new_ack;
	__be16 old_win;

	coral_pull_headers(skb);
	if (coral_parse_eth(skb) != bpf_htons(ETH_P_IP) ||
	    coral_parse_ipv4_tcp(skb, &pkt) != CORAL_CONTINUE)
		return TC_ACT_SHOT;
	old_ack = pkt.tcp->ack_seq;
	old_win = pkt.tcp->window;
	new_ack = bpf_htonl(bpf_ntohl(old_ack) + selftest_ack_delta);
	if (coral_tcp_store_u32(skb, pkt.l4_off, CORAL_TCP_ACK_OFF, old_ack, new_ack) ||
	    coral_tcp_store_u16(skb, pkt.l4_off, CORAL_TCP_WIN_OFF, old_win,
				bpf_htons(selftest_window)) ||
	    coral_store_macs(skb, (const __u8 *)selftest_dst_mac, (const __u8 *)selftest_src_mac))
		return TC_ACT_SHOT;
	return TC_ACT_OK;
}

char LICENSE[] SEC("license") = "GPL";
