"""The data plane's control API: services, modes, leases, connections, counters, identity."""
