"""KVM's TDX side (testbed/kvm/tdx.py, arch/x86/kvm/vmx/tdx.c) over the fake hardware
(testbed/hw/fake.py): a TD's TDG.VP.VMCALL arrives as EXIT_REASON_TDCALL (77) with the guest's
R10-R15, and KVM finishes it with the module's complete_tdcall() (RAX = 0, RIP + 4).

1. Dispatch (tdx_to_vmx_exit_reason, tdcall_to_vmx_exit_reason, handle_tdvmcall): R10 != 0 is a
   KVM hypercall through the one dispatcher; instruction leaves as the VMX exit of that number.
2. MapGPA (tdx_map_gpa, __tdx_map_gpa, tdx_complete_vmcall_map_gpa): checks, chunks, RETRY,
   and the completion's reading of userspace's ret per --kvm-version.
3. ReportFatalError, GetTdVmCallInfo, GetQuote, SetupEventNotifyInterrupt, unknown leaves.
4. tdx_handle_ept_violation: an access before acceptance kills the VM (kvm_vm_dead).
"""

from __future__ import annotations

import errno
from typing import Any

import pytest

from testbed.hw.exits import RunStop, StopReason, Vendor, VmxExitReason
from testbed.hw.fake import FakeExit, FakeVcpu
from testbed.hw.memory import BytesMemory
from testbed.kvm.hypercall import neg
from testbed.kvm.ioctl import KvmIoctlError
from testbed.kvm.msr import (
    KVM_CAP_X86_USER_SPACE_MSR,
    KVM_MSR_EXIT_REASON_FILTER,
    KVM_MSR_EXIT_REASON_INVAL,
    KVM_MSR_EXIT_REASON_UNKNOWN,
    MSR_KVM_POLL_CONTROL,
    MSR_KVM_SYSTEM_TIME_NEW,
    MsrFilter,
)
from testbed.kvm.tdx import (
    TDVMCALL_GET_QUOTE,
    TDVMCALL_GET_TD_VM_CALL_INFO,
    TDVMCALL_MAP_GPA,
    TDVMCALL_REPORT_FATAL_ERROR,
    TDVMCALL_SETUP_EVENT_NOTIFY_INTERRUPT,
    TDVMCALL_STATUS_ALIGN_ERROR,
    TDVMCALL_STATUS_INVALID_OPERAND,
    TDVMCALL_STATUS_RETRY,
    TDVMCALL_STATUS_SUBFUNC_UNSUPPORTED,
    TDVMCALL_STATUS_SUCCESS,
)
from testbed.kvm.uapi import (
    KVM_CAP_EXIT_HYPERCALL,
    KVM_ENOSYS,
    KVM_EXIT_HYPERCALL_LONG_MODE,
    KVM_HC_MAP_GPA_RANGE,
    KVM_MAP_GPA_RANGE_DECRYPTED,
    KVM_MAP_GPA_RANGE_ENCRYPTED,
    KVM_MEMORY_ATTRIBUTE_PRIVATE,
    KVM_SYSTEM_EVENT_TDX_FATAL,
    HypercallExit,
    InternalErrorExit,
    IoInExit,
    IoOutExit,
    KvmExit,
    KvmVmType,
    MemoryFaultExit,
    RdmsrExit,
    SystemEventExit,
    TdxExit,
    WrmsrExit,
)
from testbed.kvm.vcpu import KvmVcpu
from testbed.kvm.version import DIFFERENCES, KvmVersion
from testbed.kvm.vm import CpuidEntry, CpuidTable, KvmVm
from testbed.tracker import make_tracker
from testbed.vmm.map_gpa import MapGpaHandler
from testbed.vmm.vmm import VmEnd, Vmm
from testbed.x86 import U64, Reg

MEM = 1 << 20
TDCALL = int(VmxExitReason.EXIT_REASON_TDCALL)
RIP = 0x1000
SHARED47 = 1 << 47
MB2 = 2 << 20


def make(gpaw: int = 48, kvm: KvmVersion = KvmVersion.KVM_X86, exits: bool = True,
         maxphyaddr: int = 52) -> tuple[FakeVcpu, KvmVm, KvmVcpu]:
    hw = FakeVcpu(Vendor.INTEL, MEM)
    vm = KvmVm(KvmVmType.KVM_X86_TDX_VM, Vendor.INTEL, hw.memory, kvm_version=kvm, gpaw=gpaw)
    table = CpuidTable()
    table.set(CpuidEntry(0x80000000, 0, 0x80000008, 0, 0, 0))
    table.set(CpuidEntry(0x80000008, 0, maxphyaddr, 0, 0, 0))
    table.set(CpuidEntry(0x40000000, 0, 0x40000001, 0x4B4D564B, 0x564B4D56, 0x4D))
    vm.set_cpuid(table)
    if exits:
        vm.enable_cap(KVM_CAP_EXIT_HYPERCALL, 1 << KVM_HC_MAP_GPA_RANGE)
    hw.regs[Reg.RIP] = RIP
    return hw, vm, KvmVcpu(vm, hw)


