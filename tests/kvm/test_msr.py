"""MSRs under KVM's rules (arch/x86/kvm/x86.c), on every VM type.

Scenarios:
1. kvm_pv_test.c's table: with KVM_CAP_ENFORCE_PV_FEATURE_CPUID on and CPUID 0x40000001
   cleared, RDMSR and WRMSR of every KVM PV MSR raise #GP (kvm_get_msr_common() /
   kvm_set_msr_common() return 1 when guest_pv_has() fails); with each MSR's feature set the
   accesses succeed and a write is read back.
2. An MSR KVM does not emulate (KVM_MSR_RET_UNSUPPORTED) raises #GP, through a VM exit on
   plain VMs and through the GHCB on SEV-ES/SNP (svm_complete_emulated_msr()'s "issue
   exception"), on both vendors.
3. MSR_KVM_MIGRATION_CONTROL is never emulated by KVM: #GP unless the VMM advertises
   KVM_FEATURE_MIGRATION_CONTROL, in which case it installs a filter (KVM_X86_SET_MSR_FILTER)
   and KVM_CAP_X86_USER_SPACE_MSR(FILTER), and every access is a KVM_EXIT_X86_RDMSR/WRMSR user
   exit the VMM answers (hypercalls.rst); a write of an undefined bit is the VMM's #GP.
4. The ioctls validate as KVM does (kvm_vm_ioctl_enable_cap, kvm_vm_ioctl_set_msr_filter).
"""

from __future__ import annotations

import errno
from typing import Any

import pytest

from testbed.hw.exits import Vendor
from testbed.kvm import msr as kmsr
from testbed.kvm.ioctl import KvmIoctlError
from testbed.kvm.msr import (
    KVM_CAP_X86_USER_SPACE_MSR,
    KVM_MSR_EXIT_REASON_FILTER,
    KVM_MSR_EXIT_REASON_INVAL,
    KVM_MSR_EXIT_REASON_UNKNOWN,
    KVM_MSR_EXIT_REASON_VALID_MASK,
    KVM_MSR_FILTER_DEFAULT_DENY,
    KVM_MSR_FILTER_READ,
    KVM_MSR_FILTER_WRITE,
    MSR_KVM_MIGRATION_CONTROL,
    PV_MSR_FEATURES,
    MsrFilter,
    MsrFilterRange,
    PvMsrState,
)
from testbed.machine import Machine, VmOptions, build_program, run_guest
from testbed.vmm.vmm import RunReport

MEMORY = 8 << 20
GP = 13
UNKNOWN_MSR = 0xC0011234
MIGRATION_CONTROL_FEATURE = 1 << 17

# kvm_pv_test.c msrs_to_test[], in its order
PV_MSRS = [
    ("MSR_KVM_SYSTEM_TIME", kmsr.MSR_KVM_SYSTEM_TIME),
    ("MSR_KVM_SYSTEM_TIME_NEW", kmsr.MSR_KVM_SYSTEM_TIME_NEW),
    ("MSR_KVM_WALL_CLOCK", kmsr.MSR_KVM_WALL_CLOCK),
    ("MSR_KVM_WALL_CLOCK_NEW", kmsr.MSR_KVM_WALL_CLOCK_NEW),
    ("MSR_KVM_ASYNC_PF_EN", kmsr.MSR_KVM_ASYNC_PF_EN),
    ("MSR_KVM_STEAL_TIME", kmsr.MSR_KVM_STEAL_TIME),
    ("MSR_KVM_PV_EOI_EN", kmsr.MSR_KVM_PV_EOI_EN),
    ("MSR_KVM_POLL_CONTROL", kmsr.MSR_KVM_POLL_CONTROL),
    ("MSR_KVM_ASYNC_PF_INT", kmsr.MSR_KVM_ASYNC_PF_INT),
    ("MSR_KVM_ASYNC_PF_ACK", kmsr.MSR_KVM_ASYNC_PF_ACK),
]

