"""The TDX module as the hardware model plays it (testbed/hw/tdx_module.py): TDCALL leaves,
#VE with VE_INFO, the #DF rule, the Secure EPT's accept state and the shared bit.

The guests are small hand-written programs entered at `td_start` with the runtime's IDT
helpers only (not its boot, whose TDX support is guests/lib/tdx.s), run to a label; the
registers there are the result. Sources: Linux arch/x86/include/asm/shared/tdx.h (leaf
numbers), arch/x86/coco/tdx/tdx.c (tdx_get_ve_info, tdx_parse_tdinfo, handle_io) and
tdx-shared.c (try_accept_one); the module's src/td_dispatcher (intel/tdx-module):
tdg_vp_veinfo_get.c, tdg_mem_page_accept.c, tdg_vp_vmcall.c, td_cpuid.c, td_vmexit.c
(tdx_inject_ve: #DF while VE_INFO is valid).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import pytest
from guest_compat import far_return_to_64, far_return_to_compat, load_compat_segment

from testbed.errors import UsageError
from testbed.hw.exits import NPF_GUEST_ENC, StopReason, Vendor, VmxExitReason
from testbed.hw.memory import UnmappableMemoryError
from testbed.hw.tdx_module import (
    TDX_ATTR_SEPT_VE_DISABLE,
    TDX_EXT_EXIT_QUAL_TYPE_PENDING_EPT_VIOLATION,
    TDX_NO_VALID_VE_INFO,
    TDX_OPERAND_INVALID,
    TDX_PAGE_ALREADY_ACCEPTED,
    TDX_PAGE_SIZE_MISMATCH,
)
from testbed.machine import Machine, VmOptions, build_program, run_guest
from testbed.x86 import Reg
from testbed.x86.paging import ACCESS_READ, PagingMode, walk

TDCALL = ".byte 0x66, 0x0f, 0x01, 0xcc"

# td_start installs #VE (20) and #DF (8) handlers in the runtime's IDT. The #VE handler reads
# VE_INFO with TDG.VP.VEINFO.GET and stops at td_ve_done: R12 = status, R13 = exit reason,
# R14 = exit qualification, RBP = GLA, R15 = GPA, RBX = instruction length | info << 32.
SETUP = f"""
guest_main:
    ret
td_start:
    mov rdi, 20
    lea rsi, [rip + td_ve]
    mov rdx, 0x8e
    xor ecx, ecx
    call rt_set_gate
    mov rdi, 8
    lea rsi, [rip + td_df]
    mov rdx, 0x8e
    xor ecx, ecx
    call rt_set_gate
    sub rsp, 16
    mov word ptr [rsp], 0xfff
    mov rax, RT_IDT
    mov qword ptr [rsp + 2], rax
    lidt [rsp]
    add rsp, 16
    jmp td_body
td_ve:
    mov eax, 3
    {TDCALL}
    mov r12, rax
    mov r13, rcx
    mov r14, rdx
    mov r15, r9
    mov rbx, r10
    mov rbp, r8
td_ve_done:
    nop
td_df:
td_df_done:
    nop
td_body:
"""


@dataclass
class Recorder:
    """A hypervisor that records the TD's exits: completes TDG.VP.VMCALL, stops on the rest."""

    machine: Machine
    exits: list[tuple[int, int, int, int]] = field(default_factory=list)

    def vmexit(self, code: int, info1: int, info2: int) -> None:
        cpu = self.machine.cpu
        self.exits.append((code, info1, info2, cpu.ext_exit_qualification()))
        if code == VmxExitReason.EXIT_REASON_TDCALL:
            cpu.complete_tdcall()
        else:
            cpu.request_stop()


def _options(gpaw: int = 52) -> VmOptions:
    return VmOptions(vm_type="tdx", vendor=Vendor.INTEL, memory=8 << 20, gpaw=gpaw)


