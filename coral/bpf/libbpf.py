"""ctypes binding of libbpf.so.1: open, configure, load and close a BPF object.

libbpf does what must match the kernel exactly (ELF relocation, BTF, map
creation and reuse of pinned maps, kfunc resolution, program load); coral
calls it only at start-up, about 1 ms per object. Map access afterwards goes
through coral.bpf.syscall.

Call order (each step's preconditions are the previous steps)::

    obj = BpfObject.open(path, pin_root=None)  # parse the ELF; nothing in the kernel yet
    obj.set_max_entries("coral_conns", n)      # optional, before load
    obj.set_rodata("coral_trace", b"\\x01")     # optional, before load: const volatile globals
    obj.load()                                 # create or reuse maps, verify and load programs
    fd = obj.prog_fd("coral_ingress")          # after load
    m = obj.map("coral_services")              # after load
    obj.close()                                # or use the object as a context manager

Ownership: the BpfObject owns the libbpf object and every fd it hands out
(prog_fd, map_fd, map()). They stay valid until close(); dup them to keep
them longer. A program attached to tc holds its own reference, so closing
the object does not detach it. With pin_root, every map declared
LIBBPF_PIN_BY_NAME is pinned there at load (or reused if already pinned)
and outlives the object; without it nothing is pinned.

Not thread-safe: open, configure and load an object from one thread.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import platform
import threading
from typing import Self

from coral.bpf.btf import Btf
from coral.bpf.syscall import Map

log = logging.getLogger(__name__)

lib = ctypes.CDLL("libbpf.so.1", use_errno=True)
_libc = ctypes.CDLL(None, use_errno=True)

_P = ctypes.c_void_p
_SIGNATURES: dict[str, tuple[object, list[object]]] = {
    "bpf_object__open_file": (_P, [ctypes.c_char_p, _P]),
    "bpf_object__load": (ctypes.c_int, [_P]),
    "bpf_object__close": (None, [_P]),
    "bpf_object__btf": (_P, [_P]),
    "bpf_object__next_map": (_P, [_P, _P]),
    "bpf_object__find_map_by_name": (_P, [_P, ctypes.c_char_p]),
    "bpf_object__find_program_by_name": (_P, [_P, ctypes.c_char_p]),
    "bpf_program__fd": (ctypes.c_int, [_P]),
    "bpf_map__fd": (ctypes.c_int, [_P]),
    "bpf_map__name": (ctypes.c_char_p, [_P]),
    "bpf_map__set_pin_path": (ctypes.c_int, [_P, ctypes.c_char_p]),
    "bpf_map__set_max_entries": (ctypes.c_int, [_P, ctypes.c_uint32]),
    "bpf_map__initial_value": (_P, [_P, ctypes.POINTER(ctypes.c_size_t)]),
}
for _name, (_res, _args) in _SIGNATURES.items():
    _fn = getattr(lib, _name)
    _fn.restype = _res
    _fn.argtypes = _args


class LibbpfError(OSError):
    """A libbpf call failed. For load failures the message ends with
    libbpf's warnings, which include the verifier's log."""


class _OpenOpts(ctypes.Structure):
    """struct bpf_object_open_opts of libbpf 1.1 (sz tells libbpf which fields exist)."""

    _fields_ = (
        ("sz", ctypes.c_size_t),
        ("object_name", ctypes.c_char_p),
        ("relaxed_maps", ctypes.c_bool),
        ("pin_root_path", ctypes.c_char_p),
        ("_removed_attach_prog_fd", ctypes.c_uint32),
        ("kconfig", ctypes.c_char_p),
        ("btf_custom_path", ctypes.c_char_p),
        ("kernel_log_buf", ctypes.c_char_p),
        ("kernel_log_size", ctypes.c_size_t),
        ("kernel_log_level", ctypes.c_uint32),
    )


# libbpf reports through a printf-style callback. Route it to logging and
# keep the warnings of the current thread's load for the exception message.
_PRINT_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
_LEVELS = (logging.WARNING, logging.INFO, logging.DEBUG)  # enum libbpf_print_level
_captured = threading.local()


def _on_print(level: int, fmt: bytes, va_list: int) -> int:
    out = ctypes.c_char_p()
    n = _libc.vasprintf(ctypes.byref(out), fmt, ctypes.c_void_p(va_list))
    if n < 0 or not out.value:
        return 0
    text = out.value.decode(errors="replace").rstrip("\n")
    _libc.free(out)
    pylevel = _LEVELS[level] if 0 <= level < len(_LEVELS) else logging.DEBUG
    log.log(pylevel, "%s", text)
    if pylevel == logging.WARNING and getattr(_captured, "lines", None) is not None:
        _captured.lines.append(text)
    return 0


# va_list is passed as a pointer only on x86-64; elsewhere libbpf keeps
# printing to stderr.
if platform.machine() == "x86_64":
    _print_cb = _PRINT_FN(_on_print)
    lib.libbpf_set_print.restype = _P
    lib.libbpf_set_print.argtypes = [_PRINT_FN]
    lib.libbpf_set_print(_print_cb)


def _err(what: str, ret: int | None = None) -> LibbpfError:
    code = -ret if ret is not None and ret < 0 else ctypes.get_errno() or errno.EINVAL
    return LibbpfError(code, f"{what}: {os.strerror(code)}")


class BpfObject:
    """One BPF ELF object (bpf/build/*.bpf.o) and the kernel objects it
    loaded. See the module docstring for call order and ownership."""

    def __init__(self, ptr: int, path: str) -> None:
        self._ptr: int | None = ptr
        self.path = path
        self.loaded = False
        self._maps: dict[str, Map] = {}

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, pin_root: str | None = None) -> Self:
        """Parse the object at PATH. With PIN_ROOT (a directory on a bpffs),
        pinned maps live there; without it, no map is pinned."""
        spath = os.fspath(path)
        opts = _OpenOpts(sz=ctypes.sizeof(_OpenOpts))
        if pin_root is not None:
            opts.pin_root_path = os.fsencode(pin_root)
        ptr = lib.bpf_object__open_file(os.fsencode(spath), ctypes.byref(opts))
        if not ptr:
            raise _err(f"open {spath}")
        obj = cls(ptr, spath)
        if pin_root is None:
            for m in obj._map_ptrs():
                lib.bpf_map__set_pin_path(m, None)
        return obj

    def _obj(self) -> int:
        if self._ptr is None:
            raise LibbpfError(errno.EBADF, f"{self.path}: object is closed")
        return self._ptr

    def _map_ptrs(self) -> list[int]:
        ptrs: list[int] = []
        m = lib.bpf_object__next_map(self._obj(), None)
        while m:
            ptrs.append(m)
            m = lib.bpf_object__next_map(self._obj(), m)
        return ptrs

    def _map_ptr(self, name: str) -> int:
        m = lib.bpf_object__find_map_by_name(self._obj(), name.encode())
        if not m:
            raise LibbpfError(errno.ENOENT, f"{self.path}: no map {name!r}")
        return int(m)

    def _before_load(self, what: str) -> None:
        if self.loaded:
            raise LibbpfError(errno.EBUSY, f"{self.path}: {what} must come before load()")

    def set_max_entries(self, map_name: str, n: int) -> None:
        """Resize a map (capacity from configuration). Before load()."""
        self._before_load("set_max_entries")
        ret = lib.bpf_map__set_max_entries(self._map_ptr(map_name), n)
        if ret:
            raise _err(f"{self.path}: set_max_entries({map_name})", ret)

    def set_rodata(self, var: str, value: bytes) -> None:
        """Set a ``const volatile`` global to VALUE (its exact size, in the
        target's byte order). Before load(): the verifier then treats it as a
        constant and removes code it disables."""
        self._before_load("set_rodata")
        btf_ptr = lib.bpf_object__btf(self._obj())
        if not btf_ptr:
            raise LibbpfError(errno.ENOENT, f"{self.path}: no BTF")
        offset, size = Btf.borrowed(btf_ptr).datasec(".rodata")[var]
        if len(value) != size:
            raise ValueError(f"{var} is {size} bytes, got {len(value)}")
        rodata = next(
            (m for m in self._map_ptrs() if lib.bpf_map__name(m).endswith(b".rodata")), None
        )
        if rodata is None:
            raise LibbpfError(errno.ENOENT, f"{self.path}: no .rodata map")
        total = ctypes.c_size_t()
        base = lib.bpf_map__initial_value(rodata, ctypes.byref(total))
        if not base or offset + size > total.value:
            raise LibbpfError(errno.EINVAL, f"{self.path}: .rodata has no room for {var}")
        ctypes.memmove(base + offset, value, size)

    def load(self) -> None:
        """Create (or reuse pinned) maps and load every program; the
        verifier runs here. Raises LibbpfError with libbpf's warnings."""
        self._before_load("load")
        _captured.lines = []
        try:
            ret = lib.bpf_object__load(self._obj())
            warnings = _captured.lines
        finally:
            _captured.lines = None
        if ret:
            err = _err(f"load {self.path}", ret)
            detail = "\n".join(warnings[-60:])
            raise LibbpfError(err.errno, f"{err.strerror}\n{detail}" if detail else err.strerror)
        self.loaded = True

    def prog_fd(self, name: str) -> int:
        """The fd of program NAME (its C function name). After load()."""
        p = lib.bpf_object__find_program_by_name(self._obj(), name.encode())
        fd = lib.bpf_program__fd(p) if p else -1
        if fd < 0:
            raise LibbpfError(errno.ENOENT, f"{self.path}: no loaded program {name!r}")
        return int(fd)

    def map_fd(self, name: str) -> int:
        """The fd of map NAME. After load()."""
        fd = lib.bpf_map__fd(self._map_ptr(name))
        if fd < 0:
            raise LibbpfError(errno.ENOENT, f"{self.path}: map {name!r} is not loaded")
        return int(fd)

    def map(self, name: str) -> Map:
        """Map NAME for syscall access; borrows the object's fd. After load()."""
        if name not in self._maps:
            self._maps[name] = Map(self.map_fd(name))
        return self._maps[name]

    def close(self) -> None:
        """Free the object and close every fd it handed out. Idempotent."""
        if self._ptr is not None:
            lib.bpf_object__close(self._ptr)
            self._ptr = None
            self._maps.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
