"""The MMU: the guest's own page tables, #PF error codes, CR2, invlpg, the C-bit (x86/paging.py, hw/cpu.py)."""

from __future__ import annotations

import pytest

from testbed.layout import Layout
from testbed.machine import VmOptions, run_guest
from testbed.vmm.vmm import RunReport
from testbed.x86 import PFERR_FETCH, PFERR_PRESENT, PFERR_RSVD, PFERR_USER, PFERR_WRITE
from testbed.x86.paging import ACCESS_FETCH, ACCESS_READ, ACCESS_WRITE, PageFault, PagingMode, Translation, walk

# Edit the PTE of GUEST_FREE_GPA: and with ANDMASK, or with ORMASK, invlpg, then ACCESS it.
EDIT_PTE = """
.ifndef ANDMASK
.equ ANDMASK, -1
.endif
.ifndef ORMASK
.equ ORMASK, 0
.endif
guest_main:
    mov rdi, GUEST_FREE_GPA
    mov qword ptr [rdi], 0xc3          # a `ret` to fetch
    call rt_pte_address
    mov rcx, ANDMASK
    and qword ptr [rax], rcx
    mov rcx, ORMASK
    or qword ptr [rax], rcx
    mov rdi, GUEST_FREE_GPA
    invlpg [rdi]
.if ACCESS == 0
    mov rax, qword ptr [rdi + 0x28]
.endif
.if ACCESS == 1
    mov qword ptr [rdi + 0x30], rax
.endif
.if ACCESS == 2
    call rdi
.endif
.if ACCESS == 3
    GUEST_RUN_USER user_read
.endif
    GUEST_SYNC 0x600d
    ret
user_read:
    mov rdi, GUEST_FREE_GPA
    mov rax, qword ptr [rdi + 0x8]
    ret
"""


def run(access: int, andmask: int = -1, ormask: int = 0, **kw: object) -> RunReport:
    defines = {"ACCESS": access, "ANDMASK": andmask, "ORMASK": ormask}
    return run_guest("<mmu>", VmOptions(memory=16 << 20, defines=defines, **kw), text=EDIT_PTE)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("access", "andmask", "ormask", "error", "offset"),
    [
        (0, ~1, 0, 0, 0x28),  # not present, read
        (1, ~1, 0, PFERR_WRITE, 0x30),  # not present, write
        (1, ~2, 0, PFERR_PRESENT | PFERR_WRITE, 0x30),  # read-only page written with CR0.WP=1
        (0, -1, 1 << 50, PFERR_PRESENT | PFERR_RSVD, 0x28),  # reserved bit above MAXPHYADDR
        (2, -1, 1 << 63, PFERR_PRESENT | PFERR_FETCH, 0),  # NX page fetched (EFER.NXE=1)
    ],
)
def test_page_fault_error_code_and_cr2(access: int, andmask: int, ormask: int, error: int, offset: int) -> None:
    """A failed walk raises #PF with the SDM's error-code bits and CR2 = the faulting address."""
    report = run(access, andmask, ormask)
    assert report.outcome == "unhandled_exception", report.detail
    assert report.exception is not None
    assert report.exception["vector"] == 14
    assert report.exception["error_code"] == error, hex(report.exception["error_code"])
    fault_address = int(Layout(16 << 20).defines()["GUEST_FREE_GPA"]) + offset
    assert report.exception["cr2"] == fault_address, f"CR2 0x{report.exception['cr2']:x}, expected 0x{fault_address:x}"


def test_user_access_to_supervisor_page() -> None:
    """A CPL-3 read of a page whose U/S bit is clear faults with P|U."""
    report = run(3, andmask=~4)
    assert report.outcome == "unhandled_exception", report.detail
    assert report.exception is not None and report.exception["vector"] == 14
    assert report.exception["error_code"] == PFERR_PRESENT | PFERR_USER
    fault_address = int(Layout(16 << 20).defines()["GUEST_FREE_GPA"]) + 0x8  # user_read's load
    assert report.exception["cr2"] == fault_address, f"CR2 0x{report.exception['cr2']:x}, expected 0x{fault_address:x}"


def test_unchanged_pte_does_not_fault() -> None:
    """With the PTE left as the runtime built it, every access succeeds."""
    for access in (0, 1, 2, 3):
        report = run(access)
        assert report.outcome == "done", (access, report.detail)
        assert report.syncs() == [0x600D], access  # the access returned and the guest went on


def _tables(entries: dict[int, int]) -> dict[int, int]:
    return entries


def test_walk_strips_the_c_bit_and_reports_encryption() -> None:
    """x86.paging.walk strips the C-bit from every level and reports it from the leaf."""
    c = 1 << 51
    mem = {0x1000: 0x2000 | 7 | c, 0x2000: 0x3000 | 7 | c, 0x3000: 0x4000 | 7, 0x4000 + 8 * 5: 0x9000 | 7 | c}
    mode = PagingMode(phys_bits=48, enc_mask=c)
    result = walk(lambda pa: mem.get(pa, 0), 0x1000 | c, 0x5123, ACCESS_READ, False, mode)
    assert isinstance(result, Translation)
    assert result.gpa == 0x9000 and result.encrypted
    plain = walk(lambda pa: mem.get(pa, 0) & ~c, 0x1000, 0x5123, ACCESS_WRITE, False, mode)
    assert isinstance(plain, Translation) and not plain.encrypted


