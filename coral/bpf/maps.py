"""The data plane's maps (bpf/coral_maps.h) with typed keys and values.

Two ways in: ``CoralMaps.of(obj)`` borrows the maps of a loaded BpfObject;
``CoralMaps.pinned(pin_dir)`` opens the maps pinned in PIN_DIR by their
names (no program load: for readers in other processes, such as ``coral
datapath stats``) and owns their fds until ``close()``.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar, cast

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
V = TypeVar("V", bound=CStruct | ctypes.c_uint64)


class TypedMap(Generic[K, V]):
    """A hash map whose keys and values are mirrors from coral.bpf.structs
    (or a plain u64 value, as in coral_closing). Construction checks the
    mirrors' sizes against the kernel's map, so a stale mirror fails at
    start-up, not by corrupting state."""

    def __init__(self, m: Map, key: type[K], value: type[V]) -> None:
        for what, cls, size in (("key", key, m.key_size), ("value", value, m.value_size)):
            if ctypes.sizeof(cls) != size:
                raise TypeError(f"map {m.name}: {what} {cls.__name__} is not {size} bytes")
        self.map = m
        self._key = key
        self._value = value

    def _decode(self, raw: bytes) -> V:
        return cast(V, self._value.from_buffer_copy(raw))

    def get(self, key: K) -> V | None:
        raw = self.map.lookup(key)
        return None if raw is None else self._decode(raw)

    def put(self, key: K, value: V, flags: UpdateFlag = UpdateFlag.ANY) -> None:
        self.map.update(key, bytes(value), flags)

    def delete(self, key: K) -> bool:
        return self.map.delete(key)

    def __iter__(self) -> Iterator[K]:
        """Every key."""
        for raw in self.map.iter_keys():
            yield self._key.from_buffer_copy(raw)

    def items(self) -> Iterator[tuple[K, V]]:
        for raw in self.map.iter_keys():
            value = self.map.lookup(raw)
            if value is not None:  # deleted meanwhile
                yield self._key.from_buffer_copy(raw), self._decode(value)


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
    closing: TypedMap[ConnKey, ctypes.c_uint64]
    """Connections the application closes on purpose -> when it said so (ns)."""
    counters: Map
    owned: bool = False
    """True for pinned(): close() closes the fds."""

    @classmethod
    def _build(cls, get: Callable[[str], Map], owned: bool) -> CoralMaps:
        return cls(
            services=TypedMap(get("coral_services"), ServiceKey, ServiceState),
            vips=TypedMap(get("coral_vips"), VipKey, VipState),
            conns=TypedMap(get("coral_conns"), ConnKey, ConnState),
            handshakes=TypedMap(get("coral_handshakes"), ConnKey, Handshake),
            closing=TypedMap(get("coral_closing"), ConnKey, ctypes.c_uint64),
            counters=get("coral_counters"),
            owned=owned,
        )

    @classmethod
    def of(cls, obj: BpfObject) -> CoralMaps:
        return cls._build(obj.map, owned=False)

    @classmethod
    def pinned(cls, pin_dir: str | os.PathLike[str]) -> CoralMaps:
        """The maps pinned in PIN_DIR; raises BpfError (ENOENT) if one is missing."""
        opened: list[Map] = []

        def get(name: str) -> Map:
            opened.append(Map.open_pinned(os.path.join(pin_dir, name)))
            return opened[-1]

        try:
            return cls._build(get, owned=True)
        except BaseException:
            for m in opened:
                m.close()
            raise

    def close(self) -> None:
        """Close the fds of pinned() maps; borrowed maps belong to their object."""
        if self.owned:
            for m in (self.services, self.vips, self.conns, self.handshakes, self.closing):
                m.map.close()
            self.counters.close()

    def read_counters(self) -> dict[Reason, Counts]:
        """Every counter, summed over the CPUs."""
        out = {}
        for reason in Reason:
            per_cpu = self.counters.lookup_percpu(bytes(ctypes.c_uint32(reason))) or []
            values = [Counter.from_buffer_copy(raw) for raw in per_cpu]
            out[reason] = Counts(sum(v.packets for v in values), sum(v.bytes for v in values))
        return out
