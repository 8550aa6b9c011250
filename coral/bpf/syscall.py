"""The bpf(2) system call through ctypes: map access and BPF_PROG_TEST_RUN.

Why not libbpf for this too: these calls sit on the agent's hot paths (lease
renewal, mode switches, counters) and need nothing but an fd, so a direct
syscall keeps them at a few microseconds and works on any map fd, whoever
created it (a libbpf object, a pin, another process).

Keys and values are raw bytes in the layout of bpf/coral_structs.h; pass a
ctypes mirror from coral.bpf.structs (or bytes) and decode results with
``Mirror.from_buffer_copy``. coral.bpf.maps wraps this in typed maps.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
from collections.abc import Iterator
from dataclasses import dataclass
from enum import IntEnum
from functools import cache
from typing import Self

_SYS_BPF = {"x86_64": 321, "aarch64": 280}
_libc = ctypes.CDLL(None, use_errno=True)


class Cmd(IntEnum):
    """bpf(2) commands used here (include/uapi/linux/bpf.h)."""

    MAP_LOOKUP_ELEM = 1
    MAP_UPDATE_ELEM = 2
    MAP_DELETE_ELEM = 3
    MAP_GET_NEXT_KEY = 4
    OBJ_PIN = 6
    OBJ_GET = 7
    PROG_TEST_RUN = 10
    OBJ_GET_INFO_BY_FD = 15
    LINK_CREATE = 28


class AttachType(IntEnum):
    """Attach points used here (enum bpf_attach_type)."""

    CGROUP_SOCK_OPS = 3


class UpdateFlag(IntEnum):
    """Flags of MAP_UPDATE_ELEM."""

    ANY = 0  # create or replace
    NOEXIST = 1  # create only
    EXIST = 2  # replace only


class MapType(IntEnum):
    """The per-CPU map types (enum bpf_map_type): values come one per CPU."""

    PERCPU_HASH = 5
    PERCPU_ARRAY = 6
    LRU_PERCPU_HASH = 10


Buffer = bytes | bytearray | ctypes.Structure | ctypes.Array  # type: ignore[type-arg]


class _MapElemAttr(ctypes.Structure):
    _fields_ = (
        ("map_fd", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
        ("key", ctypes.c_uint64),
        ("value", ctypes.c_uint64),  # next_key for GET_NEXT_KEY
        ("flags", ctypes.c_uint64),
    )


class _ObjGetAttr(ctypes.Structure):
    _fields_ = (
        ("pathname", ctypes.c_uint64),
        ("bpf_fd", ctypes.c_uint32),
        ("file_flags", ctypes.c_uint32),
        ("path_fd", ctypes.c_int32),
    )


class _LinkCreateAttr(ctypes.Structure):
    _fields_ = (
        ("prog_fd", ctypes.c_uint32),
        ("target_fd", ctypes.c_uint32),
        ("attach_type", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
    )


class _InfoByFdAttr(ctypes.Structure):
    _fields_ = (
        ("bpf_fd", ctypes.c_uint32),
        ("info_len", ctypes.c_uint32),
        ("info", ctypes.c_uint64),
    )


class _MapInfo(ctypes.Structure):
    """The head of struct bpf_map_info (the kernel fills what fits)."""

    _fields_ = (
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
        ("name", ctypes.c_char * 16),
    )


class _TestRunAttr(ctypes.Structure):
    _fields_ = (
        ("prog_fd", ctypes.c_uint32),
        ("retval", ctypes.c_uint32),
        ("data_size_in", ctypes.c_uint32),
        ("data_size_out", ctypes.c_uint32),
        ("data_in", ctypes.c_uint64),
        ("data_out", ctypes.c_uint64),
        ("repeat", ctypes.c_uint32),
        ("duration", ctypes.c_uint32),
        ("ctx_size_in", ctypes.c_uint32),
        ("ctx_size_out", ctypes.c_uint32),
        ("ctx_in", ctypes.c_uint64),
        ("ctx_out", ctypes.c_uint64),
        ("flags", ctypes.c_uint32),
        ("cpu", ctypes.c_uint32),
        ("batch_size", ctypes.c_uint32),
    )


class BpfError(OSError):
    """A bpf(2) call failed; errno and the command say which and why."""


def bpf(cmd: Cmd, attr: ctypes.Structure) -> int:
    """Issue one bpf(2) command; returns its non-negative result or raises BpfError."""
    nr = _SYS_BPF.get(platform.machine())
    if nr is None:
        raise BpfError(errno.ENOSYS, f"bpf(2): unsupported architecture {platform.machine()}")
    ret = _libc.syscall(nr, int(cmd), ctypes.byref(attr), ctypes.sizeof(attr))
    if ret < 0:
        err = ctypes.get_errno()
        raise BpfError(err, f"bpf({cmd.name}): {os.strerror(err)}")
    return int(ret)


def _addr(buf: ctypes.Array | ctypes.Structure) -> int:  # type: ignore[type-arg]
    return ctypes.addressof(buf)


def _cbuf(data: Buffer, size: int, what: str) -> ctypes.Array[ctypes.c_char]:
    raw = bytes(data)
    if len(raw) != size:
        raise ValueError(f"{what} is {len(raw)} bytes, the map wants {size}")
    return ctypes.create_string_buffer(raw, size)


def mount_bpffs(path: str) -> None:
    """Mount a BPF filesystem at PATH (created if missing), for pinned maps.

    Not mounted by default on the lab's machines, and ``ip netns exec``
    remounts /sys, hiding /sys/fs/bpf: the agent mounts its own."""
    os.makedirs(path, exist_ok=True)
    if _libc.mount(b"bpf", os.fsencode(path), b"bpf", 0, None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount bpffs at {path}: {os.strerror(err)}")


BPF_FS_MAGIC = 0xCAFE4A11


def is_bpffs(path: str) -> bool:
    """Whether PATH (or, if it does not exist yet, its nearest existing
    parent, where it would be created) is on a BPF filesystem: pins
    anywhere else fail, and only with a vague EPERM."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    buf = ctypes.create_string_buffer(256)  # struct statfs; f_type comes first
    if _libc.statfs(os.fsencode(probe), buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"statfs {probe}: {os.strerror(err)}")
    return ctypes.c_long.from_buffer(buf).value == BPF_FS_MAGIC