# For each MSR in `MSR_LIST`: RDMSR, sync the #GP count and EDX:EAX, WRMSR(MSR_WRITE), sync
# the #GP count. The #GP handler counts in R15 and skips the 2-byte instruction.
MSR_TABLE_GUEST = """
guest_main:
    push rbx
    push r15
    GUEST_SET_HANDLER GP_VECTOR, guest_gp
    lea rbx, [rip + guest_msrs]
guest_loop:
    mov ecx, dword ptr [rbx]
    test ecx, ecx
    jz guest_end
    xor r15, r15
    xor eax, eax
    xor edx, edx
    rdmsr
    GUEST_SYNC r15
    shl rdx, 32
    or rax, rdx
    GUEST_SYNC rax
    mov ecx, dword ptr [rbx]
    mov eax, MSR_WRITE
    xor edx, edx
    xor r15, r15
    wrmsr
    GUEST_SYNC r15
    add rbx, 4
    jmp guest_loop
guest_end:
    pop r15
    pop rbx
    ret

guest_gp:
    add qword ptr [rdi + EX_R15], 1
    add qword ptr [rdi + EX_RIP], 2
    ret

guest_msrs:
    .long MSR_LIST
    .long 0
"""


def table_guest(indices: list[int]) -> str:
    """MSR_TABLE_GUEST with its MSR list filled in."""
    return MSR_TABLE_GUEST.replace("MSR_LIST", ", ".join(f"0x{i:x}" for i in indices))


def run_msrs(indices: list[int], write: int = 0, **options: Any) -> tuple[RunReport, list[tuple[int, int, int]]]:
    """Run MSR_TABLE_GUEST over `indices`; returns the report and (rd #GP, value, wr #GP) per MSR."""
    options.setdefault("memory", MEMORY)
    report = run_guest("msr_table.s", VmOptions(timeout=10.0, defines={"MSR_WRITE": write}, **options),
                       text=table_guest(indices))
    assert report.outcome == "done", f"{report.outcome}: {report.detail}"
    syncs = report.syncs()
    assert len(syncs) == 3 * len(indices), f"syncs {[hex(s) for s in syncs]}"
    return report, [tuple(syncs[i : i + 3]) for i in range(0, len(syncs), 3)]  # type: ignore[misc]


VENDORS = pytest.mark.parametrize("vendor", list(Vendor), ids=[v.value for v in Vendor])


# ------------------------------------------------------------------- 1. the PV MSRs


@VENDORS
def test_pv_msrs_gp_without_pv_features(vendor: Vendor) -> None:
    """With enforcement on and no PV features, RDMSR and WRMSR of every KVM PV MSR raise #GP
    (kvm_pv_test.c test_msr(); guest_pv_has() in kvm_get_msr_common/kvm_set_msr_common)."""
    _, results = run_msrs([i for _, i in PV_MSRS], vendor=vendor, pv_features=0)
    for (name, index), (rd_gp, _value, wr_gp) in zip(PV_MSRS, results, strict=True):
        assert (rd_gp, wr_gp) == (1, 1), f"{name} (0x{index:x}): rdmsr #GP {rd_gp}, wrmsr #GP {wr_gp}"


@VENDORS
def test_pv_msrs_work_with_their_features(vendor: Vendor) -> None:
    """With each PV MSR's feature in CPUID 0x40000001, reads and writes succeed and a write of 1
    reads back as 1 (POLL_CONTROL, the others store it; ASYNC_PF_ACK always reads 0) (x86.c
    kvm_set_msr_common, kvm_get_msr_common)."""
    features = 0
    for feature in PV_MSR_FEATURES.values():
        features |= 1 << feature
    # ASYNC_PF_EN bit 0 = enable needs a real page: write 1 only to MSRs the model stores as is.
    indices = [kmsr.MSR_KVM_POLL_CONTROL, kmsr.MSR_KVM_ASYNC_PF_ACK, kmsr.MSR_KVM_PV_EOI_EN]
    _, results = run_msrs(indices + indices, write=1, vendor=vendor, pv_features=features)
    first, second = results[:3], results[3:]
    assert [(r[0], r[2]) for r in results] == [(0, 0)] * 6, f"unexpected #GP: {results}"
    # kvm_arch_vcpu_create(): msr_kvm_poll_control starts at 1; ASYNC_PF_ACK reads 0.
    assert [r[1] for r in first] == [1, 0, 0], f"initial values {first}"
    assert [r[1] for r in second] == [1, 0, 1], f"values after writing 1 {second}"