def tdvmcall(hw: FakeVcpu, r11: int, r10: int = 0, **regs: int) -> None:
    """Script one TDG.VP.VMCALL: R10, R11 and any of r12..r15, rbx, rdx, rsi, rdi, r8, r9."""
    values = {Reg.R10: r10, Reg.R11: r11, Reg.RAX: 0}
    values.update({Reg[name.upper()]: value for name, value in regs.items()})
    hw.exits.append(FakeExit(TDCALL, length=4, regs=values))


def resumed(hw: FakeVcpu, n: int = 1) -> bool:
    """The TD got its TDCALL back n times: RAX = 0, RIP past the 4-byte instruction each time."""
    return hw.tdcalls == n and hw.regs[Reg.RAX] == 0 and hw.regs[Reg.RIP] == RIP + 4 * n


def run_one(kvm: KvmVcpu) -> KvmExit | RunStop:
    return kvm.run(1.0)


# ------------------------------------------------------------------- 1. dispatch
def test_kvm_hypercall_goes_through_the_one_dispatcher_at_cpl0_64bit(monkeypatch: pytest.MonkeyPatch) -> None:
    """R10 != 0 is EXIT_REASON_VMCALL: R10..R14 become nr, a0..a3 for the one dispatcher with
    CPL 0 and a 64-bit call, and the result lands in R10 (tdx.c tdx_to_vmx_exit_reason,
    tdx_emulate_vmcall, complete_hypercall_exit; x86.c ____kvm_emulate_hypercall)."""
    hw, _vm, kvm = make()
    seen: list[tuple[Any, ...]] = []
    original = kvm.kvm_emulate_hypercall

    def spy(*args: Any) -> None:
        seen.append(args[:7])
        original(*args)

    monkeypatch.setattr(kvm, "kvm_emulate_hypercall", spy)
    hw.regs[Reg.CS] = 0x1B  # the TD's CPL is not KVM's to see: the call is made at CPL 0
    tdvmcall(hw, r10=0x999, r11=1, r12=2, r13=3, r14=4)
    assert isinstance(run_one(kvm), RunStop)
    assert seen == [(0x999, 1, 2, 3, 4, 0, True)]
    assert hw.regs[Reg.R10] == neg(KVM_ENOSYS) & U64
    assert resumed(hw)


def test_kvm_hypercall_map_gpa_range_exits_and_returns_userspace_ret_raw() -> None:
    """A TD's KVM_HC_MAP_GPA_RANGE (R10 = 12) is the same KVM_EXIT_HYPERCALL as from VMCALL, and
    userspace's ret goes to R10 unchecked (tdx.c complete_hypercall_exit)."""
    hw, _vm, kvm = make()
    tdvmcall(hw, r10=KVM_HC_MAP_GPA_RANGE, r11=0x200000, r12=4, r13=KVM_MAP_GPA_RANGE_ENCRYPTED)
    run = run_one(kvm)
    assert isinstance(run, HypercallExit)
    assert run.nr == KVM_HC_MAP_GPA_RANGE and run.args[:3] == (0x200000, 4, KVM_MAP_GPA_RANGE_ENCRYPTED)
    run.ret = 0x1234
    assert isinstance(run_one(kvm), RunStop)
    assert hw.regs[Reg.R10] == 0x1234 and resumed(hw)


def test_cpuid_leaf_answers_from_the_vm_cpuid_in_r12_r15() -> None:
    """TDVMCALL<CPUID>: EAX, ECX from R12, R13; kvm_cpuid()'s EAX..EDX into R12..R15, R10 left
    0 (tdx.c tdx_emulate_cpuid)."""
    hw, _vm, kvm = make()
    tdvmcall(hw, r11=10, r12=0x40000000, r13=0)
    assert isinstance(run_one(kvm), RunStop)
    regs = [hw.regs[r] for r in (Reg.R12, Reg.R13, Reg.R14, Reg.R15)]
    assert regs == [0x40000001, 0x4B4D564B, 0x564B4D56, 0x4D]
    assert hw.regs[Reg.R10] == TDVMCALL_STATUS_SUCCESS and resumed(hw)


