"""The Python mirror (coral.bpf.structs) matches the C contract as compiled.

Compared against each object's BTF, i.e. what clang actually laid out, not
against the header text. Needs clang and bpftool (to build), not root.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterator

import pytest

from coral import bpf
from coral.bpf.btf import Btf
from coral.bpf.structs import CONTRACT, ENUMS, CStruct, Reason

OBJECTS = ("coral_tc", "coral_dp")


@pytest.fixture(scope="module", params=OBJECTS)
def btf(request: pytest.FixtureRequest) -> Iterator[Btf]:
    bpf.build()
    with Btf.parse(bpf.object_path(request.param)) as b:
        yield b


@pytest.mark.parametrize("mirror", CONTRACT, ids=lambda m: m.C_NAME)
def test_struct_layout_matches_btf(btf: Btf, mirror: type[CStruct]) -> None:
    c = btf.struct(mirror.C_NAME)
    assert ctypes.sizeof(mirror) == c.size
    fields = [f[0] for f in mirror._fields_]
    assert fields == [m.name for m in c.members], "same members, same order"
    for m in c.members:
        desc = getattr(mirror, m.name)
        assert (desc.offset, desc.size) == (m.offset, m.size), m.name
        ftype = {f[0]: f[1] for f in mirror._fields_}[m.name]
        if m.struct is not None:
            assert issubclass(ftype, CStruct) and m.struct == ftype.C_NAME, m.name


@pytest.mark.parametrize("mirror", CONTRACT, ids=lambda m: m.C_NAME)
def test_struct_has_no_holes(btf: Btf, mirror: type[CStruct]) -> None:
    """Keys are hashed bytewise: every byte must belong to a member."""
    c = btf.struct(mirror.C_NAME)
    end = 0
    for m in c.members:
        assert m.offset == end, f"hole before {mirror.C_NAME}.{m.name}"
        end = m.offset + m.size
    assert end == c.size, f"tail padding in {mirror.C_NAME}"


@pytest.mark.parametrize("c_name", ENUMS)
def test_enum_values_match_btf(btf: Btf, c_name: str) -> None:
    mirror, prefix = ENUMS[c_name]
    c_values = btf.enum(c_name)
    assert all(name.startswith(prefix) for name in c_values)
    c_values = {name.removeprefix(prefix): v for name, v in c_values.items()}
    if mirror is Reason:
        assert c_values.pop("REASON_MAX") == len(Reason), "CORAL_REASON_MAX counts the reasons"
    assert c_values == {m.name: m.value for m in mirror}


def test_passes_precede_drops() -> None:
    """coral_reason_is_drop() in C is a comparison with CORAL_DROP_FENCED."""
    assert Reason.CONTINUE == 0
    passes = [r for r in Reason if r.name.startswith("PASS_")]
    drops = [r for r in Reason if r.is_drop]
    assert len(passes) + len(drops) + 1 == len(Reason)
    assert max(passes) < min(drops) == Reason.DROP_FENCED


def test_rodata_settings_are_visible(btf: Btf) -> None:
    """set_rodata finds load-time settings through the .rodata section."""
    assert btf.datasec(".rodata")["coral_trace"][1] == 1