def unmount(path: str) -> None:
    """Detach the filesystem at PATH (lazily: open fds keep their maps)."""
    mnt_detach = 2
    if _libc.umount2(os.fsencode(path), mnt_detach) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"umount {path}: {os.strerror(err)}")


def link_create(prog_fd: int, target_fd: int, attach_type: AttachType) -> int:
    """Attach program PROG_FD to TARGET_FD (a cgroup's directory fd for the
    cgroup attach types) as a BPF link; returns the link's fd, which the
    caller owns. The link lasts as long as an fd or a pin holds it."""
    attr = _LinkCreateAttr(prog_fd=prog_fd, target_fd=target_fd, attach_type=int(attach_type))
    return bpf(Cmd.LINK_CREATE, attr)


def obj_pin(fd: int, path: str) -> None:
    """Pin the map, program or link FD at PATH (on a bpffs)."""
    cpath = ctypes.create_string_buffer(os.fsencode(path))
    bpf(Cmd.OBJ_PIN, _ObjGetAttr(pathname=_addr(cpath), bpf_fd=fd))


@cache
def possible_cpus() -> int:
    """Number of possible CPUs: the number of slots of a per-CPU map value."""
    with open("/sys/devices/system/cpu/possible") as f:
        spec = f.read().strip()
    count = 0
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        count += int(hi or lo) - int(lo) + 1
    return count


