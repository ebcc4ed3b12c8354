"""KVM's exit dispatch, hypercall dispatcher and GHCB MSR handling over the fake hardware
(testbed/hw/fake.py): plain bytes and a register dict, no Unicorn."""

from __future__ import annotations

from typing import Any

import pytest

from testbed.hw.exits import SvmExitCode, Vendor, VmxExitReason
from testbed.hw.fake import FakeExit, FakeVcpu
from testbed.kvm.ghcb import GhcbMsrCode, ghcb_cpuid_req
from testbed.kvm.hypercall import neg
from testbed.kvm.uapi import (
    KVM_CAP_EXIT_HYPERCALL,
    KVM_ENOSYS,
    KVM_HC_MAP_GPA_RANGE,
    KVM_MEMORY_ATTRIBUTE_PRIVATE,
    HypercallExit,
    InternalErrorExit,
    KvmVmType,
)
from testbed.kvm.vcpu import KvmVcpu
from testbed.kvm.vm import KvmVm
from testbed.trace import Tracer
from testbed.x86 import U64, Reg
from testbed.x86.addr import Gfn, Gpa

MEM = 1 << 20


def make(vm_type: KvmVmType = KvmVmType.KVM_X86_DEFAULT_VM, vendor: Vendor = Vendor.AMD,
         tracer: Tracer | None = None) -> tuple[FakeVcpu, KvmVm, KvmVcpu]:
    hw = FakeVcpu(vendor, MEM)
    vm = KvmVm(vm_type, vendor, hw.memory)
    return hw, vm, KvmVcpu(vm, hw, tracer)


def native_exit(vendor: Vendor) -> int:
    return int(SvmExitCode.SVM_EXIT_VMMCALL if vendor is Vendor.AMD else VmxExitReason.EXIT_REASON_VMCALL)


@pytest.mark.parametrize("vendor", list(Vendor))
def test_native_hypercall_is_an_exit_through_vmexit(vendor: Vendor) -> None:
    """The native hypercall reaches KVM as an ordinary VM exit (vmexit), and an unknown number
    completes with -KVM_ENOSYS in RAX and RIP past the instruction (x86.c
    ____kvm_emulate_hypercall, kvm_emulate_hypercall -> kvm_skip_emulated_instruction)."""
    hw, _vm, kvm = make(vendor=vendor)
    assert hw.hypervisor is kvm  # KVM attached itself when the vCPU was created
    hw.regs[Reg.RAX] = 0x999
    hw.regs[Reg.RIP] = 0x1000
    hw.exit(native_exit(vendor))
    assert hw.regs[Reg.RAX] == neg(KVM_ENOSYS) & U64
    assert hw.regs[Reg.RIP] == 0x1003
    assert kvm.stat_hypercalls == 1


def test_traced_native_hypercall_takes_the_table_and_records_the_exit() -> None:
    """With a tracer the native hypercall goes through the handler table, which records
    handle_exit and the hypercall (svm.c svm_invoke_exit_handler: the fast path only skips the
    table, never the outcome)."""
    events: list[dict[str, Any]] = []
    hw, _vm, _kvm = make(tracer=Tracer(sink=events.append))
    hw.regs[Reg.RAX] = 0x999
    hw.exit(native_exit(Vendor.AMD))
    names = [(e["layer"], e["event"]) for e in events]
    assert ("kvm", "handle_exit") in names and ("kvm", "hypercall") in names
    assert hw.regs[Reg.RAX] == neg(KVM_ENOSYS) & U64


def test_native_and_ghcb_hypercalls_share_one_dispatcher(monkeypatch: pytest.MonkeyPatch) -> None:
    """KVM_HC_MAP_GPA_RANGE from the native instruction and from the GHCB's VMMCALL produce the
    same user exit through one dispatcher, emulate_hypercall (x86.c kvm_emulate_hypercall; sev.c
    sev_handle_vmgexit SVM_EXIT_VMMCALL -> kvm_emulate_hypercall)."""
    import testbed.kvm.vcpu as kvm_vcpu

    hw, vm, kvm = make(KvmVmType.KVM_X86_SEV_VM)
    vm.enable_cap(KVM_CAP_EXIT_HYPERCALL, 1 << KVM_HC_MAP_GPA_RANGE)
    seen: list[Any] = []
    original = kvm_vcpu.emulate_hypercall

    def spy(nr: int, a0: int, a1: int, a2: int, a3: int, cpl: int, op_64_bit: bool, pv: Any, exit_mask: int,
            apic_map: bool = False) -> Any:
        seen.append((nr, a0, a1, a2, a3, cpl, op_64_bit))
        return original(nr, a0, a1, a2, a3, cpl, op_64_bit, pv, exit_mask, apic_map)

    monkeypatch.setattr(kvm_vcpu, "emulate_hypercall", spy)
    hw.regs.update({Reg.RAX: KVM_HC_MAP_GPA_RANGE, Reg.RBX: 0x2000, Reg.RCX: 1, Reg.RDX: 0})
    hw.exits = [FakeExit(native_exit(Vendor.AMD))]
    native = kvm.run(1.0)
    ghcb_ret: list[int] = []
    kvm.hypercall(KVM_HC_MAP_GPA_RANGE, 0x2000, 1, 0, 0, 0, ghcb_ret.append)
    assert seen == [(KVM_HC_MAP_GPA_RANGE, 0x2000, 1, 0, 0, 0, True)] * 2
    assert isinstance(native, HypercallExit) and native.nr == KVM_HC_MAP_GPA_RANGE
    assert native.args[:3] == (0x2000, 1, 0)
    # stat.hypercalls counts on entry (____kvm_emulate_hypercall), user exits included: both
    # are counted before userspace answered either
    assert kvm.stat_hypercalls == 2 and ghcb_ret == []


