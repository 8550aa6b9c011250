"""The data plane's control API: services, modes, leases, connections, counters, identity.

Modules:
    plane     -- DataPlane (load, attach, configure, lease, gc) and the read-only PlaneView
    identity  -- VIP hide/claim/remove and gratuitous ARP
    settings  -- the TCP settings both hosts must share for duplex
    cli       -- `coral datapath stats|conns`
"""

from coral.dataplane.plane import (
    ClosingMarker,
    Connection,
    Counts,
    DataPlane,
    DataPlaneError,
    Mode,
    PlaneView,
    Role,
    Service,
    StaleEpoch,
    closing_marker,
    open_view,
)

__all__ = [
    "ClosingMarker",
    "Connection",
    "Counts",
    "DataPlane",
    "DataPlaneError",
    "Mode",
    "PlaneView",
    "Role",
    "Service",
    "StaleEpoch",
    "closing_marker",
    "open_view",
]
