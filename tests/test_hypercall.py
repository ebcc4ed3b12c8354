"""____kvm_emulate_hypercall() as pure logic (arch/x86/kvm/x86.c)."""

from __future__ import annotations

from testbed.kvm.hypercall import PvCpuid, complete_ret, emulate_hypercall, neg
from testbed.kvm.uapi import (
    KVM_EINVAL,
    KVM_ENOSYS,
    KVM_EPERM,
    KVM_EXIT_HYPERCALL_LONG_MODE,
    KVM_FEATURE_PV_SCHED_YIELD,
    KVM_HC_MAP_GPA_RANGE,
    KVM_HC_SCHED_YIELD,
)

EXIT12 = 1 << KVM_HC_MAP_GPA_RANGE


NO_PV = PvCpuid()


def call(nr: int, *args: int, cpl: int = 0, op64: bool = True, pv: PvCpuid = NO_PV, mask: int = EXIT12) -> int:
    a = [*args, 0, 0, 0, 0][:4]
    return emulate_hypercall(nr, *a, cpl=cpl, op_64_bit=op64, pv=pv, exit_mask=mask).ret


def test_cpl_check_precedes_dispatch() -> None:
    """CPL != 0 gives -KVM_EPERM for every number, known or not."""
    assert call(1, cpl=3) == neg(KVM_EPERM)
    assert call(0x999, cpl=3) == neg(KVM_EPERM)


def test_unknown_number_is_enosys() -> None:
    """An unknown hypercall returns -KVM_ENOSYS (0xfffffffffffffc18)."""
    assert call(0x999) == 0xFFFF_FFFF_FFFF_FC18


def test_32bit_caller_sees_truncated_number_and_result() -> None:
    """A 32-bit caller's nr is truncated (so 1<<32|1 is VAPIC_POLL_IRQ) and ret is u32 in RAX."""
    assert call((1 << 32) | 1, op64=False) == 0
    assert complete_ret(neg(KVM_ENOSYS), False) == 0xFFFF_FC18


def test_pv_feature_gating_only_when_enforced() -> None:
    """SCHED_YIELD needs PV_SCHED_YIELD only with KVM_CAP_ENFORCE_PV_FEATURE_CPUID on."""
    assert call(KVM_HC_SCHED_YIELD, pv=PvCpuid(0, enforce=True)) == neg(KVM_ENOSYS)
    assert call(KVM_HC_SCHED_YIELD, pv=PvCpuid(1 << KVM_FEATURE_PV_SCHED_YIELD, enforce=True)) == 0
    assert call(KVM_HC_SCHED_YIELD, pv=PvCpuid(0, enforce=False)) == 0


def test_map_gpa_range_checks_and_exit() -> None:
    """MAP_GPA_RANGE: ENOSYS without the exit, EINVAL for bad args, else a user exit with ret 0."""
    assert call(12, 0x1000, 1, 0, mask=0) == neg(KVM_ENOSYS)
    assert call(12, 0x1001, 1, 0) == neg(KVM_EINVAL)
    assert call(12, 0x1000, 0, 0) == neg(KVM_EINVAL)
    assert call(12, 0x1000, (1 << 64) - 1, 0) == neg(KVM_EINVAL)
    out = emulate_hypercall(12, 0x1000, 2, 1 << 63, 0, cpl=0, op_64_bit=True, pv=PvCpuid(), exit_mask=EXIT12)
    assert out.user_exit is not None
    assert out.user_exit.args == (0x1000, 2, 1 << 63, 0, 0, 0)  # attrs are not checked by KVM
    assert out.user_exit.ret == 0
    assert out.user_exit.flags == KVM_EXIT_HYPERCALL_LONG_MODE


def test_send_ipi_icr_checked_before_apic_map() -> None:
    """SEND_IPI: an ICR (a3) with destination-mode or shorthand bits is -KVM_EINVAL, checked before
    the APIC map; with a clean ICR the missing in-kernel APIC map gives -EOPNOTSUPP
    (lapic.c kvm_pv_send_ipi(kvm, a0 bitmap low, a1 bitmap high, a2 min, a3 icr))."""
    from testbed.kvm.hypercall import APIC_DEST_MASK, APIC_SHORT_MASK
    from testbed.kvm.uapi import KVM_EOPNOTSUPP, KVM_HC_SEND_IPI

    assert call(KVM_HC_SEND_IPI, 1, 0, 0, 0xFD) == neg(KVM_EOPNOTSUPP)
    for bits in (APIC_DEST_MASK, 1 << 18, 1 << 19, APIC_SHORT_MASK):
        assert call(KVM_HC_SEND_IPI, 1, 0, 0, 0xFD | bits) == neg(KVM_EINVAL), hex(bits)
    # a2 (min) carrying those bits is not the ICR: still -EOPNOTSUPP
    assert call(KVM_HC_SEND_IPI, 1, 0, APIC_DEST_MASK, 0xFD) == neg(KVM_EOPNOTSUPP)