@contextmanager
def td(body: str, gpaw: int = 52) -> Iterator[Machine]:
    """A TD machine with `body` after the setup, RIP at td_start."""
    options = _options(gpaw)
    program = build_program("td_test.s", options, text=SETUP + body + "\ntd_end:\n    nop\n")
    with Machine(program, options) as machine:
        machine.cpu.write_reg(Reg.RIP, program.symbols["td_start"])
        yield machine


def run_to(machine: Machine, label: str) -> None:
    machine.boot_to(machine.program.symbols[label])


def regs(machine: Machine, *names: Reg) -> list[int]:
    return [machine.cpu.read_reg(r) for r in names]


def ve_info(body: str, gpaw: int = 52) -> dict[str, int]:
    with td(body, gpaw) as m:
        run_to(m, "td_ve_done")
        status, reason, qual, gla, gpa, insn = regs(m, Reg.R12, Reg.R13, Reg.R14, Reg.RBP, Reg.R15, Reg.RBX)
    return {"status": status, "reason": reason, "qual": qual, "gla": gla, "gpa": gpa, "len": insn & 0xFFFFFFFF}


# ------------------------------------------------------------------------------- #VE sources
def test_cpuid_hypervisor_range_is_ve_reason_10() -> None:
    """CPUID 0x40000000-0x4FFFFFFF is always #VE (td_cpuid.c), VE_INFO reason 10, length 2."""
    info = ve_info("mov eax, 0x40000000\ncpuid")
    assert info == {"status": 0, "reason": 10, "qual": 0, "gla": 0, "gpa": 0, "len": 2}


def test_cpuid_faulting_leaf_is_ve() -> None:
    """A leaf td_cpuid.c treats as faulting without REDUCE_VE (0xB, topology) raises #VE."""
    assert ve_info("mov eax, 0xb\nxor ecx, ecx\ncpuid")["reason"] == 10


def test_cpuid_leaf_0x21_is_the_module_signature() -> None:
    """The module answers CPUID 0x21 itself: EBX:EDX:ECX = "IntelTDX    " (tdx_early_init)."""
    with td("mov eax, 0x21\nxor ecx, ecx\ncpuid") as m:
        run_to(m, "td_end")
        eax, ebx, ecx, edx = regs(m, Reg.RAX, Reg.RBX, Reg.RCX, Reg.RDX)
    sig = b"".join(v.to_bytes(4, "little") for v in (ebx, edx, ecx))
    assert (eax, sig) == (0, b"IntelTDX    ")


def test_cpuid_leaf_0_reaches_the_tdx_leaf() -> None:
    """CPUID 0 from the module's configuration: max base leaf >= 0x21, the vendor GenuineIntel."""
    with td("xor eax, eax\ncpuid") as m:
        run_to(m, "td_end")
        eax, ebx, ecx, edx = regs(m, Reg.RAX, Reg.RBX, Reg.RCX, Reg.RDX)
    assert eax >= 0x21
    assert b"".join(v.to_bytes(4, "little") for v in (ebx, edx, ecx)) == b"GenuineIntel"


def test_hlt_is_ve_reason_12() -> None:
    """HLT in a TD is a #VE with reason 12 and length 1 (td_generic_ve_exit), no exit to KVM."""
    info = ve_info("hlt")
    assert (info["status"], info["reason"], info["len"]) == (0, 12, 1)


def test_port_out_is_ve_reason_30_with_the_io_qualification() -> None:
    """OUT DX, AL is #VE reason 30; the qualification is VMX's: size-1, bit 3 IN, port << 16
    (Linux's handle_io decodes it)."""
    info = ve_info("mov dx, 0x3f8\nmov al, 1\nout dx, al")
    assert (info["reason"], info["qual"], info["len"]) == (30, 0x3F8 << 16, 1)


def test_port_in_imm8_is_ve_with_in_bit() -> None:
    """IN AL, imm8 is #VE reason 30 with the IN bit (8) and length 2."""
    info = ve_info("in al, 0x71")
    assert (info["reason"], info["qual"], info["len"]) == (30, (0x71 << 16) | 8, 2)


