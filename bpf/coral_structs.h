/* SPDX-License-Identifier: GPL-2.0 */
/* THE contract between the BPF programs and Python: every struct that
 * crosses a map lives here, and only here.
 *
 * coral/bpf/structs.py mirrors each struct field by field (same names, same
 * order); tests/test_bpf_contract.py compares sizes and member offsets with
 * the compiled object's BTF, so a change here that is not mirrored fails the
 * tests instead of corrupting state.
 *
 * Rules:
 *  - fixed-width types only, explicit padding (named pad*), no implicit
 *    holes: keys are hashed bytewise, so a hole with stale bytes would make
 *    equal keys differ; Python zeroes pad fields.
 *  - __be* fields hold network byte order (as on the wire); everything else
 *    is host order.
 *  - sequence numbers are host-order u32 as the TCP header carries them.
 *  - times are nanoseconds of bpf_ktime_get_ns() (CLOCK_MONOTONIC; Python:
 *    time.monotonic_ns()), never wall-clock.
 */
#ifndef CORAL_STRUCTS_H
#define CORAL_STRUCTS_H

/* Key of coral_services. A service is one VIP:port; the data plane only
 * interferes with TCP to and from a configured service. */
struct coral_service_key {
	__be32 vip;
	__be16 port;
	__u16 pad;
};

/* Value of coral_services: everything the programs need to handle one
 * service's packets without asking user space. Written by the agent; a
 * mode switch (duplex <-> simplex, fencing) is one map update. */
struct coral_service_state {
	/* The agent's lease: past this instant the host is fenced for the
	 * service even if mode says otherwise (a frozen or dead agent cannot
	 * keep the host talking). 0 = expired. */
	__u64 lease_expiry_ns;
	/* Configuration epoch the agent holds the lease under; reported back
	 * so the peer can tell a stale host from a current one. */
	__u32 epoch;
	/* The peer host's LAN address (where clones and reports go). */
	__be32 peer_ip;
	/* This host's LAN MAC: source of frames sent to the peer (the
	 * router's MAC must not appear on our port, or the switch learns it). */
	__u8 own_mac[6];
	/* The peer host's LAN MAC: destination of clones and reports. */
	__u8 peer_mac[6];
	__u8 mode;	/* enum coral_mode */
	__u8 role;	/* enum coral_role */
	__u8 pad[2];
};

/* Key of coral_vips. ARP and fragments carry no port, so address-level
 * decisions need a map keyed by the VIP alone. */
struct coral_vip_key {
	__be32 vip;
};

/* Value of coral_vips: whether this host may claim the VIP on the LAN
 * (ARP) and, for packets without a usable port, whether the address is a
 * service address at all. The agent writes it together with the VIP's
 * services and renews its lease with theirs. */
struct coral_vip_state {
	__u64 lease_expiry_ns;	/* as in coral_service_state */
	__u32 epoch;
	__u8 mode;		/* enum coral_mode */
	__u8 pad[3];
};

/* Key of coral_conns and coral_handshakes: one client connection to one
 * service, in the client -> service direction. */
struct coral_conn_key {
	__be32 client_ip;
	__be32 vip;
	__be16 client_port;
	__be16 vip_port;
};

/* One SACK block as the TCP option carries it (host order here). */
struct coral_sack_block {
	__u32 start;
	__u32 end;
};

/* Value of coral_conns: per-connection replication state. One struct for
 * both roles (a host can be primary for one service and backup for
 * another); each role's programs use their part. Sequence numbers are in
 * the connection's one sequence space (the primary's, adopted by the
 * backup). */
struct coral_conn_state {
	/* Last packet seen (either direction): the control plane removes
	 * entries whose socket is gone and that have been quiet. */
	__u64 last_ns;
	/* The primary's ISN, and the client's: the handshake acknowledges
	 * client_isn + 1, all the primary may acknowledge before the
	 * backup's first report. */
	__u32 primary_isn;
	__u32 client_isn;
	__u16 flags;	/* enum coral_conn_flag bits */
	/* Mode when the connection opened: a simplex connection stays
	 * simplex until it closes, whatever the service's mode becomes. */
	__u8 mode;	/* enum coral_mode */
	/* Window scale both kernels advertise (the primary's choice, adopted
	 * by the backup): turns raw windows into bytes. */
	__u8 rcv_wscale;

