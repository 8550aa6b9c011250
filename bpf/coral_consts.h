/* SPDX-License-Identifier: GPL-2.0 */
/* Constants shared by every coral BPF program and mirrored in Python
 * (coral/bpf/structs.py; tests/test_bpf_contract.py checks the mirror against
 * the compiled object's BTF).
 *
 * Enumerations are the contract; macros are local to C (clang drops them
 * from BTF, so Python cannot be checked against them).
 */
#ifndef CORAL_CONSTS_H
#define CORAL_CONSTS_H

/* Every verdict and every drop reason, defined once. Each packet a program
 * sees ends with exactly one of these; it indexes the per-CPU counter array
 * (coral_counters), so each value is one counter.
 *
 * Order is part of the contract: every CORAL_PASS_* precedes every
 * CORAL_DROP_* (coral_reason_is_drop() relies on it); append new passes
 * before CORAL_DROP_FENCED and new drops before CORAL_REASON_MAX.
 */
enum coral_reason {
	/* Not a verdict: helpers return it to mean "no verdict yet, carry on".
	 * Never counted (its counter stays 0), like the kernel's
	 * SKB_NOT_DROPPED_YET. */
	CORAL_CONTINUE = 0,

	/* Not coral's business: non-IPv4, non-TCP, not to/from a service.
	 * Passed untouched. */
	CORAL_PASS_OTHER,
	/* Service traffic, passed (replication verdicts come later). */
	CORAL_PASS_SERVICE,
	/* ARP claiming a VIP while the host may speak for it. */
	CORAL_PASS_VIP_ARP,
	/* The client's handshake ACK, carrying the adopted request socket. */
	CORAL_PASS_ADOPTED,
	/* Backup, duplex: a client packet delivered to the backup's stack
	 * and cloned to the primary. */
	CORAL_PASS_CLONED,
	/* Backup: the connection table is full; the new connection is
	 * served by the backup alone (simplex, not replicated). */
	CORAL_PASS_SIMPLEX_FULL,
	/* Backup, duplex: the backup's own segment, redirected to the
	 * primary as its report (acknowledgement, window, SACK). Passed, not
	 * dropped: TCP must count the segment as sent (a drop at egress
	 * returns NET_XMIT_DROP and the segment would count as unsent). */
	CORAL_PASS_BACKUP_REPORT,
	/* Backup: the client's acknowledgement of bytes the backup has now
	 * sent, delivered to its stack (CoRAL's fake ack). */
	CORAL_PASS_FAKE_ACK,
	/* Primary, duplex: a segment to the client, acknowledgement, window
	 * and SACK clamped to what the backup holds. */
	CORAL_PASS_CLAMPED,
	/* Primary: a backup report raised the clamp; an ACK goes to the
	 * client at once. */
	CORAL_PASS_RAISED_ACK,
	/* A packet the data plane made itself (a raised ACK) or a copy for
	 * the peer, passing this host's egress. */
	CORAL_PASS_CRAFTED,
	/* FIN or RST of a connection the application is closing. */
	CORAL_PASS_CLOSE,
	/* Data with an unmarked FIN (the kernel folds a FIN into the last
	 * data, up to a whole GSO packet of it): the data passes, the FIN
	 * flag is removed. */
	CORAL_PASS_FIN_STRIPPED,
	/* Backup, duplex: a client packet of a connection this host does not
	 * hold and has no socket for (one the primary serves alone, opened
	 * before this host rejoined): redirected to the primary, not
	 * delivered here (this stack would reset it). */
	CORAL_PASS_FORWARDED,
	/* Primary: a backup report opened the window the backup limits, with
	 * the acknowledgement unchanged (its application read): a window
	 * update goes to the client at once. */
	CORAL_PASS_WINDOW_OPENED,

