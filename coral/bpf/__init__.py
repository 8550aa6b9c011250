"""coral's eBPF data plane from Python: build, load, configure, attach, observe.

Modules:
    structs  -- mirror of bpf/coral_structs.h and the enums of coral_consts.h
    syscall  -- bpf(2): map access, BPF_PROG_TEST_RUN
    libbpf   -- open/configure/load BPF objects (ctypes over libbpf.so.1)
    btf      -- struct layouts and enums from BTF (contract checks, rodata)
    maps     -- the data plane's maps, typed
    tc       -- attach programs to an interface's clsact hooks (pyroute2)
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

BPF_DIR = Path(__file__).resolve().parents[2] / "bpf"
"""The C sources (bpf/*.bpf.c, headers, Makefile)."""
BUILD_DIR = BPF_DIR / "build"


def object_path(name: str) -> Path:
    """The compiled object for bpf/NAME.bpf.c (not built here: see build())."""
    return BUILD_DIR / f"{name}.bpf.o"


def build() -> None:
    """Run bpf/Makefile (fast when up to date). For development and tests;
    a deployed agent loads prebuilt objects and never compiles."""
    jobs = str(os.cpu_count() or 1)
    subprocess.run(["make", "-s", "-j", jobs, "-C", str(BPF_DIR)], check=True)