def test_unvirtualised_msr_read_and_write_are_ve() -> None:
    """RDMSR/WRMSR of an MSR the module does not virtualise are #VE reasons 31 / 32 (length 2)."""
    assert ve_info("mov ecx, 0x4b564d00\nrdmsr")["reason"] == 31
    info = ve_info("mov ecx, 0x4b564d00\nxor eax, eax\nxor edx, edx\nwrmsr")
    assert (info["reason"], info["len"]) == (32, 2)


def test_vmcall_is_ve_reason_18_and_kvm_never_sees_it() -> None:
    """VMCALL in a TD is #VE reason 18, length 3 (td_generic_ve_exit); no VM exit reaches KVM."""
    with td("vmcall") as m:
        rec = Recorder(m)
        m.cpu.attach_hypervisor(rec)
        run_to(m, "td_ve_done")
        assert regs(m, Reg.R12, Reg.R13, Reg.RBX) == [0, 18, 3]
        assert rec.exits == []


MMIO_BODY = """
    mov rbx, 0x000ffffffffff000
    mov rax, cr3
    and rax, rbx
    mov rax, qword ptr [rax]
    and rax, rbx
    mov rcx, SHARED_1G_PTE
    mov qword ptr [rax + 8], rcx
    mov rax, cr3
    mov cr3, rax
    mov rax, 0x40000010
    mov eax, dword ptr [rax]
"""


@pytest.mark.parametrize("gpaw", [48, 52])
def test_shared_access_to_no_memory_is_an_ept_violation_ve(gpaw: int) -> None:
    """A shared access (shared bit GPAW-1 set in the PTE) to a GPA with no memory is MMIO: an
    EPT-violation #VE, reason 48, with the GLA and the GPA including the shared bit."""
    shared = 1 << (gpaw - 1)
    body = MMIO_BODY.replace("SHARED_1G_PTE", hex(shared | 0x40000000 | 0x83))
    info = ve_info(body, gpaw)
    assert (info["status"], info["reason"]) == (0, 48)
    assert info["gla"] == 0x40000010
    assert info["gpa"] == shared | 0x40000010
    assert info["qual"] & 0x7 == 1  # a data read


def test_second_ve_before_veinfo_get_is_double_fault() -> None:
    """A #VE while VE_INFO is still valid is #DF (td_vmexit.c tdx_inject_ve): the handler that
    does not read VE_INFO takes #DF on the next #VE."""
    body = """
    mov rdi, 20
    lea rsi, [rip + td_ve_noread]
    mov rdx, 0x8e
    xor ecx, ecx
    call rt_set_gate
    mov eax, 0x40000000
    cpuid
    jmp td_end
td_ve_noread:
    mov eax, 0x40000001
    cpuid
    jmp td_end
"""
    with td(body) as m:
        run_to(m, "td_df_done")
        assert m.cpu._tdx is not None and m.cpu._tdx.ve.valid and m.cpu._tdx.ve.exit_reason == 10


def test_ve_after_veinfo_get_is_delivered_again() -> None:
    """VEINFO.GET frees VE_INFO, so the next #VE is a #VE, not #DF."""
    body = """
    mov rdi, 20
    lea rsi, [rip + td_ve_count]
    mov rdx, 0x8e
    xor ecx, ecx
    call rt_set_gate
    xor r11, r11
    mov eax, 0x40000000
    cpuid
td_ve_count:
    inc r11
    mov eax, 3
    TDCALL_INSN
    cmp r11, 2
    je td_end
    mov eax, 0x40000000
    cpuid
""".replace("TDCALL_INSN", TDCALL)
    with td(body) as m:
        run_to(m, "td_end")
        assert m.cpu.read_reg(Reg.R11) == 2


# ------------------------------------------------------------------------------- leaves
def test_veinfo_get_without_ve_is_no_valid_ve_info() -> None:
    """TDG.VP.VEINFO.GET with nothing pending answers TDX_NO_VALID_VE_INFO and clears RCX..R10."""
    with td(f"mov rcx, 5\nmov eax, 3\n{TDCALL}") as m:
        run_to(m, "td_end")
        assert regs(m, Reg.RAX, Reg.RCX) == [TDX_NO_VALID_VE_INFO, 0]


