"""KVM_SET_MEMORY_ATTRIBUTES validation and semantics (virt/kvm/kvm_main.c), KVM_CAP_DISABLE_QUIRKS2."""

from __future__ import annotations

import errno

import pytest

from testbed.hw.exits import Vendor
from testbed.hw.memory import GuestMemory
from testbed.kvm.memattr import MemoryAttributes
from testbed.kvm.uapi import (
    KVM_CAP_DISABLE_QUIRKS,
    KVM_CAP_DISABLE_QUIRKS2,
    KVM_CAP_MEMORY_ATTRIBUTES,
    KVM_CAP_MEMORY_FAULT_INFO,
    KVM_CAP_USER_MEMORY,
    KVM_MEMORY_ATTRIBUTE_PRIVATE,
    KvmVmType,
)
from testbed.kvm.vm import KVM_X86_VALID_QUIRKS, KvmIoctlError, KvmVm

P = KVM_MEMORY_ATTRIBUTE_PRIVATE


@pytest.mark.parametrize(
    ("address", "size", "attributes", "flags"),
    [
        (0, 0x1000, P, 1),  # flags must be 0
        (0, 0x1000, 1 << 0, 0),  # unsupported attribute bit
        (0, 0, P, 0),  # size 0
        (0xFFFF_FFFF_FFFF_F000, 0x2000, P, 0),  # address + size wraps
        (0x800, 0x1000, P, 0),  # address not page aligned
        (0x1000, 0x800, P, 0),  # size not page aligned
    ],
)
def test_invalid_requests_fail_with_einval(address: int, size: int, attributes: int, flags: int) -> None:
    """Each check of kvm_vm_ioctl_set_mem_attributes() returns EINVAL and changes nothing."""
    attrs = MemoryAttributes(16)
    with pytest.raises(KvmIoctlError) as info:
        attrs.set(address, size, attributes, flags)
    assert info.value.errno == errno.EINVAL
    assert attrs.private == bytearray(16)


def test_set_then_clear_private() -> None:
    """Setting PRIVATE marks exactly the GFNs of the range; setting 0 makes them shared again."""
    attrs = MemoryAttributes(16)
    attrs.set(0x2000, 0x3000, P)
    assert [attrs.is_private(g) for g in range(6)] == [False, False, True, True, True, False]
    attrs.set(0x3000, 0x1000, 0)
    assert [attrs.is_private(g) for g in range(6)] == [False, False, True, False, True, False]


def test_unchanged_range_is_not_an_update() -> None:
    """An update that changes nothing returns early (no zap of mappings)."""
    attrs = MemoryAttributes(16, initially_private=True)
    attrs.set(0, 0x10000, P)
    assert attrs.updates == 0
    attrs.set(0, 0x1000, 0)
    assert attrs.updates == 1


# -------------------------------------------------- every VM type, and KVM_CAP_DISABLE_QUIRKS2

VM_TYPES = [KvmVmType.KVM_X86_DEFAULT_VM, KvmVmType.KVM_X86_SW_PROTECTED_VM, KvmVmType.KVM_X86_SEV_VM,
            KvmVmType.KVM_X86_SEV_ES_VM, KvmVmType.KVM_X86_SNP_VM]


def make_vm(vm_type: KvmVmType, vendor: Vendor = Vendor.AMD) -> KvmVm:
    """A 16-page VM of `vm_type` (the kvm layer alone, no CPU)."""
    return KvmVm(vm_type, vendor, GuestMemory(16 << 12).host_view())


@pytest.mark.parametrize("vm_type", VM_TYPES, ids=[t.name for t in VM_TYPES])
@pytest.mark.parametrize(
    ("address", "size", "flags"),
    [(0, 0x1000, 1), (0, 0, 0), (0xFFFF_FFFF_FFFF_F000, 0x2000, 0), (0x800, 0x1000, 0), (0x1000, 0x800, 0)],
    ids=["flags", "size_0", "wraps", "address_unaligned", "size_unaligned"],
)
def test_every_vm_validates_memory_attributes(vm_type: KvmVmType, address: int, size: int, flags: int) -> None:
    """kvm_vm_ioctl_set_mem_attributes() checks flags, size, wrap-around and alignment on every VM,
    with or without private memory (attributes 0 here, valid everywhere): EINVAL."""
    with pytest.raises(KvmIoctlError) as info:
        make_vm(vm_type).set_memory_attributes(address, size, 0, flags)
    assert info.value.errno == errno.EINVAL


