"""Canaries: the Unicorn 2.1.4 facts the hardware model (testbed/hw/unicorn_binding.py and up) is built on.

Each test pins one measured fact of ../shared/UNICORN.md (or one hazard the model works
around) on bare Unicorn with hand-encoded bytes - no Keystone, no testbed layer - so that an
Unicorn upgrade that changes the fact fails here, by name, instead of silently breaking the
model. A failing canary means: re-measure, then fix the model and UNICORN.md together.
"""

from __future__ import annotations

import ctypes
import struct
from collections.abc import Callable
from typing import Any

import pytest
import unicorn
from unicorn import unicorn_const as ucc
from unicorn import x86_const as ux

from testbed.hw.cpu import old_exception_offset

CODE = 0x1000
U64 = (1 << 64) - 1
HLT = b"\xf4"
NOP = b"\x90"


def new_uc(size: int = 0x100000) -> unicorn.Uc:
    """A 64-bit x86 Unicorn with `size` bytes of identity-mapped RAM at 0 and a stack."""
    uc = unicorn.Uc(ucc.UC_ARCH_X86, ucc.UC_MODE_64)
    uc.mem_map(0, size)
    uc.reg_write(ux.UC_X86_REG_RSP, 0x8000)
    return uc


def record_and_stop(seen: list[int]) -> Callable[[unicorn.Uc, int, Any], None]:
    """A UC_HOOK_INTR callback that records the vector and stops emulation."""

    def hook(u: unicorn.Uc, intno: int, _ud: Any) -> None:
        seen.append(intno)
        u.emu_stop()

    return hook


def start(uc: unicorn.Uc, code: bytes, until: int | None = None) -> unicorn.UcError | None:
    """Load `code` at CODE and run it; returns the UcError emu_start raised, if any."""
    uc.mem_write(CODE, code)
    try:
        uc.emu_start(CODE, CODE + len(code) if until is None else until)
    except unicorn.UcError as exc:
        return exc
    return None


def rip(uc: unicorn.Uc) -> int:
    """The guest RIP."""
    return int(uc.reg_read(ux.UC_X86_REG_RIP))


# ---------------------------------------------------------------------- interception


INVALID_INSNS = {
    "vmcall": bytes.fromhex("0f01c1"),
    "vmmcall": bytes.fromhex("0f01d9"),
    "rep_vmmcall_vmgexit": bytes.fromhex("f30f01d9"),
    "ud2": bytes.fromhex("0f0b"),
    "tdcall": bytes.fromhex("660f01cc"),
    "pvalidate": bytes.fromhex("f20f01ff"),
    "rmpadjust": bytes.fromhex("f30f01fe"),
}


@pytest.mark.parametrize("insn", list(INVALID_INSNS.values()), ids=list(INVALID_INSNS))
def test_virtualization_instructions_raise_insn_invalid_at_first_byte(insn: bytes) -> None:
    """VMCALL, VMMCALL, VMGEXIT, UD2, TDCALL, PVALIDATE, RMPADJUST hit UC_HOOK_INSN_INVALID, RIP at byte 0."""
    uc = new_uc()
    seen: list[int] = []
    intrs: list[int] = []

    def on_invalid(u: unicorn.Uc, _ud: Any) -> bool:
        seen.append(rip(u))
        return False

    uc.hook_add(ucc.UC_HOOK_INSN_INVALID, on_invalid)
    uc.hook_add(ucc.UC_HOOK_INTR, record_and_stop(intrs))
    error = start(uc, NOP + insn + HLT)
    assert seen == [CODE + 1], f"hook saw RIPs {[hex(r) for r in seen]}, expected [0x{CODE + 1:x}]"
    assert intrs == [], f"the instruction raised interrupts {intrs} instead"
    assert error is not None and error.errno == ucc.UC_ERR_INSN_INVALID, f"emu_start ended with {error!r}"


def test_insn_invalid_hook_returning_true_after_moving_rip_continues() -> None:
    """An INSN_INVALID hook that sets RIP past VMCALL and returns True resumes emulation there."""
    uc = new_uc()

    def skip(u: unicorn.Uc, _ud: Any) -> bool:
        u.reg_write(ux.UC_X86_REG_RIP, rip(u) + 3)
        return True

    uc.hook_add(ucc.UC_HOOK_INSN_INVALID, skip)
    code = INVALID_INSNS["vmcall"] + bytes.fromhex("b82a000000") + HLT  # vmcall; mov eax, 42; hlt
    error = start(uc, code)
    assert error is None, f"emu_start raised {error!r}"
    assert uc.reg_read(ux.UC_X86_REG_EAX) == 42
    assert rip(uc) == CODE + len(code)


