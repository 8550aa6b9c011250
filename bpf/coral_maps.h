/* SPDX-License-Identifier: GPL-2.0 */
/* Every map of the data plane. Each program object includes this header,
 * so every object carries the same definitions; all maps are pinned by name
 * (LIBBPF_PIN_BY_NAME), so objects loaded with the same pin root share one
 * set of maps, and a reloaded program finds the live state again.
 *
 * max_entries below are defaults; the loader resizes maps from the
 * configuration before load (coral.bpf.libbpf.BpfObject.set_max_entries).
 */
#ifndef CORAL_MAPS_H
#define CORAL_MAPS_H

#include "coral_consts.h"
#include "coral_structs.h"

/* The configured services and their mode, role, peer and lease: the one
 * place the agent steers the data plane from. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct coral_service_key);
	__type(value, struct coral_service_state);
	__uint(max_entries, 256);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} coral_services SEC(".maps");

/* Service addresses, for decisions without a port (ARP, fragments,
 * headers too broken to read a port from). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct coral_vip_key);
	__type(value, struct coral_vip_state);
	__uint(max_entries, 64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} coral_vips SEC(".maps");

/* Replicated connections. A plain hash, not LRU: an established replicated
 * connection is never evicted; when full, new connections are served in
 * simplex and counted. Preallocated, so an insert never fails for memory. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct coral_conn_key);
	__type(value, struct coral_conn_state);
	__uint(max_entries, 65536);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} coral_conns SEC(".maps");

/* Connections the application is closing on purpose (value: when it said
 * so, ns): their FIN or RST may leave the host. A map of its own, written
 * only by user space, so a mark never races the programs' updates of the
 * connection's state in coral_conns. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct coral_conn_key);
	__type(value, __u64);
	__uint(max_entries, 65536);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} coral_closing SEC(".maps");

/* Half-open connections awaiting adoption by the backup. LRU: under a SYN
 * flood the oldest pending handshakes go, nothing else. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct coral_conn_key);
	__type(value, struct coral_handshake);
	__uint(max_entries, 16384);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} coral_handshakes SEC(".maps");

/* One counter per verdict and drop reason, per CPU (no atomics on the
 * packet path); user space sums the CPUs. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, struct coral_counter);
	__uint(max_entries, CORAL_REASON_MAX);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} coral_counters SEC(".maps");

/* Not a map: clang puts a type into the object's BTF only if something
 * uses it, and nothing at run time needs the enums as types. This read-only
 * variable uses each of them, so the contract test finds their values in
 * the BTF. Never read. */
const volatile struct {
	enum coral_reason reason;
	enum coral_mode mode;
	enum coral_role role;
	enum coral_conn_flag conn_flag;
	enum coral_syn_opt syn_opt;
} coral_btf_anchor;

#endif /* CORAL_MAPS_H */