@pytest.mark.parametrize("gpaw", [48, 52])
def test_vp_info_reports_gpaw_and_attributes(gpaw: int) -> None:
    """TDG.VP.INFO: RCX[5:0] = GPAW, RDX = attributes with SEPT_VE_DISABLE (tdx_parse_tdinfo)."""
    with td(f"mov eax, 1\n{TDCALL}", gpaw) as m:
        run_to(m, "td_end")
        rax, rcx, rdx = regs(m, Reg.RAX, Reg.RCX, Reg.RDX)
    assert (rax, rcx & 0x3F, rdx) == (0, gpaw, TDX_ATTR_SEPT_VE_DISABLE)


def test_unknown_leaf_is_operand_invalid() -> None:
    """A TDCALL leaf the module does not know answers TDX_OPERAND_INVALID (operand RAX)."""
    with td(f"mov eax, 0x55\n{TDCALL}") as m:
        run_to(m, "td_end")
        assert m.cpu.read_reg(Reg.RAX) == TDX_OPERAND_INVALID


def test_mr_report_stops_with_a_clear_error() -> None:
    """TDG.MR.REPORT is not modelled: the run stops naming it, the host does not crash."""
    with td(f"mov eax, 4\n{TDCALL}") as m:
        m.cpu.attach_hypervisor(Recorder(m))
        stop = m.cpu.run(5.0)
        assert stop.reason is StopReason.EMULATOR_ERROR and "TDG.MR.REPORT" in stop.detail


def test_vmcall_leaf_exits_to_kvm_with_reason_77_and_completes() -> None:
    """TDG.VP.VMCALL is a TD exit to KVM, EXIT_REASON_TDCALL (77); complete_tdcall() leaves
    RAX = 0 and RIP past the TDCALL (tdg_vp_vmcall.c)."""
    body = f"mov rcx, 0xfc00\nmov r10, 0\nmov r11, 0x10000\nxor eax, eax\n{TDCALL}\nmov r9, rax\njmp td_end"
    with td(body) as m:
        rec = Recorder(m)
        m.cpu.attach_hypervisor(rec)
        m.cpu.breakpoint = m.program.symbols["td_end"]
        assert m.cpu.run(5.0).detail == "breakpoint"
        assert [e[0] for e in rec.exits] == [VmxExitReason.EXIT_REASON_TDCALL]
        assert m.cpu.read_reg(Reg.R9) == 0


def test_vmcall_leaf_with_reserved_gpr_select_bits_is_operand_invalid() -> None:
    """TDG.VP.VMCALL with RCX bit 0, 1 or 4 set answers TDX_OPERAND_INVALID | RCX (1) itself."""
    body = f"mov rcx, 0x11\nxor eax, eax\n{TDCALL}"
    with td(body) as m:
        rec = Recorder(m)
        m.cpu.attach_hypervisor(rec)
        run_to(m, "td_end")
        assert m.cpu.read_reg(Reg.RAX) == TDX_OPERAND_INVALID | 1 and rec.exits == []


@pytest.mark.parametrize("rax", [0x1_0000_0001, 0x0100_0001, 0x1_0001, 0x1_0006, 0x1_0000],
                         ids=["reserved1", "reserved0", "vp_info_v1", "accept_v1", "vmcall_v1"])
def test_reserved_rax_bits_and_versions_are_operand_invalid(rax: int) -> None:
    """RAX bits 63:24 set, or a version (RAX[23:16]) for a leaf with none (TDG.VP.INFO, ACCEPT,
    TDG.VP.VMCALL), is TDX_OPERAND_INVALID | RAX before the leaf runs: no TD exit (td_call())."""
    body = f"mov rax, {rax:#x}\nmov rcx, 0xfc00\n{TDCALL}"
    with td(body) as m:
        rec = Recorder(m)
        m.cpu.attach_hypervisor(rec)
        run_to(m, "td_end")
        assert m.cpu.read_reg(Reg.RAX) == TDX_OPERAND_INVALID and rec.exits == []


