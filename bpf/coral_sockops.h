/* SPDX-License-Identifier: GPL-2.0 */
/* Socket level: a lower minimum retransmission timeout for service sockets.
 *
 * After a failover the survivor resends what the dead host sent last at its
 * retransmission timer. Linux's 200 ms minimum makes that the longest part
 * of a failover after a link crash; the kernel lets a sock_ops program lower
 * it per socket (TCP_BPF_RTO_MIN). The loader picks the value just above
 * the takeover time, so the first resend that is not suppressed comes right
 * after the takeover (docs/design.md, "Resuming without a timeout").
 *
 * The program is attached to a cgroup (every socket below it runs it), so
 * it first checks that the socket lives in this data plane's namespace.
 */
#ifndef CORAL_SOCKOPS_H
#define CORAL_SOCKOPS_H

#include "coral_maps.h"

#define CORAL_SOL_TCP 6

/* Load-time settings: the network namespace served (its cookie) and the
 * minimum RTO for its service sockets, in microseconds (0: leave it). */
const volatile __u64 coral_netns_cookie = 0;
const volatile __u32 coral_rto_min_us = 0;

/* A service socket just established (passive open: the primary's socket,
 * or the backup's adopted one): lower its minimum RTO. */
static __always_inline void coral_sock_established(struct bpf_sock_ops *ops)
{
	struct coral_service_key key = {
		.vip = ops->local_ip4,
		.port = bpf_htons((__u16)ops->local_port),
	};
	int rto_min_us = coral_rto_min_us;

	if (!rto_min_us || ops->family != 2 /* AF_INET */ ||
	    bpf_get_netns_cookie(ops) != coral_netns_cookie)
		return;
	if (!bpf_map_lookup_elem(&coral_services, &key))
		return;
	bpf_setsockopt(ops, CORAL_SOL_TCP, TCP_BPF_RTO_MIN, &rto_min_us, sizeof(rto_min_us));
}

#endif /* CORAL_SOCKOPS_H */
