"""KVM's CPUID table as a guest reads it (testbed/kvm/vm.py CpuidTable.lookup: cpuid.c
kvm_cpuid(..., exact_only=false) and get_out_of_range_cpuid_entry())."""

from __future__ import annotations

import pytest
from test_tdx_scenarios import syncs, td

from testbed.kvm.vm import CpuidEntry, CpuidTable

INTEL = (0x756E6547, 0x6C65746E, 0x49656E69)  # "GenuineIntel": EBX, ECX, EDX
AMD = (0x68747541, 0x444D4163, 0x69746E65)  # "AuthenticAMD"
HYGON = (0x6F677948, 0x656E6975, 0x6E65476E)  # "HygonGenuine"


def table(vendor: tuple[int, int, int]) -> CpuidTable:
    """Max basic leaf 0xB (indexed, index 0 and 1), hypervisor range to 0x40000001, extended
    range to 0x80000008."""
    t = CpuidTable()
    ebx, ecx, edx = vendor
    t.set(CpuidEntry(0, 0, 0xB, ebx, ecx, edx))
    t.set(CpuidEntry(0xB, 0, 0x1, 0x2, 0x100, 0x7), indexed=True)
    t.set(CpuidEntry(0xB, 1, 0x4, 0x8, 0x201, 0x7), indexed=True)
    t.set(CpuidEntry(0x40000000, 0, 0x40000001, 0x4B4D564B, 0x564B4D56, 0x4D))
    t.set(CpuidEntry(0x80000000, 0, 0x80000008, 0, 0, 0))
    t.set(CpuidEntry(0x80000008, 0, 0x30, 0, 0, 0))
    return t


@pytest.mark.parametrize("function", [0xC, 0x40000002, 0x40000077, 0x80000009, 0xC0000000, 0x4FFFFFFF])
def test_an_intel_guests_leaf_beyond_its_range_reads_the_highest_basic_leaf(function: int) -> None:
    """Above its class's maximum (or in a class with no entry, e.g. 0xC0000000) an Intel guest's
    CPUID reads the highest basic leaf, at the requested index (get_out_of_range_cpuid_entry)."""
    t = table(INTEL)
    assert t.lookup(function, 0) == (0x1, 0x2, 0x100, 0x7)
    assert t.lookup(function, 1) == (0x4, 0x8, 0x201, 0x7)
    # index 5 of leaf 0xB has no entry: ECX[7:0] = the index, EDX from index 1 (kvm_cpuid)
    assert t.lookup(function, 5) == (0, 0, 5, 0x7)


@pytest.mark.parametrize("vendor", [AMD, HYGON], ids=["amd", "hygon"])
@pytest.mark.parametrize("function", [0xC, 0x40000077, 0x80000009])
def test_an_amd_or_hygon_guests_leaf_beyond_its_range_reads_zeros(vendor: tuple[int, int, int],
                                                                   function: int) -> None:
    """AuthenticAMD and HygonGenuine guests get zeros beyond a range (no redirection)."""
    assert table(vendor).lookup(function, 0) == (0, 0, 0, 0)


def test_a_leaf_within_its_range_without_an_entry_reads_zeros() -> None:
    """A function within its class's range but not set by userspace reads zeros, also on Intel."""
    t = table(INTEL)
    assert t.lookup(0x7, 0) == (0, 0, 0, 0)
    assert t.lookup(0x80000005, 0) == (0, 0, 0, 0)
    assert t.lookup(0x40000001, 0) == (0, 0, 0, 0)


def test_kvms_own_reads_of_its_table_are_exact() -> None:
    """KVM's own use of the table (kvm_find_cpuid_entry: e.g. the PV feature word) is exact: a
    leaf that is not set is 0 there, whatever a guest's CPUID of it reads."""
    t = table(INTEL)
    assert t.eax(0x40000077) == 0 and t.find(0x40000077, 0) is None
    assert t.lookup(0x40000077, 0)[0] == 0x1


def test_a_tds_tdvmcall_cpuid_beyond_the_range_reads_the_highest_basic_leaf() -> None:
    """A TD's TDVMCALL<CPUID> goes through kvm_cpuid(..., false) (tdx.c tdx_emulate_cpuid): leaf
    0x40000077, above the KVM leaves, reads the TD's highest basic leaf, as CPUID of it does."""
    body = """
guest_main:
    push r12
    push r13
    push r14
    push r15
    xor r10d, r10d
    mov r11, 10
    xor r12d, r12d
    xor r13d, r13d
    TDVMCALL
    mov rax, r12
    GUEST_SYNC rax
    xor r10d, r10d
    mov r11, 10
    mov r12, rax
    xor r13d, r13d
    TDVMCALL
    GUEST_SYNC r12, r13, r14, r15
    xor r10d, r10d
    mov r11, 10
    mov r12, 0x40000077
    xor r13d, r13d
    TDVMCALL
    GUEST_SYNC r10, r12, r13, r14, r15
    pop r15
    pop r14
    pop r13
    pop r12
    ret
"""
    (top,), highest, (status, *beyond) = syncs(td(body, name="cpuid_range.s"))
    assert status == 0 and beyond == highest and top >= 1