def test_veinfo_get_version_1_is_accepted() -> None:
    """TDG.VP.VEINFO.GET has a version 1 (its own check refuses > 1): no VE pending answers
    TDX_NO_VALID_VE_INFO, not OPERAND_INVALID."""
    with td(f"mov eax, 0x10003\n{TDCALL}") as m:
        run_to(m, "td_end")
        assert m.cpu.read_reg(Reg.RAX) == TDX_NO_VALID_VE_INFO


@pytest.mark.parametrize(("leaf", "name"), [(2, "TDG.MR.RTMR.EXTEND"), (5, "TDG.VP.CPUIDVE.SET"),
                                            (8, "TDG.VM.WR"), (11, "TDG.SYS.RD"), (27, "TDG.VP.INVVPID")])
def test_module_leaves_not_modelled_stop_naming_the_leaf(leaf: int, name: str) -> None:
    """Leaves the module has (td_call()'s switch) but the testbed does not model stop the run
    naming them, never a TDX_OPERAND_INVALID the module would not give."""
    with td(f"mov eax, {leaf}\nxor ecx, ecx\n{TDCALL}") as m:
        m.cpu.attach_hypervisor(Recorder(m))
        stop = m.cpu.run(5.0)
        assert stop.reason is StopReason.EMULATOR_ERROR and name in stop.detail


def test_vp_info_says_sys_rd_is_available() -> None:
    """TDG.VP.INFO R10 = commands available, bit 0 TDG.SYS.RD (tdg_vp_info.c); R9, R11 = 0."""
    with td(f"mov r10, -1\nmov r11, -1\nmov eax, 1\n{TDCALL}") as m:
        run_to(m, "td_end")
        assert regs(m, Reg.RAX, Reg.R9, Reg.R10, Reg.R11) == [0, 0, 1, 0]


def test_vmcall_exposing_rbp_is_operand_invalid() -> None:
    """RCX bit 5 (RBP) is refused too: KVM builds every TD with TDX_CONFIG_FLAGS_NO_RBP_MOD
    (tdx.c setup_tdparams), which adds BIT(5) to tdg_vp_vmcall()'s check."""
    with td(f"mov rcx, 0xfc20\nxor eax, eax\n{TDCALL}") as m:
        rec = Recorder(m)
        m.cpu.attach_hypervisor(rec)
        run_to(m, "td_end")
        assert m.cpu.read_reg(Reg.RAX) == TDX_OPERAND_INVALID | 1 and rec.exits == []


def test_vmcall_shows_and_returns_only_the_exposed_gprs() -> None:
    """At TDG.VP.VMCALL KVM sees zeros in the GPRs RCX does not expose, and at TDH.VP.ENTER only
    the exposed ones take KVM's values; the others keep the TD's, RCX = the control
    (tdh_vp_enter.c save_regs_after_tdvmcall)."""
    body = (f"mov rcx, 0x1c00\nmov r10, 0\nmov r11, 0x10000\nmov r12, 0x12\nmov r13, 0x13\n"
            f"mov r14, 0x14\nmov r15, 0x15\nmov rbx, 0xb\nxor eax, eax\n{TDCALL}")
    seen: dict[Reg, int] = {}

    class Kvm(Recorder):
        def vmexit(self, code: int, info1: int, info2: int) -> None:
            cpu = self.machine.cpu
            seen.update({r: cpu.read_reg(r) for r in (Reg.R10, Reg.R11, Reg.R12, Reg.R13, Reg.R14, Reg.RBX)})
            for r in (Reg.R10, Reg.R11, Reg.R12, Reg.R13, Reg.R14, Reg.R15, Reg.RBX):
                cpu.write_reg(r, 0x777)
            super().vmexit(code, info1, info2)

    with td(body) as m:
        m.cpu.attach_hypervisor(Kvm(m))
        run_to(m, "td_end")
        after = regs(m, Reg.RAX, Reg.RCX, Reg.R10, Reg.R11, Reg.R12, Reg.R13, Reg.R14, Reg.R15, Reg.RBX)
    assert seen == {Reg.R10: 0, Reg.R11: 0x10000, Reg.R12: 0x12, Reg.R13: 0, Reg.R14: 0, Reg.RBX: 0}
    assert after == [0, 0x1c00, 0x777, 0x777, 0x777, 0x13, 0x14, 0x15, 0xb]