def test_pv_msrs_ungated_without_enforcement() -> None:
    """Without KVM_CAP_ENFORCE_PV_FEATURE_CPUID every PV MSR is accessible (guest_pv_has() is true)."""
    _, results = run_msrs([i for _, i in PV_MSRS], pv_features=0, enforce_pv_cpuid=False)
    assert all(r[0] == 0 and r[2] == 0 for r in results), f"#GP counts {results}"


def test_pv_msr_state_unit() -> None:
    """PvMsrState: unknown index -> UNSUPPORTED, PV MSR without feature -> 1, POLL_CONTROL refuses bit 1 (x86.c
    kvm_set_msr_common)."""
    state = PvMsrState()
    assert state.get(UNKNOWN_MSR, True) == (kmsr.KVM_MSR_RET_UNSUPPORTED, 0)
    assert state.set(kmsr.MSR_KVM_STEAL_TIME, 0, False) == kmsr.KVM_MSR_RET_ERR
    assert state.set(kmsr.MSR_KVM_POLL_CONTROL, 2, True) == kmsr.KVM_MSR_RET_ERR
    assert state.set(MSR_KVM_MIGRATION_CONTROL, 1, True) == kmsr.KVM_MSR_RET_UNSUPPORTED


# ------------------------------------------------------------------ 2. unknown MSRs


@VENDORS
def test_unknown_msr_gp_on_plain_vm(vendor: Vendor) -> None:
    """An MSR KVM does not emulate raises #GP(0) on RDMSR and WRMSR (KVM_MSR_RET_UNSUPPORTED,
    kvm_complete_insn_gp()), and no user exit without KVM_CAP_X86_USER_SPACE_MSR."""
    report, results = run_msrs([UNKNOWN_MSR, MSR_KVM_MIGRATION_CONTROL], vendor=vendor)
    assert [(r[0], r[2]) for r in results] == [(1, 1), (1, 1)], f"#GP counts {results}"
    assert not [e for e in report.user_exits if e["reason"].startswith("x86_")]


MSR_READ_ONE = """
guest_main:
    mov ecx, MSR_INDEX
    rdmsr
    GUEST_SYNC rax
    ret
"""


@pytest.mark.parametrize("vm_type", ["sev-es", "sev-snp"])
def test_unknown_msr_through_ghcb_is_gp(vm_type: str) -> None:
    """SEV-ES/SNP: RDMSR of an unknown MSR goes #VC -> GHCB -> msr_interception(), which
    answers "issue exception" #GP (svm_complete_emulated_msr()); the runtime reports #GP."""
    report = run_guest("msr_one.s", VmOptions(vm_type=vm_type, memory=MEMORY, defines={"MSR_INDEX": UNKNOWN_MSR}),
                       text=MSR_READ_ONE)
    assert report.outcome == "unhandled_exception", f"{report.outcome}: {report.detail}"
    assert report.exception is not None
    # #GP(0) with RIP at the RDMSR (MSR_READ_ONE line 4): the guest did not run past it.
    assert (report.exception["vector"], report.exception["error_code"], report.exception["line"]) == (GP, 0, 4)