@pytest.mark.parametrize("insn", [ux.UC_X86_INS_RDMSR, ux.UC_X86_INS_WRMSR, ux.UC_X86_INS_VMCALL],
                         ids=["rdmsr", "wrmsr", "vmcall"])
def test_insn_hook_cannot_hook_msr_or_vmcall(insn: int) -> None:
    """UC_HOOK_INSN refuses RDMSR, WRMSR and VMCALL (uc.hook_add raises UcError)."""
    uc = new_uc()
    with pytest.raises(unicorn.UcError):
        uc.hook_add(ucc.UC_HOOK_INSN, lambda *a: None, None, 1, 0, insn)


def test_insn_hook_accepts_cpuid() -> None:
    """UC_HOOK_INSN does accept CPUID and calls the hook for it (the control for the test above)."""
    uc = new_uc()
    seen: list[int] = []

    def on_cpuid(u: unicorn.Uc, _ud: Any) -> int:
        seen.append(u.reg_read(ux.UC_X86_REG_RIP))
        return 1  # handled: skip the instruction

    uc.hook_add(ucc.UC_HOOK_INSN, on_cpuid, None, 1, 0, ux.UC_X86_INS_CPUID)
    error = start(uc, b"\x0f\xa2" + HLT)  # cpuid; hlt
    assert error is None, f"emu_start raised {error!r}"
    assert len(seen) == 1, f"CPUID hook calls at {seen}"


def test_unknown_msr_write_is_dropped_and_reads_zero() -> None:
    """WRMSR to 0xC0010130 (GHCB MSR) is silently dropped, RDMSR then returns 0, no #GP; msr_read agrees."""
    uc = new_uc()
    intrs: list[int] = []
    uc.hook_add(ucc.UC_HOOK_INTR, record_and_stop(intrs))
    # mov ecx, 0xC0010130; mov eax, 0x1234; mov edx, 0x5678; wrmsr; xor eax, eax; xor edx, edx; rdmsr; hlt
    code = bytes.fromhex("b9300101c0" "b834120000" "ba78560000" "0f30" "31c0" "31d2" "0f32") + HLT
    error = start(uc, code)
    assert error is None, f"emu_start raised {error!r}"
    assert intrs == [], f"interrupts {intrs}"
    assert (uc.reg_read(ux.UC_X86_REG_EAX), uc.reg_read(ux.UC_X86_REG_EDX)) == (0, 0)
    uc.msr_write(0xC0010130, 0x1234_5678)
    assert uc.msr_read(0xC0010130) == 0


def test_hlt_ends_emu_start_cleanly_with_rip_after_it() -> None:
    """hlt returns from emu_start without an error and leaves RIP just past it."""
    uc = new_uc()
    error = start(uc, NOP + HLT + NOP * 4, until=CODE + 0x100)
    assert error is None, f"emu_start raised {error!r}"
    assert rip(uc) == CODE + 2, f"RIP 0x{rip(uc):x}"


# ------------------------------------------------------------------------------ exceptions


def run_intr(code: bytes, on_intr: Callable[[unicorn.Uc, int], None]) -> list[tuple[int, int]]:
    """Run `code` with a UC_HOOK_INTR that records (vector, RIP) and then calls `on_intr`."""
    uc = new_uc()
    seen: list[tuple[int, int]] = []

    def hook(u: unicorn.Uc, intno: int, _ud: Any) -> None:
        seen.append((intno, rip(u)))
        if len(seen) > 8:
            u.emu_stop()
            return
        on_intr(u, intno)

    uc.hook_add(ucc.UC_HOOK_INTR, hook)
    start(uc, code)
    return seen


DIV0_TWICE = bytes.fromhex("31c9" "f7f1" "f7f1") + HLT  # xor ecx, ecx; div ecx; div ecx; hlt


def skip_2(u: unicorn.Uc, _intno: int) -> None:
    """Skip the 2-byte div."""
    u.reg_write(ux.UC_X86_REG_RIP, rip(u) + 2)


def test_second_de_arrives_as_df_without_reset() -> None:
    """Without resetting QEMU's old_exception, the second #DE is reported as #DF (vector 8)."""
    seen = run_intr(DIV0_TWICE, skip_2)
    assert [v for v, _ in seen] == [0, 8], f"vectors {seen}"
    assert seen[0][1] == CODE + 2, f"#DE RIP 0x{seen[0][1]:x}, expected the div at 0x{CODE + 2:x}"


def test_old_exception_offset_is_found_once() -> None:
    """testbed.hw.cpu.old_exception_offset() locates exactly one int32 in a saved context (cached)."""
    off = old_exception_offset()
    size = len(bytes(new_uc().context_save()))
    assert 0 <= off <= size - 4, f"offset {off} outside a {size}-byte context"
    assert old_exception_offset() == off


