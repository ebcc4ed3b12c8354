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