def test_io_leaf_exits_as_kvm_exit_io_and_in_value_lands_in_r11() -> None:
    """TDVMCALL<IO>: R12 size, R13 write, R14 port, R15 value; no in-kernel device, so
    KVM_EXIT_IO; an IN's data goes to R11 (tdx.c tdx_emulate_io, tdx_complete_pio_in)."""
    hw, _vm, kvm = make()
    tdvmcall(hw, r11=30, r12=4, r13=1, r14=0xE9, r15=0xAABBCCDD11223344)
    out = run_one(kvm)
    assert isinstance(out, IoOutExit) and (out.port, out.size, out.value) == (0xE9, 4, 0x11223344)
    tdvmcall(hw, r11=30, r12=2, r13=0, r14=0x70)
    run = run_one(kvm)
    assert isinstance(run, IoInExit) and (run.port, run.size) == (0x70, 2)
    run.data = b"\x34\x12"
    assert isinstance(run_one(kvm), RunStop)
    assert hw.regs[Reg.R11] == 0x1234 and resumed(hw, 2)


@pytest.mark.parametrize(("size", "write"), [(3, 0), (8, 0), (0, 1), (1, 2)])
def test_io_leaf_with_bad_size_or_direction_is_invalid_operand(size: int, write: int) -> None:
    """TDVMCALL<IO> with a size other than 1, 2, 4 or a write flag other than 0/1 is
    INVALID_OPERAND, with no exit (tdx.c tdx_emulate_io)."""
    hw, _vm, kvm = make()
    tdvmcall(hw, r11=30, r12=size, r13=write, r14=0xE9)
    assert isinstance(run_one(kvm), RunStop)
    assert hw.regs[Reg.R10] == TDVMCALL_STATUS_INVALID_OPERAND and resumed(hw)


def test_msr_leaves_follow_tdx_msr_rules() -> None:
    """TDVMCALL<RDMSR> of MSR_KVM_POLL_CONTROL (in tdx_has_emulated_msr) reads 1 into R11; a
    KVM PV MSR outside that list is INVALID_OPERAND rather than #GP (tdx.c tdx_get_msr,
    tdx_complete_emulated_msr)."""
    hw, _vm, kvm = make()
    tdvmcall(hw, r11=31, r12=MSR_KVM_POLL_CONTROL)
    tdvmcall(hw, r11=32, r12=MSR_KVM_SYSTEM_TIME_NEW, r13=0x1001)
    assert isinstance(run_one(kvm), RunStop)
    assert hw.injected == []  # KVM cannot inject #GP into a TD
    assert hw.regs[Reg.R10] == TDVMCALL_STATUS_INVALID_OPERAND and resumed(hw, 2)
    hw2, _vm2, kvm2 = make()
    tdvmcall(hw2, r11=31, r12=MSR_KVM_POLL_CONTROL)
    assert isinstance(run_one(kvm2), RunStop)
    assert hw2.regs[Reg.R11] == 1 and hw2.regs[Reg.R10] == 0


def test_an_msr_kvm_does_not_emulate_for_a_td_fails_with_reason_inval() -> None:
    """An MSR outside tdx_has_emulated_msr() fails in tdx_get_msr() with 1, not UNSUPPORTED: with
    only UNKNOWN user exits enabled it is INVALID_OPERAND, with INVAL ones a KVM_EXIT_X86_RDMSR of
    reason INVAL (x86.c kvm_msr_reason)."""
    hw, vm, kvm = make()
    vm.enable_cap(KVM_CAP_X86_USER_SPACE_MSR, KVM_MSR_EXIT_REASON_UNKNOWN)
    tdvmcall(hw, r11=31, r12=0x12345)
    assert isinstance(run_one(kvm), RunStop)
    assert hw.regs[Reg.R10] == TDVMCALL_STATUS_INVALID_OPERAND and resumed(hw)
    hw, vm, kvm = make()
    vm.enable_cap(KVM_CAP_X86_USER_SPACE_MSR, KVM_MSR_EXIT_REASON_INVAL)
    tdvmcall(hw, r11=31, r12=0x12345)
    run = run_one(kvm)
    assert isinstance(run, RdmsrExit) and (run.index, run.msr_reason) == (0x12345, KVM_MSR_EXIT_REASON_INVAL)


@pytest.mark.parametrize(("leaf", "index", "value", "r10", "r11"), [
    (31, 0x3A, 0, TDVMCALL_STATUS_SUCCESS, 1),  # IA32_FEAT_CTL reads FEAT_CTL_LOCKED (no LMCE)
    (32, 0x3A, 1, TDVMCALL_STATUS_INVALID_OPERAND, None),  # read-only (tdx_is_read_only_msr)
    (32, 0xC0000080, 0x500, TDVMCALL_STATUS_INVALID_OPERAND, None),  # EFER: read-only
    (32, 0x1B, 0xFEE00900, TDVMCALL_STATUS_INVALID_OPERAND, None),  # APIC_BASE: read-only
    (31, 0x4D0, 0, TDVMCALL_STATUS_INVALID_OPERAND, None),  # MCG_EXT_CTL without MCG_LMCE_P
])
def test_td_msr_special_cases(leaf: int, index: int, value: int, r10: int, r11: int | None) -> None:
    """tdx_get_msr()/tdx_set_msr()'s own cases: IA32_FEAT_CTL reads locked, the read-only MSRs
    refuse writes, IA32_MCG_EXT_CTL needs LMCE (tdx.c)."""
    hw, _vm, kvm = make()
    tdvmcall(hw, r11=leaf, r12=index, r13=value)
    assert isinstance(run_one(kvm), RunStop)
    assert hw.regs[Reg.R10] == r10 and resumed(hw)
    if r11 is not None:
        assert hw.regs[Reg.R11] == r11