@pytest.mark.parametrize("vm_type", ["sev-es", "sev-snp"])
def test_pv_msr_through_ghcb_follows_its_feature(vm_type: str) -> None:
    """SEV-ES/SNP: a PV MSR read through the GHCB obeys the same gating (MSR_KVM_POLL_CONTROL
    reads 1 with KVM_FEATURE_POLL_CONTROL, #GP without it)."""
    defines: dict[str, int | str] = {"MSR_INDEX": kmsr.MSR_KVM_POLL_CONTROL}
    ok = run_guest("msr_one.s", VmOptions(vm_type=vm_type, memory=MEMORY, defines=defines,
                                          pv_features=1 << kmsr.KVM_FEATURE_POLL_CONTROL), text=MSR_READ_ONE)
    assert ok.outcome == "done" and ok.syncs() == [1], f"{ok.outcome}: {ok.detail} {ok.syncs()}"
    gp = run_guest("msr_one.s", VmOptions(vm_type=vm_type, memory=MEMORY, defines=defines, pv_features=0),
                   text=MSR_READ_ONE)
    assert gp.outcome == "unhandled_exception" and gp.exception is not None, f"{gp.outcome}: {gp.detail}"
    assert (gp.exception["vector"], gp.exception["error_code"], gp.exception["line"]) == (GP, 0, 4)


def test_unknown_msr_user_exit_when_enabled() -> None:
    """With KVM_CAP_X86_USER_SPACE_MSR(UNKNOWN), an unknown MSR is a KVM_EXIT_X86_RDMSR user exit
    (reason KVM_MSR_EXIT_REASON_UNKNOWN); the VMM's error answer becomes #GP (complete_fast_rdmsr())."""
    options = VmOptions(memory=MEMORY, defines={"MSR_WRITE": 0})
    machine = Machine(build_program("msr_table.s", options, text=table_guest([UNKNOWN_MSR])), options)
    machine.kvm_vm.enable_cap(KVM_CAP_X86_USER_SPACE_MSR, KVM_MSR_EXIT_REASON_UNKNOWN)
    report = machine.run()
    assert report.outcome == "done", report.detail
    assert report.syncs() == [1, 0, 1], f"syncs {report.syncs()}"
    exits = [e for e in report.user_exits if e["reason"] in ("x86_rdmsr", "x86_wrmsr")]
    assert [(e["reason"], e["index"], e["msr_reason"], e["error"]) for e in exits] == [
        ("x86_rdmsr", UNKNOWN_MSR, KVM_MSR_EXIT_REASON_UNKNOWN, 1),
        ("x86_wrmsr", UNKNOWN_MSR, KVM_MSR_EXIT_REASON_UNKNOWN, 1),
    ], exits


X2APIC_TPR = 0x808
X2APIC_SVR = 0x80F  # in tdx_has_emulated_msr(); the TPR is not (the CPU virtualises it for a TD)


@VENDORS
def test_x2apic_msr_without_in_kernel_lapic_is_inval_and_never_filtered(vendor: Vendor) -> None:
    """An x2APIC MSR (0x800-0x8ff) goes to kvm_x2apic_msr_read()/_write(), which return 1 without
    an in-kernel local APIC: reason INVAL, not UNKNOWN (kvm_msr_reason); and a filter denying it
    does not apply ("x2APIC MSRs do not support filtering", kvm_msr_allowed)."""
    options = VmOptions(memory=MEMORY, vendor=vendor.value, defines={"MSR_WRITE": 0})
    machine = Machine(build_program("msr_table.s", options, text=table_guest([X2APIC_TPR])), options)
    machine.kvm_vm.enable_cap(KVM_CAP_X86_USER_SPACE_MSR, KVM_MSR_EXIT_REASON_VALID_MASK)
    machine.kvm_vm.set_msr_filter(MsrFilter.deny(X2APIC_TPR))
    report = machine.run()
    assert report.outcome == "done", report.detail
    assert report.syncs() == [1, 0, 1], f"syncs {report.syncs()}"  # the VMM answered error: #GP
    exits = [e for e in report.user_exits if e["reason"] in ("x86_rdmsr", "x86_wrmsr")]
    assert [(e["reason"], e["index"], e["msr_reason"]) for e in exits] == [
        ("x86_rdmsr", X2APIC_TPR, KVM_MSR_EXIT_REASON_INVAL), ("x86_wrmsr", X2APIC_TPR, KVM_MSR_EXIT_REASON_INVAL)]
    assert MsrFilter.deny(0x800, 0x8FF).allowed(0x8FF, KVM_MSR_FILTER_READ)
    assert not MsrFilter.deny(0x7FF, 0x900).allowed(0x900, KVM_MSR_FILTER_READ)