class Map:
    """One BPF map, by fd.

    Ownership: a Map made with ``owned=False`` (the default) borrows its fd
    (for example from a BpfObject, which closes it); ``Map.open_pinned``
    returns an owned Map, closed by ``close()`` or the ``with`` block.
    Per-CPU maps are read with ``lookup_percpu`` (one value per possible
    CPU) and written with one value for every CPU.
    """

    def __init__(self, fd: int, *, owned: bool = False) -> None:
        self.fd = fd
        self._owned = owned
        info = _MapInfo()
        attr = _InfoByFdAttr(bpf_fd=fd, info_len=ctypes.sizeof(info), info=_addr(info))
        bpf(Cmd.OBJ_GET_INFO_BY_FD, attr)
        self.type = info.type
        self.key_size = info.key_size
        self.value_size = info.value_size
        self.max_entries = info.max_entries
        self.name = info.name.decode()
        self.percpu = info.type in set(MapType)
        # Per-CPU values are laid out one per possible CPU, each 8-aligned.
        self._slot = (self.value_size + 7) & ~7

    @classmethod
    def open_pinned(cls, path: str) -> Self:
        """An owned Map for the map pinned at PATH (on a bpffs)."""
        cpath = ctypes.create_string_buffer(os.fsencode(path))
        fd = bpf(Cmd.OBJ_GET, _ObjGetAttr(pathname=_addr(cpath)))
        return cls(fd, owned=True)

    def close(self) -> None:
        if self._owned and self.fd >= 0:
            os.close(self.fd)
        self.fd = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _value_buf(self) -> ctypes.Array[ctypes.c_char]:
        size = self._slot * possible_cpus() if self.percpu else self.value_size
        return ctypes.create_string_buffer(size)

    def _lookup_raw(self, key: Buffer) -> ctypes.Array[ctypes.c_char] | None:
        k = _cbuf(key, self.key_size, "key")
        v = self._value_buf()
        try:
            bpf(Cmd.MAP_LOOKUP_ELEM, _MapElemAttr(map_fd=self.fd, key=_addr(k), value=_addr(v)))
        except BpfError as e:
            if e.errno == errno.ENOENT:
                return None
            raise
        return v

    def lookup(self, key: Buffer) -> bytes | None:
        """The value stored under KEY, or None. Not for per-CPU maps."""
        if self.percpu:
            raise TypeError(f"map {self.name} is per-CPU: use lookup_percpu")
        v = self._lookup_raw(key)
        return None if v is None else v.raw

    def lookup_percpu(self, key: Buffer) -> list[bytes] | None:
        """One value per possible CPU, or None if KEY is absent."""
        if not self.percpu:
            raise TypeError(f"map {self.name} is not per-CPU: use lookup")
        v = self._lookup_raw(key)
        if v is None:
            return None
        raw = v.raw
        return [raw[i : i + self.value_size] for i in range(0, len(raw), self._slot)]

    def update(self, key: Buffer, value: Buffer, flags: UpdateFlag = UpdateFlag.ANY) -> None:
        """Store VALUE under KEY (per-CPU maps: the same VALUE on every CPU)."""
        k = _cbuf(key, self.key_size, "key")
        raw = bytes(value)
        if self.percpu:
            raw = _cbuf(raw, self.value_size, "value").raw.ljust(self._slot, b"\0")
            raw *= possible_cpus()
            v = ctypes.create_string_buffer(raw, len(raw))
        else:
            v = _cbuf(raw, self.value_size, "value")
        attr = _MapElemAttr(map_fd=self.fd, key=_addr(k), value=_addr(v), flags=flags)
        bpf(Cmd.MAP_UPDATE_ELEM, attr)

    def delete(self, key: Buffer) -> bool:
        """Remove KEY; False if it was not there."""
        k = _cbuf(key, self.key_size, "key")
        try:
            bpf(Cmd.MAP_DELETE_ELEM, _MapElemAttr(map_fd=self.fd, key=_addr(k)))
        except BpfError as e:
            if e.errno == errno.ENOENT:
                return False
            raise
        return True

    def iter_keys(self) -> Iterator[bytes]:
        """Every key, in the map's order. Concurrent deletes may skip keys."""
        cur: ctypes.Array[ctypes.c_char] | None = None
        nxt = ctypes.create_string_buffer(self.key_size)
        while True:
            attr = _MapElemAttr(
                map_fd=self.fd, key=0 if cur is None else _addr(cur), value=_addr(nxt)
            )
            try:
                bpf(Cmd.MAP_GET_NEXT_KEY, attr)
            except BpfError as e:
                if e.errno == errno.ENOENT:
                    return
                raise
            yield nxt.raw
            cur = ctypes.create_string_buffer(nxt.raw, self.key_size)


@dataclass(frozen=True)
class RunResult:
    """The outcome of BPF_PROG_TEST_RUN: the program's return value (the tc
    action), the packet as the program left it, and the mean run time."""

    retval: int
    data: bytes
    duration_ns: int


def prog_test_run(
    prog_fd: int, data: bytes, *, repeat: int = 1, ctx: bytes | None = None
) -> RunResult:
    """Run the program on one crafted packet, in the kernel, without a device.

    Only the output packet comes back: a bpf_clone_redirect inside the
    program really transmits, so clone paths need a throwaway namespace.
    CTX, if given, is an initial struct __sk_buff (mark, priority, gso_size...).
    """
    data_in = ctypes.create_string_buffer(data, len(data))
    out_size = len(data) + 512  # room for programs that grow the packet
    while True:
        data_out = ctypes.create_string_buffer(out_size)
        attr = _TestRunAttr(
            prog_fd=prog_fd,
            data_size_in=len(data),
            data_size_out=out_size,
            data_in=_addr(data_in),
            data_out=_addr(data_out),
            repeat=repeat,
        )
        if ctx is not None:
            ctx_in = ctypes.create_string_buffer(ctx, len(ctx))
            attr.ctx_size_in = len(ctx)
            attr.ctx_in = _addr(ctx_in)
        try:
            bpf(Cmd.PROG_TEST_RUN, attr)
        except BpfError as e:
            if e.errno == errno.ENOSPC and attr.data_size_out > out_size:
                out_size = attr.data_size_out
                continue
            raise
        return RunResult(attr.retval, data_out.raw[: attr.data_size_out], attr.duration)