	/* Service traffic while the service is fenced (mode). */
	CORAL_DROP_FENCED,
	/* Service traffic after the agent's lease ran out. */
	CORAL_DROP_LEASE_EXPIRED,
	/* ARP claiming a VIP while fenced or lease-expired. */
	CORAL_DROP_ARP_FENCED,
	/* Fewer bytes than an IPv4 header (20, or IHL*4 with options). */
	CORAL_DROP_IP_TRUNCATED,
	/* EtherType IPv4 but version field != 4. */
	CORAL_DROP_IP_BAD_VERSION,
	/* IHL below 5 words. */
	CORAL_DROP_IP_BAD_IHL,
	/* Total length shorter than the header or longer than the packet. */
	CORAL_DROP_IP_BAD_TOTLEN,
	/* A fragment to or from a VIP: TCP to a service is never fragmented
	 * (PMTU discovery), and a later fragment has no port to check. */
	CORAL_DROP_IP_FRAGMENT,
	/* IPv4 payload shorter than a TCP header. */
	CORAL_DROP_TCP_TRUNCATED,
	/* TCP data offset below 5 words or beyond the IPv4 payload. */
	CORAL_DROP_TCP_BAD_DOFF,
	/* Backup in duplex: the client's SYN is held back; the primary alone
	 * answers it and the backup adopts the primary's choice later. */
	CORAL_DROP_SYN_HELD,
	/* The primary's SYN-ACK seen by the backup: recorded, not delivered. */
	CORAL_DROP_SYNACK_COPY,
	/* Client's ACK before the backup has the SYN-ACK copy; the client
	 * retransmits. */
	CORAL_DROP_HANDSHAKE_PENDING,
	/* ACK whose ack number is not the primary's ISN + 1: a stray ACK must
	 * never become a connection. */
	CORAL_DROP_ADOPT_MISMATCH,
	/* No listening socket for the service on this host. */
	CORAL_DROP_ADOPT_NO_LISTENER,
	/* The kernel refused the adoption (bad attributes, sysctls). Dropped,
	 * not passed: the listener would answer the ACK with an RST. */
	CORAL_DROP_ADOPT_FAILED,
	/* FIN or RST from the service for a replicated connection the
	 * application did not mark closing: a crash falls silent. */
	CORAL_DROP_UNMARKED_CLOSE,
	/* Primary: a backup report, its information taken, nothing to send. */
	CORAL_DROP_REPORT_CONSUMED,
	/* From the peer but unusable: a report or copy for a connection this
	 * host does not track. */
	CORAL_DROP_PEER_STRAY,
	/* Primary: a replicated connection cannot be tracked (table full);
	 * the client retransmits its SYN. */
	CORAL_DROP_CONN_TABLE_FULL,
	/* A rewrite helper failed: never pass a half-rewritten packet. */
	CORAL_DROP_REWRITE_FAILED,
	/* Copying the frame (to the peer, or looping it back) failed. */
	CORAL_DROP_COPY_FAILED,
	/* Backup: a looped copy with no acknowledgement left to deliver. */
	CORAL_DROP_LOOP_STALE,

	CORAL_REASON_MAX,
};

/* Per-service mode. The zero value is FENCED, so a zeroed or half-written
 * entry fails closed. Unknown values are treated as fenced too. */
enum coral_mode {
	CORAL_MODE_FENCED = 0,	/* must not send or receive for the service */
	CORAL_MODE_DUPLEX = 1,	/* both hosts up, connections replicated */
	CORAL_MODE_SIMPLEX = 2,	/* this host alone serves */
};

/* This host's role for one service (a host may hold different roles for
 * different services). 0 is not a role. */
enum coral_role {
	CORAL_ROLE_PRIMARY = 1,	/* does the real work, sends to clients */
	CORAL_ROLE_BACKUP = 2,	/* owns the VIP on the LAN, mirrors */
};

/* Bits of coral_conn_state.flags. (Closing marks live in coral_closing, a
 * map only user space writes.) */
enum coral_conn_flag {
	/* The backup has reported at least once: until then the primary
	 * acknowledges nothing beyond the handshake. */
	CORAL_CONN_BACKUP_SEEN = 1 << 0,
};

/* Bits of coral_syn_opts.flags: which options a SYN or SYN-ACK carried. */
enum coral_syn_opt {
	CORAL_SYN_MSS = 1 << 0,
	CORAL_SYN_WSCALE = 1 << 1,
	CORAL_SYN_SACK_PERM = 1 << 2,
	CORAL_SYN_TIMESTAMP = 1 << 3,
	/* ECN setup: ECE+CWR on a SYN, ECE on a SYN-ACK. */
	CORAL_SYN_ECN = 1 << 4,
};

/* C-only constants (not in BTF, not mirrored). */
#define TC_ACT_OK 0
#define TC_ACT_SHOT 2
#define TC_ACT_STOLEN 4
#define ETH_ALEN 6
#define ETH_HLEN 14
#define ETH_P_IP 0x0800
#define ETH_P_ARP 0x0806
#define ARPHRD_ETHER 1
#define IP_MF 0x2000
#define IP_OFFSET 0x1fff
#define TCPOPT_EOL 0
#define TCPOPT_NOP 1
#define TCPOPT_MSS 2
#define TCPOPT_WINDOW 3
#define TCPOPT_SACK_PERM 4
#define TCPOPT_SACK 5
#define TCPOPT_TIMESTAMP 8
#define TCP_MSS_DEFAULT 536	/* RFC 1122/9293: MSS when the SYN has none */
#define TCP_OPTIONS_MAX 40	/* (15 - 5) words */
#define NSEC_PER_MSEC 1000000ULL

#endif /* CORAL_CONSTS_H */