	/* ---- primary: the clamp ---- */
	/* Highest client byte (next expected sequence number) the backup's
	 * kernel has acknowledged, from its reports: the primary never
	 * acknowledges more to the client. */
	__u32 backup_ack;
	/* The backup's receive window in bytes: the advertised right edge
	 * never exceeds backup_ack + backup_win. */
	__u32 backup_win;
	/* What the primary's own kernel last acknowledged and advertised
	 * (unclamped): a raised clamp is sent as min(primary, backup). */
	__u32 primary_ack;
	__u32 primary_win;
	/* Next sequence number the primary sends: the seq of a raised ACK
	 * the data plane sends on the primary's behalf. */
	__u32 primary_snd_nxt;
	/* Highest acknowledgement actually sent to the client: a report that
	 * raises the clamp above it triggers an immediate ACK. */
	__u32 acked_to_client;
	/* The backup's latest SACK blocks: a primary SACK block is passed
	 * to the client only if the backup holds those bytes too. */
	struct coral_sack_block backup_sack[3];
	/* Next hop toward the client (the router's MAC, learnt from the
	 * primary's own segments): destination of a raised ACK. */
	__u8 client_mac[6];
	__u16 pad;
	/* The primary's highest timestamps (TSval, TSecr) sent so far: a
	 * raised ACK carries them, never the backup's clock, which may run a
	 * millisecond ahead and would make the client reject the primary's
	 * next segments (PAWS). */
	__u32 primary_tsval;
	__u32 primary_tsecr;
	/* The backup's highest timestamp echo (TSecr), from its reports: an
	 * acknowledgement the backup limits echoes at least this, or the
	 * client takes its retransmission for spurious (an echo older than
	 * the retransmission says the original arrived: Eifel, RFC 3522) and
	 * undoes its recovery although the backup never had the original. */
	__u32 backup_tsecr;

	/* ---- backup: catching up with the primary (fake acks) ---- */
	/* Highest end sequence the backup's kernel has sent (suppressed). */
	__u32 backup_snd_nxt;
	/* The client's latest acknowledgement, unclamped, with its window
	 * and timestamps: replayed to the backup's kernel once it has sent
	 * the bytes acknowledged. */
	__u32 client_ack;
	/* Highest acknowledgement let through to the backup's kernel. */
	__u32 delivered_ack;
	__u32 client_tsval;
	__u32 client_tsecr;
	__u16 client_win;	/* raw window field, as the client sent it */
	__u16 pad2;
};

/* The handshake options of one SYN or SYN-ACK: what the backup needs to
 * rebuild the primary's negotiated connection (bpf_tcp_req_attrs). */
struct coral_syn_opts {
	__u32 tsval;	/* TSval, if CORAL_SYN_TIMESTAMP */
	__u16 mss;	/* MSS option, TCP_MSS_DEFAULT if absent */
	__u8 wscale;	/* window scale shift, if CORAL_SYN_WSCALE */
	__u8 flags;	/* enum coral_syn_opt bits */
};

/* Value of coral_handshakes: a connection between the client's SYN and its
 * adoption by the backup. Kept apart from coral_conns so a SYN flood can
 * only evict other half-open handshakes (an LRU map), never established
 * replicated connections. */
struct coral_handshake {
	/* When the primary's SYN-ACK copy was seen (0 = not yet): the
	 * primary's TSval is advanced by the time elapsed since, so the
	 * backup's timestamps continue the primary's clock. */
	__u64 synack_ns;
	struct coral_syn_opts client;	/* from the client's SYN */
	struct coral_syn_opts primary;	/* from the primary's SYN-ACK */
	__u32 primary_isn;	/* the SYN-ACK's sequence number */
	__u32 pad;
};

/* Value of coral_counters (one per enum coral_reason, per CPU). Bytes as
 * well as packets: capacity questions are asked in bytes. */
struct coral_counter {
	__u64 packets;
	__u64 bytes;
};

#endif /* CORAL_STRUCTS_H */