def test_second_de_stays_de_when_old_exception_is_reset() -> None:
    """Writing -1 to old_exception (at old_exception_offset()) after each #DE keeps the next one a #DE."""
    off = old_exception_offset()

    def reset_and_skip(u: unicorn.Uc, intno: int) -> None:
        ctx = u.context_save()
        addr = ctypes.cast(ctx._context, ctypes.c_void_p).value
        assert addr is not None
        ctypes.c_int32.from_address(addr + off).value = -1
        u.context_restore(ctx)
        skip_2(u, intno)

    seen = run_intr(DIV0_TWICE, reset_and_skip)
    assert [v for v, _ in seen] == [0, 0], f"vectors {seen}"
    assert [r for _, r in seen] == [CODE + 2, CODE + 4]


def test_intr_rip_is_at_a_fault_and_after_a_trap() -> None:
    """UC_HOOK_INTR sees RIP at the faulting div (#DE) but after int3 (#BP); Unicorn never uses the IDT."""
    seen = run_intr(bytes.fromhex("31c9" "f7f1") + HLT, lambda u, i: u.emu_stop())
    assert seen == [(0, CODE + 2)], f"#DE: {seen}"
    seen = run_intr(NOP + b"\xcc" + HLT, lambda u, i: u.emu_stop())
    assert seen == [(3, CODE + 2)], f"int3: {seen}"


def test_segment_register_writes_do_not_change_cpl() -> None:
    """After iretq to CPL 3, reg_write of CS=0x08/SS=0x10 in an INTR hook leaves QEMU at CPL 3.

    So `mov ds, 0x10` (a DPL-0 data segment) at the handler faults with #GP: a model that delivers
    a CPL 3 -> 0 interrupt by writing CS and SS keeps running the handler at CPL 3.
    """
    uc = new_uc()
    gdt = [0, 0x00AF9B000000FFFF, 0x00CF93000000FFFF, 0x00CFF3000000FFFF, 0x00AFFB000000FFFF]
    uc.mem_write(0x500, struct.pack("<5Q", *gdt))
    uc.reg_write(ux.UC_X86_REG_GDTR, (0, 0x500, 0x27, 0))
    uc.reg_write(ux.UC_X86_REG_CS, 0x08)
    uc.reg_write(ux.UC_X86_REG_SS, 0x10)
    # push 0x1b; push 0x9000; pushfq; push 0x23; mov rax, 0x2100; push rax; iretq
    uc.mem_write(0x2100, bytes.fromhex("cd81"))  # int 0x81 at CPL 3
    kernel = bytes.fromhex("66b81000" "8ed8") + HLT  # mov ax, 0x10; mov ds, ax; hlt
    uc.mem_write(0x3000, kernel)
    seen: list[tuple[int, int, int]] = []

    def hook(u: unicorn.Uc, intno: int, _ud: Any) -> None:
        seen.append((intno, rip(u), int(u.reg_read(ux.UC_X86_REG_CS))))
        if len(seen) > 1:
            u.emu_stop()
            return
        u.reg_write(ux.UC_X86_REG_CS, 0x08)
        u.reg_write(ux.UC_X86_REG_SS, 0x10)
        u.reg_write(ux.UC_X86_REG_RSP, 0x8000)
        u.reg_write(ux.UC_X86_REG_RIP, 0x3000)

    uc.hook_add(ucc.UC_HOOK_INTR, hook)
    start(uc, bytes.fromhex("6a1b" "6800900000" "9c" "6a23" "48c7c000210000" "50" "48cf"), until=0x3000 + len(kernel))
    assert seen[0] == (0x81, 0x2102, 0x23), f"int 0x81 at CPL 3: {seen}"
    assert seen[1:] == [(13, 0x3004, 0x08)], f"mov ds at the 'CPL 0' handler: {seen[1:]}"


# ---------------------------------------------------------------------------- TLB / MMU


TLB_READ_WRITE = bytes.fromhex(
    "48c7c310500000"  # mov rbx, 0x5010
    "488b03"  # mov rax, [rbx]
    "48c7c328600000"  # mov rbx, 0x6028
    "488903"  # mov [rbx], rax
) + HLT


def virtual_tlb_uc(fill: Callable[[unicorn.Uc, int, int, Any], bool]) -> unicorn.Uc:
    """A Unicorn in UC_TLB_VIRTUAL mode whose TLB misses go to `fill`."""
    uc = new_uc()
    uc.ctl_set_tlb_mode(ucc.UC_TLB_VIRTUAL)
    uc.hook_add(ucc.UC_HOOK_TLB_FILL, lambda u, vaddr, access, entry, _ud: fill(u, vaddr, access, entry))
    return uc