def test_filtered_wrmsr_exits_to_userspace_and_its_error_is_invalid_operand() -> None:
    """A filtered WRMSR exits as KVM_EXIT_X86_WRMSR with EDX:EAX from R13; userspace's error is
    INVALID_OPERAND (x86.c kvm_emulate_wrmsr, tdx.c tdx_complete_emulated_msr)."""
    hw, vm, kvm = make()
    vm.enable_cap(KVM_CAP_X86_USER_SPACE_MSR, KVM_MSR_EXIT_REASON_FILTER)
    vm.set_msr_filter(MsrFilter.deny(0x4B564D08))
    tdvmcall(hw, r11=32, r12=0x4B564D08, r13=0x1_0000_0001)
    run = run_one(kvm)
    assert isinstance(run, WrmsrExit) and (run.index, run.data) == (0x4B564D08, 0x1_0000_0001)
    run.error = 1
    assert isinstance(run_one(kvm), RunStop)
    assert hw.regs[Reg.R10] == TDVMCALL_STATUS_INVALID_OPERAND and resumed(hw)


def test_hlt_leaf_halts_the_vcpu_in_kvm_until_an_event() -> None:
    """TDVMCALL<HLT> is kvm_emulate_halt_noskip() with the in-kernel local APIC every TD has
    (tdx_vcpu_create requires a split irqchip): no KVM_EXIT_HLT, the vCPU halts in KVM and
    KVM_RUN blocks (a timeout here, nothing can wake it) until an event is pending; then the
    TDCALL completes (x86.c __kvm_emulate_halt)."""
    hw, _vm, kvm = make()
    tdvmcall(hw, r11=12, r12=0)
    for _ in range(2):
        stop = run_one(kvm)
        assert isinstance(stop, RunStop) and stop.reason is StopReason.TIMEOUT and "halted" in stop.detail
        assert hw.tdcalls == 0
    kvm.inject_event()
    assert isinstance(run_one(kvm), RunStop)
    assert hw.regs[Reg.R10] == TDVMCALL_STATUS_SUCCESS and resumed(hw)
    # with an event pending at the halt (kvm_vcpu_has_events) the vCPU stays runnable
    done: list[int] = []
    kvm.inject_event()
    kvm.halt(lambda: done.append(1))
    assert done == [1] and not kvm.pending_event


def test_mmio_leaf_checks_then_has_no_device() -> None:
    """TDVMCALL<MMIO>: a private GPA or bad size is INVALID_OPERAND; a shared GPA would be
    KVM_EXIT_MMIO, which the testbed (no MMIO devices) reports as KVM_EXIT_INTERNAL_ERROR
    (tdx.c tdx_emulate_mmio; README, Deliberate deviations)."""
    hw, _vm, kvm = make()
    tdvmcall(hw, r11=48, r12=4, r13=0, r14=0xFEE00000)  # private
    assert isinstance(run_one(kvm), RunStop)
    assert hw.regs[Reg.R10] == TDVMCALL_STATUS_INVALID_OPERAND
    tdvmcall(hw, r11=48, r12=3, r13=0, r14=SHARED47 | 0xFEE00000)  # size 3
    assert isinstance(run_one(kvm), RunStop)
    assert hw.regs[Reg.R10] == TDVMCALL_STATUS_INVALID_OPERAND and resumed(hw, 2)
    tdvmcall(hw, r11=48, r12=4, r13=0, r14=SHARED47 | 0xFEE00000)
    run = run_one(kvm)
    assert isinstance(run, InternalErrorExit) and "gpa 0xfee00000" in run.detail


@pytest.mark.parametrize(("r12", "r13"), [((1 << 32) | 4, 0), (4, 1 << 32), ((7 << 32) | 8, (1 << 63) | 1)])
def test_mmio_size_and_direction_are_their_low_32_bits(r12: int, r13: int) -> None:
    """TDVMCALL<MMIO> reads R12 and R13 into `int size, write` (tdx.c tdx_emulate_mmio): only
    their low 32 bits are checked, so these reach the device lookup (here: no device)."""
    hw, _vm, kvm = make()
    tdvmcall(hw, r11=48, r12=r12, r13=r13, r14=SHARED47 | 0xFEE00000)
    run = run_one(kvm)
    kind = "write" if r13 & 1 else "read"
    assert isinstance(run, InternalErrorExit) and f"{kind} of {r12 & 0xFF} bytes at gpa 0xfee00000" in run.detail


