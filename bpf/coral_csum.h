/* SPDX-License-Identifier: GPL-2.0 */
/* Header rewriting that keeps checksums right, for the replication paths
 * (ack clamping, window clamping, MAC rewriting of clones).
 *
 * The TCP checksum is patched incrementally (bpf_l4_csum_replace), never
 * recomputed: GSO packets are up to 64 KiB and the kernel already handles
 * every skb->ip_summed state (CHECKSUM_PARTIAL at egress leaves the field to
 * the NIC; CHECKSUM_COMPLETE stays valid because the field change and the
 * checksum change cancel out in the packet's sum). All helpers invalidate
 * packet pointers: re-derive them from struct coral_pkt offsets afterwards.
 */
#ifndef CORAL_CSUM_H
#define CORAL_CSUM_H

#include "coral_consts.h"

#define CORAL_TCP_SEQ_OFF 4
#define CORAL_TCP_ACK_OFF 8
#define CORAL_TCP_WIN_OFF 14
#define CORAL_TCP_CSUM_OFF 16

/* Replace the 32-bit field at l4_off + field_off (seq, ack, a timestamp or
 * SACK edge) whose current value is old. Values in network order. Returns 0
 * or a negative errno. */
static __always_inline int coral_tcp_store_u32(struct __sk_buff *skb, __u32 l4_off,
					       __u32 field_off, __be32 old, __be32 new)
{
	int err = bpf_l4_csum_replace(skb, l4_off + CORAL_TCP_CSUM_OFF, old, new, sizeof(new));

	if (err)
		return err;
	return bpf_skb_store_bytes(skb, l4_off + field_off, &new, sizeof(new), 0);
}

/* Replace the 16-bit field at l4_off + field_off (the window). */
static __always_inline int coral_tcp_store_u16(struct __sk_buff *skb, __u32 l4_off,
					       __u32 field_off, __be16 old, __be16 new)
{
	int err = bpf_l4_csum_replace(skb, l4_off + CORAL_TCP_CSUM_OFF, old, new, sizeof(new));

	if (err)
		return err;
	return bpf_skb_store_bytes(skb, l4_off + field_off, &new, sizeof(new), 0);
}

/* Rewrite both MAC addresses (a clone to the peer: no checksum covers the
 * Ethernet header). */
static __always_inline int coral_store_macs(struct __sk_buff *skb, const __u8 *dst,
					    const __u8 *src)
{
	int err = bpf_skb_store_bytes(skb, 0, dst, ETH_ALEN, 0);

	if (err)
		return err;
	return bpf_skb_store_bytes(skb, ETH_ALEN, src, ETH_ALEN, 0);
}

#endif /* CORAL_CSUM_H */