# ------------------------------------------------------------------------------- accept
def _accept(rcx: str) -> str:
    return f"mov rcx, {rcx}\nmov eax, 6\n{TDCALL}\n"


def test_accept_levels_and_answers() -> None:
    """TDG.MEM.PAGE.ACCEPT (tdg_mem_page_accept.c): 1G is OPERAND_INVALID | RCX (levels 4K..2M
    only), 2M over 4K Secure-EPT leaves is PAGE_SIZE_MISMATCH | 1, 4K of a pending page
    succeeds, again is PAGE_ALREADY_ACCEPTED | 0 (a warning), a misaligned 2M or a shared GPA
    is OPERAND_INVALID | RCX."""
    body = (_accept("0x600002") + "mov r8, rax\n" + _accept("0x600001") + "mov r9, rax\n"
            + _accept("0x600000") + "mov r10, rax\n" + _accept("0x600000") + "mov r11, rax\n"
            + _accept("0x601001") + "mov r12, rax\n" + _accept("0x8000000000600000") + "mov r13, rax\n")
    with td(body) as m:
        run_to(m, "td_end")
        got = regs(m, Reg.R8, Reg.R9, Reg.R10, Reg.R11, Reg.R12, Reg.R13)
        assert m.cpu._tdx is not None and m.cpu._tdx.is_accepted(0x600)
    assert got == [TDX_OPERAND_INVALID | 1, TDX_PAGE_SIZE_MISMATCH | 1, 0, TDX_PAGE_ALREADY_ACCEPTED,
                   TDX_OPERAND_INVALID | 1, TDX_OPERAND_INVALID | 1]


def test_accepted_page_is_readable_and_zeroed() -> None:
    """An accepted page reads as zeros (init_sept_4k_page) and the guest uses it."""
    body = _accept("0x600000") + "mov rax, 0x600008\nmov rbx, qword ptr [rax]\nmov qword ptr [rax], 7\n"
    with td(body) as m:
        run_to(m, "td_end")
        assert m.cpu.read_reg(Reg.RBX) == 0
        with pytest.raises(UnmappableMemoryError):
            m.memory.host_read(0x600000, 8)  # guest_memfd: the VMM cannot read private memory


def test_private_access_to_pending_page_exits_to_kvm() -> None:
    """A private access to a pending page is an EPT violation TD exit (48) with the GPA (its page) and the
    extended exit qualification PENDING_EPT_VIOLATION (6), which KVM's
    tdx_is_sept_violation_unexpected_pending() checks; no #VE (SEPT_VE_DISABLE)."""
    with td("mov rax, 0x600010\nmov rbx, qword ptr [rax]") as m:
        rec = Recorder(m)
        m.cpu.attach_hypervisor(rec)
        m.cpu.run(5.0)
        code, err, gpa, ext = rec.exits[0]
        assert (code, gpa, ext) == (VmxExitReason.EXIT_REASON_EPT_VIOLATION, 0x600000,
                                    TDX_EXT_EXIT_QUAL_TYPE_PENDING_EPT_VIOLATION)
        assert err & NPF_GUEST_ENC
        assert m.cpu.ext_exit_qualification() == 0  # only during that exit
        assert m.cpu._tdx is not None and m.cpu._tdx.ve.valid is False


def test_accept_of_a_shared_gfn_exits_to_kvm() -> None:
    """ACCEPT of a GFN KVM maps shared has no Secure EPT entry: an EPT violation TD exit (a
    private fault) that KVM turns into KVM_EXIT_MEMORY_FAULT; RIP stays at the TDCALL."""
    with td(_accept("0x600000")) as m:
        m.kvm_vm.set_memory_attributes(0x600000, 0x1000, 0)
        rec = Recorder(m)
        m.cpu.attach_hypervisor(rec)
        m.cpu.run(5.0)
        code, err, gpa, _ = rec.exits[0]
        assert (code, gpa) == (VmxExitReason.EXIT_REASON_EPT_VIOLATION, 0x600000) and err & NPF_GUEST_ENC