def test_x2apic_msr_of_a_td_is_not_modelled() -> None:
    """A TD has KVM's in-kernel local APIC: TDVMCALL<RDMSR> of an x2APIC register tdx_has_emulated_msr()
    lists would read it (kvm_x2apic_msr_read), which the testbed does not model: the run ends naming
    it instead of answering #GP."""
    report = run_guest("msr_table.s", VmOptions(memory=MEMORY, vm_type="tdx", vendor="intel", timeout=10.0,
                                                defines={"MSR_WRITE": 0}), text=table_guest([X2APIC_SVR]))
    assert report.outcome == "internal_error", report.detail
    assert report.detail == ("RDMSR 0x80f: the in-kernel local APIC's x2APIC registers are not modelled by "
                             "the testbed")


def test_pv_msr_without_feature_exits_as_inval() -> None:
    """A PV MSR refused by guest_pv_has() returns 1, which kvm_msr_reason() reports as
    KVM_MSR_EXIT_REASON_INVAL: with that reason enabled it exits instead of #GP."""
    options = VmOptions(memory=MEMORY, pv_features=0, defines={"MSR_WRITE": 0})
    machine = Machine(build_program("msr_table.s", options, text=table_guest([kmsr.MSR_KVM_STEAL_TIME])), options)
    machine.kvm_vm.enable_cap(KVM_CAP_X86_USER_SPACE_MSR, KVM_MSR_EXIT_REASON_INVAL)
    report = machine.run()
    exits = [e for e in report.user_exits if e["reason"].startswith("x86_")]
    assert [(e["reason"], e["msr_reason"]) for e in exits] == [("x86_rdmsr", KVM_MSR_EXIT_REASON_INVAL),
                                                              ("x86_wrmsr", KVM_MSR_EXIT_REASON_INVAL)], exits


# ------------------------------------------------------- 3. MSR_KVM_MIGRATION_CONTROL


MIGRATION_GUEST = """
guest_main:
    push r15
    GUEST_SET_HANDLER GP_VECTOR, guest_gp
    xor r15, r15
    mov ecx, MSR_KVM_MIGRATION_CONTROL
    mov eax, 1
    xor edx, edx
    wrmsr
    xor eax, eax
    rdmsr
    GUEST_SYNC rax
    mov ecx, MSR_KVM_MIGRATION_CONTROL
    mov eax, 2
    xor edx, edx
    wrmsr
    GUEST_SYNC r15
    pop r15
    ret

guest_gp:
    add qword ptr [rdi + EX_R15], 1
    add qword ptr [rdi + EX_RIP], 2
    ret
"""


