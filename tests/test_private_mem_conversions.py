"""A port of KVM's selftest x86/private_mem_conversions_test.c (explicit conversions) to the host API.

The guest (guests/private_mem_conversions.s) writes patterns into 4K and 2M ranges at offsets 0, 4K
and 2M of a 2M+4K region, converts them with KVM_HC_MAP_GPA_RANGE, and syncs; the host handles
KVM_EXIT_HYPERCALL itself as the selftest's handle_exit_hypercall() does (the attribute only, ret 0)
and checks the patterns at each sync. The README's host-API example is this test's shape.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

import testbed
from testbed.hw.memory import UnmappableMemoryError
from testbed.kvm.uapi import KVM_HC_MAP_GPA_RANGE, KVM_MAP_GPA_RANGE_ENCRYPTED
from testbed.machine import GUESTS_DIR
from testbed.pytest_plugin import TestbedCombination

GUEST = GUESTS_DIR / "private_mem_conversions.s"
SYNC_SHARED, SYNC_PRIVATE = 0, 1
PAGE = 4096


def handle_exit_hypercall(vm: testbed.Vm, exit: testbed.HypercallExit) -> None:
    """The selftest's handle_exit_hypercall(): KVM_SET_MEMORY_ATTRIBUTES over the range, ret 0."""
    assert exit.nr == KVM_HC_MAP_GPA_RANGE, f"wanted MAP_GPA_RANGE, got {exit.nr}"
    gpa, npages, attrs = exit.args[:3]
    private = bool(attrs & KVM_MAP_GPA_RANGE_ENCRYPTED)
    if not private:
        vm.guest_mem_fallocate(gpa, npages * PAGE, punch_hole=True)  # the do_fallocate pass
    vm.set_memory_attributes(gpa, npages * PAGE, private=private)
    exit.ret = 0


@pytest.mark.testbed(vm_types=["sw-protected", "sev", "sev-snp", "tdx"], memory="16M", timeout=60)
def test_private_mem_conversions(testbed_vm: Callable[..., testbed.Vm],
                                 testbed_combination: TestbedCombination) -> None:
    """Shared ranges hold what guest and host write; private ones are the guest's alone (x86.c
    __kvm_emulate_hypercall KVM_HC_MAP_GPA_RANGE -> KVM_EXIT_HYPERCALL; kvm_main.c
    kvm_vm_ioctl_set_mem_attributes)."""
    guest_memfd = testbed_combination.vm_type in ("sw-protected", "sev-snp", "tdx")
    syncs = 0
    with testbed_vm() as vm:  # the plugin's: this test's VM type and vendor (testbed/pytest_plugin.py)
        vcpu = vm.load(GUEST)
        while True:
            match vcpu.run():
                case testbed.HypercallExit() as exit:
                    handle_exit_hypercall(vm, exit)
                    continue
                case exit:
                    uc = vm.handle(exit)  # ucalls (a failed GUEST_ASSERT raises here)
            if uc is None:
                continue
            if uc.cmd == "done":
                break
            syncs += 1
            kind, gpa, size = uc.args[:3]
            for offset in range(0, size, PAGE):
                n = min(PAGE, size - offset)
                if kind == SYNC_SHARED:
                    # The host sees the shared data, then writes the new pattern (memcmp_h, memset).
                    assert not vm.is_private(gpa + offset)
                    assert vm.read(gpa + offset, n) == bytes([uc.args[3]]) * n, hex(gpa + offset)
                    vm.write(gpa + offset, bytes([uc.args[4]]) * n)
                else:
                    assert kind == SYNC_PRIVATE, f"unknown sync {kind}"
                    assert vm.is_private(gpa + offset)
                    if guest_memfd:
                        with pytest.raises(UnmappableMemoryError):
                            vm.read(gpa + offset, n)  # guest_memfd is not mappable by the host
                    else:
                        assert b"\x22" * 16 not in vm.read(gpa + offset, n)  # ciphertext of pattern two
    assert syncs == 1 + 5 + 3 * 2  # the initial sync, one per range, two private per 4K range