def test_conversion_to_shared_forgets_acceptance() -> None:
    """Private->shared removes the page from the Secure EPT (TDH.MEM.PAGE.REMOVE): converted
    back, it is pending again."""
    with td("nop") as m:
        tdx = m.cpu._tdx
        assert tdx is not None
        assert tdx.is_accepted(0x100)  # the image, added by KVM_TDX_INIT_MEM_REGION
        m.kvm_vm.set_memory_attributes(0x100000, 0x1000, 0)
        assert not tdx.is_accepted(0x100)


# ------------------------------------------------------------------------------- shared bit
@pytest.mark.parametrize("gpaw", [48, 52])
def test_walk_strips_the_shared_bit_and_marks_shared(gpaw: int) -> None:
    """The page walk strips the shared bit (GPAW-1) from the GPA; set = shared (the inverse
    of SEV's C-bit: PagingMode enc_means_private=False)."""
    shared = 1 << (gpaw - 1)
    mode = PagingMode(phys_bits=gpaw, enc_mask=shared, enc_means_private=False)
    tables = {0x1000: 0x2003, 0x2000: 0x3003, 0x3000: 0x4003, 0x4000 + 8 * 5: shared | 0x5003,
              0x4000 + 8 * 6: 0x6003}
    read = lambda pa: tables.get(pa, 0)  # noqa: E731
    sh = walk(read, 0x1000, 0x5000, ACCESS_READ, False, mode)
    pv = walk(read, 0x1000, 0x6000, ACCESS_READ, False, mode)
    assert not isinstance(sh, Exception) and not isinstance(pv, Exception)
    assert (sh.gpa, sh.encrypted) == (0x5000, False)  # type: ignore[union-attr]
    assert (pv.gpa, pv.encrypted) == (0x6000, True)  # type: ignore[union-attr]


# ------------------------------------------------------------------------------- usage
def test_tdx_with_amd_is_a_usage_error() -> None:
    """The tdx VM type is Intel only: vendor amd is a UsageError naming both."""
    with pytest.raises(UsageError, match="tdx needs an Intel vCPU"):
        VmOptions(vm_type="tdx", vendor=Vendor.AMD).validate()


@pytest.mark.parametrize("gpaw", [47, 51, "x", 64])
def test_bad_gpaw_is_a_usage_error(gpaw: object) -> None:
    """gpaw is 48 or 52; anything else is a UsageError naming the field."""
    with pytest.raises(UsageError, match="gpaw"):
        VmOptions(vm_type="tdx", vendor="intel", gpaw=gpaw)  # type: ignore[arg-type]


def test_cli_gpaw_flag() -> None:
    """`--gpaw 48` reaches VmOptions."""
    from testbed.cli import build_parser, vm_options_from_args

    args = build_parser().parse_args(["run", "x.s", "--vm-type", "tdx", "--vendor", "intel", "--gpaw", "48"])
    assert vm_options_from_args(args).gpaw == 48


def test_tdcall_outside_64_bit_mode_is_gp() -> None:
    """TDCALL from a 32-bit code segment is #GP(0) before RAX is looked at (td_call():
    "if (!is_td_guest_in_64b_mode()) inject_gp(0)"): here TDG.VP.INFO, which would succeed."""
    text = ("guest_main:\n" + load_compat_segment() + far_return_to_compat("compat")
            + "compat:\n    .byte 0xb8, 1, 0, 0, 0\n"  # mov eax, 1 (TDG.VP.INFO)
            + f"    {TDCALL}\n" + far_return_to_64("back64") + "back64:\n    ret\n")
    options = _options()
    report = run_guest("compat_tdcall.s", options, text=text)
    assert report.outcome == "unhandled_exception", report.detail
    assert report.exception is not None
    assert (report.exception["vector"], report.exception["error_code"]) == (13, 0)