@pytest.mark.parametrize("leaf", [0x10005, 0x20000, 0, 1, 18, (1 << 64) - 1])
def test_unknown_leaf_is_subfunc_unsupported(leaf: int) -> None:
    """Any other R11 with R10 = 0 is SUBFUNC_UNSUPPORTED (tdx.c handle_tdvmcall)."""
    hw, _vm, kvm = make()
    tdvmcall(hw, r11=leaf)
    assert isinstance(run_one(kvm), RunStop)
    assert hw.regs[Reg.R10] == TDVMCALL_STATUS_SUBFUNC_UNSUPPORTED and resumed(hw)


# --------------------------------------------------------------------- 2. MapGPA
@pytest.mark.parametrize(("gpa", "size", "status"), [
    (0x200000, 0, TDVMCALL_STATUS_INVALID_OPERAND),                      # size 0
    ((1 << 64) - 0x1000, 0x2000, TDVMCALL_STATUS_INVALID_OPERAND),       # wraps
    (SHARED47 - 0x1000, 0x2000, TDVMCALL_STATUS_INVALID_OPERAND),        # both sides of bit 47
    (1 << 52, 0x1000, TDVMCALL_STATUS_INVALID_OPERAND),                  # beyond MAXPHYADDR 52
    ((1 << 52) - 0x1000, 0x2000, TDVMCALL_STATUS_INVALID_OPERAND),       # ends beyond it
    (0x200800, 0x1000, TDVMCALL_STATUS_ALIGN_ERROR),
    (0x200000, 0x1800, TDVMCALL_STATUS_ALIGN_ERROR),
])
def test_map_gpa_bad_input_is_answered_with_r11_the_gpa(gpa: int, size: int, status: int) -> None:
    """tdx_map_gpa(): wrap, size 0, an illegal GPA (kvm_vcpu_is_legal_gpa) or ends on different
    sides of the shared bit are INVALID_OPERAND, misalignment ALIGN_ERROR; R11 = the GPA; no
    exit."""
    hw, _vm, kvm = make()
    tdvmcall(hw, r11=TDVMCALL_MAP_GPA, r12=gpa, r13=size)
    assert isinstance(run_one(kvm), RunStop)
    assert hw.regs[Reg.R10] == status and hw.regs[Reg.R11] == gpa and resumed(hw)


def test_map_gpa_without_the_user_exit_is_subfunc_unsupported() -> None:
    """Without KVM_CAP_EXIT_HYPERCALL for KVM_HC_MAP_GPA_RANGE, MapGPA is SUBFUNC_UNSUPPORTED,
    checked before anything else (tdx.c tdx_map_gpa, user_exit_on_hypercall)."""
    hw, _vm, kvm = make(exits=False)
    tdvmcall(hw, r11=TDVMCALL_MAP_GPA, r12=0x200800, r13=0)
    assert isinstance(run_one(kvm), RunStop)
    assert hw.regs[Reg.R10] == TDVMCALL_STATUS_SUBFUNC_UNSUPPORTED and hw.regs[Reg.R11] == 0x200800


@pytest.mark.parametrize(("gpaw", "shared"), [(48, 1 << 47), (52, 1 << 51)])
def test_map_gpa_chunks_of_2m_with_the_shared_bit_stripped(gpaw: int, shared: int) -> None:
    """__tdx_map_gpa(): one KVM_EXIT_HYPERCALL per 2 MiB chunk, nr 12, args[0] = GPA without the
    shared bit, args[1] = pages, args[2] = DECRYPTED for a shared GPA, flags LONG_MODE, ret
    preset 0; success leaves R10 = 0 (tdx_complete_vmcall_map_gpa)."""
    hw, _vm, kvm = make(gpaw=gpaw)
    tdvmcall(hw, r11=TDVMCALL_MAP_GPA, r12=shared | 0x400000, r13=5 << 20)
    seen = []
    while not isinstance(run := run_one(kvm), RunStop):
        assert isinstance(run, HypercallExit) and run.ret == 0
        seen.append((run.nr, run.args[:3], run.flags))
    assert seen == [(12, (0x400000, 512, KVM_MAP_GPA_RANGE_DECRYPTED), KVM_EXIT_HYPERCALL_LONG_MODE),
                    (12, (0x600000, 512, KVM_MAP_GPA_RANGE_DECRYPTED), KVM_EXIT_HYPERCALL_LONG_MODE),
                    (12, (0x800000, 256, KVM_MAP_GPA_RANGE_DECRYPTED), KVM_EXIT_HYPERCALL_LONG_MODE)]
    assert hw.regs[Reg.R10] == TDVMCALL_STATUS_SUCCESS and resumed(hw)


