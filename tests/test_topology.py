"""The lab's address plan, without root."""

from __future__ import annotations

import pytest

from coral.lab.topology import SERVER_HOSTS, LabError, Topology


def test_every_veth_appears_once_and_ends_match() -> None:
    topo = Topology("x", clients=3, private_link=True)
    pairs = topo.veths()
    ends = [end for pair in pairs for end in pair]
    assert len(ends) == len(set(ends))
    hosts = {h.name: h for h in topo.hosts()}
    for a, b in pairs:
        iface = next(i for i in hosts[a[0]].ifaces if i.name == a[1])
        assert iface.peer == b
    # router ports: 3 servers + 3 clients; plus one private link
    assert len(pairs) == 3 + 3 + 1


def test_private_link_is_optional() -> None:
    topo = Topology("x", clients=1, private_link=False)
    assert all(i.name != "priv0" for h in topo.hosts() for i in h.ifaces)


def test_names_carry_prefix_and_lab() -> None:
    topo = Topology("abc1", clients=1, private_link=True)
    assert {topo.namespace(h) for h in topo.host_names} == {
        "coral-abc1-router",
        "coral-abc1-primary",
        "coral-abc1-backup",
        "coral-abc1-spare",
        "coral-abc1-client1",
    }


@pytest.mark.parametrize("name", ["", "has-dash", "UPPER", "x" * 13, "a b"])
def test_bad_lab_names_are_refused(name: str) -> None:
    with pytest.raises(LabError, match="lab name"):
        Topology(name, clients=1, private_link=True)


def test_client_count_is_bounded() -> None:
    with pytest.raises(LabError, match="clients"):
        Topology("x", clients=0, private_link=True)


def test_server_hosts_are_forced_apart() -> None:
    """One shared kernel would otherwise give both hosts identical timestamp offsets."""
    topo = Topology("x", clients=1, private_link=True)
    ts = {h.name: h.sysctls["net.ipv4.tcp_timestamps"] for h in topo.hosts() if h.kind == "server"}
    assert ts["primary"] != ts["backup"]
    assert set(ts) == set(SERVER_HOSTS)


def test_links_of_a_server_are_its_far_ends() -> None:
    topo = Topology("x", clients=1, private_link=True)
    assert set(topo.links_of("primary")) == {("router", "p-primary"), ("backup", "priv0")}
    with pytest.raises(LabError, match="no host"):
        topo.links_of("nosuch")
