"""The node agent: one per server host, it keeps the pair's roles, leases and epochs.

Modules (import them directly; this package imports none of them, so that a tool
needing one piece, such as the witness on the router, loads only that piece):

- agent: the agent itself, which ties the others to the data plane and the proxies.
- statemachine: the agent's states and the enforced table of transitions between them.
- supervisor: turns any crash of a local service process into a crash of the host.
- config: the agent's settings (one TOML file per host) and their validation.
- metrics: the agent's Prometheus metrics, drawn from its status snapshot.
- heartbeat: the sequenced, MACed UDP heartbeats between the two agents of a pair.
- witness: the outside witness that gives the sole grant when the hosts lose each other.
- keys: reading a shared key file (heartbeats, witness, logging channel).
- reach: whether an outside host answers through the router.
- cli, status, witness_cli: the `coral agent`, `coral status`, `coral fence` and
  `coral witness` commands.
"""