def test_map_gpa_stops_with_retry_when_an_event_is_pending() -> None:
    """After a good chunk with an event pending (kvm_vcpu_has_events), MapGPA returns RETRY with
    R11 = the next chunk's GPA, shared bit kept (tdx.c tdx_complete_vmcall_map_gpa)."""
    hw, _vm, kvm = make()
    tdvmcall(hw, r11=TDVMCALL_MAP_GPA, r12=0x400000, r13=6 << 20)
    run = run_one(kvm)
    assert isinstance(run, HypercallExit) and run.args[2] == KVM_MAP_GPA_RANGE_ENCRYPTED
    kvm.inject_event()
    assert isinstance(run_one(kvm), RunStop)
    assert hw.regs[Reg.R10] == TDVMCALL_STATUS_RETRY and hw.regs[Reg.R11] == 0x600000 and resumed(hw)
    assert not kvm.pending_event  # delivered as the TD was re-entered


def test_map_gpa_last_chunk_ignores_a_pending_event() -> None:
    """The event check comes after the end check: a pending event after the last chunk does not
    turn success into RETRY (tdx.c tdx_complete_vmcall_map_gpa)."""
    hw, _vm, kvm = make()
    tdvmcall(hw, r11=TDVMCALL_MAP_GPA, r12=0x400000, r13=MB2)
    assert isinstance(run_one(kvm), HypercallExit)
    kvm.inject_event()
    assert isinstance(run_one(kvm), RunStop)
    assert hw.regs[Reg.R10] == TDVMCALL_STATUS_SUCCESS and resumed(hw)


@pytest.mark.parametrize(("kvm_version", "ret", "status"), [
    (KvmVersion.KVM_X86, errno.EAGAIN, TDVMCALL_STATUS_RETRY),
    (KvmVersion.KVM_X86, errno.EINVAL, TDVMCALL_STATUS_INVALID_OPERAND),
    (KvmVersion.RELEASED, errno.EAGAIN, TDVMCALL_STATUS_INVALID_OPERAND),
    (KvmVersion.RELEASED, errno.EINVAL, TDVMCALL_STATUS_INVALID_OPERAND),
    (KvmVersion.RELEASED, neg(22), TDVMCALL_STATUS_INVALID_OPERAND),
])
def test_map_gpa_userspace_error_per_kvm_version(kvm_version: KvmVersion, ret: int, status: int) -> None:
    """Userspace's ret on a chunk: the reference tree maps EAGAIN to RETRY and EINVAL to
    INVALID_OPERAND, 7.1 makes any non-zero value INVALID_OPERAND; R11 = that chunk's GPA
    (tdx.c tdx_complete_vmcall_map_gpa; commit 3e2dec1ede0a)."""
    hw, _vm, kvm = make(kvm=kvm_version)
    tdvmcall(hw, r11=TDVMCALL_MAP_GPA, r12=SHARED47 | 0x400000, r13=6 << 20)
    assert isinstance(run_one(kvm), HypercallExit)
    run = run_one(kvm)
    assert isinstance(run, HypercallExit) and run.args[0] == 0x600000
    run.ret = ret
    assert isinstance(run_one(kvm), RunStop)
    assert hw.regs[Reg.R10] == status and hw.regs[Reg.R11] == SHARED47 | 0x600000 and resumed(hw)


def test_map_gpa_other_ret_fails_kvm_run_in_the_reference_tree() -> None:
    """Reference tree: a ret other than 0, EINVAL, EAGAIN makes the completion return -EINVAL,
    KVM_RUN fails and the TDCALL is not completed (tdx.c tdx_complete_vmcall_map_gpa,
    kvm_is_valid_map_gpa_range_ret)."""
    hw, _vm, kvm = make()
    tdvmcall(hw, r11=TDVMCALL_MAP_GPA, r12=0x400000, r13=MB2)
    run = run_one(kvm)
    assert isinstance(run, HypercallExit)
    run.ret = neg(22)
    with pytest.raises(KvmIoctlError) as info:
        run_one(kvm)
    assert info.value.errno == errno.EINVAL and hw.tdcalls == 0


def test_the_difference_is_listed() -> None:
    """The MapGPA completion difference is in kvm/version.py's DIFFERENCES with its commit."""
    assert any(d.commit.startswith("3e2dec1ede0a") for d in DIFFERENCES)


def test_map_gpa_answered_inside_the_exit_does_not_grow_the_stack() -> None:
    """A VMM answering each chunk inside KVM_RUN (the fast path) drives 4096 chunks (8 GiB)
    without recursion, and the TD gets SUCCESS once (tdx.c __tdx_map_gpa per chunk)."""
    hw, _vm, kvm = make()
    tdvmcall(hw, r11=TDVMCALL_MAP_GPA, r12=SHARED47, r13=8 << 30)
    count = 0

    def handled(exit: KvmExit) -> bool:
        nonlocal count
        count += 1
        return True

    assert isinstance(kvm.run(5.0, handled), RunStop)
    assert count == 4096 and hw.regs[Reg.R10] == 0 and resumed(hw)


