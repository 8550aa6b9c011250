"""Shared fixtures: labs that always tear down, and the root marker."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from coral.lab import Lab
from coral.lab.topology import fresh_name


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root: network namespaces, tc and bpffs")
    for item in items:
        if "root" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def lab() -> Iterator[Lab]:
    """A lab with two clients; removed after the test, also when it fails."""
    lab = Lab.up(fresh_name(), clients=2)
    try:
        yield lab
    finally:
        lab.down()