@pytest.mark.parametrize("vm_type", VM_TYPES, ids=[t.name for t in VM_TYPES])
def test_private_attribute_only_where_supported(vm_type: KvmVmType) -> None:
    """kvm_supported_mem_attributes() is PRIVATE for VMs with private memory and 0 otherwise:
    PRIVATE is EINVAL on the others, a valid 0 is accepted everywhere, and
    KVM_CHECK_EXTENSION(KVM_CAP_MEMORY_ATTRIBUTES) reports the same set."""
    vm = make_vm(vm_type)
    vm.set_memory_attributes(0x1000, 0x1000, 0)
    supported = vm.check_extension(KVM_CAP_MEMORY_ATTRIBUTES)
    if vm.has_private_mem:
        assert supported == P
        vm.set_memory_attributes(0x1000, 0x1000, P)
    else:
        assert supported == 0
        with pytest.raises(KvmIoctlError) as info:
            vm.set_memory_attributes(0x1000, 0x1000, P)
        assert info.value.errno == errno.EINVAL


@pytest.mark.parametrize("vendor", list(Vendor), ids=[v.value for v in Vendor])
def test_disable_quirks_v1_drops_unknown_bits_without_an_error(vendor: Vendor) -> None:
    """KVM_CAP_DISABLE_QUIRKS (v1) is advertised (1) and takes any value: the supported bits are
    disabled, the rest dropped, never EINVAL (x86.c kvm_vm_ioctl_enable_cap: "disabled_quirks |=
    cap->args[0] & kvm_caps.supported_quirks")."""
    vm = make_vm(KvmVmType.KVM_X86_DEFAULT_VM, vendor)
    assert vm.check_extension(KVM_CAP_DISABLE_QUIRKS) == 1
    vm.enable_cap(KVM_CAP_DISABLE_QUIRKS, (1 << 64) - 1)
    assert vm.disabled_quirks == vm.check_extension(KVM_CAP_DISABLE_QUIRKS2)


@pytest.mark.parametrize("vm_type", list(KvmVmType))
def test_the_capabilities_the_testbed_models_are_advertised(vm_type: KvmVmType) -> None:
    """KVM_CAP_USER_MEMORY and KVM_CAP_MEMORY_FAULT_INFO are 1 on every VM (kvm_main.c
    kvm_vm_ioctl_check_extension_generic; x86.c kvm_vm_ioctl_check_extension), as the testbed
    has KVM_SET_USER_MEMORY_REGION and KVM_EXIT_MEMORY_FAULT."""
    vendor = Vendor.INTEL if vm_type is KvmVmType.KVM_X86_TDX_VM else Vendor.AMD
    vm = make_vm(vm_type, vendor)
    assert vm.check_extension(KVM_CAP_USER_MEMORY) == 1
    assert vm.check_extension(KVM_CAP_MEMORY_FAULT_INFO) == 1


@pytest.mark.parametrize("vendor", list(Vendor), ids=[v.value for v in Vendor])
def test_disable_quirks2_accepts_any_supported_subset(vendor: Vendor) -> None:
    """KVM_CAP_DISABLE_QUIRKS2 takes any subset of kvm_caps.supported_quirks (what CHECK_EXTENSION
    returns) and EINVAL for anything else (x86.c kvm_vm_ioctl_enable_cap); IGNORE_GUEST_PAT (bit 9)
    is not supported without EPT (AMD)."""
    vm = make_vm(KvmVmType.KVM_X86_DEFAULT_VM, vendor)
    supported = vm.check_extension(KVM_CAP_DISABLE_QUIRKS2)
    assert supported == (KVM_X86_VALID_QUIRKS if vendor is Vendor.INTEL else KVM_X86_VALID_QUIRKS & ~(1 << 9))
    assert supported & (1 << 10)  # KVM_X86_QUIRK_VMCS12_FREEZE_IN_SMM_CC, on both vendors
    for bit in range(11):
        if supported & (1 << bit):
            vm.enable_cap(KVM_CAP_DISABLE_QUIRKS2, 1 << bit)
    assert vm.disabled_quirks == supported
    for bad in (1 << 11, 1 << 63, supported | (1 << 12)):
        with pytest.raises(KvmIoctlError) as info:
            vm.enable_cap(KVM_CAP_DISABLE_QUIRKS2, bad)
        assert info.value.errno == errno.EINVAL
    if vendor is Vendor.AMD:
        with pytest.raises(KvmIoctlError):
            vm.enable_cap(KVM_CAP_DISABLE_QUIRKS2, 1 << 9)