@pytest.mark.parametrize("vm_type", ["default", "sw-protected", "sev"])
def test_migration_control_is_handled_by_the_vmm(vm_type: str) -> None:
    """Advertising KVM_FEATURE_MIGRATION_CONTROL makes the VMM filter the MSR: writes and reads
    are KVM_EXIT_X86_WRMSR/RDMSR exits (reason FILTER) it answers; bit 1 is refused with #GP."""
    options = VmOptions(vm_type=vm_type, memory=MEMORY, pv_features=MIGRATION_CONTROL_FEATURE,
                        defines={"MSR_KVM_MIGRATION_CONTROL": MSR_KVM_MIGRATION_CONTROL})
    machine = Machine(build_program("migration.s", options, text=MIGRATION_GUEST), options)
    report = machine.run()
    assert report.outcome == "done", f"{report.outcome}: {report.detail}"
    assert report.syncs() == [1, 1], f"syncs {report.syncs()} (value read back, #GP count)"
    exits = [(e["reason"], e["msr_reason"], e["data"], e["error"]) for e in report.user_exits
             if e["reason"].startswith("x86_")]
    assert exits == [("x86_wrmsr", KVM_MSR_EXIT_REASON_FILTER, 1, 0), ("x86_rdmsr", KVM_MSR_EXIT_REASON_FILTER, 1, 0),
                     ("x86_wrmsr", KVM_MSR_EXIT_REASON_FILTER, 2, 1)], exits
    assert machine.msr.migration_ready


MIGRATION_CONTROL_AT_START = """
guest_main:
    mov ecx, MSR_KVM_MIGRATION_CONTROL
    rdmsr
    GUEST_SYNC rax
    ret
"""


@pytest.mark.parametrize(("vm_type", "ready"), [("default", 1), ("sev", 0), ("sw-protected", 0)])
def test_migration_control_starts_as_msr_rst_says(vm_type: str, ready: int) -> None:
    """Documentation/virt/kvm/x86/msr.rst: "When a guest is started, bit 0 will be 0 if the guest
    has encrypted memory and 1 if the guest does not have encrypted memory" (the testbed counts
    every VM whose private memory the host cannot read as encrypted)."""
    report = run_guest("migration_start.s", VmOptions(vm_type=vm_type, memory=MEMORY,
                                                      pv_features=MIGRATION_CONTROL_FEATURE,
                                                      defines={"MSR_KVM_MIGRATION_CONTROL": MSR_KVM_MIGRATION_CONTROL}),
                       text=MIGRATION_CONTROL_AT_START)
    assert report.outcome == "done" and report.syncs() == [ready], f"{report.outcome}: {report.detail}"


@pytest.mark.parametrize("vm_type", ["sev-es", "sev-snp"])
def test_migration_control_through_ghcb(vm_type: str) -> None:
    """SEV-ES/SNP: the GHCB's MSR exit reaches the same filter and user exit (msr_interception())."""
    source = MSR_READ_ONE.replace("    mov ecx, MSR_INDEX\n    rdmsr\n", "    mov ecx, MSR_INDEX\n    mov eax, 1\n"
                                  "    xor edx, edx\n    wrmsr\n    mov ecx, MSR_INDEX\n    rdmsr\n")
    report = run_guest("migration_es.s", VmOptions(vm_type=vm_type, memory=MEMORY,
                                                   pv_features=MIGRATION_CONTROL_FEATURE,
                                                   defines={"MSR_INDEX": MSR_KVM_MIGRATION_CONTROL}), text=source)
    assert report.outcome == "done" and report.syncs() == [1], f"{report.outcome}: {report.detail} {report.syncs()}"
    assert [e["reason"] for e in report.user_exits if e["reason"].startswith("x86_")] == ["x86_wrmsr", "x86_rdmsr"]


def test_migration_control_gp_without_the_feature() -> None:
    """Without KVM_FEATURE_MIGRATION_CONTROL the VMM installs no filter: KVM does not emulate the
    MSR, so both accesses #GP and nothing exits."""
    report, results = run_msrs([MSR_KVM_MIGRATION_CONTROL], pv_features=0)
    assert results == [(1, 0, 1)], results
    assert not [e for e in report.user_exits if e["reason"].startswith("x86_")]


# ------------------------------------------------------------------- 4. the ioctls


def _vm() -> Any:
    options = VmOptions(memory=MEMORY)
    return Machine(build_program("msr_table.s", options, text=table_guest([]).replace("MSR_WRITE", "0")),
                   options).kvm_vm


