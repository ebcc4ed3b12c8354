"""Constants the guest runtime shares with the Python side are defined once, or checked here.

* Layout addresses and ports (testbed/layout.py) reach the runtime only as defines: no `.equ`
  in guests/lib may define one of them.
* Every other shared value (ucall commands and layout, GHCB offsets and MSR protocol codes,
  SVM exit codes, KVM hypercall numbers and errno values, termination reasons) is an `.equ` in
  guests/lib/*.s whose value must equal the Python constant it mirrors.
"""

from __future__ import annotations

import re
from enum import IntEnum
from pathlib import Path
from types import ModuleType

import pytest

from testbed.asm.syntax import _integer_value
from testbed.kvm import ghcb, uapi
from testbed.layout import Layout
from testbed.vmm import ucall

LIB = Path(__file__).resolve().parent.parent / "guests" / "lib"
_EQU = re.compile(r"^\s*\.equ\s+([A-Za-z_]\w*)\s*,\s*([^#\n]+?)\s*(?:#.*)?$", re.MULTILINE)


#: Build switches, not constants: a macro sets them (GUEST_IMAGE_LEGACY) and the runtime defaults them.
SWITCHES = {"GUEST_IMAGE_IS_LEGACY"}


def equs() -> dict[str, int]:
    """Every `.equ NAME, <integer literal>` in guests/lib/*.s (build switches aside)."""
    values: dict[str, int] = {}
    for path in sorted(LIB.glob("*.s")):
        for name, text in _EQU.findall(path.read_text(encoding="utf-8")):
            if name in SWITCHES:
                continue
            value = _integer_value(text)
            if value is not None:
                assert name not in values or values[name] == value, f"{name} defined twice in guests/lib"
                values[name] = value
    return values


def python_constants(*modules: ModuleType) -> dict[str, int]:
    """Module-level ints and IntEnum members of `modules`, by name."""
    found: dict[str, int] = {}
    for module in modules:
        for name, value in vars(module).items():
            if isinstance(value, type) and issubclass(value, IntEnum):
                found.update({member.name: int(member) for member in value})
            elif isinstance(value, int) and not isinstance(value, bool) and name.isupper():
                found.setdefault(name, value)
    return found


# The runtime's names for values the Python side spells differently.
GHCB_FIELDS = {
    "GHCB_CPL": ghcb.GhcbSave.cpl,
    "GHCB_RAX": ghcb.GhcbSave.rax,
    "GHCB_RCX": ghcb.GhcbSave.rcx,
    "GHCB_RDX": ghcb.GhcbSave.rdx,
    "GHCB_RBX": ghcb.GhcbSave.rbx,
    "GHCB_RSI": ghcb.GhcbSave.rsi,
    "GHCB_SW_EXITCODE": ghcb.GhcbSave.sw_exit_code,
    "GHCB_SW_EXITINFO1": ghcb.GhcbSave.sw_exit_info_1,
    "GHCB_SW_EXITINFO2": ghcb.GhcbSave.sw_exit_info_2,
    "GHCB_SW_SCRATCH": ghcb.GhcbSave.sw_scratch,
    "GHCB_XCR0": ghcb.GhcbSave.xcr0,
    "GHCB_VALID": ghcb.GHCB_VALID_BITMAP_OFFSET,
    "GHCB_SHARED_BUF": ghcb.GHCB_SHARED_BUFFER_OFFSET,
    "GHCB_VERSION": ghcb.GHCB_PROTOCOL_VERSION_OFFSET,
    "GHCB_USAGE": ghcb.GHCB_USAGE_OFFSET,
}

# Names that must be mirrored (a test that matched nothing would pass vacuously).
REQUIRED = [
    "UCALL_NONE", "UCALL_SYNC", "UCALL_ABORT", "UCALL_DONE", "UCALL_UNHANDLED",
    "UCALL_CMD", "UCALL_NARGS", "UCALL_ARGS", "UCALL_MAX_ARGS",
    "KVM_HC_MAP_GPA_RANGE", "KVM_ENOSYS", "KVM_EINVAL", "KVM_EPERM", "KVM_MAP_GPA_RANGE_ENCRYPTED",
    "KVM_FEATURE_HC_MAP_GPA_RANGE", "MSR_AMD64_SEV_ES_GHCB", "GHCB_MSR_TERM_REQ", "GHCB_MSR_PSC_REQ",
    "GHCB_MSR_REG_GPA_REQ", "SVM_EXIT_IOIO", "SVM_EXIT_MSR", "SVM_VMGEXIT_PSC", "SNP_PAGE_STATE_PRIVATE",
    "SNP_PAGE_STATE_SHARED", "VMGEXIT_PSC_MAX_ENTRY", "VMGEXIT_PSC_MAX_COUNT", "SEV_TERM_SET_LINUX",
    "GHCB_TERM_PSC", *GHCB_FIELDS,
]


def mirrored() -> dict[str, int]:
    return {**python_constants(ucall, uapi, ghcb), **{name: int(v) for name, v in GHCB_FIELDS.items()}}


def test_layout_values_reach_the_runtime_only_as_defines() -> None:
    """No guests/lib `.equ` defines a name the host passes as a define (layout.py): one source."""
    injected = set(Layout(8 << 20).defines())
    assert not injected & set(equs()), sorted(injected & set(equs()))


def test_every_required_constant_has_both_sides() -> None:
    """Each value named in REQUIRED is an `.equ` in guests/lib and a Python constant."""
    guest, host = equs(), mirrored()
    assert [name for name in REQUIRED if name not in guest] == []
    assert [name for name in REQUIRED if name not in host] == []


@pytest.mark.parametrize("name", sorted(set(equs()) & set(mirrored())))
def test_shared_constant_agrees(name: str) -> None:
    """A guests/lib `.equ` and the Python constant of the same name have the same value."""
    assert equs()[name] == mirrored()[name], f"{name}: guests/lib 0x{equs()[name]:x}, Python 0x{mirrored()[name]:x}"