def test_walk_large_pages_and_reserved_ps_in_pml4() -> None:
    """2 MiB and 1 GiB leaves translate; PS in a PML4E is a reserved-bit fault."""
    mode = PagingMode(phys_bits=48)
    mem = {0x1000: 0x2000 | 7, 0x2000: 0x3000 | 7, 0x3000: 0x40000000 | 7 | (1 << 7)}  # PDE with PS: 2 MiB
    res = walk(lambda pa: mem.get(pa, 0), 0x1000, 0x12345, ACCESS_FETCH, False, mode)
    assert isinstance(res, Translation) and res.gpa == 0x40012000
    huge = {0x1000: 0x2000 | 7, 0x2000: 0x40000000 | 7 | (1 << 7)}  # PDPTE with PS: 1 GiB
    res = walk(lambda pa: huge.get(pa, 0), 0x1000, 0x12345678, ACCESS_FETCH, False, mode)
    assert isinstance(res, Translation) and res.gpa == 0x52345000
    bad = {0x1000: 0x2000 | 7 | (1 << 7)}
    fault = walk(lambda pa: bad.get(pa, 0), 0x1000, 0x12345, ACCESS_READ, False, mode)
    assert isinstance(fault, PageFault) and fault.error_code == PFERR_PRESENT | PFERR_RSVD


#: Clear EFER.NXE, then read or call a page whose PTE has bit 63 set (or is not present).
NXE_OFF = """
guest_main:
    mov rdi, GUEST_FREE_GPA
    mov qword ptr [rdi], 0xc3
    call rt_pte_address
.if PTE_NX
    movabs rcx, 0x8000000000000000
    or qword ptr [rax], rcx
.else
    and qword ptr [rax], -2
.endif
    mov ecx, 0xC0000080
    rdmsr
    btr eax, 11
    wrmsr
    mov rdi, GUEST_FREE_GPA
    mov rax, cr3
    mov cr3, rax
.if FETCH
    call rdi
.else
    mov rax, qword ptr [rdi + 0x28]
.endif
    GUEST_SYNC 0x600d
    ret
"""


@pytest.mark.parametrize(("pte_nx", "fetch", "error_code"), [
    (1, 0, PFERR_PRESENT | PFERR_RSVD),  # bit 63 is reserved without NXE
    (1, 1, PFERR_PRESENT | PFERR_RSVD),  # ... and no I/D bit
    (0, 1, 0),  # a not-present fetch: no I/D bit without NXE (or SMEP)
], ids=["read_bit63", "fetch_bit63", "fetch_not_present"])
@pytest.mark.parametrize("vm_type", ["default", "sev"])
def test_with_efer_nxe_clear_bit_63_is_reserved_and_no_fetch_bit_is_reported(
        vm_type: str, pte_nx: int, fetch: int, error_code: int) -> None:
    """EFER.NXE = 0: bit 63 of a paging entry is reserved (#PF with P|RSVD) and the error code's
    I/D bit is not set (SDM vol. 3 4.5 tables 4-14..4-19, 4.7; APM vol. 2 8.4.2), in the fill's
    walk (C and Python read EFER with CR0 and CR3)."""
    report = run_guest("<nxe>", VmOptions(vm_type=vm_type, memory=16 << 20, timeout=5.0,
                                          defines={"PTE_NX": pte_nx, "FETCH": fetch}), text=NXE_OFF)
    assert report.outcome == "unhandled_exception", report.detail
    assert report.exception is not None
    assert (report.exception["vector"], report.exception["error_code"]) == (14, error_code)


#: A PTE with bit 50 set: above MAXPHYADDR 48.
PTE_BIT_50 = """
guest_main:
    mov rdi, GUEST_FREE_GPA
    call rt_pte_address
    movabs rcx, 1 << 50
    or qword ptr [rax], rcx
    mov rdi, GUEST_FREE_GPA
    invlpg [rdi]
    mov rax, qword ptr [rdi + 0x28]
    GUEST_SYNC 0x600d
    ret
"""


@pytest.mark.parametrize("c_bit", [51, 47])
@pytest.mark.parametrize("vm_type", ["default", "sev"])
def test_bits_above_maxphyaddr_48_are_reserved_whatever_the_c_bit(vm_type: str, c_bit: int) -> None:
    """MAXPHYADDR is 48 with the C-bit at 51 or at 47 (EPYC 7001/7002): bit 50 of a PTE is
    reserved, a #PF with P|RSVD (SDM vol. 3 4.5; APM vol. 2 15.34.1), not an access to a GPA
    outside guest memory."""
    report = run_guest("<maxphy>", VmOptions(vm_type=vm_type, c_bit=c_bit, memory=16 << 20, timeout=5.0),
                       text=PTE_BIT_50)
    assert report.outcome == "unhandled_exception", report.detail
    assert report.exception is not None
    assert (report.exception["vector"], report.exception["error_code"]) == (14, PFERR_PRESENT | PFERR_RSVD)