def test_send_ipi_gated_by_pv_send_ipi() -> None:
    """SEND_IPI needs KVM_FEATURE_PV_SEND_IPI under enforcement (-KVM_ENOSYS without, before any
    ICR check), as kvm_pv_test.c's hcalls_to_test asserts."""
    from testbed.kvm.hypercall import APIC_DEST_MASK
    from testbed.kvm.uapi import KVM_EOPNOTSUPP, KVM_FEATURE_PV_SEND_IPI, KVM_HC_SEND_IPI

    off = PvCpuid(0, enforce=True)
    on = PvCpuid(1 << KVM_FEATURE_PV_SEND_IPI, enforce=True)
    assert call(KVM_HC_SEND_IPI, 0, 0, 0, APIC_DEST_MASK, pv=off) == neg(KVM_ENOSYS)
    assert call(KVM_HC_SEND_IPI, 0, 0, 0, 0, pv=on) == neg(KVM_EOPNOTSUPP)


def test_clock_pairing_is_eopnotsupp() -> None:
    """CLOCK_PAIRING returns -KVM_EOPNOTSUPP for any clock type: kvm_pv_clock_pairing() refuses a
    type other than KVM_CLOCK_PAIRING_WALLCLOCK, and the modelled host's clocksource is not TSC
    based (kvm_get_walltime_and_clockread() fails), so even WALLCLOCK is refused."""
    from testbed.kvm.uapi import KVM_CLOCK_PAIRING_WALLCLOCK, KVM_EOPNOTSUPP, KVM_HC_CLOCK_PAIRING

    assert call(KVM_HC_CLOCK_PAIRING, 0x1000, KVM_CLOCK_PAIRING_WALLCLOCK) == neg(KVM_EOPNOTSUPP)
    assert call(KVM_HC_CLOCK_PAIRING, 0x1000, 1) == neg(KVM_EOPNOTSUPP)


def test_32bit_map_gpa_range_exit_truncates_and_has_no_long_mode_flag() -> None:
    """A 32-bit caller's MAP_GPA_RANGE exit carries args truncated to 32 bits and flags = 0
    (KVM_EXIT_HYPERCALL_LONG_MODE only for is_64_bit_hypercall()), x86.c."""
    out = emulate_hypercall((1 << 32) | 12, (7 << 32) | 0x2000, (1 << 40) | 3, (1 << 33) | 0x10, 0,
                            cpl=0, op_64_bit=False, pv=NO_PV, exit_mask=EXIT12)
    assert out.user_exit is not None
    assert out.user_exit.args[:3] == (0x2000, 3, 0x10)
    assert out.user_exit.flags == 0


def test_exit_hypercall_cap_rejects_invalid_bits() -> None:
    """KVM_ENABLE_CAP(KVM_CAP_EXIT_HYPERCALL) with bits outside KVM_EXIT_HYPERCALL_VALID_MASK
    (only 1 << KVM_HC_MAP_GPA_RANGE) fails with EINVAL and keeps the old mask (x86.c
    kvm_vm_ioctl_enable_cap)."""
    import errno

    import pytest

    from testbed.hw.exits import Vendor
    from testbed.hw.memory import GuestMemory
    from testbed.kvm.ioctl import KvmIoctlError
    from testbed.kvm.uapi import KVM_CAP_EXIT_HYPERCALL, KvmVmType
    from testbed.kvm.vm import KvmVm

    vm = KvmVm(KvmVmType.KVM_X86_DEFAULT_VM, Vendor.AMD, GuestMemory(1 << 20).host_view())
    vm.enable_cap(KVM_CAP_EXIT_HYPERCALL, EXIT12)
    for bad in (1 << 11, 1 << 13, 1 << 63, EXIT12 | 1):
        with pytest.raises(KvmIoctlError) as info:
            vm.enable_cap(KVM_CAP_EXIT_HYPERCALL, bad)
        assert info.value.errno == errno.EINVAL
    assert vm.hypercall_exit_mask == EXIT12