# ------------------------------------------------------------ 3. the other GHCI leaves
def test_report_fatal_error_is_a_tdx_fatal_system_event_and_the_vmm_recovers_the_message() -> None:
    """ReportFatalError: KVM_EXIT_SYSTEM_EVENT type KVM_SYSTEM_EVENT_TDX_FATAL (7) with the 16
    GPRs (RAX = exit reason, RSP = RBP = 0) and no resume (tdx.c tdx_report_fatal_error); the
    VMM reads the 64-byte message from R14, R15, RBX, RDI, RSI, R8, R9, RDX as far as RCX's
    bitmap exposes them, and a valid-GPA flag's R13 is recorded, never read (QEMU
    target/i386/kvm/tdx.c tdx_handle_report_fatal_error)."""
    hw, _vm, kvm = make()
    text = b"kernel panic: attempted to kill the idle task!!"  # 48 bytes, 6 registers
    words = [int.from_bytes(text.ljust(64, b"\0")[i:i + 8], "little") for i in range(0, 64, 8)]
    names = ["r14", "r15", "rbx", "rdi", "rsi", "r8", "r9", "rdx"]
    tdvmcall(hw, r11=TDVMCALL_REPORT_FATAL_ERROR, r12=1 << 63, r13=0xDEAD_BEEF_F00D_0000,
             rcx=0xFFCC, **dict(zip(names, words, strict=True)))
    run = run_one(kvm)
    assert isinstance(run, SystemEventExit) and run.type == KVM_SYSTEM_EVENT_TDX_FATAL
    assert len(run.data) == 16 and run.data[0] == TDCALL and run.data[4] == run.data[5] == 0
    assert run.data[14] == words[0] and run.data[12] == 1 << 63 and hw.tdcalls == 0
    vmm = Vmm(BytesMemory(MEM), MapGpaHandler(make_tracker("bitmap", guest_pages=MEM >> 12), MEM >> 12))
    end = vmm.handle(run)
    assert isinstance(end, VmEnd) and end.outcome == "terminated"
    assert vmm.report.extra["tdx_fatal"] == {"error_code": 1 << 63, "message": text.decode(),
                                             "gpa": 0xDEAD_BEEF_F00D_0000}
    # Registers RCX did not expose are left out of the message (QEMU's COPY_REG).
    hw2, _vm2, kvm2 = make()
    tdvmcall(hw2, r11=TDVMCALL_REPORT_FATAL_ERROR, rcx=1 << int(Reg.R14), r14=words[0], r15=words[1])
    run2 = run_one(kvm2)
    assert isinstance(run2, SystemEventExit)
    vmm2 = Vmm(BytesMemory(MEM), MapGpaHandler(make_tracker("bitmap", guest_pages=MEM >> 12), MEM >> 12))
    vmm2.handle(run2)
    assert vmm2.report.extra["tdx_fatal"]["message"] == "kernel p" and vmm2.report.extra["tdx_fatal"]["gpa"] is None


def test_get_td_vm_call_info() -> None:
    """GetTdVmCallInfo: R12 = 0 -> R11..R14 = 0, SUCCESS; R12 = 1 -> KVM_EXIT_TDX, userspace's
    ret and R11..R14 copied back; else INVALID_OPERAND (tdx.c tdx_get_td_vm_call_info,
    tdx_complete_get_td_vm_call_info)."""
    hw, _vm, kvm = make()
    tdvmcall(hw, r11=TDVMCALL_GET_TD_VM_CALL_INFO, r12=0, r13=7, r14=8)
    assert isinstance(run_one(kvm), RunStop)
    assert [hw.regs[r] for r in (Reg.R10, Reg.R11, Reg.R12, Reg.R13, Reg.R14)] == [0, 0, 0, 0, 0]
    tdvmcall(hw, r11=TDVMCALL_GET_TD_VM_CALL_INFO, r12=1)
    run = run_one(kvm)
    assert isinstance(run, TdxExit) and (run.nr, run.leaf, run.ret) == (TDVMCALL_GET_TD_VM_CALL_INFO, 1, 0)
    run.r11 = 2
    assert isinstance(run_one(kvm), RunStop)
    assert hw.regs[Reg.R11] == 2 and hw.regs[Reg.R10] == 0
    tdvmcall(hw, r11=TDVMCALL_GET_TD_VM_CALL_INFO, r12=2)
    assert isinstance(run_one(kvm), RunStop)
    assert hw.regs[Reg.R10] == TDVMCALL_STATUS_INVALID_OPERAND and resumed(hw, 3)