def test_user_space_msr_rejects_invalid_reasons() -> None:
    """KVM_ENABLE_CAP(KVM_CAP_X86_USER_SPACE_MSR) with bits outside KVM_MSR_EXIT_REASON_VALID_MASK -> EINVAL."""
    vm = _vm()
    with pytest.raises(KvmIoctlError) as info:
        vm.enable_cap(KVM_CAP_X86_USER_SPACE_MSR, 1 << 3)
    assert info.value.errno == errno.EINVAL
    vm.enable_cap(KVM_CAP_X86_USER_SPACE_MSR, kmsr.KVM_MSR_EXIT_REASON_VALID_MASK)
    assert vm.user_space_msr_mask == kmsr.KVM_MSR_EXIT_REASON_VALID_MASK


@pytest.mark.parametrize("bad", [
    MsrFilter(flags=2),
    MsrFilter(ranges=(MsrFilterRange(0, 0x10, 1, b"\x00"),)),
    MsrFilter(ranges=(MsrFilterRange(4, 0x10, 1, b"\x00"),)),
    MsrFilter(ranges=(MsrFilterRange(KVM_MSR_FILTER_READ, 0x10, 0, b""),)),
    MsrFilter(ranges=(MsrFilterRange(KVM_MSR_FILTER_READ, 0x10, 9, b"\x00"),)),
    MsrFilter(ranges=tuple(MsrFilterRange(KVM_MSR_FILTER_READ, i, 1, b"\x00") for i in range(17))),
], ids=["flags", "range_no_flags", "range_bad_flags", "empty_range", "short_bitmap", "17_ranges"])
def test_msr_filter_validation(bad: MsrFilter) -> None:
    """kvm_vm_ioctl_set_msr_filter()/kvm_add_msr_filter() reject malformed filters with EINVAL."""
    with pytest.raises(KvmIoctlError) as info:
        _vm().set_msr_filter(bad)
    assert info.value.errno == errno.EINVAL


def test_msr_filter_first_range_decides() -> None:
    """kvm_msr_allowed(): the first range covering the access decides; uncovered accesses take the default."""
    f = MsrFilter(KVM_MSR_FILTER_DEFAULT_DENY, (MsrFilterRange(KVM_MSR_FILTER_READ, 0x100, 8, b"\x01"),))
    assert f.allowed(0x100, KVM_MSR_FILTER_READ)
    assert not f.allowed(0x101, KVM_MSR_FILTER_READ)
    assert not f.allowed(0x100, KVM_MSR_FILTER_WRITE)  # read-only range: the default applies
    assert MsrFilter().allowed(0x100, KVM_MSR_FILTER_WRITE)


def test_msr_exit_left_pending_completes_on_the_next_run() -> None:
    """KVM_RUN returns at each KVM_EXIT_X86_RDMSR/WRMSR and the next KVM_RUN completes it with what
    userspace wrote (x86.c complete_fast_rdmsr / complete_fast_msr_access via
    complete_userspace_io): the instruction neither runs natively nor is skipped twice."""
    from testbed.api import Vm
    from testbed.kvm.uapi import RdmsrExit, WrmsrExit

    options = VmOptions(memory=MEMORY, pv_features=MIGRATION_CONTROL_FEATURE,
                        defines={"MSR_KVM_MIGRATION_CONTROL": MSR_KVM_MIGRATION_CONTROL})
    msr_exits: list[str] = []
    syncs: list[int] = []
    with Vm(options) as vm:
        vcpu = vm.load("migration.s", text=MIGRATION_GUEST)
        while True:
            exit_ = vcpu.run()
            if isinstance(exit_, RdmsrExit | WrmsrExit):
                msr_exits.append(exit_.reason)
            uc = vm.handle(exit_)
            if uc is not None and uc.cmd == "done":
                break
            if uc is not None:
                syncs.append(uc.args[0])
    assert msr_exits == ["x86_wrmsr", "x86_rdmsr", "x86_wrmsr"], msr_exits
    assert syncs == [1, 1], f"syncs {syncs}"
