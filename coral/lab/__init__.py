"""A lab of network namespaces: clients, a router, a server LAN, real Apache."""

from coral.lab.lab import CRASH_MODES, Lab, remove_all, remove_lab
from coral.lab.topology import LabError, Topology

__all__ = ["CRASH_MODES", "Lab", "LabError", "Topology", "remove_all", "remove_lab"]