def test_get_quote_front_door_and_the_default_vmm_answer() -> None:
    """GetQuote: a buffer GPA without the shared bit is INVALID_OPERAND; else KVM_EXIT_TDX with
    the GPA stripped and the size, ret preset SUBFUNC_UNSUPPORTED (tdx.c tdx_get_quote), and the
    VMM's answer reaches R10 (tdx_complete_simple): QEMU's, ALIGN_ERROR for a size that is not
    4 KiB aligned (vmm/tdx.py)."""
    hw, _vm, kvm = make()
    tdvmcall(hw, r11=TDVMCALL_GET_QUOTE, r12=0x5000, r13=0x1000)
    assert isinstance(run_one(kvm), RunStop)
    assert hw.regs[Reg.R10] == TDVMCALL_STATUS_INVALID_OPERAND and resumed(hw)
    tdvmcall(hw, r11=TDVMCALL_GET_QUOTE, r12=SHARED47 | 0x5000, r13=0x1234)
    run = run_one(kvm)
    assert isinstance(run, TdxExit) and (run.nr, run.gpa, run.size) == (TDVMCALL_GET_QUOTE, 0x5000, 0x1234)
    assert run.ret == TDVMCALL_STATUS_SUBFUNC_UNSUPPORTED
    vmm = Vmm(BytesMemory(MEM), MapGpaHandler(make_tracker("bitmap", guest_pages=MEM >> 12), MEM >> 12))
    assert vmm.handle(run) is None
    assert isinstance(run_one(kvm), RunStop)
    assert hw.regs[Reg.R10] == TDVMCALL_STATUS_ALIGN_ERROR and resumed(hw, 2)


def test_setup_event_notify_interrupt() -> None:
    """SetupEventNotifyInterrupt: a vector outside 32..255 is INVALID_OPERAND, else KVM_EXIT_TDX
    with ret preset SUBFUNC_UNSUPPORTED (tdx.c tdx_setup_event_notify_interrupt)."""
    hw, _vm, kvm = make()
    tdvmcall(hw, r11=TDVMCALL_SETUP_EVENT_NOTIFY_INTERRUPT, r12=31)
    assert isinstance(run_one(kvm), RunStop)
    assert hw.regs[Reg.R10] == TDVMCALL_STATUS_INVALID_OPERAND and resumed(hw)
    tdvmcall(hw, r11=TDVMCALL_SETUP_EVENT_NOTIFY_INTERRUPT, r12=0xEC)
    run = run_one(kvm)
    assert isinstance(run, TdxExit) and run.vector == 0xEC and run.ret == TDVMCALL_STATUS_SUBFUNC_UNSUPPORTED


# ------------------------------------------------------------- 4. EPT violations
def test_access_before_accept_kills_the_vm() -> None:
    """A private access to a private GFN that faults is a pending page: "Guest access before
    accepting", kvm_vm_dead(), KVM_RUN fails with EIO now and on every later call (tdx.c
    tdx_handle_ept_violation)."""
    hw, vm, kvm = make()
    vm.set_memory_attributes(0x10000, 0x1000, KVM_MEMORY_ATTRIBUTE_PRIVATE)
    hw.exits.append(FakeExit(int(VmxExitReason.EXIT_REASON_EPT_VIOLATION), 0, 0x10000))
    with pytest.raises(KvmIoctlError) as info:
        run_one(kvm)
    assert info.value.errno == errno.EIO and "before accepting 0x10000" in str(info.value)
    with pytest.raises(KvmIoctlError) as again:
        run_one(kvm)
    assert again.value.errno == errno.EIO


def test_ept_violation_with_attribute_mismatch_is_a_memory_fault() -> None:
    """A shared-GPA access to a private GFN (or a private one to a shared GFN) is the common
    fault path: KVM_EXIT_MEMORY_FAULT on the GPA without the shared bit (mmu.c
    kvm_mmu_faultin_pfn -> kvm_mmu_prepare_memory_fault_exit)."""
    hw, vm, kvm = make()
    vm.set_memory_attributes(0x10000, 0x1000, KVM_MEMORY_ATTRIBUTE_PRIVATE)
    vm.set_memory_attributes(0x20000, 0x1000, 0)
    hw.exits.append(FakeExit(int(VmxExitReason.EXIT_REASON_EPT_VIOLATION), 0, SHARED47 | 0x10000))
    hw.exits.append(FakeExit(int(VmxExitReason.EXIT_REASON_EPT_VIOLATION), 0, 0x20000))
    run = run_one(kvm)
    assert isinstance(run, MemoryFaultExit) and (run.gpa, run.private) == (0x10000, False)
    run = run_one(kvm)
    assert isinstance(run, MemoryFaultExit) and (run.gpa, run.private) == (0x20000, True)
    assert not vm.dead


def test_run_stop_when_script_ends() -> None:
    """Sanity of the harness: with nothing scripted the fake's run ends as a timeout."""
    _hw, _vm, kvm = make()
    stop = run_one(kvm)
    assert isinstance(stop, RunStop) and stop.reason is StopReason.TIMEOUT
