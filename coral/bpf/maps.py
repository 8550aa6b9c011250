"""The data plane's maps (bpf/coral_maps.h) with typed keys and values."""

from __future__ import annotations

import ctypes
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

from coral.bpf.libbpf import BpfObject
from coral.bpf.structs import (
    ConnKey,
    ConnState,
    Counter,
    CStruct,
    Handshake,
    Reason,
    ServiceKey,
    ServiceState,
    VipKey,
    VipState,
)
from coral.bpf.syscall import Map, UpdateFlag

K = TypeVar("K", bound=CStruct)
V = TypeVar("V", bound=CStruct)


class TypedMap(Generic[K, V]):
    """A hash map whose keys and values are mirrors from coral.bpf.structs.
    Construction checks the mirrors' sizes against the kernel's map, so a
    stale mirror fails at start-up, not by corrupting state."""

    def __init__(self, m: Map, key: type[K], value: type[V]) -> None:
        for what, cls, size in (("key", key, m.key_size), ("value", value, m.value_size)):
            if ctypes.sizeof(cls) != size:
                raise TypeError(f"map {m.name}: {what} {cls.__name__} is not {size} bytes")
        self.map = m
        self._key = key
        self._value = value

    def get(self, key: K) -> V | None:
        raw = self.map.lookup(key)
        return None if raw is None else self._value.from_buffer_copy(raw)

    def put(self, key: K, value: V, flags: UpdateFlag = UpdateFlag.ANY) -> None:
        self.map.update(key, value, flags)

    def delete(self, key: K) -> bool:
        return self.map.delete(key)

    def items(self) -> Iterator[tuple[K, V]]:
        for raw in self.map.iter_keys():
            value = self.map.lookup(raw)
            if value is not None:  # deleted meanwhile
                yield self._key.from_buffer_copy(raw), self._value.from_buffer_copy(value)


@dataclass(frozen=True)
class Counts:
    packets: int
    bytes: int


@dataclass(frozen=True)
class CoralMaps:
    """Every map of a loaded coral object. Borrowed from the BpfObject (or
    shared with every object loaded on the same pin root): valid while it is."""

    services: TypedMap[ServiceKey, ServiceState]
    vips: TypedMap[VipKey, VipState]
    conns: TypedMap[ConnKey, ConnState]
    handshakes: TypedMap[ConnKey, Handshake]
    counters: Map

    @classmethod
    def of(cls, obj: BpfObject) -> CoralMaps:
        return cls(
            services=TypedMap(obj.map("coral_services"), ServiceKey, ServiceState),
            vips=TypedMap(obj.map("coral_vips"), VipKey, VipState),
            conns=TypedMap(obj.map("coral_conns"), ConnKey, ConnState),
            handshakes=TypedMap(obj.map("coral_handshakes"), ConnKey, Handshake),
            counters=obj.map("coral_counters"),
        )

    def read_counters(self) -> dict[Reason, Counts]:
        """Every counter, summed over the CPUs."""
        out = {}
        for reason in Reason:
            per_cpu = self.counters.lookup_percpu(bytes(ctypes.c_uint32(reason))) or []
            values = [Counter.from_buffer_copy(raw) for raw in per_cpu]
            out[reason] = Counts(sum(v.packets for v in values), sum(v.bytes for v in values))
        return out