def test_unknown_exit_code_is_an_internal_error() -> None:
    """An exit code KVM has no handler for ends KVM_RUN with KVM_EXIT_INTERNAL_ERROR,
    emulation suberror (svm.c svm_handle_invalid_exit / x86.c handle_emulation_failure)."""
    hw, _vm, kvm = make()
    hw.exits = [FakeExit(0x3FF)]
    run = kvm.run(1.0)
    assert isinstance(run, InternalErrorExit) and "0x3ff" in run.detail


def test_ghcb_msr_lives_in_the_hardware() -> None:
    """The GHCB MSR is the hardware's: RESET preloads the SEV information response there
    (sev.c sev_es_init_vmcb / GHCB_MSR_SEV_INFO), a VMGEXIT's MSR-protocol reply is written
    there (sev_handle_vmgexit_msr_protocol), and KVM's view is a read of it, not a copy."""
    hw, _vm, kvm = make(KvmVmType.KVM_X86_SEV_ES_VM)
    kvm.reset()
    assert hw.ghcb_msr_value() & 0xFFF == GhcbMsrCode.GHCB_MSR_SEV_INFO_RESP
    hw.set_ghcb_msr(ghcb_cpuid_req(0x80000000, 0))  # the guest's WRMSR, CPUID EAX request
    hw.exit(int(SvmExitCode.SVM_EXIT_VMGEXIT), length=4)
    reply = hw.ghcb_msr_value()
    assert reply & 0xFFF == GhcbMsrCode.GHCB_MSR_CPUID_RESP
    assert kvm.sev_state is not None and kvm.sev_state.ghcb_msr == reply
    hw.set_ghcb_msr(0x1234000)  # written behind KVM's back: KVM sees it at once
    assert kvm.sev_state.ghcb_msr == 0x1234000


def test_attribute_change_tells_the_hardware_stage2_changed() -> None:
    """KVM_SET_MEMORY_ATTRIBUTES zaps the range's stage-2 mappings (kvm_main.c
    kvm_vm_set_mem_attributes -> kvm_arch_pre_set_memory_attributes): the hardware hears of it
    once, and asks KVM (not a copy) whether a GFN is private."""
    hw, vm, _kvm = make(KvmVmType.KVM_X86_SW_PROTECTED_VM)
    stage2 = vm.stage2()
    assert stage2 is not None and not stage2.is_private(Gfn(4))
    vm.set_memory_attributes(0x4000, 0x2000, KVM_MEMORY_ATTRIBUTE_PRIVATE)
    assert hw.stage2_changes == [(4, 6, True)]
    assert stage2.is_private(Gfn(4)) and stage2.is_private(Gfn(5)) and not stage2.is_private(Gfn(6))
    vm.set_memory_attributes(0x4000, 0x2000, KVM_MEMORY_ATTRIBUTE_PRIVATE)  # no change: no zap
    assert len(hw.stage2_changes) == 1


def test_launch_commands_drive_the_hardware() -> None:
    """KVM_SEV_LAUNCH_UPDATE_DATA and KVM_SEV_SNP_LAUNCH_START/UPDATE are KVM calls that drive
    the firmware (sev.c sev_launch_update_data, snp_launch_update); SNP_LAUNCH_START assigns
    all RAM private."""
    hw, vm, _kvm = make(KvmVmType.KVM_X86_SNP_VM)
    vm.sev_snp_launch_start()
    vm.sev_snp_launch_update(Gpa(0x10000), 0x3000)
    assert hw.stage2_changes == [(0, MEM >> 12, True)]
    assert hw.launched == [("snp_launch_update", 0x10000, 0x3000)]
    hw2, vm2, _ = make(KvmVmType.KVM_X86_SEV_VM)
    vm2.sev_launch_update_data(Gpa(0x1000), 0x1000)
    assert hw2.launched == [("launch_update_data", 0x1000, 0x1000)]


def test_launch_command_on_a_plain_vm_is_refused() -> None:
    """A launch command on a VM that is not SEV fails cleanly (sev.c sev_mem_enc_ioctl:
    -ENOTTY when !sev_guest), never reaching the hardware."""
    from testbed.kvm.ioctl import KvmIoctlError

    hw, vm, _ = make()
    with pytest.raises(KvmIoctlError):
        vm.sev_launch_update_data(Gpa(0), 0x1000)
    assert hw.launched == []
