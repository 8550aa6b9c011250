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
	/* Backup in duplex: its own replies never reach the client. Returned
	 * as TC_ACT_STOLEN, not TC_ACT_SHOT: a drop at egress reports
	 * NET_XMIT_DROP to TCP, which then counts the segment as not sent
	 * (snd_nxt stays put) and treats the client's acknowledgements of the
	 * primary's identical bytes as acks of unsent data. */
	CORAL_DROP_BACKUP_SUPPRESSED,

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

/* Bits of coral_conn_state.flags. */
enum coral_conn_flag {
	/* The proxy is closing this connection on purpose: its FIN may pass.
	 * Any other FIN or RST from the VIP is a failure and is dropped. */
	CORAL_CONN_CLOSING = 1 << 0,
	/* The backup has reported at least once: until then the primary
	 * acknowledges nothing beyond the handshake. */
	CORAL_CONN_BACKUP_SEEN = 1 << 1,
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
#define TCPOPT_TIMESTAMP 8
#define TCP_MSS_DEFAULT 536	/* RFC 1122/9293: MSS when the SYN has none */
#define TCP_OPTIONS_MAX 40	/* (15 - 5) words */
#define NSEC_PER_MSEC 1000000ULL

#endif /* CORAL_CONSTS_H */