def identity(entry: Any, vaddr: int) -> bool:
    """Grant everything, mapping `vaddr`'s page to itself."""
    entry.paddr = vaddr & ~0xFFF
    entry.perms = ucc.UC_PROT_ALL
    return True


def test_tlb_fill_sees_fetch_read_and_write_with_page_addresses() -> None:
    """The TLB-fill hook is told FETCH, READ and WRITE, and gets the page address, not the access's (0x5010)."""
    fills: list[tuple[int, int]] = []

    def fill(_u: unicorn.Uc, vaddr: int, access: int, entry: Any) -> bool:
        fills.append((vaddr, access))
        return identity(entry, vaddr)

    uc = virtual_tlb_uc(fill)
    error = start(uc, TLB_READ_WRITE)
    assert error is None, f"emu_start raised {error!r}"
    assert fills == [(CODE, ucc.UC_MEM_FETCH), (0x5000, ucc.UC_MEM_READ), (0x6000, ucc.UC_MEM_WRITE)], (
        "fills " + ", ".join(f"(0x{v:x}, {a})" for v, a in fills)
    )


def test_failed_fill_is_followed_by_fetch_fill_of_until_page() -> None:
    """After a fill returns False, emu_start(until=2**64-1) probes a FETCH of page 0xfffffffffffff000.

    The model must therefore treat only the first failed fill of a run as the guest's fault.
    """
    fills: list[tuple[int, int]] = []

    def fill(_u: unicorn.Uc, vaddr: int, access: int, entry: Any) -> bool:
        fills.append((vaddr, access))
        if vaddr in (0x5000, U64 & ~0xFFF):
            return False
        return identity(entry, vaddr)

    uc = virtual_tlb_uc(fill)
    error = start(uc, TLB_READ_WRITE, until=U64)
    assert error is not None and error.errno == ucc.UC_ERR_EXCEPTION, f"emu_start ended with {error!r}"
    assert rip(uc) == CODE + 7, f"RIP 0x{rip(uc):x}, expected the faulting mov at 0x{CODE + 7:x}"
    assert fills[1:] == [(0x5000, ucc.UC_MEM_READ), (U64 & ~0xFFF, ucc.UC_MEM_FETCH)], (
        "fills " + ", ".join(f"(0x{v:x}, {a})" for v, a in fills)
    )


def test_pte_change_without_invlpg_keeps_old_translation() -> None:
    """A guest PTE change is not seen until invlpg: the TLB keeps the old translation, as on hardware."""
    pt_base = 0x9000  # one-level toy page table: entry i maps virtual page i (0 = identity)
    fills: list[int] = []

    def fill(u: unicorn.Uc, vaddr: int, _access: int, entry: Any) -> bool:
        pte = struct.unpack("<Q", u.mem_read(pt_base + (vaddr >> 12) * 8, 8))[0]
        if vaddr == 0x5000:
            fills.append(pte)
        if not pte:
            return identity(entry, vaddr)
        entry.paddr = pte & ~0xFFF
        entry.perms = ucc.UC_PROT_ALL
        return True

    uc = virtual_tlb_uc(fill)
    uc.mem_write(pt_base + 5 * 8, struct.pack("<Q", 0x7000))  # virtual 0x5000 -> physical 0x7000
    uc.mem_write(0x7000, struct.pack("<Q", 0xAAAA))
    uc.mem_write(0x8000, struct.pack("<Q", 0xBBBB))
    code = bytes.fromhex(
        "48c7c300500000"  # mov rbx, 0x5000
        "488b03"  # mov rax, [rbx]      -> 0xAAAA
        "48c7c100800000"  # mov rcx, 0x8000
        "48c7c228900000"  # mov rdx, 0x9028 (the PTE of virtual page 5)
        "48890a"  # mov [rdx], rcx      -> PTE now says 0x8000
        "488b33"  # mov rsi, [rbx]      -> still 0xAAAA
        "0f013b"  # invlpg [rbx]
        "488b3b"  # mov rdi, [rbx]      -> 0xBBBB
    ) + HLT
    error = start(uc, code)
    assert error is None, f"emu_start raised {error!r}"
    got = [uc.reg_read(r) for r in (ux.UC_X86_REG_RAX, ux.UC_X86_REG_RSI, ux.UC_X86_REG_RDI)]
    assert got == [0xAAAA, 0xAAAA, 0xBBBB], f"reads {[hex(v) for v in got]}"
    assert fills == [0x7000, 0x8000], f"fills of page 0x5000 saw PTEs {[hex(p) for p in fills]}"
