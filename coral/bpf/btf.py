"""Read struct layouts, enum values and data sections from BTF, through libbpf.

The compiled object's BTF is what the kernel and the programs really use, so
it, not the C source, is what the Python mirrors are checked against
(tests/test_bpf_contract.py). BpfObject.set_rodata uses the data section
layout to find a const volatile global.
"""

from __future__ import annotations

import ctypes
import errno
import os
from dataclasses import dataclass
from enum import IntEnum
from typing import Self, TypeVar

_lib = ctypes.CDLL("libbpf.so.1", use_errno=True)
_P = ctypes.c_void_p
for _name, _res, _args in (
    ("btf__parse", _P, [ctypes.c_char_p, _P]),
    ("btf__free", None, [_P]),
    ("btf__type_cnt", ctypes.c_uint32, [_P]),
    ("btf__type_by_id", _P, [_P, ctypes.c_uint32]),
    ("btf__name_by_offset", ctypes.c_char_p, [_P, ctypes.c_uint32]),
    ("btf__resolve_size", ctypes.c_int64, [_P, ctypes.c_uint32]),
    ("btf__resolve_type", ctypes.c_int, [_P, ctypes.c_uint32]),
):
    _fn = getattr(_lib, _name)
    _fn.restype = _res
    _fn.argtypes = _args


_T = TypeVar("_T", bound=ctypes.Structure)


class Kind(IntEnum):
    """BTF_KIND_* (include/uapi/linux/btf.h), the ones read here."""

    STRUCT = 4
    ENUM = 6
    DATASEC = 15
    ENUM64 = 19


class _Type(ctypes.Structure):
    _fields_ = (
        ("name_off", ctypes.c_uint32),
        ("info", ctypes.c_uint32),
        ("size_or_type", ctypes.c_uint32),
    )


class _Member(ctypes.Structure):
    _fields_ = (
        ("name_off", ctypes.c_uint32),
        ("type", ctypes.c_uint32),
        ("offset", ctypes.c_uint32),
    )


class _Enum(ctypes.Structure):
    _fields_ = (("name_off", ctypes.c_uint32), ("val", ctypes.c_int32))


class _Enum64(ctypes.Structure):
    _fields_ = (
        ("name_off", ctypes.c_uint32),
        ("lo", ctypes.c_uint32),
        ("hi", ctypes.c_uint32),
    )


class _VarSecinfo(ctypes.Structure):
    _fields_ = (
        ("type", ctypes.c_uint32),
        ("offset", ctypes.c_uint32),
        ("size", ctypes.c_uint32),
    )


@dataclass(frozen=True)
class Member:
    """One struct member: byte offset and size, and for a struct-typed member
    the nested struct's name (so nested layouts can be compared too)."""

    name: str
    offset: int
    size: int
    struct: str | None


@dataclass(frozen=True)
class Struct:
    name: str
    size: int
    members: tuple[Member, ...]


class Btf:
    """A parsed BTF blob. Ownership: ``parse`` returns an owned Btf (free it
    with close() or ``with``); ``borrowed`` wraps one a bpf_object owns."""

    def __init__(self, ptr: int, *, owned: bool) -> None:
        self._ptr = ptr
        self._owned = owned

    @classmethod
    def parse(cls, path: str | os.PathLike[str]) -> Self:
        """The BTF of an ELF object or a raw BTF file (/sys/kernel/btf/vmlinux)."""
        ptr = _lib.btf__parse(os.fsencode(path), None)
        if not ptr:
            code = ctypes.get_errno() or errno.EINVAL
            raise OSError(code, f"btf__parse {os.fspath(path)}: {os.strerror(code)}")
        return cls(ptr, owned=True)

    @classmethod
    def borrowed(cls, ptr: int) -> Self:
        return cls(ptr, owned=False)

    def close(self) -> None:
        if self._owned and self._ptr:
            _lib.btf__free(self._ptr)
        self._ptr = 0

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _type(self, type_id: int) -> tuple[_Type, int]:
        addr = _lib.btf__type_by_id(self._ptr, type_id)
        if not addr:
            raise KeyError(type_id)
        return _Type.from_address(addr), addr

    def _name(self, off: int) -> str:
        raw = _lib.btf__name_by_offset(self._ptr, off)
        return raw.decode() if raw else ""

    @staticmethod
    def _kind(t: _Type) -> int:
        return (t.info >> 24) & 0x1F

    def _find(self, name: str, kinds: set[Kind]) -> tuple[_Type, int]:
        for type_id in range(1, _lib.btf__type_cnt(self._ptr)):
            t, addr = self._type(type_id)
            if self._kind(t) in kinds and self._name(t.name_off) == name:
                return t, addr
        raise KeyError(f"no BTF {'/'.join(k.name for k in kinds)} named {name!r}")

    def _items(self, t: _Type, addr: int, item: type[_T]) -> list[_T]:
        vlen = t.info & 0xFFFF
        base = addr + ctypes.sizeof(_Type)
        return [item.from_address(base + i * ctypes.sizeof(item)) for i in range(vlen)]

    def struct(self, name: str) -> Struct:
        """Layout of ``struct NAME``. Bitfield members are not supported
        (the contract has none)."""
        t, addr = self._find(name, {Kind.STRUCT})
        members = []
        for m in self._items(t, addr, _Member):
            if t.info >> 31:  # kind_flag: offset holds bitfield size << 24
                raise ValueError(f"struct {name}: bitfields are not part of the contract")
            resolved, _ = self._type(_lib.btf__resolve_type(self._ptr, m.type))
            nested = self._kind(resolved) == Kind.STRUCT
            members.append(
                Member(
                    name=self._name(m.name_off),
                    offset=m.offset // 8,
                    size=int(_lib.btf__resolve_size(self._ptr, m.type)),
                    struct=self._name(resolved.name_off) if nested else None,
                )
            )
        return Struct(name, t.size_or_type, tuple(members))

    def enum(self, name: str) -> dict[str, int]:
        """Enumerators of ``enum NAME`` and their values."""
        t, addr = self._find(name, {Kind.ENUM, Kind.ENUM64})
        signed = bool(t.info >> 31)
        if self._kind(t) == Kind.ENUM64:
            out = {}
            for e in self._items(t, addr, _Enum64):
                val = (e.hi << 32) | e.lo
                out[self._name(e.name_off)] = val - (1 << 64) if signed and e.hi >> 31 else val
            return out
        items = self._items(t, addr, _Enum)
        return {self._name(e.name_off): e.val if signed else e.val & 0xFFFFFFFF for e in items}

    def datasec(self, name: str) -> dict[str, tuple[int, int]]:
        """Variables of data section NAME (".rodata", ".bss"): name -> (offset, size)."""
        t, addr = self._find(name, {Kind.DATASEC})
        out = {}
        for v in self._items(t, addr, _VarSecinfo):
            var, _ = self._type(v.type)
            out[self._name(var.name_off)] = (v.offset, v.size)
        return out
